#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/rng.h"
#include "model/config.h"
#include "model/param_layout.h"
#include "model/safetensors.h"

namespace rlhf {
namespace {

namespace fs = std::filesystem;

template <typename F>
std::string error_message(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an rlhf::Error";
  return "";
}

#define EXPECT_CONTAINS(text, part) \
  EXPECT_NE(std::string(text).find(part), std::string::npos) << "message: " << (text)

std::vector<float> random_floats(Rng& rng, size_t n) {
  std::vector<float> v(n);
  // Random bit patterns cover every exponent, subnormals, infinities and NaN payloads: the
  // round trip must preserve bits, not just values.
  for (float& x : v) {
    const uint32_t bits = static_cast<uint32_t>(rng.next_u64());
    std::memcpy(&x, &bits, sizeof(x));
  }
  return v;
}

bool same_bits(const float* a, const float* b, size_t n) {
  return n == 0 || std::memcmp(a, b, n * sizeof(float)) == 0;  // memcmp forbids null even for 0
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

// A hand-made file: 8-byte length, the given header text, then `data_bytes` bytes of data.
void write_raw(const std::string& path, const std::string& header, size_t data_bytes,
               uint64_t header_len_override = 0) {
  const uint64_t len = header_len_override ? header_len_override : header.size();
  std::string bytes(8, '\0');
  std::memcpy(bytes.data(), &len, 8);
  bytes += header;
  bytes.append(data_bytes, '\x01');
  write_bytes(path, bytes);
}

class Safetensors : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::path(::testing::TempDir()) /
           (std::string("rlhf_safetensors_") + info->name() + "_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string file(const std::string& name) const { return (dir_ / name).string(); }

  fs::path dir_;
};

TEST_F(Safetensors, RoundTripIsBitExactWithMetadata) {
  Rng rng(42);
  const std::vector<std::vector<int64_t>> shapes = {{3, 5}, {7}, {}, {2, 0, 3}, {2, 3, 4}};
  const std::vector<std::string> names = {"a.weight", "bias", "scalar", "empty", "cube"};
  std::vector<std::vector<float>> data;
  std::vector<SafetensorsTensorRef> refs;
  for (size_t i = 0; i < shapes.size(); ++i) {
    int64_t n = 1;
    for (int64_t d : shapes[i]) n *= d;
    data.push_back(random_floats(rng, static_cast<size_t>(n)));
  }
  data[1][0] = -0.0f;
  data[1][1] = std::numeric_limits<float>::quiet_NaN();
  data[1][2] = std::numeric_limits<float>::denorm_min();
  for (size_t i = 0; i < shapes.size(); ++i) {
    refs.push_back({names[i], shapes[i], data[i].empty() ? nullptr : data[i].data()});
  }
  const std::map<std::string, std::string> metadata = {
      {"config", "d_model: 128\nn_layers: 4\n"}, {"step", "1200"}, {"note", "\xc3\xa9t\xc3\xa9"}};
  const std::string path = file("model.safetensors");
  safetensors_write(path, refs, metadata);

  // The data section starts 8-byte aligned.
  const std::string bytes = read_bytes(path);
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8);
  EXPECT_EQ((8 + header_len) % 8, 0u);
  EXPECT_EQ(bytes[8], '{');

  const SafetensorsReader reader(path);
  EXPECT_EQ(reader.metadata(), metadata);
  std::vector<std::string> sorted = names;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(reader.names(), sorted);
  for (size_t i = 0; i < shapes.size(); ++i) {
    EXPECT_TRUE(reader.has(names[i]));
    EXPECT_EQ(reader.shape(names[i]), shapes[i]);
    std::vector<float> back(data[i].size() + 1, 7.0f);  // one guard element past the end
    reader.read(names[i], shapes[i], back.data());
    EXPECT_TRUE(same_bits(back.data(), data[i].data(), data[i].size())) << names[i];
    EXPECT_EQ(back.back(), 7.0f) << "wrote past the end of " << names[i];
  }
  EXPECT_FALSE(reader.has("nope"));
}

TEST_F(Safetensors, DataSectionIsEightByteAligned) {
  // Names of 1..8 characters move the JSON length through every residue mod 8.
  const std::vector<float> x = {1.5f, -2.0f};
  const std::string path = file("aligned.safetensors");
  for (size_t len = 1; len <= 8; ++len) {
    const std::string name(len, 'n');
    safetensors_write(path, {{name, {2}, x.data()}}, {});
    const std::string bytes = read_bytes(path);
    uint64_t header_len = 0;
    std::memcpy(&header_len, bytes.data(), 8);
    EXPECT_EQ((8 + header_len) % 8, 0u) << "name length " << len;
    EXPECT_EQ(bytes.size(), 8 + header_len + 8);
    std::vector<float> back(2);
    SafetensorsReader(path).read(name, {2}, back.data());
    EXPECT_EQ(back, x);
  }
}

TEST_F(Safetensors, WriteIsAtomicAndLeavesNoTempFile) {
  const std::string path = file("ckpt.safetensors");
  std::vector<float> first = {1, 2, 3}, second = {4, 5, 6, 7};
  safetensors_write(path, {{"w", {3}, first.data()}}, {{"version", "1"}});
  safetensors_write(path, {{"w", {4}, second.data()}}, {{"version", "2"}});  // replaces it
  std::vector<std::string> entries;
  for (const auto& e : fs::directory_iterator(dir_)) entries.push_back(e.path().filename());
  EXPECT_EQ(entries, std::vector<std::string>{"ckpt.safetensors"});
  const SafetensorsReader reader(path);
  EXPECT_EQ(reader.metadata().at("version"), "2");
  std::vector<float> back(4);
  reader.read("w", {4}, back.data());
  EXPECT_EQ(back, second);
}

TEST_F(Safetensors, FailedWriteLeavesNothingBehind) {
  std::vector<float> x = {1, 2};
  // Duplicate names are refused before anything is written.
  std::string msg = error_message([&] {
    safetensors_write(file("dup.safetensors"), {{"w", {2}, x.data()}, {"w", {2}, x.data()}}, {});
  });
  EXPECT_CONTAINS(msg, "tensor 'w' appears twice");
  msg = error_message([&] {
    safetensors_write(file("bad.safetensors"), {{"__metadata__", {2}, x.data()}}, {});
  });
  EXPECT_CONTAINS(msg, "invalid tensor name");
  // A directory that does not exist: the temp file cannot even be created.
  msg = error_message([&] {
    safetensors_write(file("no/such/dir/x.safetensors"), {{"w", {2}, x.data()}}, {});
  });
  EXPECT_CONTAINS(msg, "x.safetensors.tmp");
  EXPECT_TRUE(fs::is_empty(dir_));
}

TEST_F(Safetensors, EveryTruncationIsRejectedWithAClearError) {
  Rng rng(3);
  std::vector<float> a = random_floats(rng, 6), b = random_floats(rng, 4);
  const std::string path = file("full.safetensors");
  safetensors_write(path, {{"embed", {2, 3}, a.data()}, {"lm_head", {4}, b.data()}}, {{"k", "v"}});
  const std::string bytes = read_bytes(path);
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8);
  const size_t data_size = bytes.size() - 8 - header_len;
  ASSERT_EQ(data_size, 40u);

  // Every proper prefix of the file, from empty to one byte short, must be refused when opened.
  const std::string cut_path = file("cut.safetensors");
  for (size_t cut = 0; cut < bytes.size(); ++cut) {
    write_bytes(cut_path, bytes.substr(0, cut));
    const std::string msg = error_message([&] { SafetensorsReader reader(cut_path); });
    EXPECT_CONTAINS(msg, cut_path);
    if (cut < 8) {
      EXPECT_CONTAINS(msg, "fewer than the 8-byte header length");
    } else if (cut < 8 + header_len) {
      EXPECT_CONTAINS(msg, "is truncated or not a safetensors file: the header length is");
    } else {
      // "embed" holds data bytes [0,24), "lm_head" [24,40): the first one cut off is named.
      const size_t have = cut - 8 - header_len;
      const std::string needs =
          have < 24 ? "tensor 'embed' needs bytes [0,24)" : "tensor 'lm_head' needs bytes [24,40)";
      EXPECT_CONTAINS(msg, "is truncated: " + needs);
      EXPECT_CONTAINS(msg, "but the data section has " + std::to_string(have) + " bytes");
    }
  }
  EXPECT_NO_THROW(SafetensorsReader reader(path));
}

TEST_F(Safetensors, MissingFileAndNonFileAreErrors) {
  std::string msg = error_message([&] { SafetensorsReader reader(file("absent.safetensors")); });
  EXPECT_CONTAINS(msg, "absent.safetensors' does not exist");
  msg = error_message([&] { SafetensorsReader reader(dir_.string()); });
  EXPECT_CONTAINS(msg, "is not a regular file");
}

TEST_F(Safetensors, HeaderLengthBeyondTheFileIsAnError) {
  const std::string path = file("long.safetensors");
  write_raw(path, "{}", 0, /*header_len_override=*/1000);
  EXPECT_CONTAINS(error_message([&] { SafetensorsReader reader(path); }),
                  "the header length is 1000 bytes but only 2 bytes follow it");
  // A length near 2^64 must not wrap around in the size check.
  write_raw(path, "{}", 0, std::numeric_limits<uint64_t>::max() - 3);
  EXPECT_CONTAINS(error_message([&] { SafetensorsReader reader(path); }), "the header length is");
}

TEST_F(Safetensors, CorruptHeadersAreErrors) {
  struct Case {
    std::string header;
    size_t data_bytes;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {"{\"w\": {\"dtype\": \"F32\", ", 0, "header is not valid JSON"},
      {"[1, 2, 3]", 0, "header is not a JSON object"},
      {R"({"w": 5})", 0, "tensor 'w' is not a JSON object"},
      {R"({"w": {"shape": [1], "data_offsets": [0, 4]}})", 4, "tensor 'w' has no 'dtype'"},
      {R"({"w": {"dtype": "F32", "data_offsets": [0, 4]}})", 4, "tensor 'w' has no 'shape'"},
      {R"({"w": {"dtype": "F32", "shape": [1]}})", 4, "tensor 'w' has no 'data_offsets'"},
      {R"({"w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}})", 4,
       "tensor 'w' has dtype BF16; only F32 and U8 are supported"},
      {R"({"w": {"dtype": 3, "shape": [2], "data_offsets": [0, 8]}})", 8, "non-string dtype"},
      {R"({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})", 8,
       "invalid shape [-2]"},
      {R"({"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}})", 8, "not a list"},
      {R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 8]}})", 8,
       "whose size overflows"},
      {R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}})", 12,
       "tensor 'w' has data_offsets [0,12) but shape [2] of F32 needs 8 bytes"},
      {R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}})", 8, "data_offsets [8,0)"},
      {R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}})", 8,
       "non-negative integers"},
      {R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}})", 8, "expected [begin, end]"},
      // Offsets past the end of the data section.
      {R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}})", 8,
       "is truncated: tensor 'w' needs bytes [16,24) but the data section has 8 bytes"},
      {R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
       12, "tensors 'a' [0,8) and 'b' [4,12) overlap"},
      {R"({"__metadata__": {"step": 5}})", 0, "metadata 'step' is not a string"},
      {R"({"__metadata__": [1]})", 0, "__metadata__ is not a JSON object"},
      // The same tensor listed twice: a JSON parser keeps one entry, so the other would vanish.
      {R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})",
       8, "header lists 'w' twice"},
  };
  const std::string path = file("corrupt.safetensors");
  for (const Case& c : cases) {
    write_raw(path, c.header, c.data_bytes);
    const std::string msg = error_message([&] { SafetensorsReader reader(path); });
    EXPECT_CONTAINS(msg, c.expected);
    EXPECT_CONTAINS(msg, path);
  }
}

TEST_F(Safetensors, ReadChecksNameAndShape) {
  std::vector<float> w(64 * 128, 1.0f);
  const std::string path = file("shape.safetensors");
  safetensors_write(path, {{"layers.0.wq", {64, 128}, w.data()}}, {});
  const SafetensorsReader reader(path);
  std::vector<float> dst(128 * 128, 0.0f);
  EXPECT_CONTAINS(error_message([&] {
                    reader.read("layers.0.wq", {128, 128}, dst.data());
                  }),
                  "tensor 'layers.0.wq' has shape [64,128] but the model config needs [128,128]");
  EXPECT_CONTAINS(error_message([&] { reader.read("lm_head", {1}, dst.data()); }),
                  "has no tensor 'lm_head'");
  EXPECT_CONTAINS(error_message([&] { reader.shape("lm_head"); }), "has no tensor 'lm_head'");
  EXPECT_EQ(dst[0], 0.0f) << "a refused read must not write";
}

// A small config whose layout has dense and MoE layers, shared experts and router buffers.
ModelConfig small_config() {
  ModelConfig c;
  c.vocab_size = 262;
  c.d_model = 16;
  c.n_layers = 2;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.head_dim = 8;
  c.d_ff = 24;
  c.n_routed_experts = 4;
  c.top_k = 2;
  c.d_expert = 8;
  return c;
}

TEST_F(Safetensors, LayoutRoundTrip) {
  const ModelConfig config = small_config();
  const ParamLayout params = ParamLayout::parameters(config);
  const ParamLayout buffers = ParamLayout::buffers(config);
  Rng rng(11);
  const std::vector<float> weights = random_floats(rng, static_cast<size_t>(params.total()));
  const std::vector<float> bias = random_floats(rng, static_cast<size_t>(buffers.total()));
  std::vector<SafetensorsTensorRef> refs;
  safetensors_add_layout(refs, params, weights.data(), "params.");
  safetensors_add_layout(refs, buffers, bias.data(), "buffers.");
  ASSERT_EQ(refs.size(), params.tensors().size() + buffers.tensors().size());
  const std::string path = file("layout.safetensors");
  safetensors_write(path, refs, {{"config", config.to_yaml()}});

  const SafetensorsReader reader(path);
  std::vector<float> weights_back(weights.size()), bias_back(bias.size());
  safetensors_read_layout(reader, params, weights_back.data(), "params.");
  safetensors_read_layout(reader, buffers, bias_back.data(), "buffers.");
  EXPECT_TRUE(same_bits(weights_back.data(), weights.data(), weights.size()));
  EXPECT_TRUE(same_bits(bias_back.data(), bias.data(), bias.size()));
  EXPECT_TRUE(reader.has("params.layers.1.experts.w_gate"));
  EXPECT_EQ(reader.metadata().at("config"), config.to_yaml());
}

TEST_F(Safetensors, LayoutMismatchesAreErrorsAndTouchNothing) {
  const ModelConfig config = small_config();
  const ParamLayout params = ParamLayout::parameters(config);
  std::vector<float> weights(static_cast<size_t>(params.total()), 0.5f);
  std::vector<SafetensorsTensorRef> refs;
  safetensors_add_layout(refs, params, weights.data(), "params.");
  const std::string path = file("layout.safetensors");
  safetensors_write(path, refs, {});
  const SafetensorsReader reader(path);

  // A deeper model: its layer 2 is missing from the file.
  ModelConfig deeper = config;
  deeper.n_layers = 3;
  const ParamLayout deeper_params = ParamLayout::parameters(deeper);
  std::vector<float> dst(static_cast<size_t>(deeper_params.total()), -1.0f);
  EXPECT_CONTAINS(
      error_message([&] { safetensors_read_layout(reader, deeper_params, dst.data(), "params."); }),
      "has no tensor 'params.layers.2.attn_norm'");
  // A shallower model: the file has a layer it does not know.
  ModelConfig shallower = config;
  shallower.n_layers = 1;
  const ParamLayout shallow_params = ParamLayout::parameters(shallower);
  EXPECT_CONTAINS(error_message([&] {
                    safetensors_read_layout(reader, shallow_params, dst.data(), "params.");
                  }),
                  "has tensor 'params.layers.1.");
  // A wider model: same names, other shapes.
  ModelConfig wider = config;
  wider.d_model = 32;
  const ParamLayout wide_params = ParamLayout::parameters(wider);
  dst.assign(static_cast<size_t>(wide_params.total()), -1.0f);
  EXPECT_CONTAINS(
      error_message([&] { safetensors_read_layout(reader, wide_params, dst.data(), "params."); }),
      "tensor 'params.embed' has shape [262,16] but the model config needs [262,32]");
  // The wrong prefix: nothing is found.
  EXPECT_CONTAINS(
      error_message([&] { safetensors_read_layout(reader, params, dst.data(), "model."); }),
      "has no tensor 'model.embed'");
  // All checks happen before the first copy.
  for (float x : dst) ASSERT_EQ(x, -1.0f);
}

}  // namespace
}  // namespace rlhf
