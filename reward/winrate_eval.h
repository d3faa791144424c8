#pragma once
// Pairwise preference evaluation: how often policy A's answer is preferred to policy B's
// (`rlhf eval winrate`, `rlhf eval ratings`; docs/eval.md).
//
// The data flow is the one of the services: both policies answer the same prompts through
// actors (ActorClient: same sampling settings, same seeds), a PairJudge compares every pair in
// both orders, and each prompt's outcome, with both answers and every reasoning text, becomes
// a v1::EvalRecord in the RolloutStore. Rules:
//   - A pair whose two orders disagree is a tie (the judge could not tell them apart beyond its
//     position preference).
//   - A pair with no valid verdict in either order (after the judge's retries) is INVALID: it
//     is counted and left out of every rate, never turned into a loss or a tie.
//   - An empty answer is not sent to the judge (the service refuses empty texts): the other
//     answer wins, two empty answers tie; such pairs are marked decided_without_judge.
//
// Resuming: the prompts are split into rounds of spec.round_prompts; a round is generated,
// judged and stored as one atomic write, and a round already in the store is skipped. The
// policies' seeds depend only on the prompt index, and a round's judge batch is always the
// same, so a resumed evaluation stores what an uninterrupted one would have. The spec is stored
// under the eval id; running another spec under the same id is an error that names the fields
// that differ.
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "reward/preference_stats.h"
#include "rlhf/v1/records.pb.h"
#include "rollout/task_suite.h"

namespace rlhf {

class ActorClient;
class RewardClient;
class RolloutStore;

// One prompt and the two answers to it.
struct EvalPair {
  TaskExample example;  // task may be empty and reference unknown for prompts from a file
  bool has_reference = false;
  std::string response_a, response_b;
};

// One order's judgment of a pair, in terms of the pair's A and B.
struct OrderJudgment {
  bool valid = false;
  std::string verdict = "invalid";  // "A", "B" or "tie" when valid
  double preference_a = 0;
  std::vector<std::string> reasoning;
  int invalid_samples = 0;
  int retries = 0;
};

struct PairJudgment {
  OrderJudgment a_first, b_first;
};

// Compares pairs in both orders. Implementations: ServiceJudge (a generative reward model
// behind the reward service) and GroundTruthJudge (the task suite's graders).
class PairJudge {
 public:
  virtual ~PairJudge() = default;
  // One judgment per pair, in order. `seed` makes it reproducible.
  virtual std::vector<PairJudgment> judge(const std::vector<EvalPair>& pairs, uint64_t seed) = 0;
};

// Both orders of every pair go to RewardService.CompareBatch as separate items (A first, then
// B first, with both_orders off), k votes each. The service refuses a whole request when one
// judge prompt does not fit the judge's context; `fits_context`, when given, says which pairs
// fit, and a pair that does not is INVALID in both orders (with that reason) instead.
class ServiceJudge : public PairJudge {
 public:
  using FitsContext = std::function<bool(const EvalPair& pair, bool with_reference)>;
  ServiceJudge(RewardClient& client, int k, double temperature, bool with_reference,
               FitsContext fits_context = {});
  std::vector<PairJudgment> judge(const std::vector<EvalPair>& pairs, uint64_t seed) override;

 private:
  RewardClient& client_;
  int k_;
  double temperature_;
  bool with_reference_;
  FitsContext fits_context_;
};

// The task graders as the judge: the answer with the higher grade wins, equal grades tie. The
// same in both orders by construction; for the built-in tasks it is the truth the GRM is
// measured against. Every prompt needs a task family the suite can grade.
class GroundTruthJudge : public PairJudge {
 public:
  explicit GroundTruthJudge(const TaskSuite& suite) : suite_(suite) {}
  std::vector<PairJudgment> judge(const std::vector<EvalPair>& pairs, uint64_t seed) override;

 private:
  const TaskSuite& suite_;
};

// The outcome of one pair from its two orders (the rules above).
std::string pair_verdict(const OrderJudgment& a_first, const OrderJudgment& b_first);
PairOutcome outcome_of(const v1::EvalRecord& record);

// The CRC-32C of a file's bytes (for EvalSpec); rlhf::Error when it cannot be read.
uint32_t file_crc32c(const std::string& path);

// Stores `spec` under its eval id, or checks that the stored one is the same; rlhf::Error
// naming each field that differs otherwise.
void check_or_store_eval_spec(RolloutStore& store, const v1::EvalSpec& spec);

struct WinrateProgress {
  int round = 0, rounds = 0;
  uint64_t prompts_done = 0, prompts = 0;
  bool skipped = false;  // the round was already stored
  double round_s = 0;
};

// Generates, judges and stores every round not yet in the store (see the header comment).
// `prompts[i]` has prompt index i. The spec must already be checked (check_or_store_eval_spec).
// Returns the number of rounds run (0 when everything was stored).
int run_winrate(RolloutStore& store, const v1::EvalSpec& spec,
                const std::vector<TaskExample>& prompts, ActorClient& actor_a,
                ActorClient& actor_b, PairJudge& judge,
                const std::function<void(const WinrateProgress&)>& progress = {});

// Every stored record of an evaluation, by prompt index.
std::vector<v1::EvalRecord> read_eval_records(const RolloutStore& store,
                                              const std::string& eval_id);

struct WinrateReport {
  std::string eval_id;
  int prompts = 0;
  WinRate overall;                 // counts, win rate (ties half), bootstrap CI, sign test
  double swap_consistency = 0;     // of pairs judged valid in both orders: same verdict
  int judged_in_both_orders = 0;   // the denominator of swap_consistency
  double lc_win_rate = 0.5;        // length-controlled (preference_stats.h)
  double mean_length_a = 0, mean_length_b = 0;  // tokens, over all prompts
  int decided_without_judge = 0;
  // Pairs whose two answers are the same text. A judge can only tie them honestly; one that
  // names a position instead shows up as disagreeing orders (a tie, and lower consistency).
  int identical_answers = 0;
  int64_t invalid_samples = 0, retries = 0;
  struct Task {
    std::string task;
    WinRate rate;
  };
  std::vector<Task> per_task;  // by task name; "(none)" for prompts without one
};

// The report of stored records; `resamples` bootstrap resamples (>= 1000 for reports).
WinrateReport winrate_report(const std::string& eval_id,
                             const std::vector<v1::EvalRecord>& records, int resamples,
                             uint64_t seed);

// Bradley-Terry ratings of several models from pairwise evaluations on the same prompts.
struct PairRecords {
  int a = 0, b = 0;  // model indices
  std::vector<v1::EvalRecord> records;
};

struct RatingsReport {
  // Per model, on the Elo scale: 400 * log10 of the Bradley-Terry strength, mean 1000.
  std::vector<double> rating, ci_low, ci_high;
  // 1 + the number of models whose interval lies wholly above this one's: models whose
  // intervals overlap share a rank.
  std::vector<int> rank;
  int valid_comparisons = 0;
};

// Fits on every valid outcome; the intervals come from a bootstrap over prompt indices (the
// same resampled prompts for every pair, so a prompt's outcomes stay together).
RatingsReport bradley_terry_ratings(int n_models, const std::vector<PairRecords>& pairs,
                                    int resamples, uint64_t seed, double confidence = 0.95);

}  // namespace rlhf
