#include "model/config.h"

#include <cmath>
#include <cstdint>
#include <limits>

#include <fmt/core.h>
#include <fmt/ranges.h>
#include <yaml-cpp/yaml.h>

#include "common/error.h"
#include "common/yaml_reader.h"
#include "model/tokenizer.h"

namespace rlhf {

namespace {

// validate() has no YamlSection to take the path from; the model always lives under `model:`.
constexpr const char* kPrefix = "model.";

void require_positive(const char* key, int value) {
  if (value <= 0) fail("{}{}: must be positive, got {}", kPrefix, key, value);
}

void require_non_negative(const char* key, int value) {
  if (value < 0) fail("{}{}: must be zero or positive, got {}", kPrefix, key, value);
}

void require_positive(const char* key, double value) {
  if (!std::isfinite(value) || value <= 0.0) {
    fail("{}{}: must be a finite number > 0, got {}", kPrefix, key, value);
  }
}

void require_non_negative(const char* key, double value) {
  if (!std::isfinite(value) || value < 0.0) {
    fail("{}{}: must be a finite number >= 0, got {}", kPrefix, key, value);
  }
}

// fmt's "{}" prints the shortest decimal that parses back to the same double, so a config
// written into a checkpoint reproduces every bit of the one that trained it.
std::string yaml_double(double value) { return fmt::format("{}", value); }

// Strings go through the emitter so that a name with YAML-significant characters is quoted.
std::string yaml_string(const std::string& value) {
  YAML::Emitter emitter;
  emitter << value;
  return emitter.c_str();
}

}  // namespace

ModelConfig ModelConfig::read(YamlSection& section) {
  ModelConfig c;  // defaults: every key is optional
  c.vocab_size = section.get<int>("vocab_size", c.vocab_size);
  c.tokenizer = section.get<std::string>("tokenizer", c.tokenizer);
  c.d_model = section.get<int>("d_model", c.d_model);
  c.n_layers = section.get<int>("n_layers", c.n_layers);
  c.n_heads = section.get<int>("n_heads", c.n_heads);
  c.n_kv_heads = section.get<int>("n_kv_heads", c.n_kv_heads);
  c.head_dim = section.get<int>("head_dim", c.head_dim);
  c.max_seq_len = section.get<int>("max_seq_len", c.max_seq_len);
  c.rope_theta = section.get<double>("rope_theta", c.rope_theta);
  c.norm_eps = section.get<double>("norm_eps", c.norm_eps);
  c.init_std = section.get<double>("init_std", c.init_std);
  c.n_dense_layers = section.get<int>("n_dense_layers", c.n_dense_layers);
  c.d_ff = section.get<int>("d_ff", c.d_ff);
  c.n_routed_experts = section.get<int>("n_routed_experts", c.n_routed_experts);
  c.n_shared_experts = section.get<int>("n_shared_experts", c.n_shared_experts);
  c.top_k = section.get<int>("top_k", c.top_k);
  c.d_expert = section.get<int>("d_expert", c.d_expert);
  c.route_scale = section.get<double>("route_scale", c.route_scale);
  c.bias_update_rate = section.get<double>("bias_update_rate", c.bias_update_rate);
  c.seq_balance_loss = section.get<double>("seq_balance_loss", c.seq_balance_loss);

  YamlSection clamp = section.section("clamp");
  c.clamp.enabled = clamp.get<bool>("enabled", c.clamp.enabled);
  c.clamp.gate_max = clamp.get<double>("gate_max", c.clamp.gate_max);
  c.clamp.linear_limit = clamp.get<double>("linear_limit", c.clamp.linear_limit);
  clamp.finish();

  section.finish();
  c.validate();
  return c;
}

void ModelConfig::validate() const {
  // 0 means "not known yet": the caller fills it in from the tokenizer (model/tokenizer.h).
  require_non_negative("vocab_size", vocab_size);
  bool known_tokenizer = false;
  for (const std::string& name : tokenizer_names()) known_tokenizer |= (name == tokenizer);
  if (!known_tokenizer) {
    fail("{}tokenizer: unknown tokenizer '{}' (known: {})", kPrefix, tokenizer,
         fmt::join(tokenizer_names(), ", "));
  }

  require_positive("d_model", d_model);
  require_positive("n_layers", n_layers);
  require_positive("n_heads", n_heads);
  require_positive("n_kv_heads", n_kv_heads);
  if (n_heads % n_kv_heads != 0) {
    fail("{}n_heads: must be a multiple of n_kv_heads ({}), got {}", kPrefix, n_kv_heads, n_heads);
  }
  require_positive("head_dim", head_dim);
  // RoPE rotates pairs of dimensions, so a head must have an even number of them.
  if (head_dim % 2 != 0) {
    fail("{}head_dim: must be even (RoPE rotates pairs of dimensions), got {}", kPrefix, head_dim);
  }
  // q_dim() and kv_dim() are int products; reject sizes whose product would overflow.
  if (static_cast<int64_t>(n_heads) * head_dim > std::numeric_limits<int32_t>::max()) {
    fail("{}head_dim: n_heads * head_dim = {} is too large", kPrefix,
         static_cast<int64_t>(n_heads) * head_dim);
  }
  require_positive("max_seq_len", max_seq_len);
  require_positive("rope_theta", rope_theta);
  require_positive("norm_eps", norm_eps);
  require_positive("init_std", init_std);

  // Every FFN field is checked even when no layer uses it (e.g. d_ff with n_dense_layers = 0):
  // a value that is only valid while unused turns into a surprise the day it is used.
  require_non_negative("n_dense_layers", n_dense_layers);
  if (n_dense_layers > n_layers) {
    fail("{}n_dense_layers: must be at most n_layers ({}), got {}", kPrefix, n_layers,
         n_dense_layers);
  }
  require_positive("d_ff", d_ff);
  require_positive("n_routed_experts", n_routed_experts);
  require_non_negative("n_shared_experts", n_shared_experts);
  if (top_k < 1 || top_k > n_routed_experts) {
    fail("{}top_k: must be in 1..n_routed_experts ({}), got {}", kPrefix, n_routed_experts, top_k);
  }
  require_positive("d_expert", d_expert);
  require_positive("route_scale", route_scale);
  require_non_negative("bias_update_rate", bias_update_rate);
  require_non_negative("seq_balance_loss", seq_balance_loss);

  // Limits are checked even when clamping is off, so switching it on never fails later.
  require_positive("clamp.gate_max", clamp.gate_max);
  require_positive("clamp.linear_limit", clamp.linear_limit);
}

std::string ModelConfig::to_yaml() const {
  std::string out;
  auto line = [&out](const char* key, const std::string& value) {
    out += fmt::format("{}: {}\n", key, value);
  };
  line("vocab_size", std::to_string(vocab_size));
  line("tokenizer", yaml_string(tokenizer));
  line("d_model", std::to_string(d_model));
  line("n_layers", std::to_string(n_layers));
  line("n_heads", std::to_string(n_heads));
  line("n_kv_heads", std::to_string(n_kv_heads));
  line("head_dim", std::to_string(head_dim));
  line("max_seq_len", std::to_string(max_seq_len));
  line("rope_theta", yaml_double(rope_theta));
  line("norm_eps", yaml_double(norm_eps));
  line("init_std", yaml_double(init_std));
  line("n_dense_layers", std::to_string(n_dense_layers));
  line("d_ff", std::to_string(d_ff));
  line("n_routed_experts", std::to_string(n_routed_experts));
  line("n_shared_experts", std::to_string(n_shared_experts));
  line("top_k", std::to_string(top_k));
  line("d_expert", std::to_string(d_expert));
  line("route_scale", yaml_double(route_scale));
  line("bias_update_rate", yaml_double(bias_update_rate));
  line("seq_balance_loss", yaml_double(seq_balance_loss));
  out += "clamp:\n";
  out += fmt::format("  enabled: {}\n", clamp.enabled ? "true" : "false");
  out += fmt::format("  gate_max: {}\n", yaml_double(clamp.gate_max));
  out += fmt::format("  linear_limit: {}\n", yaml_double(clamp.linear_limit));
  return out;
}

}  // namespace rlhf
