// Batched generation (model/generate.h) on CudaOps<float> against the same model on
// CpuOps<float>: the same weights (init_random with one seed), prompts, sampling parameters and
// seed; the tokens, the sampler's logprobs and the routing traces compared. Skips when no CUDA
// device is present.
//
// What must agree, and why:
//  - Tokens. A token flips between backends only at a near-tie: greedy, when the two largest
//    logits lie within the backends' rounding difference; sampling, when the sequence's uniform
//    draw lands that close to a boundary of the cumulative distribution. With logits of std
//    ~1.7 (init_std 0.3) and rounding differences of ~1e-6, that has a chance of the order of
//    1e-5 per token, so the first kExactSteps tokens of every sequence must be identical.
//    Later, a sequence may part ways, but only at a near-tie, which the test checks on the CPU
//    model's own logits at that position (kTieGap); after that the two sequences are different
//    texts and only the teacher-forced checks below apply.
//  - Logprobs, kLogprobTol = 1e-4. Both are log softmax of the backend's logits in the
//    sampler's double arithmetic. The logits agree to 1e-5 of max|logit| by test_cuda_model's
//    bound (measured 3.5e-7 there, ~1e-6 absolute here), and the CPU's own cached decode differs
//    from its full forward by up to 1e-4 by test_generate.cpp's bound (measured 6e-6), which
//    this reuses. A wrong logits row (the bug this guards against: the host reading device
//    memory, or the wrong row of a batch) moves a logprob by 1e-1 and more.
//  - Teacher-forced: every token either backend generated, scored by the OTHER backend's full
//    forward (log_softmax_gather), within kLogprobTol of the generator's logprob. This holds
//    whether or not the token sequences diverged.
//  - Routing traces: exact, as test_generate.cpp requires on the CPU (router score gaps ~1e-1
//    against rounding ~1e-7).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <unistd.h>

#include "common/rng.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cuda/cuda_ops.h"
#include "model/checkpoint.h"
#include "model/generate.h"
#include "model/tokenizer.h"
#include "model/transformer.h"
#include "tests/gpu/gpu_test_support.h"
#include "tests/test_support.h"

namespace rlhf {
namespace {

constexpr int kExactSteps = 4;
constexpr double kLogprobTol = 1e-4;
constexpr double kTieGap = 1e-4;

ModelConfig small_config() {
  return small_moe_config();  // as in test_generate.cpp
}

// Six prompts of mixed lengths (test_generate.cpp's): in chunks of 4 the prefill is padded, and
// the 26-token prompt reaches max_seq_len (32) mid-chunk, so the decode batch compacts (a later
// slot's KV cache rows move into the finished slot's place, a device-side copy on the GPU).
std::vector<std::vector<int32_t>> mixed_prompts() {
  Rng rng(99);
  std::vector<std::vector<int32_t>> prompts;
  for (int n : {3, 26, 11, 6, 1, 17}) {
    std::vector<int32_t> p(static_cast<size_t>(n));
    for (auto& t : p) t = int32_t(rng.uniform_int(0, 255));
    prompts.push_back(std::move(p));
  }
  return prompts;
}

// log softmax(row) in double, as the sampler computes it.
std::vector<double> log_softmax(std::span<const float> row) {
  double max_logit = -INFINITY;
  for (float v : row) max_logit = std::max(max_logit, double(v));
  double sum = 0;
  for (float v : row) sum += std::exp(double(v) - max_logit);
  std::vector<double> out(row.size());
  for (size_t v = 0; v < row.size(); ++v) out[v] = double(row[v]) - max_logit - std::log(sum);
  return out;
}

class CudaGenerateTest : public testing::Test {
 protected:
  static constexpr int kMaxBatch = 4;

  void SetUp() override {
    SKIP_WITHOUT_GPU();
    gpu_ = std::make_unique<CudaOps<float>>();
    const ModelConfig config = small_config();
    cpu_model_ = std::make_unique<Transformer<float>>(cpu_, config, kMaxBatch, config.max_seq_len);
    gpu_model_ = std::make_unique<Transformer<float>>(*gpu_, config, kMaxBatch, config.max_seq_len);
    cpu_model_->init_random(7);
    gpu_model_->init_random(7);
  }

  // Logits [n, V] of `seq` through a full forward (no cache) of `model`, on the host, with its
  // routing trace.
  std::vector<float> full_logits(Transformer<float>& model, const std::vector<int32_t>& seq,
                                 RoutingTrace* trace) {
    const size_t V = size_t(model.config().vocab_size);
    const float* logits = model.forward(seq.data(), 1, int(seq.size()), nullptr, nullptr, trace);
    std::vector<float> host(seq.size() * V);
    model.ops().copy_to_host(host.data(), logits, sizeof(float) * host.size());
    return host;
  }

  // `g`'s generated tokens scored by `model` (teacher-forced, full forward through
  // log_softmax_gather), against g's own logprobs. Greedy logprobs are at temperature 1 too.
  // Also compares g's routing trace with the one `model` records over the same tokens.
  double check_teacher_forced(Transformer<float>& model, const Generation& g,
                              const std::string& what) {
    const std::vector<int32_t> seq = g.processed_tokens();
    RoutingTrace trace;
    const float* logits = model.forward(seq.data(), 1, int(seq.size()), nullptr, nullptr, &trace);
    const size_t first = g.prompt_tokens.size() - 1;  // position predicting tokens[0]
    std::vector<int32_t> targets(seq.size(), 0);
    for (size_t j = 0; j < g.tokens.size(); ++j) targets[first + j] = g.tokens[j];
    const std::vector<float> lp =
        gather_logprobs(model.ops(), logits, targets, model.config().vocab_size);
    double worst = 0;
    for (size_t j = 0; j < g.tokens.size(); ++j) {
      const double d = std::abs(double(lp[first + j]) - double(g.logprobs[j]));
      EXPECT_LE(d, kLogprobTol) << what << " token " << j;
      worst = std::max(worst, std::isnan(d) ? INFINITY : d);
    }
    EXPECT_EQ(trace.expert_ids, g.routing.expert_ids) << what << ": routing";
    return worst;
  }

  CpuOps<float> cpu_;
  std::unique_ptr<CudaOps<float>> gpu_;
  std::unique_ptr<Transformer<float>> cpu_model_, gpu_model_;
  ByteTokenizer tokenizer_;
};

TEST_F(CudaGenerateTest, BatchedGenerationMatchesCpu) {
  const auto prompts = mixed_prompts();
  const int V = small_config().vocab_size;
  Generator cpu_generator(*cpu_model_, tokenizer_, kMaxBatch);
  Generator gpu_generator(*gpu_model_, tokenizer_, kMaxBatch);
  double worst_same = 0, worst_teacher = 0;
  int agreeing = 0, total = 0, diverged = 0;
  for (const double temperature : {1.0, 0.0}) {
    SamplingParams params;
    params.temperature = temperature;
    params.seed = 1234;
    params.max_new_tokens = 12;
    const std::vector<Generation> cpu = cpu_generator.generate(prompts, params);
    const std::vector<Generation> gpu = gpu_generator.generate(prompts, params);
    ASSERT_EQ(gpu.size(), prompts.size());
    for (size_t i = 0; i < prompts.size(); ++i) {
      const std::string what =
          "T=" + std::to_string(temperature) + " prompt " + std::to_string(i);
      const Generation& c = cpu[i];
      const Generation& g = gpu[i];
      EXPECT_EQ(g.prompt_tokens, prompts[i]) << what;
      ASSERT_FALSE(g.tokens.empty()) << what;
      ASSERT_EQ(g.logprobs.size(), g.tokens.size()) << what;
      size_t same = 0;
      while (same < c.tokens.size() && same < g.tokens.size() && c.tokens[same] == g.tokens[same])
        ++same;
      const size_t exact = std::min<size_t>(kExactSteps, c.tokens.size());
      EXPECT_GE(same, exact) << what << ": the first tokens differ";
      for (size_t j = 0; j < same; ++j) {
        const double d = std::abs(double(g.logprobs[j]) - double(c.logprobs[j]));
        EXPECT_LE(d, kLogprobTol) << what << " token " << j;
        worst_same = std::max(worst_same, std::isnan(d) ? INFINITY : d);
      }
      agreeing += int(same);
      total += int(c.tokens.size());
      if (same == c.tokens.size() && same == g.tokens.size()) {
        EXPECT_EQ(g.finished, c.finished) << what;
        EXPECT_EQ(g.text, c.text) << what;
        EXPECT_EQ(g.routing.expert_ids, c.routing.expert_ids) << what;
      } else if (same < c.tokens.size() && same < g.tokens.size()) {
        // The sequences part at token `same`: a near-tie on the CPU model's own logits there.
        ++diverged;
        std::vector<int32_t> prefix = c.prompt_tokens;
        prefix.insert(prefix.end(), c.tokens.begin(), c.tokens.begin() + long(same));
        const std::vector<float> logits = full_logits(*cpu_model_, prefix, nullptr);
        const std::span<const float> row(logits.data() + (prefix.size() - 1) * size_t(V),
                                         size_t(V));
        const int32_t a = c.tokens[same], b = g.tokens[same];
        if (temperature == 0.0) {
          EXPECT_LE(std::abs(double(row[a]) - double(row[b])), kTieGap)
              << what << ": greedy tokens " << a << " and " << b << " at step " << same
              << " are not a near-tie";
        } else {
          // TokenSampler draws one uniform per sampled token from the sequence's Rng, seeded
          // mix_seed(seed, index), and walks the ids in order (no top-k / top-p here): the
          // draw lies where the cumulative probability passes from the lower id to the higher.
          Rng rng(mix_seed(params.seed, i));
          double u = 0;
          for (size_t s = 0; s <= same; ++s) u = rng.uniform();
          const std::vector<double> lp = log_softmax(row);
          double boundary = 0;
          for (int v = 0; v <= std::min(a, b); ++v) boundary += std::exp(lp[v]);
          EXPECT_LE(std::abs(u - boundary), kTieGap)
              << what << ": sampled tokens " << a << " and " << b << " at step " << same
              << " are not a near-tie (u " << u << ", boundary " << boundary << ")";
        }
      } else {
        // One sequence is a prefix of the other: only a difference at eos or at the length
        // limit could do that, and both are at a token both have.
        ADD_FAILURE() << what << ": one generation stops early (" << c.tokens.size() << " vs "
                      << g.tokens.size() << " tokens)";
      }
      worst_teacher = std::max(worst_teacher, check_teacher_forced(*cpu_model_, g, what + " gpu"));
      worst_teacher = std::max(worst_teacher, check_teacher_forced(*gpu_model_, c, what + " cpu"));
    }
  }
  std::printf("  %d of %d tokens identical (%d sequences parted at a near-tie); max |dlogprob| "
              "on identical tokens %.3g, teacher-forced across backends %.3g\n",
              agreeing, total, diverged, worst_same, worst_teacher);
}

// Decode steps replayed from recordings (CUDA graphs, the default) give exactly what the same
// model gives op by op: the same kernels with the same launch shapes, so the same bits, and
// the same results whether a recording is fresh or replayed. The mixed prompts shrink the batch
// as sequences end (a recording per batch size), and every generate() call allocates its own
// cache (the second call replays the first call's recordings only if the new cache took the
// same memory).
void expect_recorded_steps_give_the_unrecorded_bits(Transformer<float>& model,
                                                    const ByteTokenizer& tokenizer,
                                                    int max_batch) {
  const auto prompts = mixed_prompts();
  Generator generator(model, tokenizer, max_batch);
  SamplingParams params;
  params.temperature = 1.0;
  params.seed = 77;
  params.max_new_tokens = 12;
  model.record_decode_steps(true);
  const std::vector<Generation> recorded = generator.generate(prompts, params);
  const std::vector<Generation> recorded_again = generator.generate(prompts, params);
  EXPECT_GE(model.recorded_decode_steps(), 2u) << "decode steps did not run as recordings";
  model.record_decode_steps(false);
  const std::vector<Generation> plain = generator.generate(prompts, params);
  EXPECT_EQ(model.recorded_decode_steps(), 0u);
  for (const auto* run : {&recorded, &recorded_again}) {
    ASSERT_EQ(run->size(), plain.size());
    for (size_t i = 0; i < plain.size(); ++i) {
      SCOPED_TRACE("prompt " + std::to_string(i));
      EXPECT_EQ((*run)[i].tokens, plain[i].tokens);
      EXPECT_EQ((*run)[i].logprobs, plain[i].logprobs);  // float ==: bit for bit
      EXPECT_EQ((*run)[i].routing.expert_ids, plain[i].routing.expert_ids);
    }
  }
}

TEST_F(CudaGenerateTest, RecordedDecodeStepsGiveTheUnrecordedBits) {
  if (!gpu_->can_record()) GTEST_SKIP() << "RLHF_CUDA_GRAPHS=off";
  expect_recorded_steps_give_the_unrecorded_bits(*gpu_model_, tokenizer_, kMaxBatch);
}

// The same for a model with packed MXFP4 experts, as the actors serve it: its shared expert
// runs in a side branch (Ops::side_branch_begin, a second stream), recorded into the graphs
// with the fork and join as edges, and op by op with the two streams running concurrently.
TEST_F(CudaGenerateTest, RecordedPackedDecodeStepsGiveTheUnrecordedBits) {
  if (!gpu_->can_record()) GTEST_SKIP() << "RLHF_CUDA_GRAPHS=off";
  ModelConfig config = small_config();
  config.d_expert = 32;  // whole MXFP4 blocks along the down product's k
  ASSERT_GT(config.n_shared_experts, 0);
  Transformer<float> source(cpu_, config, 1, 8);
  source.init_random(11);
  const std::filesystem::path path =
      std::filesystem::temp_directory_path() /
      ("rlhf_cuda_generate_packed_" + std::to_string(::getpid()) + ".safetensors");
  checkpoint_save_packed(path.string(), source, "byte", Fp4Format::mxfp4);
  const auto packed = checkpoint_load_model(path.string(), *gpu_, kMaxBatch);
  std::filesystem::remove(path);
  ASSERT_EQ(packed->packed_format(), Fp4Format::mxfp4);
  expect_recorded_steps_give_the_unrecorded_bits(*packed, tokenizer_, kMaxBatch);
}

TEST_F(CudaGenerateTest, GatherLogprobsMatchesHostLogSoftmaxOnBothBackends) {
  // gather_logprobs (log_softmax_gather on the backend, through backend buffers) against the
  // host's double log-softmax of the same logits rows: a float op against a double one on the
  // same logits, so within float rounding of logprobs of size ~10 (2e-6 relative each; bound
  // 1e-5).
  const auto prompts = mixed_prompts();
  const std::vector<int32_t>& seq = prompts[1];  // 26 tokens
  const std::vector<int32_t> targets(seq.begin() + 1, seq.end());
  const int V = small_config().vocab_size;
  for (Transformer<float>* model : {cpu_model_.get(), gpu_model_.get()}) {
    SCOPED_TRACE(model->ops().name());
    const std::vector<float> host = full_logits(*model, seq, nullptr);
    const float* logits = model->forward(seq.data(), 1, int(seq.size()));
    const std::vector<float> lp = gather_logprobs(model->ops(), logits, targets, V);
    ASSERT_EQ(lp.size(), targets.size());
    for (size_t i = 0; i < targets.size(); ++i) {
      const std::vector<double> ref =
          log_softmax(std::span<const float>(host.data() + i * size_t(V), size_t(V)));
      EXPECT_NEAR(lp[i], ref[size_t(targets[i])], 1e-5) << "position " << i;
    }
  }
}

}  // namespace
}  // namespace rlhf
