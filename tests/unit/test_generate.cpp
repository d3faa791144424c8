// Batched generation with a KV cache (model/generate.h) on a small random MoE model.
//
// Tolerances. Incremental decode and a one-shot forward compute the same function in a
// different float order: the BLAS blocks a 1-row GEMM differently from a 20-row one, the
// padded batched prefill runs GEMMs of other shapes than a lone sequence, and the sampler's
// softmax is in double while log_softmax_gather is in float. Each logit is a sum over ~100
// float products per layer through 3 layers; float rounding (6e-8 relative) over that gives
// ~1e-6 absolute on logits of size ~3. We allow 1e-4 (kLogitTol). Measured (OpenBLAS,
// OMP_NUM_THREADS=2; the tests print "measured ..."): KV decode vs full forward 9.2e-6 on
// logits, batched vs alone 3.3e-6 on logprobs, generation vs full forward 6.2e-6 on logprobs.
// A real bug (a wrong position, a pad leaking into attention) moves them by 1e-2 and more.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "common/error.h"
#include "common/rng.h"
#include "kernels/cpu/cpu_ops.h"
#include "model/generate.h"
#include "model/tokenizer.h"
#include "model/transformer.h"
#include "tests/test_support.h"

namespace rlhf {
namespace {

constexpr double kLogitTol = 1e-4;

ModelConfig small_config() {
  return small_moe_config();
}

std::vector<int32_t> random_tokens(Rng& rng, int n) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = int32_t(rng.uniform_int(0, 255));
  return t;
}

class GenerateTest : public ::testing::Test {
 protected:
  GenerateTest() : model(ops, small_config(), kModelBatch, small_config().max_seq_len) {
    model.init_random(7);
  }

  int V() const { return model.config().vocab_size; }

  // Logits [n, V] of one sequence through a plain (no cache) forward.
  std::vector<float> full_logits(const std::vector<int32_t>& seq, RoutingTrace* record = nullptr,
                                 const RoutingTrace* replay = nullptr) {
    const float* l = model.forward(seq.data(), 1, int(seq.size()), nullptr, nullptr, record,
                                   replay);
    return std::vector<float>(l, l + seq.size() * size_t(V()));
  }

  std::vector<std::vector<int32_t>> mixed_prompts() {
    Rng rng(99);
    std::vector<std::vector<int32_t>> prompts;
    // The 26-token prompt reaches max_seq_len (32) after 6 tokens, mid-chunk when chunks hold
    // 3 prompts, so the decode batch compacts (a later slot's cache moves into its place).
    for (int n : {3, 26, 11, 6, 1, 17}) prompts.push_back(random_tokens(rng, n));
    return prompts;
  }

  // Eight one-letter task prompts, formatted: the stop tests sample from them.
  std::vector<std::vector<int32_t>> letter_prompts() const {
    std::vector<std::vector<int32_t>> prompts;
    for (char c : std::string("abcdefgh")) prompts.push_back(format_prompt(tokenizer, {&c, 1}));
    return prompts;
  }

  static constexpr int kModelBatch = 8;
  CpuOps<float> ops;
  ByteTokenizer tokenizer;
  Transformer<float> model;
};

double max_abs_diff(const float* a, const float* b, size_t n) {
  double m = 0;
  for (size_t i = 0; i < n; ++i) m = std::max(m, double(std::abs(a[i] - b[i])));
  return m;
}

// ---------------------------------------------------------------- KV cache

TEST_F(GenerateTest, KvCacheDecodeMatchesFullForward) {
  // Two sequences with different prompt lengths share one padded prefill, then decode one token
  // per step at different positions. Every logit and every routing choice must match a plain
  // forward over each whole sequence.
  Rng rng(5);
  const std::vector<std::vector<int32_t>> seqs = {random_tokens(rng, 20), random_tokens(rng, 16)};
  const std::vector<int> prompt = {9, 5};
  const int steps = 11, L = 9;
  const int moe = model.config().n_moe_layers(), K = model.config().top_k;

  std::vector<std::vector<float>> ref(2);
  std::vector<RoutingTrace> ref_trace(2);
  for (int b = 0; b < 2; ++b) ref[b] = full_logits(seqs[b], &ref_trace[b]);

  KvCache<float> cache(ops, model.config(), 2, model.config().max_seq_len);
  std::vector<int32_t> tokens(2 * L, ByteTokenizer::kPad);
  for (int b = 0; b < 2; ++b) std::copy_n(seqs[b].begin(), prompt[b], tokens.begin() + b * L);
  std::vector<int32_t> start = {0, 0};
  RoutingTrace trace;
  const float* logits = model.forward(tokens.data(), 2, L, &cache, start.data(), &trace);
  double worst = 0;
  for (int b = 0; b < 2; ++b) {
    for (int t = 0; t < prompt[b]; ++t) {
      const double d = max_abs_diff(logits + size_t(b * L + t) * V(),
                                    ref[b].data() + size_t(t) * V(), size_t(V()));
      EXPECT_LE(d, kLogitTol) << "prefill sequence " << b << " position " << t;
      worst = std::max(worst, d);
      for (int m = 0; m < moe; ++m) {
        for (int j = 0; j < K; ++j) {
          EXPECT_EQ(trace.layer(m)[(b * L + t) * K + j], ref_trace[b].layer(m)[t * K + j]);
        }
      }
    }
  }
  for (int s = 0; s < steps; ++s) {
    for (int b = 0; b < 2; ++b) {
      start[b] = prompt[b] + s;
      tokens[b] = seqs[b][start[b]];
    }
    logits = model.forward(tokens.data(), 2, 1, &cache, start.data(), &trace);
    for (int b = 0; b < 2; ++b) {
      const double d = max_abs_diff(logits + size_t(b) * V(),
                                    ref[b].data() + size_t(start[b]) * V(), size_t(V()));
      EXPECT_LE(d, kLogitTol) << "decode sequence " << b << " position " << start[b];
      worst = std::max(worst, d);
      for (int m = 0; m < moe; ++m) {
        for (int j = 0; j < K; ++j) {
          EXPECT_EQ(trace.layer(m)[b * K + j], ref_trace[b].layer(m)[start[b] * K + j]);
        }
      }
    }
  }
  std::printf("measured KV-cache vs full forward max |dlogit| = %.3g\n", worst);
}

// ---------------------------------------------------------------- batching

void expect_same_generation(const Generation& a, const Generation& b, const std::string& what,
                            double* worst) {
  EXPECT_EQ(a.prompt_tokens, b.prompt_tokens) << what;
  ASSERT_EQ(a.tokens, b.tokens) << what;
  ASSERT_EQ(a.logprobs.size(), b.logprobs.size()) << what;
  for (size_t i = 0; i < a.logprobs.size(); ++i) {
    EXPECT_NEAR(a.logprobs[i], b.logprobs[i], kLogitTol) << what << " token " << i;
    *worst = std::max(*worst, double(std::abs(a.logprobs[i] - b.logprobs[i])));
  }
  EXPECT_EQ(a.finished, b.finished) << what;
  EXPECT_EQ(a.text, b.text) << what;
  EXPECT_EQ(a.routing.n_tokens, b.routing.n_tokens) << what;
  EXPECT_EQ(a.routing.expert_ids, b.routing.expert_ids) << what;
}

TEST_F(GenerateTest, BatchedMatchesAlone) {
  const auto prompts = mixed_prompts();
  double worst = 0;
  for (double temperature : {1.0, 0.0}) {
    SamplingParams params;
    params.temperature = temperature;
    params.seed = 42;
    params.max_new_tokens = 12;
    // Six prompts in chunks of 3 (padded prefill, shrinking decode batch) against chunks of
    // 1: the same sequence index keeps the same Rng, so only batching differs.
    Generator batched(model, tokenizer, 3);
    Generator single(model, tokenizer, 1);
    const auto together = batched.generate(prompts, params);
    const auto alone = single.generate(prompts, params);
    ASSERT_EQ(together.size(), prompts.size());
    ASSERT_EQ(alone.size(), prompts.size());
    for (size_t i = 0; i < prompts.size(); ++i) {
      expect_same_generation(together[i], alone[i],
                             "T=" + std::to_string(temperature) + " prompt " + std::to_string(i),
                             &worst);
      EXPECT_EQ(together[i].prompt_tokens, prompts[i]);
      EXPECT_FALSE(together[i].tokens.empty());
    }
    // Greedy does not depend on the index at all: a prompt generated on its own in a call of
    // its own matches too.
    if (temperature == 0.0) {
      for (size_t i = 0; i < prompts.size(); ++i) {
        const auto own = batched.generate({prompts[i]}, params);
        expect_same_generation(together[i], own[0], "own call " + std::to_string(i), &worst);
      }
    }
  }
  std::printf("measured batched vs alone max |dlogprob| = %.3g\n", worst);
}

// ---------------------------------------------------------------- routing replay

TEST_F(GenerateTest, RoutingTraceReplaysOnTheProcessedSequence) {
  SamplingParams params;
  params.seed = 3;
  params.max_new_tokens = 10;
  Generator generator(model, tokenizer, 4);
  const auto gens = generator.generate(mixed_prompts(), params);
  const int E = model.config().n_routed_experts;
  for (const Generation& g : gens) {
    const std::vector<int32_t> seq = g.processed_tokens();
    ASSERT_EQ(seq.size(), g.prompt_tokens.size() + g.tokens.size() - 1);
    ASSERT_EQ(g.routing.n_tokens, int(seq.size()));
    ASSERT_EQ(g.routing.n_layers, model.config().n_moe_layers());
    ASSERT_EQ(g.routing.top_k, model.config().top_k);

    RoutingTrace fresh, replayed;
    const std::vector<float> fresh_logits = full_logits(seq, &fresh);
    // The actor's routing is what a fresh learner forward over the same tokens routes.
    EXPECT_EQ(fresh.expert_ids, g.routing.expert_ids);
    const std::vector<float> replay_logits = full_logits(seq, &replayed, &g.routing);
    EXPECT_EQ(replayed.expert_ids, g.routing.expert_ids);
    EXPECT_EQ(max_abs_diff(fresh_logits.data(), replay_logits.data(), fresh_logits.size()), 0.0);

    // A different trace (every expert id moved to the next expert; still k distinct ids per
    // token) must change the logits, or the comparison above proves nothing.
    RoutingTrace shifted = g.routing;
    for (int32_t& id : shifted.expert_ids) id = (id + 1) % E;
    const std::vector<float> shifted_logits = full_logits(seq, nullptr, &shifted);
    EXPECT_GT(max_abs_diff(fresh_logits.data(), shifted_logits.data(), fresh_logits.size()),
              1e-2);
  }
}

// ---------------------------------------------------------------- determinism

TEST_F(GenerateTest, SeedsAndGreedyAreDeterministic) {
  const auto prompts = mixed_prompts();
  Generator generator(model, tokenizer, 4);
  SamplingParams greedy;
  greedy.temperature = 0.0;
  greedy.max_new_tokens = 16;
  const auto g1 = generator.generate(prompts, greedy);
  greedy.seed = 12345;  // greedy ignores the seed
  const auto g2 = generator.generate(prompts, greedy);
  for (size_t i = 0; i < prompts.size(); ++i) {
    EXPECT_EQ(g1[i].tokens, g2[i].tokens);
    EXPECT_EQ(g1[i].logprobs, g2[i].logprobs);
  }

  SamplingParams sampled;
  sampled.max_new_tokens = 16;
  sampled.seed = 1;
  const auto a = generator.generate(prompts, sampled);
  const auto b = generator.generate(prompts, sampled);
  sampled.seed = 2;
  const auto c = generator.generate(prompts, sampled);
  int differing = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    EXPECT_EQ(a[i].tokens, b[i].tokens);
    EXPECT_EQ(a[i].logprobs, b[i].logprobs);
    differing += a[i].tokens != c[i].tokens;
  }
  // A temperature-1 random model spreads its mass over many tokens: a new seed changes
  // essentially every sequence, and certainly not none.
  EXPECT_GE(differing, 4);
  // ... and the sampled sequences are not simply the greedy ones.
  int not_greedy = 0;
  for (size_t i = 0; i < prompts.size(); ++i) not_greedy += a[i].tokens != g1[i].tokens;
  EXPECT_GE(not_greedy, 4);
}

// ---------------------------------------------------------------- logprobs

TEST_F(GenerateTest, LogprobsMatchFullForward) {
  const auto prompts = mixed_prompts();
  Generator generator(model, tokenizer, 4);
  struct Case {
    double temperature;
    int top_k;
    double top_p;
  };
  double worst = 0;
  // Truncation (top-k / top-p) changes which tokens can be drawn, never the reported logprob:
  // it stays the full temperature-scaled distribution's.
  for (const Case& k : {Case{1.0, 0, 1.0}, Case{0.7, 0, 1.0}, Case{0.0, 0, 1.0},
                        Case{1.3, 5, 1.0}, Case{0.8, 0, 0.9}}) {
    SamplingParams params;
    params.temperature = k.temperature;
    params.top_k = k.top_k;
    params.top_p = k.top_p;
    params.seed = 11;
    params.max_new_tokens = 14;
    const auto gens = generator.generate(prompts, params);
    for (const Generation& g : gens) {
      const std::vector<int32_t> seq = g.processed_tokens();
      const std::vector<float> logits = full_logits(seq);
      const int P = int(g.prompt_tokens.size()), G = int(g.tokens.size());
      std::vector<float> expected(static_cast<size_t>(G));
      ops.log_softmax_gather(expected.data(), logits.data() + size_t(P - 1) * V(),
                             g.tokens.data(), G, V(), k.temperature > 0 ? k.temperature : 1.0);
      for (int i = 0; i < G; ++i) {
        EXPECT_NEAR(g.logprobs[i], expected[i], kLogitTol) << "T=" << k.temperature << " i=" << i;
        worst = std::max(worst, double(std::abs(g.logprobs[i] - expected[i])));
        if (k.temperature == 0.0) {
          const float* row = logits.data() + size_t(P - 1 + i) * V();
          EXPECT_EQ(g.tokens[i], int32_t(std::max_element(row, row + V()) - row));
        }
        if (k.top_k > 0) {
          // The token is among the top_k logits of its row.
          const float* row = logits.data() + size_t(P - 1 + i) * V();
          int above = 0;
          for (int v = 0; v < V(); ++v) above += row[v] > row[g.tokens[i]];
          EXPECT_LT(above, k.top_k);
        }
      }
    }
  }
  std::printf("measured generation vs full-forward max |dlogprob| = %.3g\n", worst);
}

TEST_F(GenerateTest, TopKOneAndTinyTopPAreGreedy) {
  const auto prompts = mixed_prompts();
  Generator generator(model, tokenizer, 4);
  SamplingParams greedy;
  greedy.temperature = 0.0;
  greedy.max_new_tokens = 12;
  const auto expected = generator.generate(prompts, greedy);

  // Temperature 1: the logprob is log softmax(logits / 1), the same numbers greedy reports.
  SamplingParams top_k;
  top_k.top_k = 1;
  top_k.max_new_tokens = 12;
  SamplingParams top_p;
  top_p.top_p = 1e-9;
  top_p.max_new_tokens = 12;
  for (const SamplingParams& params : {top_k, top_p}) {
    const auto gens = generator.generate(prompts, params);
    for (size_t i = 0; i < prompts.size(); ++i) {
      EXPECT_EQ(gens[i].tokens, expected[i].tokens) << "prompt " << i;
      EXPECT_EQ(gens[i].logprobs, expected[i].logprobs) << "prompt " << i;
    }
  }
}

// ---------------------------------------------------------------- stopping

TEST_F(GenerateTest, StopsAtMaxNewTokensAndMaxSeqLen) {
  Rng rng(8);
  const int max_seq = model.config().max_seq_len;
  SamplingParams params;
  params.stop_at_eos = false;
  params.max_new_tokens = 32;
  Generator generator(model, tokenizer, 4);
  const auto gens = generator.generate({random_tokens(rng, 28), random_tokens(rng, 31)}, params);
  // The sequence ends at max_seq_len: 4 tokens after 28, 1 after 31; never finished.
  EXPECT_EQ(gens[0].tokens.size(), 4u);
  EXPECT_EQ(gens[1].tokens.size(), 1u);
  for (const Generation& g : gens) {
    EXPECT_FALSE(g.finished);
    EXPECT_EQ(int(g.prompt_tokens.size() + g.tokens.size()), max_seq);
    EXPECT_EQ(g.routing.n_tokens, max_seq - 1);
    EXPECT_EQ(g.logprobs.size(), g.tokens.size());
  }
  params.max_new_tokens = 5;
  const auto short_gens = generator.generate({random_tokens(rng, 3)}, params);
  EXPECT_EQ(short_gens[0].tokens.size(), 5u);
  EXPECT_EQ(short_gens[0].routing.n_tokens, 3 + 5 - 1);
}

TEST_F(GenerateTest, StopsAtEos) {
  // A hot temperature flattens the random model so eos (1 of 262 tokens) turns up; look for a
  // seed that produces one, then check what stopping there means.
  Generator generator(model, tokenizer, 8);
  const std::vector<std::vector<int32_t>> prompts = letter_prompts();
  SamplingParams params;
  params.temperature = 4.0;
  params.max_new_tokens = 24;
  bool found = false;
  for (uint64_t seed = 0; seed < 40 && !found; ++seed) {
    params.seed = seed;
    params.stop_at_eos = true;
    const auto stopped = generator.generate(prompts, params);
    params.stop_at_eos = false;
    const auto continued = generator.generate(prompts, params);
    for (size_t i = 0; i < prompts.size(); ++i) {
      const Generation& g = stopped[i];
      const auto eos = std::find(g.tokens.begin(), g.tokens.end(), ByteTokenizer::kEos);
      if (eos == g.tokens.end()) {
        EXPECT_FALSE(g.finished);
        EXPECT_EQ(g.tokens, continued[i].tokens);
        continue;
      }
      found = true;
      EXPECT_TRUE(g.finished);
      EXPECT_EQ(eos + 1, g.tokens.end()) << "generation went on after eos";
      // The text drops the eos (and any other special token).
      EXPECT_EQ(g.text, tokenizer.decode(std::span(g.tokens).first(g.tokens.size() - 1)));
      // Without stop_at_eos the same draws continue past it (up to max_new_tokens).
      const Generation& c = continued[i];
      EXPECT_FALSE(c.finished);
      EXPECT_EQ(c.tokens.size(), size_t(params.max_new_tokens));
      EXPECT_TRUE(std::equal(g.tokens.begin(), g.tokens.end(), c.tokens.begin()));
    }
  }
  EXPECT_TRUE(found) << "no seed produced eos; the test checks nothing";
}

TEST_F(GenerateTest, StopsAfterTheStopToken) {
  // The same draws with and without a stop token: with it, each sequence ends right after the
  // token's first occurrence (kept, finished) and is otherwise unchanged.
  Generator generator(model, tokenizer, 8);
  const std::vector<std::vector<int32_t>> prompts = letter_prompts();
  SamplingParams params;
  params.temperature = 4.0;
  params.max_new_tokens = 16;
  params.seed = 5;
  params.stop_at_eos = false;
  const auto free_run = generator.generate(prompts, params);
  params.stop_token = free_run[0].tokens[5];
  const auto stopped = generator.generate(prompts, params);
  int stopped_early = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const std::vector<int32_t>& all = free_run[i].tokens;
    const auto at = std::find(all.begin(), all.end(), params.stop_token);
    if (at == all.end()) {
      EXPECT_EQ(stopped[i].tokens, all);
      EXPECT_FALSE(stopped[i].finished);
      continue;
    }
    ++stopped_early;
    EXPECT_EQ(stopped[i].tokens, std::vector<int32_t>(all.begin(), at + 1));
    EXPECT_TRUE(stopped[i].finished);
    EXPECT_EQ(stopped[i].text, tokenizer.decode(stopped[i].tokens));
  }
  EXPECT_LE(stopped[0].tokens.size(), 6u);
  EXPECT_GE(stopped_early, 1);
}

TEST_F(GenerateTest, GenerateTextFormatsAndDecodes) {
  Generator generator(model, tokenizer, 2);
  SamplingParams params;
  params.max_new_tokens = 6;
  const auto gens = generator.generate_text({"hello", "a longer prompt"}, params);
  ASSERT_EQ(gens.size(), 2u);
  EXPECT_EQ(gens[0].prompt_tokens, format_prompt(tokenizer, "hello"));
  EXPECT_EQ(gens[1].prompt_tokens, format_prompt(tokenizer, "a longer prompt"));
  for (const Generation& g : gens) EXPECT_EQ(g.text, tokenizer.decode(g.tokens));
  EXPECT_TRUE(generator.generate_text({}, params).empty());
}

// ---------------------------------------------------------------- the sampler alone

// Draws `n` tokens and returns each token's frequency; checks every logprob on the way.
std::vector<double> frequencies(const std::vector<float>& logits, const SamplingParams& params,
                                int n, const std::vector<double>& expected_logprob) {
  TokenSampler sampler;
  Rng rng(17);
  std::vector<double> freq(logits.size(), 0.0);
  for (int i = 0; i < n; ++i) {
    double logprob = 0;
    const int32_t t = sampler.sample(logits, params, rng, &logprob);
    EXPECT_NEAR(logprob, expected_logprob[size_t(t)], 1e-6);
    freq[size_t(t)] += 1.0 / n;
  }
  return freq;
}

TEST(TokenSampler, TruncationAndTemperature) {
  const std::vector<double> p = {0.5, 0.3, 0.15, 0.05};
  std::vector<float> logits;
  std::vector<double> log_p;
  for (double x : p) {
    logits.push_back(float(std::log(x)));
    log_p.push_back(std::log(x));
  }
  const int n = 20000;  // frequency std <= 0.0036; we allow 0.02 (> 5 sigma; fixed seed)
  const double tol = 0.02;
  SamplingParams params;

  auto f = frequencies(logits, params, n, log_p);
  for (size_t i = 0; i < p.size(); ++i) EXPECT_NEAR(f[i], p[i], tol) << i;

  params.top_k = 2;  // {0, 1} renormalized: 0.625, 0.375
  f = frequencies(logits, params, n, log_p);
  EXPECT_NEAR(f[0], 0.625, tol);
  EXPECT_NEAR(f[1], 0.375, tol);
  EXPECT_EQ(f[2] + f[3], 0.0);

  params.top_k = 0;
  params.top_p = 0.7;  // 0.5 < 0.7 <= 0.8: {0, 1}
  f = frequencies(logits, params, n, log_p);
  EXPECT_NEAR(f[0], 0.625, tol);
  EXPECT_EQ(f[2] + f[3], 0.0);

  params.top_p = 0.85;  // 0.8 < 0.85 <= 0.95: {0, 1, 2}
  f = frequencies(logits, params, n, log_p);
  EXPECT_NEAR(f[2], 0.15 / 0.95, tol);
  EXPECT_EQ(f[3], 0.0);

  params.top_k = 3;  // top_p is measured on what top_k kept: 0.5/0.95 < 0.6 <= 0.8/0.95
  params.top_p = 0.6;
  f = frequencies(logits, params, n, log_p);
  EXPECT_GT(f[1], 0.3);
  EXPECT_EQ(f[2] + f[3], 0.0);

  // Temperature 0.5 squares the probabilities; the logprob is of that distribution.
  params = SamplingParams{};
  params.temperature = 0.5;
  double z = 0;
  for (double x : p) z += x * x;
  std::vector<double> log_p2;
  for (double x : p) log_p2.push_back(std::log(x * x / z));
  f = frequencies(logits, params, n, log_p2);
  for (size_t i = 0; i < p.size(); ++i) EXPECT_NEAR(f[i], p[i] * p[i] / z, tol) << i;
}

TEST(TokenSampler, GreedyTiesAndBadLogits) {
  TokenSampler sampler;
  Rng rng(1);
  SamplingParams greedy;
  greedy.temperature = 0.0;
  double logprob = 0;
  const std::vector<float> tie = {1.0f, 3.0f, 3.0f, 0.0f};
  EXPECT_EQ(sampler.sample(tie, greedy, rng, &logprob), 1);
  const double lse = std::log(std::exp(1.0) + 2 * std::exp(3.0) + 1.0);
  EXPECT_NEAR(logprob, 3.0 - lse, 1e-6);
  SamplingParams top1;
  top1.top_k = 1;
  EXPECT_EQ(sampler.sample(tie, top1, rng, &logprob), 1);

  const std::vector<float> bad = {0.0f, NAN, 1.0f};
  EXPECT_THROW(sampler.sample(bad, SamplingParams{}, rng, &logprob), Error);
}

// ---------------------------------------------------------------- errors

void expect_error_naming(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one naming " << needle;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(SamplingParams, ValidateNamesTheBadField) {
  EXPECT_NO_THROW(SamplingParams{}.validate());
  auto with = [](auto edit) {
    SamplingParams p;
    edit(p);
    return [p] { p.validate(); };
  };
  expect_error_naming(with([](SamplingParams& p) { p.temperature = -0.1; }), "temperature");
  expect_error_naming(with([](SamplingParams& p) { p.temperature = NAN; }), "temperature");
  expect_error_naming(with([](SamplingParams& p) { p.top_k = -1; }), "top_k");
  expect_error_naming(with([](SamplingParams& p) { p.top_p = 0.0; }), "top_p");
  expect_error_naming(with([](SamplingParams& p) { p.top_p = 1.5; }), "top_p");
  expect_error_naming(with([](SamplingParams& p) { p.max_new_tokens = 0; }), "max_new_tokens");
  expect_error_naming(with([](SamplingParams& p) { p.stop_token = -2; }), "stop_token");
  SamplingParams edge;
  edge.temperature = 0.0;
  edge.top_p = 1.0;
  edge.max_new_tokens = 1;
  EXPECT_NO_THROW(edge.validate());
}

// The model checks the KV cache's bounds itself, before anything is queued: the GPU backend's
// cache write does not read start[] back to check them.
TEST_F(GenerateTest, ForwardPastTheCacheIsAnError) {
  KvCache<float> cache(ops, model.config(), 2, 16);
  const std::vector<int32_t> tokens(2 * 4, 1);
  const std::vector<int32_t> start = {0, 13};  // 13 + 4 > 16
  expect_error_naming([&] { model.forward(tokens.data(), 2, 4, &cache, start.data()); },
                      "KV cache overflow: sequence 1 starts at 13 with 4 new tokens, capacity 16");
}

TEST_F(GenerateTest, BadPromptsAndSetupAreErrors) {
  Generator generator(model, tokenizer, 2);
  SamplingParams params;
  const int max_seq = model.config().max_seq_len;
  expect_error_naming([&] { generator.generate({{1, 2}, {}}, params); }, "prompt 1 is empty");
  expect_error_naming(
      [&] { generator.generate({std::vector<int32_t>(size_t(max_seq), 1)}, params); },
      "max_seq_len");
  expect_error_naming([&] { generator.generate({{1, 262}}, params); }, "outside the vocabulary");
  expect_error_naming([&] { generator.generate({{-1}}, params); }, "outside the vocabulary");
  params.top_p = 2.0;
  expect_error_naming([&] { generator.generate({{1}}, params); }, "top_p");
  expect_error_naming([&] { Generator bad(model, tokenizer, 0); }, "max_batch");

  ModelConfig other = small_config();
  other.vocab_size = 300;
  Transformer<float> wrong_vocab(ops, other, 1, other.max_seq_len);
  expect_error_naming([&] { Generator bad(wrong_vocab, tokenizer, 1); }, "vocab_size");
}

}  // namespace
}  // namespace rlhf
