#pragma once
// Small helpers shared by the test files.
#include <functional>
#include <string>

#include "common/error.h"
#include "model/config.h"
#include "model/tokenizer.h"

namespace rlhf {

// The message of the rlhf::Error that `fn` throws; "" when it throws none.
inline std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// The small MoE model of the generation and RL tests (CPU and GPU): byte vocabulary, d_model 32,
// 3 layers (one dense, then two MoE layers of 4 routed experts, top 2, one shared expert),
// GQA 4:2 of head_dim 8. init_std 0.3 instead of the default 0.02 spreads the logits (std
// ~1.7), so greedy choices are not near-ties, yet temperature-1 sampling still varies.
inline ModelConfig small_moe_config() {
  ModelConfig c;
  c.vocab_size = ByteTokenizer::kVocabSize;
  c.d_model = 32;
  c.n_layers = 3;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 8;
  c.max_seq_len = 32;
  c.n_dense_layers = 1;
  c.d_ff = 64;
  c.n_routed_experts = 4;
  c.n_shared_experts = 1;
  c.top_k = 2;
  c.d_expert = 16;
  c.init_std = 0.3;
  return c;
}

// The actor tests' policy (CPU and GPU): 2 MoE layers of 4 experts whose sizes are whole MXFP4
// blocks of 32 along d_model and d_expert, so the actor can serve it packed; init_std 0.3 for
// logits that spread, so temperature-1 samples vary with the seed and different random weights
// give visibly different rollouts.
inline ModelConfig actor_policy_config() {
  ModelConfig config;
  config.vocab_size = ByteTokenizer::kVocabSize;
  config.d_model = 32;
  config.n_layers = 2;
  config.n_heads = 2;
  config.n_kv_heads = 1;
  config.head_dim = 16;
  config.max_seq_len = 64;
  config.d_ff = 64;
  config.n_routed_experts = 4;
  config.d_expert = 32;
  config.init_std = 0.3;
  return config;
}

}  // namespace rlhf
