// Policy weights as bytes and chunks (actor/weight_transfer.h): chunking and reassembly with
// their checks (header, size, CRC-32C, limit), and serialize/load round trips of a small random
// MoE model, float and packed FP4, compared on logits.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "actor/weight_transfer.h"
#include "common/crc32c.h"
#include "common/error.h"
#include "common/rng.h"
#include "kernels/cpu/cpu_ops.h"
#include "model/checkpoint.h"
#include "model/tokenizer.h"
#include "model/transformer.h"
#include "tests/test_support.h"

namespace rlhf {
namespace {

namespace fs = std::filesystem;

std::string random_bytes(size_t n, uint64_t seed) {
  Rng rng(seed);
  std::string bytes(n, '\0');
  for (char& c : bytes) c = char(rng.uniform_int(0, 255));
  return bytes;
}

WeightPayload payload_of(std::string bytes, uint64_t version = 7) {
  WeightPayload payload;
  payload.version = version;
  payload.bytes = std::move(bytes);
  return payload;
}

WeightPayload assemble(const std::vector<v1::WeightChunk>& chunks,
                       uint64_t max_bytes = 1ull << 30) {
  WeightAssembler assembler(max_bytes);
  for (const v1::WeightChunk& chunk : chunks) assembler.add(chunk);
  return assembler.finish();
}

// EXPECT_THROW that also checks the message names what went wrong.
template <typename F>
void expect_error_containing(F&& f, const std::vector<std::string>& parts) {
  try {
    f();
    ADD_FAILURE() << "no rlhf::Error thrown";
  } catch (const Error& e) {
    for (const std::string& part : parts) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos)
          << "'" << e.what() << "' should mention '" << part << "'";
    }
  }
}

TEST(WeightChunks, RoundTripInChunksWithTheHeaderInTheFirst) {
  const WeightPayload payload = payload_of(random_bytes(2500, 1), 42);
  const std::vector<v1::WeightChunk> chunks = make_weight_chunks(payload, 1000);
  ASSERT_EQ(chunks.size(), 3u);
  EXPECT_EQ(weight_chunk_count(payload, 1000), 3u);
  EXPECT_EQ(chunks[0].version(), 42u);
  EXPECT_EQ(chunks[0].total_bytes(), 2500u);
  EXPECT_EQ(chunks[0].format(), kCheckpointFormat);
  EXPECT_EQ(chunks[0].crc32c(), crc32c(std::as_bytes(std::span<const char>(payload.bytes))));
  EXPECT_EQ(chunks[0].data().size(), 1000u);
  EXPECT_EQ(chunks[1].data().size(), 1000u);
  EXPECT_EQ(chunks[2].data().size(), 500u);
  for (size_t i = 1; i < chunks.size(); ++i) {
    EXPECT_TRUE(chunks[i].format().empty()) << "chunk " << i << " repeats the header";
    EXPECT_EQ(chunks[i].total_bytes(), 0u);
  }
  const WeightPayload back = assemble(chunks);
  EXPECT_EQ(back.version, 42u);
  EXPECT_EQ(back.format, kCheckpointFormat);
  EXPECT_EQ(back.bytes, payload.bytes);

  // A size that is an exact multiple of the chunk size makes no empty trailing chunk.
  EXPECT_EQ(make_weight_chunks(payload_of(random_bytes(2000, 2)), 1000).size(), 2u);
  // The default chunk is 1 MiB, the most weights.proto allows.
  EXPECT_EQ(make_weight_chunks(payload_of(random_bytes((1 << 20) + 1, 3))).size(), 2u);
}

TEST(WeightChunks, AnEmptyPayloadIsOneHeaderChunk) {
  const WeightPayload payload = payload_of("", 3);
  const std::vector<v1::WeightChunk> chunks = make_weight_chunks(payload, 1000);
  ASSERT_EQ(chunks.size(), 1u);
  EXPECT_EQ(chunks[0].total_bytes(), 0u);
  EXPECT_TRUE(chunks[0].data().empty());
  const WeightPayload back = assemble(chunks);
  EXPECT_EQ(back.version, 3u);
  EXPECT_TRUE(back.bytes.empty());
}

TEST(WeightAssembler, ACorruptedChunkFailsTheCrcCheckNamingBothValues) {
  const WeightPayload payload = payload_of(random_bytes(3000, 4));
  std::vector<v1::WeightChunk> chunks = make_weight_chunks(payload, 1000);
  (*chunks[1].mutable_data())[17] ^= 0x01;  // one bit
  WeightAssembler assembler;
  for (const v1::WeightChunk& chunk : chunks) assembler.add(chunk);
  std::string corrupted = payload.bytes;
  corrupted[1017] ^= 0x01;
  const uint32_t got = crc32c(std::as_bytes(std::span<const char>(corrupted)));
  expect_error_containing([&] { assembler.finish(); },
                          {"CRC-32C mismatch", fmt::format("{:#010x}", got),
                           fmt::format("{:#010x}", chunks[0].crc32c())});

  // A header that states the wrong checksum fails the same way.
  std::vector<v1::WeightChunk> wrong_header = make_weight_chunks(payload, 1000);
  wrong_header[0].set_crc32c(wrong_header[0].crc32c() + 1);
  expect_error_containing([&] { assemble(wrong_header); }, {"CRC-32C mismatch"});
}

TEST(WeightAssembler, AMissingChunkFailsTheSizeCheckNamingBothValues) {
  std::vector<v1::WeightChunk> chunks = make_weight_chunks(payload_of(random_bytes(3000, 5)), 1000);
  chunks.pop_back();
  expect_error_containing([&] { assemble(chunks); }, {"size mismatch", "2000", "3000"});
}

TEST(WeightAssembler, AFirstChunkWithoutHeaderIsRefused) {
  std::vector<v1::WeightChunk> chunks = make_weight_chunks(payload_of(random_bytes(3000, 6)), 1000);
  WeightAssembler assembler;
  expect_error_containing([&] { assembler.add(chunks[1]); }, {"no header"});

  v1::WeightChunk other_format = chunks[0];
  other_format.set_format("pickle");
  WeightAssembler assembler2;
  expect_error_containing([&] { assembler2.add(other_format); }, {"pickle", kCheckpointFormat});

  WeightAssembler nothing;
  expect_error_containing([&] { nothing.finish(); }, {"no chunk"});
}

TEST(WeightAssembler, DataPastTotalBytesIsRefused) {
  const WeightPayload payload = payload_of(random_bytes(2500, 7));
  std::vector<v1::WeightChunk> chunks = make_weight_chunks(payload, 1000);
  WeightAssembler assembler;
  for (const v1::WeightChunk& chunk : chunks) assembler.add(chunk);
  expect_error_containing([&] { assembler.add(chunks[1]); }, {"past total_bytes", "2500"});
}

TEST(WeightAssembler, APayloadOverTheLimitIsRefusedAtTheHeader) {
  const std::vector<v1::WeightChunk> chunks =
      make_weight_chunks(payload_of(random_bytes(2500, 8)), 1000);
  WeightAssembler assembler(2499);
  expect_error_containing([&] { assembler.add(chunks[0]); }, {"2500", "2499", "limit"});
  EXPECT_FALSE(assembler.has_header());
  // Exactly at the limit is fine.
  EXPECT_EQ(assemble(chunks, 2500).bytes.size(), 2500u);

  // The default limit is 1 GiB; the header alone announces the size.
  v1::WeightChunk huge = chunks[0];
  huge.set_total_bytes((1ull << 30) + 1);
  WeightAssembler default_limit;
  expect_error_containing([&] { default_limit.add(huge); }, {"exceeds the limit"});
}

// ---- serialize_policy / load_policy

// The generation tests' small MoE model, with experts of whole FP4 blocks.
ModelConfig small_config() {
  ModelConfig c = small_moe_config();
  c.max_seq_len = 24;
  c.d_expert = 32;   // FP4 blocks run along rows of 32 (d_model) and 32 (d_expert) values
  c.init_std = 0.1;  // large enough that FP4 quantization visibly changes the logits
  return c;
}

constexpr int kBatch = 2;
constexpr int kSeq = 12;

std::vector<float> logits_of(Transformer<float>& model, const std::vector<int32_t>& tokens) {
  const float* l = model.forward(tokens.data(), kBatch, kSeq);
  std::vector<float> host(size_t(kBatch) * kSeq * model.config().vocab_size);
  model.ops().copy_to_host(host.data(), l, sizeof(float) * host.size());
  return host;
}

std::vector<int32_t> random_tokens(uint64_t seed) {
  Rng rng(seed);
  std::vector<int32_t> tokens(size_t(kBatch) * kSeq);
  for (int32_t& t : tokens) t = int32_t(rng.uniform_int(0, 255));
  return tokens;
}

// Points TMPDIR at an empty directory of its own for the test, so it can check that nothing
// is left behind.
class PolicyBytes : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* old = std::getenv("TMPDIR");
    if (old) old_tmpdir_ = old;
    dir_ = fs::temp_directory_path() /
           ("rlhf_weight_transfer_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    ::setenv("TMPDIR", dir_.c_str(), 1);
    model_ = std::make_unique<Transformer<float>>(ops_, small_config(), kBatch, kSeq);
    model_->init_random(11);
  }
  void TearDown() override {
    if (old_tmpdir_) {
      ::setenv("TMPDIR", old_tmpdir_->c_str(), 1);
    } else {
      ::unsetenv("TMPDIR");
    }
    fs::remove_all(dir_);
  }

  std::vector<std::string> leftovers() const {
    std::vector<std::string> names;
    for (const auto& entry : fs::directory_iterator(dir_)) {
      names.push_back(entry.path().filename().string());
    }
    return names;
  }

  fs::path dir_;
  std::optional<std::string> old_tmpdir_;
  CpuOps<float> ops_;
  std::unique_ptr<Transformer<float>> model_;
};

TEST_F(PolicyBytes, AFloatPolicyLoadsBackWithIdenticalLogits) {
  const std::string bytes = serialize_policy(*model_, "byte", std::nullopt);
  EXPECT_TRUE(leftovers().empty());
  const CheckpointContents info = read_policy_info(bytes);
  EXPECT_FALSE(info.expert_format.has_value());
  EXPECT_FALSE(info.training.has_value()) << "a policy carries no optimizer or training state";
  EXPECT_EQ(info.tokenizer, "byte");
  EXPECT_EQ(info.config.to_yaml(), model_->config().to_yaml());

  CpuOps<float> ops;
  const std::unique_ptr<Transformer<float>> loaded = load_policy(bytes, ops, kBatch);
  EXPECT_FALSE(loaded->packed_format().has_value());
  EXPECT_EQ(loaded->max_batch(), kBatch);
  EXPECT_EQ(loaded->max_seq(), small_config().max_seq_len);
  // The same float weights, ops and shapes: bit for bit the same logits.
  const std::vector<int32_t> tokens = random_tokens(5);
  EXPECT_EQ(logits_of(*loaded, tokens), logits_of(*model_, tokens));
  EXPECT_TRUE(leftovers().empty());
}

class PackedPolicyBytes : public PolicyBytes,
                          public ::testing::WithParamInterface<Fp4Format> {};

TEST_P(PackedPolicyBytes, APackedPolicyLoadsBackAsTheSavedPackedCheckpoint) {
  const Fp4Format format = GetParam();
  const std::string bytes = serialize_policy(*model_, "byte", format);
  EXPECT_EQ(read_policy_info(bytes).expert_format, format);
  CpuOps<float> ops;
  const std::unique_ptr<Transformer<float>> loaded = load_policy(bytes, ops, kBatch);
  ASSERT_EQ(loaded->packed_format(), format);

  // The reference: the same model packed into a checkpoint file and loaded from it.
  const std::string path = (dir_ / "reference.safetensors").string();
  checkpoint_save_packed(path, *model_, "byte", format);
  const std::unique_ptr<Transformer<float>> reference = checkpoint_load_model(path, ops, kBatch);
  fs::remove(path);

  const std::vector<int32_t> tokens = random_tokens(6);
  const std::vector<float> packed_logits = logits_of(*loaded, tokens);
  EXPECT_EQ(packed_logits, logits_of(*reference, tokens));
  // And the experts really are the FP4 ones: the float model computes something else.
  const std::vector<float> float_logits = logits_of(*model_, tokens);
  double max_diff = 0;
  for (size_t i = 0; i < float_logits.size(); ++i) {
    max_diff = std::max(max_diff, double(std::abs(float_logits[i] - packed_logits[i])));
  }
  EXPECT_GT(max_diff, 1e-3);
  EXPECT_TRUE(leftovers().empty());
}

INSTANTIATE_TEST_SUITE_P(Formats, PackedPolicyBytes,
                         ::testing::Values(Fp4Format::mxfp4, Fp4Format::nvfp4),
                         [](const auto& param_info) {
                           return std::string(fp4_format_name(param_info.param));
                         });

TEST_F(PolicyBytes, BytesThatAreNoCheckpointAreAnErrorAndLeaveNothingBehind) {
  CpuOps<float> ops;
  expect_error_containing([&] { load_policy("definitely not safetensors", ops, 1); },
                          {"weight payload", "<payload>"});
  expect_error_containing([&] { read_policy_info(""); }, {"weight payload"});
  // A truncated checkpoint: the header promises data that is not there.
  std::string bytes = serialize_policy(*model_, "byte", std::nullopt);
  bytes.resize(bytes.size() / 2);
  expect_error_containing([&] { load_policy(bytes, ops, 1); }, {"weight payload"});
  EXPECT_TRUE(leftovers().empty());
}

}  // namespace
}  // namespace rlhf
