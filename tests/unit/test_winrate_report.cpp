// The win-rate report and the Bradley-Terry ratings of reward/winrate_eval.h on hand-made
// evaluation records, with every expected number worked out by hand.
#include <gtest/gtest.h>

#include <cmath>

#include "common/error.h"
#include "reward/winrate_eval.h"

namespace rlhf {
namespace {

v1::EvalRecord record(uint64_t prompt, const std::string& task, const std::string& verdict,
                      const std::string& ab, const std::string& ba, uint32_t length_a,
                      uint32_t length_b, bool without_judge = false) {
  v1::EvalRecord r;
  r.set_eval_id("e");
  r.set_prompt_index(prompt);
  r.set_task(task);
  r.set_response_a("a" + std::to_string(prompt));  // different answers unless a test says so
  r.set_response_b("b" + std::to_string(prompt));
  r.set_verdict(verdict);
  r.set_verdict_ab(ab);
  r.set_verdict_ba(ba);
  r.set_length_a(length_a);
  r.set_length_b(length_b);
  r.set_decided_without_judge(without_judge);
  return r;
}

TEST(PairVerdict, AgreeingOrdersDecideDisagreeingOnesTieAndAnInvalidOrderIsInvalid) {
  auto order = [](const std::string& v) {
    OrderJudgment j;
    j.valid = v != "invalid";
    j.verdict = v;
    return j;
  };
  EXPECT_EQ(pair_verdict(order("A"), order("A")), "A");
  EXPECT_EQ(pair_verdict(order("B"), order("B")), "B");
  EXPECT_EQ(pair_verdict(order("tie"), order("tie")), "tie");
  EXPECT_EQ(pair_verdict(order("A"), order("B")), "tie");
  EXPECT_EQ(pair_verdict(order("A"), order("tie")), "tie");
  EXPECT_EQ(pair_verdict(order("A"), order("invalid")), "invalid");
  EXPECT_EQ(pair_verdict(order("invalid"), order("B")), "invalid");
}

TEST(WinrateReport, CountsRatesSwapConsistencyLengthsAndTasksByHand) {
  const std::vector<v1::EvalRecord> records = {
      record(0, "add", "A", "A", "A", 5, 3),
      record(1, "add", "tie", "A", "B", 4, 4),          // orders disagree
      record(2, "sort", "B", "B", "B", 2, 4),
      record(3, "sort", "invalid", "A", "invalid", 3, 3),
      record(4, "count", "A", "A", "A", 6, 0, true),    // B's answer was empty
  };
  const WinrateReport r = winrate_report("e", records, 1000, 1);
  EXPECT_EQ(r.prompts, 5);
  EXPECT_EQ(r.overall.wins, 2);
  EXPECT_EQ(r.overall.ties, 1);
  EXPECT_EQ(r.overall.losses, 1);
  EXPECT_EQ(r.overall.invalid, 1);
  EXPECT_DOUBLE_EQ(r.overall.win_rate, 2.5 / 4);  // ties half, invalid left out
  // Judged in both orders with two valid verdicts: prompts 0, 1, 2; two of them agree.
  EXPECT_EQ(r.judged_in_both_orders, 3);
  EXPECT_DOUBLE_EQ(r.swap_consistency, 2.0 / 3);
  EXPECT_EQ(r.decided_without_judge, 1);
  EXPECT_EQ(r.identical_answers, 0);
  EXPECT_DOUBLE_EQ(r.mean_length_a, (5 + 4 + 2 + 3 + 6) / 5.0);
  EXPECT_DOUBLE_EQ(r.mean_length_b, (3 + 4 + 4 + 3 + 0) / 5.0);
  ASSERT_EQ(r.per_task.size(), 3u);  // by name: add, count, sort
  EXPECT_EQ(r.per_task[0].task, "add");
  EXPECT_DOUBLE_EQ(r.per_task[0].rate.win_rate, 0.75);
  EXPECT_EQ(r.per_task[1].task, "count");
  EXPECT_DOUBLE_EQ(r.per_task[1].rate.win_rate, 1.0);
  EXPECT_EQ(r.per_task[2].task, "sort");
  EXPECT_EQ(r.per_task[2].rate.losses, 1);
  EXPECT_EQ(r.per_task[2].rate.invalid, 1);
  EXPECT_DOUBLE_EQ(r.per_task[2].rate.win_rate, 0.0);
}

TEST(WinrateReport, CountsIdenticalAnswers) {
  std::vector<v1::EvalRecord> records = {record(0, "add", "tie", "A", "B", 2, 2),
                                         record(1, "add", "A", "A", "A", 2, 2)};
  records[0].set_response_a("12");
  records[0].set_response_b("12");
  records[1].set_response_a("12");
  records[1].set_response_b("13");
  EXPECT_EQ(winrate_report("e", records, 1000, 1).identical_answers, 1);
}

TEST(WinrateReport, AnUnknownStoredVerdictIsAnErrorNamingThePrompt) {
  const std::vector<v1::EvalRecord> records = {record(7, "add", "A wins", "A", "A", 1, 1)};
  try {
    winrate_report("e", records, 1000, 1);
    FAIL() << "accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("prompt 7"), std::string::npos) << e.what();
  }
}

PairRecords pair_records(int a, int b, int prompts, int a_wins, int ties) {
  PairRecords p{a, b, {}};
  for (int i = 0; i < prompts; ++i) {
    const std::string v = i < a_wins ? "A" : i < a_wins + ties ? "tie" : "B";
    p.records.push_back(record(uint64_t(i), "add", v, v, v, 1, 1));
  }
  return p;
}

TEST(BradleyTerryRatings, TheFitIsTheEloScaleOfBradleyTerryAndOverlappingModelsShareARank) {
  // Model 0 beats 1 and 2 on 36 of 40 prompts; 1 and 2 tie on every prompt and do equally
  // against 0: they are the same strength, and 0 is far above both.
  const std::vector<PairRecords> pairs = {pair_records(0, 1, 40, 36, 0),
                                          pair_records(0, 2, 40, 36, 0),
                                          pair_records(1, 2, 40, 0, 40)};
  const RatingsReport r = bradley_terry_ratings(3, pairs, 1000, 11);
  EXPECT_EQ(r.valid_comparisons, 120);
  std::vector<PairwiseResult> all;
  for (const PairRecords& p : pairs)
    for (const v1::EvalRecord& rec : p.records)
      all.push_back({p.a, p.b, rec.verdict() == "A" ? 1.0 : rec.verdict() == "tie" ? 0.5 : 0.0});
  const std::vector<double> theta = bradley_terry(3, all, 0.5, 10000, 1e-9);
  const double elo = 400 / std::log(10.0);
  for (int m = 0; m < 3; ++m) EXPECT_NEAR(r.rating[size_t(m)], 1000 + elo * theta[size_t(m)], 1e-9);
  EXPECT_NEAR(r.rating[1], r.rating[2], 1e-6);
  EXPECT_NEAR((r.rating[0] + r.rating[1] + r.rating[2]) / 3, 1000, 1e-6);  // mean 1000
  for (int m = 0; m < 3; ++m) {
    EXPECT_LE(r.ci_low[size_t(m)], r.rating[size_t(m)] + 1e-9);
    EXPECT_GE(r.ci_high[size_t(m)], r.rating[size_t(m)] - 1e-9);
  }
  EXPECT_GT(r.ci_low[0], std::max(r.ci_high[1], r.ci_high[2]));
  EXPECT_EQ(r.rank, (std::vector<int>{1, 2, 2}));
}

TEST(BradleyTerryRatings, InvalidOutcomesAreLeftOutAndTooFewModelsAreAnError) {
  PairRecords p = pair_records(0, 1, 10, 5, 0);
  p.records.push_back(record(10, "add", "invalid", "A", "invalid", 1, 1));
  const RatingsReport r = bradley_terry_ratings(2, {p}, 1000, 3);
  EXPECT_EQ(r.valid_comparisons, 10);
  EXPECT_NEAR(r.rating[0], 1000, 1e-6);  // 5 wins, 5 losses
  EXPECT_EQ(r.rank, (std::vector<int>{1, 1}));
  EXPECT_THROW(bradley_terry_ratings(1, {}, 1000, 3), Error);
}

}  // namespace
}  // namespace rlhf
