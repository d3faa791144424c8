#pragma once
// `rlhf train-grm`: trains one model that both generates and judges. The judge's data is scored
// data (reward/scored_data.h): built from the task suite with the starting policy's own samples,
// or a user's JSONL file. Training continues from the policy checkpoint (grm.policy) on a mix of
// judge examples (share grm.judge_fraction; the loss covers the reasoning, the verdict line and
// eos) and the task suite's demonstrations (so the model keeps its policy skills).
//
// Work directory: what `rlhf sft` writes (learner/sft.h), plus
//   DIR/scored.jsonl   the judge data the run trains on (written before training; read back on
//                      --resume, so a resumed run sees exactly the same data)
#include <memory>
#include <string>

#include "learner/sft.h"
#include "reward/scored_data.h"

namespace rlhf {

// The training sequence of one pairwise record in the split pair layout (judge_format.h): the
// prompt with side A's line, the judge's turn about A, side B's line (given, not trained), the
// judge's turn about B with the verdict line, eos. An rlhf::Error naming the record (`index`)
// if its reasoning is not "A <about A>; B <about B>" with no newline in side A's part.
TrainingSequence split_pair_example(const Tokenizer& tokenizer, const PairwiseExample& e,
                                    size_t index);

// Judge examples and demonstrations, mixed by a hash of the index.
class JudgeMixSource : public SftDataSource {
 public:
  // Records whose judge sequence exceeds max_seq_len + 1 tokens are left out and counted.
  // layout: the judge prompts' layout (judge_format.h).
  JudgeMixSource(const ScoredData& data, const TaskSuite& suite, const Tokenizer& tokenizer,
                 double judge_fraction, int max_seq_len, int layout = kJudgeLinesLayout);
  TrainingSequence sequence(uint64_t index) const override;
  std::string describe(uint64_t index) const override;
  size_t judge_examples() const { return judge_.size(); }
  size_t too_long() const { return too_long_; }

 private:
  bool is_judge(uint64_t index) const;
  std::vector<TrainingSequence> judge_;
  std::vector<std::string> judge_prompts_;  // for error messages
  DemonstrationSource demonstrations_;
  double judge_fraction_;
  size_t too_long_ = 0;
};

// The judge data of a run: the user's file, or built from the task suite (training split) with
// the policy's samples when a policy is given.
ScoredData make_grm_data(const RunConfig& config);

struct GrmRunSummary {
  SftSummary sft;
  std::string data_path;
  int64_t pointwise_records = 0;
  int64_t pairwise_records = 0;
  int64_t too_long_records = 0;  // left out: longer than the model's context
};

GrmRunSummary run_train_grm(const RunConfig& config, const std::string& workdir, bool resume);

}  // namespace rlhf
