// Win-rate evaluation (reward/winrate_eval.h) end to end: a briefly trained policy and a
// deliberately degraded copy of it, each served by a real ActorServer on a loopback port, a
// real RolloutStore, and judges: the task graders (GroundTruthJudge), a real RewardServer, and
// scripted judges for the counting rules (position bias, invalid output).
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <set>

#include <fmt/core.h>

#include "actor/actor_client.h"
#include "actor/actor_engine.h"
#include "actor/actor_service.h"
#include "common/error.h"
#include "common/rng.h"
#include "kernels/cpu/cpu_ops.h"
#include "learner/sft.h"
#include "model/checkpoint.h"
#include "reward/judge.h"
#include "reward/reward_client.h"
#include "reward/reward_service.h"
#include "reward/winrate_eval.h"
#include "rollout/rollout_store.h"

namespace rlhf {
namespace {

namespace fs = std::filesystem;

constexpr const char* kTinyConfig = R"(
model:
  tokenizer: byte
  d_model: 32
  n_layers: 2
  n_heads: 2
  n_kv_heads: 1
  head_dim: 16
  max_seq_len: 48
  n_dense_layers: 1
  d_ff: 64
  n_routed_experts: 4
  n_shared_experts: 1
  top_k: 2
  d_expert: 32
tasks:
  seed: 1
  families: [add, sort, reverse, count]
sft:
  steps: 600
  batch_size: 16
  eval_examples: 16
  eval_batch: 16
  checkpoint_every: 600
  optimizer: {lr: 0.01, warmup_steps: 10}
sampling:
  temperature: 0.0
  max_new_tokens: 12
  seed: 3
runtime:
  threads: 1
)";

constexpr int kPrompts = 64;

// A policy served by an actor on a free loopback port.
struct ServedPolicy {
  explicit ServedPolicy(const std::string& checkpoint)
      : engine(checkpoint, options()), server(engine),
        client("127.0.0.1:" + std::to_string(server.port())) {}
  static ActorEngineOptions options() {
    ActorEngineOptions o;
    o.max_batch = 16;
    return o;
  }
  ActorEngine engine;
  ActorServer server;
  ActorClient client;
};

// Answers as scripted, the same for every pair: for the counting rules.
class ScriptedJudge : public PairJudge {
 public:
  ScriptedJudge(OrderJudgment a_first, OrderJudgment b_first)
      : a_first_(std::move(a_first)), b_first_(std::move(b_first)) {}
  std::vector<PairJudgment> judge(const std::vector<EvalPair>& pairs, uint64_t) override {
    return std::vector<PairJudgment>(pairs.size(), PairJudgment{a_first_, b_first_});
  }

 private:
  OrderJudgment a_first_, b_first_;
};

OrderJudgment says(const std::string& verdict) {
  OrderJudgment j;
  j.valid = verdict != "invalid";
  j.verdict = verdict;
  j.preference_a = verdict == "A" ? 1.0 : verdict == "B" ? 0.0 : 0.5;
  if (j.valid) j.reasoning = {"scripted"};
  if (!j.valid) j.invalid_samples = 1;
  return j;
}

// Fails the `fail_on_call`-th call (1-based): an evaluation interrupted mid-way.
class FailingJudge : public PairJudge {
 public:
  FailingJudge(PairJudge& inner, int fail_on_call) : inner_(inner), fail_on_call_(fail_on_call) {}
  std::vector<PairJudgment> judge(const std::vector<EvalPair>& pairs, uint64_t seed) override {
    if (++calls == fail_on_call_) throw Error("judge went away");
    return inner_.judge(pairs, seed);
  }
  int calls = 0;

 private:
  PairJudge& inner_;
  int fail_on_call_;
};

class WinrateEvalTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    root_ = fs::path(::testing::TempDir()) / fmt::format("rlhf-winrate-{}", ::getpid());
    fs::remove_all(root_);
    fs::create_directories(root_);
    config_ = std::make_unique<RunConfig>(RunConfig::load_string(kTinyConfig, "test"));
    SftTrainer sft(*config_, (root_ / "sft").string(), false);
    sft.train();
    policy_ = (root_ / "policy.safetensors").string();
    checkpoint_save(policy_, sft.model(), "byte");

    // The degraded copy: the same weights with Gaussian noise of 0.6 times their RMS added.
    Transformer<float>& model = sft.model();
    float* w = model.params();
    const size_t n = model.layout().total();
    double sum_sq = 0;
    for (size_t i = 0; i < n; ++i) sum_sq += double(w[i]) * w[i];
    const double noise = 0.6 * std::sqrt(sum_sq / double(n));
    Rng rng(99);
    for (size_t i = 0; i < n; ++i) {
      // Box-Muller from two uniforms.
      const double u1 = std::max(rng.uniform(), 1e-12), u2 = rng.uniform();
      w[i] += float(noise * std::sqrt(-2 * std::log(u1)) * std::cos(2 * M_PI * u2));
    }
    degraded_ = (root_ / "degraded.safetensors").string();
    checkpoint_save(degraded_, model, "byte");

    suite_ = std::make_unique<TaskSuite>(config_->tasks);
    for (int i = 0; i < kPrompts; ++i) prompts_.push_back(suite_->example(Split::kHeldOut, uint64_t(i)));
  }
  static void TearDownTestSuite() {
    suite_.reset();
    config_.reset();
    fs::remove_all(root_);
  }

  static v1::EvalSpec spec(const std::string& id, int round_prompts = 16) {
    v1::EvalSpec s;
    s.set_eval_id(id);
    s.set_checkpoint_a("a");
    s.set_checkpoint_b("b");
    s.set_judge("test");
    s.set_k(1);
    s.set_temperature(0.0);  // greedy answers: the policy's best, and reproducible
    s.set_max_new_tokens(12);
    s.set_seed(3);
    s.set_prompts(prompts_.size());
    s.set_round_prompts(round_prompts);
    return s;
  }

  std::unique_ptr<RolloutStore> open_store(const std::string& name) const {
    return RolloutStore::open((root_ / name).string(), RolloutStore::Mode::kReadWrite);
  }

  static WinrateReport evaluate(RolloutStore& store, const v1::EvalSpec& s, ServedPolicy& a,
                                ServedPolicy& b, PairJudge& judge) {
    check_or_store_eval_spec(store, s);
    run_winrate(store, s, prompts_, a.client, b.client, judge);
    return winrate_report(s.eval_id(), read_eval_records(store, s.eval_id()), 2000, 5);
  }

  static fs::path root_;
  static std::string policy_, degraded_;
  static std::unique_ptr<RunConfig> config_;
  static std::unique_ptr<TaskSuite> suite_;
  static std::vector<TaskExample> prompts_;
};

fs::path WinrateEvalTest::root_;
std::string WinrateEvalTest::policy_, WinrateEvalTest::degraded_;
std::unique_ptr<RunConfig> WinrateEvalTest::config_;
std::unique_ptr<TaskSuite> WinrateEvalTest::suite_;
std::vector<TaskExample> WinrateEvalTest::prompts_;

TEST_F(WinrateEvalTest, TheDegradedCopyIsReallyWorse) {
  // The premise of the next tests: the noise costs the policy a clear part of its score.
  CpuOps<float> ops;
  auto policy = checkpoint_load_model(policy_, ops, 16);
  auto degraded = checkpoint_load_model(degraded_, ops, 16);
  const auto tokenizer = make_tokenizer("byte");
  const PolicyEvaluation p =
      evaluate_policy(*policy, *tokenizer, *suite_, kPrompts, 16, config_->sampling, true);
  const PolicyEvaluation d =
      evaluate_policy(*degraded, *tokenizer, *suite_, kPrompts, 16, config_->sampling, true);
  EXPECT_GT(p.mean_score, d.mean_score + 1.0) << p.mean_score << " vs " << d.mean_score;
}

TEST_F(WinrateEvalTest, APolicyAgainstItselfHasAnIntervalContainingOneHalf) {
  ServedPolicy a(policy_), b(policy_);
  GroundTruthJudge judge(*suite_);
  const auto store = open_store("self");
  const WinrateReport r = evaluate(*store, spec("self"), a, b, judge);
  EXPECT_EQ(r.prompts, kPrompts);
  EXPECT_EQ(r.overall.invalid, 0);
  EXPECT_LE(r.overall.ci_low, 0.5);
  EXPECT_GE(r.overall.ci_high, 0.5);
  // Same weights, same sampling settings and seeds: the same answers, so every pair ties.
  EXPECT_EQ(r.overall.ties, kPrompts);
  EXPECT_DOUBLE_EQ(r.overall.win_rate, 0.5);
  EXPECT_DOUBLE_EQ(r.mean_length_a, r.mean_length_b);
}

TEST_F(WinrateEvalTest, APolicyAgainstADegradedCopyHasAnIntervalAboveOneHalf) {
  ServedPolicy policy(policy_), degraded(degraded_);
  GroundTruthJudge judge(*suite_);
  const auto store = open_store("degraded");
  const WinrateReport r = evaluate(*store, spec("policy-vs-degraded"), policy, degraded, judge);
  EXPECT_GT(r.overall.ci_low, 0.5) << r.overall.win_rate;
  EXPECT_LT(r.overall.p_value, 0.01);
  EXPECT_GT(r.lc_win_rate, 0.5);
  EXPECT_DOUBLE_EQ(r.swap_consistency, 1.0);  // the graders have no position
  // And the other way round: the interval lies below one half, mirrored.
  const WinrateReport mirrored =
      evaluate(*store, spec("degraded-vs-policy"), degraded, policy, judge);
  EXPECT_LT(mirrored.overall.ci_high, 0.5);
  EXPECT_EQ(mirrored.overall.wins, r.overall.losses);
  EXPECT_EQ(mirrored.overall.losses, r.overall.wins);
  EXPECT_NEAR(mirrored.overall.win_rate, 1 - r.overall.win_rate, 1e-12);
  // Per task: the counts add up to the whole.
  int total = 0;
  for (const auto& t : r.per_task) {
    total += t.rate.wins + t.rate.ties + t.rate.losses + t.rate.invalid;
  }
  EXPECT_EQ(total, kPrompts);
}

TEST_F(WinrateEvalTest, OrdersThatDisagreeTieAndInvalidIsNeverALoss) {
  ServedPolicy policy(policy_), degraded(degraded_);
  const auto store = open_store("rules");
  // A judge that always prefers the response shown first: each order names another response.
  ScriptedJudge first_wins(says("A"), says("B"));
  const WinrateReport biased = evaluate(*store, spec("biased"), policy, degraded, first_wins);
  EXPECT_EQ(biased.overall.ties + biased.decided_without_judge, kPrompts);
  EXPECT_EQ(biased.judged_in_both_orders, kPrompts - biased.decided_without_judge);
  ASSERT_GT(biased.judged_in_both_orders, kPrompts / 2);
  EXPECT_DOUBLE_EQ(biased.swap_consistency, 0.0);
  // A judge whose B-first output never parses: every judged pair is INVALID, none a loss.
  ScriptedJudge broken(says("B"), says("invalid"));
  const WinrateReport invalid = evaluate(*store, spec("invalid"), policy, degraded, broken);
  EXPECT_EQ(invalid.overall.invalid, kPrompts - invalid.decided_without_judge);
  int judged_losses = 0;
  for (const v1::EvalRecord& record : read_eval_records(*store, "invalid")) {
    if (record.decided_without_judge()) continue;
    EXPECT_EQ(record.verdict(), "invalid");
    EXPECT_EQ(record.verdict_ab(), "B");
    EXPECT_EQ(record.verdict_ba(), "invalid");
    judged_losses += outcome_of(record) == PairOutcome::kLossA;
  }
  EXPECT_EQ(judged_losses, 0);
  // Agreeing orders carry the verdict.
  ScriptedJudge agrees(says("B"), says("B"));
  const WinrateReport b_wins = evaluate(*store, spec("agree"), policy, degraded, agrees);
  EXPECT_EQ(b_wins.overall.losses + b_wins.decided_without_judge, kPrompts);
  EXPECT_DOUBLE_EQ(b_wins.swap_consistency, 1.0);
}

TEST_F(WinrateEvalTest, AReRunSkipsStoredRoundsAndAnInterruptedRunResumesToTheSameRecords) {
  ServedPolicy policy(policy_), degraded(degraded_);
  GroundTruthJudge truth(*suite_);
  const auto store = open_store("resume");
  const v1::EvalSpec s = spec("resume", 16);  // 4 rounds

  // Uninterrupted, in its own store.
  const auto reference_store = open_store("resume-reference");
  evaluate(*reference_store, s, policy, degraded, truth);

  // Interrupted: the judge fails in the third round; two rounds are stored, nothing of the third.
  FailingJudge failing(truth, 3);
  check_or_store_eval_spec(*store, s);
  EXPECT_THROW(run_winrate(*store, s, prompts_, policy.client, degraded.client, failing), Error);
  EXPECT_EQ(read_eval_records(*store, "resume").size(), 32u);
  // Resumed: only the missing rounds run.
  FailingJudge counting(truth, 0);
  EXPECT_EQ(run_winrate(*store, s, prompts_, policy.client, degraded.client, counting), 2);
  EXPECT_EQ(counting.calls, 2);
  // A finished evaluation re-reports without judging anything.
  EXPECT_EQ(run_winrate(*store, s, prompts_, policy.client, degraded.client, counting), 0);
  EXPECT_EQ(counting.calls, 2);

  const auto resumed = read_eval_records(*store, "resume");
  const auto reference = read_eval_records(*reference_store, "resume");
  ASSERT_EQ(resumed.size(), reference.size());
  for (size_t i = 0; i < resumed.size(); ++i) {
    EXPECT_EQ(resumed[i].SerializeAsString(), reference[i].SerializeAsString()) << i;
  }
}

TEST_F(WinrateEvalTest, AnotherSpecUnderTheSameIdIsAnErrorNamingTheField) {
  const auto store = open_store("spec");
  v1::EvalSpec s = spec("same-id");
  check_or_store_eval_spec(*store, s);
  check_or_store_eval_spec(*store, s);  // the same spec again: fine
  s.set_k(3);
  try {
    check_or_store_eval_spec(*store, s);
    FAIL() << "a changed spec was accepted";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("k"), std::string::npos) << message;
    EXPECT_NE(message.find("same-id"), std::string::npos) << message;
    EXPECT_NE(message.find("--eval-id"), std::string::npos) << message;
  }
  EXPECT_EQ(store->eval_spec("same-id")->k(), 1);  // the stored spec is untouched
}

TEST_F(WinrateEvalTest, TheRewardServiceJudgesBothOrdersAndEveryJudgmentIsStored) {
  // The policy itself as the judge model (with room for judge prompts): it was never trained to
  // judge, so many outputs are INVALID; what matters here is the bookkeeping.
  CpuOps<float> ops;
  ModelConfig judge_config = checkpoint_read_info(policy_).config;
  judge_config.max_seq_len = 256;
  Transformer<float> judge_model(ops, judge_config, 8, judge_config.max_seq_len);
  checkpoint_load_weights(policy_, judge_model);
  const auto tokenizer = make_tokenizer("byte");
  Judge judge(judge_model, *tokenizer, 8);
  RewardServer server(judge);
  RewardClient client("127.0.0.1:" + std::to_string(server.port()));
  ServiceJudge service_judge(client, 2, 1.0, /*with_reference=*/true);

  ServedPolicy policy(policy_), degraded(degraded_);
  const auto store = open_store("service");
  v1::EvalSpec s = spec("service", 32);
  s.set_prompts(16);
  const std::vector<TaskExample> prompts(prompts_.begin(), prompts_.begin() + 16);
  check_or_store_eval_spec(*store, s);
  run_winrate(*store, s, prompts, policy.client, degraded.client, service_judge);
  const auto records = read_eval_records(*store, "service");
  ASSERT_EQ(records.size(), 16u);
  for (const v1::EvalRecord& r : records) {
    if (r.decided_without_judge()) continue;
    OrderJudgment ab, ba;
    ab.valid = r.verdict_ab() != "invalid";
    ab.verdict = r.verdict_ab();
    ba.valid = r.verdict_ba() != "invalid";
    ba.verdict = r.verdict_ba();
    EXPECT_EQ(r.verdict(), pair_verdict(ab, ba));
    // k = 2 votes per order: each valid vote keeps its reasoning, each invalid one is counted.
    EXPECT_EQ(r.reasoning_size() + r.reasoning_ba_size() + r.invalid_samples(), 4);
    EXPECT_FALSE(r.response_a().empty());
    EXPECT_FALSE(r.response_b().empty());
  }
  const WinrateReport report = winrate_report("service", records, 1000, 1);
  EXPECT_EQ(report.overall.wins + report.overall.ties + report.overall.losses +
                report.overall.invalid,
            16);
}

}  // namespace
}  // namespace rlhf
