#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>

#include "common/error.h"
#include "common/yaml_reader.h"
#include "model/config.h"

namespace rlhf {
namespace {

ModelConfig read_model(const std::string& yaml) {
  YamlSection section(yaml_load_string(yaml, "test config"), "model");
  return ModelConfig::read(section);
}

// The message of the rlhf::Error that reading `yaml` throws ("" and a test failure if none).
std::string read_error(const std::string& yaml) {
  try {
    read_model(yaml);
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an rlhf::Error for:\n" << yaml;
  return "";
}

bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof(double)) == 0; }

void expect_equal(const ModelConfig& a, const ModelConfig& b) {
  EXPECT_EQ(a.vocab_size, b.vocab_size);
  EXPECT_EQ(a.tokenizer, b.tokenizer);
  EXPECT_EQ(a.d_model, b.d_model);
  EXPECT_EQ(a.n_layers, b.n_layers);
  EXPECT_EQ(a.n_heads, b.n_heads);
  EXPECT_EQ(a.n_kv_heads, b.n_kv_heads);
  EXPECT_EQ(a.head_dim, b.head_dim);
  EXPECT_EQ(a.max_seq_len, b.max_seq_len);
  EXPECT_TRUE(same_bits(a.rope_theta, b.rope_theta)) << a.rope_theta << " vs " << b.rope_theta;
  EXPECT_TRUE(same_bits(a.norm_eps, b.norm_eps)) << a.norm_eps << " vs " << b.norm_eps;
  EXPECT_TRUE(same_bits(a.init_std, b.init_std)) << a.init_std << " vs " << b.init_std;
  EXPECT_EQ(a.n_dense_layers, b.n_dense_layers);
  EXPECT_EQ(a.d_ff, b.d_ff);
  EXPECT_EQ(a.n_routed_experts, b.n_routed_experts);
  EXPECT_EQ(a.n_shared_experts, b.n_shared_experts);
  EXPECT_EQ(a.top_k, b.top_k);
  EXPECT_EQ(a.d_expert, b.d_expert);
  EXPECT_TRUE(same_bits(a.route_scale, b.route_scale));
  EXPECT_TRUE(same_bits(a.bias_update_rate, b.bias_update_rate));
  EXPECT_TRUE(same_bits(a.seq_balance_loss, b.seq_balance_loss));
  EXPECT_EQ(a.clamp.enabled, b.clamp.enabled);
  EXPECT_TRUE(same_bits(a.clamp.gate_max, b.clamp.gate_max));
  EXPECT_TRUE(same_bits(a.clamp.linear_limit, b.clamp.linear_limit));
}

TEST(ModelConfig, DefaultsValidate) {
  EXPECT_NO_THROW(ModelConfig().validate());
  // An absent or empty section is the defaults.
  expect_equal(read_model(""), ModelConfig());
  expect_equal(read_model("{}"), ModelConfig());
}

TEST(ModelConfig, ReadsEveryKey) {
  const ModelConfig c = read_model(R"(
vocab_size: 262
tokenizer: byte
d_model: 64
n_layers: 3
n_heads: 8
n_kv_heads: 4
head_dim: 16
max_seq_len: 128
rope_theta: 500000
norm_eps: 1.0e-6
init_std: 0.01
n_dense_layers: 0
d_ff: 96
n_routed_experts: 16
n_shared_experts: 2
top_k: 4
d_expert: 48
route_scale: 2.5
bias_update_rate: 0.0
seq_balance_loss: 0.0001
clamp:
  enabled: false
  gate_max: 7
  linear_limit: 6.5
)");
  EXPECT_EQ(c.vocab_size, 262);
  EXPECT_EQ(c.d_model, 64);
  EXPECT_EQ(c.n_layers, 3);
  EXPECT_EQ(c.n_heads, 8);
  EXPECT_EQ(c.n_kv_heads, 4);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.max_seq_len, 128);
  EXPECT_EQ(c.rope_theta, 500000.0);
  EXPECT_EQ(c.norm_eps, 1e-6);
  EXPECT_EQ(c.init_std, 0.01);
  EXPECT_EQ(c.n_dense_layers, 0);
  EXPECT_EQ(c.d_ff, 96);
  EXPECT_EQ(c.n_routed_experts, 16);
  EXPECT_EQ(c.n_shared_experts, 2);
  EXPECT_EQ(c.top_k, 4);
  EXPECT_EQ(c.d_expert, 48);
  EXPECT_EQ(c.route_scale, 2.5);
  EXPECT_EQ(c.bias_update_rate, 0.0);
  EXPECT_EQ(c.seq_balance_loss, 0.0001);
  EXPECT_FALSE(c.clamp.enabled);
  EXPECT_EQ(c.clamp.gate_max, 7.0);
  EXPECT_EQ(c.clamp.linear_limit, 6.5);
}

TEST(ModelConfig, ToYamlRoundTripsBitExactly) {
  ModelConfig c;
  c.vocab_size = 262;
  c.d_model = 96;
  c.n_layers = 5;
  c.n_heads = 6;
  c.n_kv_heads = 3;
  c.head_dim = 16;
  c.max_seq_len = 333;
  // Doubles with no short decimal form: a writer with too few digits changes their bits.
  c.rope_theta = 1.0 / 3.0 * 1e6;
  c.norm_eps = 0.1 + 0.2;
  c.init_std = std::nextafter(0.02, 1.0);
  c.n_dense_layers = 2;
  c.d_ff = 200;
  c.n_routed_experts = 12;
  c.n_shared_experts = 0;
  c.top_k = 12;
  c.d_expert = 40;
  c.route_scale = 2.0 / 7.0;
  c.bias_update_rate = 1e-300;
  c.seq_balance_loss = 3e-5;
  c.clamp.enabled = false;
  c.clamp.gate_max = 9.999999999999998;
  c.clamp.linear_limit = 1e20;

  const std::string yaml = c.to_yaml();
  const ModelConfig back = read_model(yaml);
  expect_equal(back, c);
  EXPECT_EQ(back.to_yaml(), yaml);
  // The defaults round-trip too (vocab_size 0 = "from the tokenizer").
  expect_equal(read_model(ModelConfig().to_yaml()), ModelConfig());
}

struct BadValue {
  const char* yaml;
  const char* expected;  // a substring of the error message; always names the key
};

TEST(ModelConfig, EachBadValueIsAnErrorNamingTheKey) {
  const BadValue cases[] = {
      {"vocab_size: -1", "model.vocab_size: must be zero or positive, got -1"},
      {"tokenizer: sentencepiece",
       "model.tokenizer: unknown tokenizer 'sentencepiece' (known: byte)"},
      {"d_model: 0", "model.d_model: must be positive, got 0"},
      {"n_layers: -2", "model.n_layers: must be positive"},
      {"n_heads: 0", "model.n_heads: must be positive"},
      {"n_kv_heads: 0", "model.n_kv_heads: must be positive"},
      {"n_heads: 3\nn_kv_heads: 2", "model.n_heads: must be a multiple of n_kv_heads (2), got 3"},
      {"head_dim: 0", "model.head_dim: must be positive"},
      {"head_dim: 31", "model.head_dim: must be even"},
      {"n_heads: 65536\nn_kv_heads: 1\nhead_dim: 65536", "model.head_dim: n_heads * head_dim"},
      {"max_seq_len: 0", "model.max_seq_len: must be positive"},
      {"rope_theta: 0", "model.rope_theta: must be a finite number > 0"},
      {"rope_theta: .inf", "model.rope_theta: must be a finite number > 0"},
      {"norm_eps: -1e-5", "model.norm_eps: must be a finite number > 0"},
      {"init_std: .nan", "model.init_std: must be a finite number > 0"},
      {"n_dense_layers: -1", "model.n_dense_layers: must be zero or positive"},
      {"n_layers: 4\nn_dense_layers: 5",
       "model.n_dense_layers: must be at most n_layers (4), got 5"},
      {"d_ff: 0", "model.d_ff: must be positive"},
      {"n_routed_experts: 0", "model.n_routed_experts: must be positive"},
      {"n_shared_experts: -1", "model.n_shared_experts: must be zero or positive"},
      {"top_k: 0", "model.top_k: must be in 1..n_routed_experts (8), got 0"},
      {"n_routed_experts: 4\ntop_k: 5", "model.top_k: must be in 1..n_routed_experts (4), got 5"},
      {"d_expert: 0", "model.d_expert: must be positive"},
      {"route_scale: 0", "model.route_scale: must be a finite number > 0"},
      {"bias_update_rate: -0.001", "model.bias_update_rate: must be a finite number >= 0"},
      {"seq_balance_loss: -1", "model.seq_balance_loss: must be a finite number >= 0"},
      {"clamp:\n  gate_max: 0", "model.clamp.gate_max: must be a finite number > 0"},
      {"clamp:\n  enabled: false\n  linear_limit: -10",
       "model.clamp.linear_limit: must be a finite number > 0"},
  };
  for (const BadValue& bad : cases) {
    const std::string msg = read_error(bad.yaml);
    EXPECT_NE(msg.find(bad.expected), std::string::npos)
        << "yaml: " << bad.yaml << "\nerror: " << msg << "\nexpected: " << bad.expected;
  }
}

TEST(ModelConfig, ValidateChecksAStructBuiltInCode) {
  ModelConfig c;
  c.top_k = c.n_routed_experts + 1;
  EXPECT_THROW(c.validate(), Error);
  c = ModelConfig();
  c.clamp.linear_limit = 0.0;
  EXPECT_THROW(c.validate(), Error);
}

TEST(ModelConfig, UnknownKeysAreErrors) {
  std::string msg = read_error("d_modle: 128");
  EXPECT_NE(msg.find("model.d_modle: unknown key"), std::string::npos) << msg;
  EXPECT_NE(msg.find("d_model"), std::string::npos) << "lists the known keys: " << msg;
  msg = read_error("clamp:\n  gate_maks: 5");
  EXPECT_NE(msg.find("model.clamp.gate_maks: unknown key"), std::string::npos) << msg;
}

TEST(ModelConfig, WrongTypesAreErrors) {
  const BadValue cases[] = {
      {"d_model: abc", "model.d_model: expected an integer, got 'abc'"},
      {"d_model: 1.5", "model.d_model: expected an integer, got '1.5'"},
      {"rope_theta: fast", "model.rope_theta: expected a number, got 'fast'"},
      {"rope_theta: [1, 2]", "model.rope_theta: expected a number, got a list"},
      {"clamp:\n  enabled: maybe", "model.clamp.enabled: expected true or false, got 'maybe'"},
      {"clamp: 5", "model.clamp: expected a mapping"},
      {"tokenizer: {name: byte}", "model.tokenizer: expected a string, got a mapping"},
  };
  for (const BadValue& bad : cases) {
    const std::string msg = read_error(bad.yaml);
    EXPECT_NE(msg.find(bad.expected), std::string::npos)
        << "yaml: " << bad.yaml << "\nerror: " << msg << "\nexpected: " << bad.expected;
  }
}

}  // namespace
}  // namespace rlhf
