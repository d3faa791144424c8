#pragma once
// The model's architecture, as read from the `model:` section of a YAML config.
// Every key is documented in docs/config.md; `validate()` names the first bad value.
#include <cstdint>
#include <string>

#include "kernels/swiglu_clamp.h"

namespace rlhf {

class YamlSection;

struct ModelConfig {
  int vocab_size = 0;  // taken from the tokenizer; a config may state it only to double-check
  std::string tokenizer = "byte";
  int d_model = 128;
  int n_layers = 4;
  int n_heads = 4;
  int n_kv_heads = 2;  // grouped-query attention: n_heads must be a multiple of n_kv_heads
  int head_dim = 32;
  int max_seq_len = 64;
  double rope_theta = 10000.0;
  double norm_eps = 1e-5;
  double init_std = 0.02;

  // FFN: the first n_dense_layers layers use a dense SwiGLU of width d_ff; the rest are MoE.
  int n_dense_layers = 1;
  int d_ff = 256;
  int n_routed_experts = 8;
  int n_shared_experts = 1;
  int top_k = 2;
  int d_expert = 128;  // hidden width of one expert (routed and shared alike)
  double route_scale = 1.0;         // multiplies the normalized gates of the chosen experts
  double bias_update_rate = 1e-3;   // auxiliary-loss-free balancing: bias step per update
  double seq_balance_loss = 0.0;    // coefficient of the optional sequence-level balance loss
  SwigluClampConfig clamp;

  int n_moe_layers() const { return n_layers - n_dense_layers; }
  bool is_moe_layer(int layer) const { return layer >= n_dense_layers; }
  int q_dim() const { return n_heads * head_dim; }
  int kv_dim() const { return n_kv_heads * head_dim; }

  // Throws rlhf::Error naming the first invalid value.
  void validate() const;
  // Reads the `model:` section strictly (unknown keys are errors). vocab_size is filled in
  // from the tokenizer afterwards by the caller (see model/tokenizer.h).
  static ModelConfig read(YamlSection& section);
  // YAML text that `read` accepts and that reproduces this config exactly (used in checkpoints).
  std::string to_yaml() const;
};

}  // namespace rlhf
