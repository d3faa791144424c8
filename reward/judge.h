#pragma once
// Judging with a generative reward model: batched generation of judge outputs (KV cache, one
// Generator), k-sample voting, bounded retries of INVALID outputs with new seeds. Every result
// keeps the reasoning of each valid sample and counts its invalid samples and retries.
//
// Voting. Pointwise: the score is the mean of the k valid samples' scores. Pairwise: each
// sample votes A, B or tie; with `swap_order` half of the samples (those with odd index) see the
// two responses in swapped order and their verdict is mapped back, so a judge's position bias
// cancels; preference_a = (votes for A + ties / 2) / valid votes, and the verdict is A above
// 0.5, B below, tie at exactly 0.5. A sample whose output stays INVALID after max_retries
// retries does not vote; a request with no valid vote at all is INVALID (valid = false), never
// a default score or a tie.
#include <array>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "model/checkpoint.h"
#include "model/generate.h"
#include "reward/judge_format.h"

namespace rlhf {

struct JudgeRequest {  // pointwise
  std::string prompt;
  std::string response;
  std::optional<std::string> reference;
};

struct PairwiseRequest {
  std::string prompt;
  std::string response_a;
  std::string response_b;
  std::optional<std::string> reference;
};

struct VotingParams {
  int k = 1;                  // samples per request, 1..kMaxVotes
  double temperature = 0.0;   // 0: greedy (then the k samples agree unless order swaps differ)
  int max_retries = 2;        // extra attempts per INVALID sample, each with a new seed
  int max_new_tokens = 96;    // per judge output, eos included (a pairwise reasoning that quotes
                              // both responses runs to ~80 tokens); per turn in the split pair
                              // layout (judge_format.h)
  uint64_t seed = 0;
  bool swap_order = true;     // pairwise: odd samples see B first
  // Split pair layout, with a reference: each side is read alone, as a pointwise judgment, and
  // the judge writes the verdict after both readings (judge_format.h). Off: the two turns, the
  // second reasoning about B after A's. Separate sides judge far better (docs/grm.md, "separate
  // sides"): a side's reading cannot depend on the pair's order or on the other side.
  bool separate_sides = true;
  // Separate sides: when the two readings end with different scores, the verdict is their
  // comparison (the higher score wins) and no verdict turn is generated; the judge writes the
  // verdict only when the scores are equal (or one does not parse: verdict_from_readings). So a
  // verdict never contradicts the judge's own readings of the two sides, and the order of the
  // pair matters only where the readings cannot tell the sides apart. Off: the judge writes every
  // verdict (docs/grm.md, "the verdict from the readings' scores").
  bool verdict_from_scores = true;
  static constexpr int kMaxVotes = 32;
  void validate() const;      // rlhf::Error naming the bad field
};

struct PointwiseJudgment {
  bool valid = false;
  double score = 0;                    // mean of sample_scores; 0 when invalid
  std::vector<int> sample_scores;      // one per valid sample
  std::vector<std::string> reasoning;  // one per valid sample
  int invalid_samples = 0;             // samples that stayed INVALID after their retries
  int retries = 0;                     // extra generations spent on INVALID outputs
};

struct PairwiseJudgment {
  bool valid = false;
  Verdict verdict = Verdict::kTie;
  double preference_a = 0.5;
  std::vector<Verdict> votes;          // one per valid sample, mapped back to the request's order
  std::vector<std::string> reasoning;  // one per valid sample (as written, in the order it saw)
  int invalid_samples = 0;
  int retries = 0;
};

// The prompt layout travels with the judge: `rlhf train-grm` writes it into its checkpoints
// (judge_layout_annotations), and whoever loads a judge reads it back with judge_layout_of.
// Metadata: the column layout as kJudgeColumnsKey = its width, the tagged layout as
// kJudgeLayoutKey = "tagged"; neither key means the line layout.
inline constexpr const char* kJudgeColumnsKey = "judge_columns";
inline constexpr const char* kJudgeLayoutKey = "judge_layout";
// The layout code of judge_format.h. An rlhf::Error naming the checkpoint and the key if a value
// is not one of the above, or if both keys are present.
int judge_layout_of(const CheckpointContents& info, const std::string& path);
// The metadata that records `layout` (empty for the line layout).
std::map<std::string, std::string> judge_layout_annotations(int layout);
// "line layout", "column layout of 10", "tagged layout": for logs.
std::string judge_layout_name(int layout);
// How Judge::compare judges a pair: "one prompt", "two turns" (the split pair layout) or
// "separate sides" (the split pair layout with VotingParams::separate_sides).
// "separate sides, verdict from scores" when VotingParams::verdict_from_scores is on as well.
std::string pair_judging_name(int layout, bool with_reference, bool separate_sides,
                              bool verdict_from_scores);

class Judge {
 public:
  // `model` must be built for at least `max_batch` sequences of config.max_seq_len tokens.
  // layout: the prompt layout the judge was trained with (judge_layout_of).
  Judge(Transformer<float>& model, const Tokenizer& tokenizer, int max_batch,
        int layout = kJudgeLinesLayout);

  std::vector<PointwiseJudgment> score(const std::vector<JudgeRequest>& requests,
                                       const VotingParams& params);
  std::vector<PairwiseJudgment> compare(const std::vector<PairwiseRequest>& requests,
                                        const VotingParams& params);

  const Tokenizer& tokenizer() const { return tokenizer_; }
  const ModelConfig& model_config() const { return model_.config(); }
  int layout() const { return layout_; }

 private:
  // Generates judge outputs for `prompts` (judge prompt texts), retrying outputs that `valid`
  // rejects; returns the final output per prompt and adds retries to *retries[i].
  template <typename IsValid>
  std::vector<std::string> generate_with_retries(const std::vector<std::string>& prompts,
                                                 const VotingParams& params, uint64_t seed_base,
                                                 IsValid valid, std::vector<int>& retries);

  // The token that ends a split pair's first turn and a separate side's reading.
  int32_t newline_token() const;
  // The last turn of a split pair (both ways): `contexts` generated to eos with a seed of its
  // own, derived from the first turn's; none if there are none.
  std::vector<Generation> last_turn(const std::vector<std::vector<int32_t>>& contexts,
                                    const SamplingParams& sampling);

  // One generation of the split pair layout's two turns (judge_format.h) for the pairs
  // `pending` of `turns`: the first turn from the prompt up to the judge's newline, then side B's
  // line appended and the second turn to eos. Per entry of pending, the two turns joined, or
  // nullopt if either stopped otherwise.
  std::vector<std::optional<std::string>> split_pair_attempt(
      const std::vector<SplitPairTurns>& turns, const std::vector<size_t>& pending,
      const SamplingParams& sampling);
  // The same with separate sides (VotingParams::separate_sides, judge_format.h): both sides'
  // pointwise readings in one batch (side_prompts[i]: A's and B's pointwise prompts, each up to
  // its first newline), then per pair the turns with both readings given and the verdict line
  // generated; with verdict_from_scores, only for the pairs whose readings' scores are equal
  // (the others get the verdict of verdict_from_readings written after their readings).
  std::vector<std::optional<std::string>> separate_sides_attempt(
      const std::vector<SplitPairTurns>& turns,
      const std::vector<std::array<std::string, 2>>& side_prompts,
      const std::vector<size_t>& pending, const SamplingParams& sampling,
      bool verdict_from_scores);

  Transformer<float>& model_;
  const Tokenizer& tokenizer_;
  Generator generator_;
  int layout_;
};

}  // namespace rlhf
