#include "learner/collector.h"

#include <algorithm>
#include <chrono>
#include <map>

#include <spdlog/spdlog.h>

#include "common/error.h"
#include "common/rng.h"

namespace rlhf {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

}  // namespace

std::optional<double> rollout_reward(const v1::ScoredRollout& s, const std::string& source) {
  if (source == "ground_truth") {
    if (!s.has_ground_truth_score()) return std::nullopt;
    return s.ground_truth_score();
  }
  if (!s.judgment().valid()) return std::nullopt;
  return s.judgment().score();
}

Collector::Collector(const RunConfig& config, std::string run_id, const TaskSuite& suite,
                     RolloutSampler& sampler, RolloutScorer& scorer, RolloutStore& store)
    : config_(config), run_id_(std::move(run_id)), suite_(suite), sampler_(sampler),
      scorer_(scorer), store_(store) {}

std::vector<v1::Prompt> Collector::prompts(int64_t step) const {
  const RlConfig& rl = config_.rl;
  std::vector<v1::Prompt> prompts;
  for (int i = 0; i < rl.prompts_per_step; ++i) {
    const uint64_t index = uint64_t(step) * uint64_t(rl.prompts_per_step) + uint64_t(i);
    // 40-bit suite indices, a stream of its own (not the SFT data's).
    const TaskExample example = suite_.example(Split::kTrain, mix_seed(rl.seed, index) >> 24);
    v1::Prompt p;
    p.set_run_id(run_id_);
    p.set_prompt_index(index);
    p.set_text(example.prompt);
    p.set_task(example.task);
    p.set_reference(example.reference);
    prompts.push_back(std::move(p));
  }
  return prompts;
}

std::vector<v1::ScoredRollout> Collector::collect(int64_t step, uint64_t version, bool read_back,
                                                  CollectStats& m) {
  const RlConfig& rl = config_.rl;
  const std::vector<v1::Prompt> prompts = this->prompts(step);
  const uint64_t first = prompts.front().prompt_index();
  const uint64_t end = prompts.back().prompt_index() + 1;
  const size_t expected = prompts.size() * size_t(rl.samples_per_prompt);
  auto t0 = Clock::now();
  std::vector<v1::ScoredRollout> stored;
  if (read_back) stored = store_.read_scored(run_id_, version, first, end);
  if (stored.size() == expected) {
    // A restarted learner redoing a step it had already collected: train on exactly what the
    // store holds, so nothing is sampled twice.
    m.from_store = true;
    m.store_s = seconds_since(t0);
    m.rollouts = stored.size();
    spdlog::info("step {}: {} scored rollouts of version {} read back from the store", step + 1,
                 stored.size(), version);
    return stored;
  }
  if (!stored.empty()) {
    fail("store '{}': run '{}' version {} holds {} of the {} rollouts of prompts {}..{}; a step "
         "is written in one batch, so the store was changed by something else",
         store_.path(), run_id_, version, stored.size(), expected, first, end - 1);
  }

  v1::GenerateRequest request;
  for (const v1::Prompt& p : prompts) {
    auto* item = request.add_prompts();
    item->set_prompt_index(p.prompt_index());
    item->set_text(p.text());
  }
  request.set_n(rl.samples_per_prompt);
  request.set_temperature(config_.sampling.temperature);
  request.set_top_k(config_.sampling.top_k);
  request.set_top_p(config_.sampling.top_p);
  request.set_max_new_tokens(config_.sampling.max_new_tokens);
  request.set_seed(mix_seed(rl.seed, 0x6E4E000000ull + uint64_t(step)));
  request.set_want_routing(true);
  request.set_expect_version(version);
  t0 = Clock::now();
  std::vector<v1::GenerateResponse> responses = sampler_.generate(request);
  m.generate_s = seconds_since(t0);

  std::map<uint64_t, const v1::Prompt*> by_index;
  for (const v1::Prompt& p : prompts) by_index[p.prompt_index()] = &p;
  std::vector<v1::ScoredRollout> scored;
  int64_t generated_tokens = 0;
  for (v1::GenerateResponse& response : responses) {
    if (!by_index.count(response.prompt_index()))
      fail("actor returned prompt index {}, which was not asked for", response.prompt_index());
    for (v1::Rollout& rollout : *response.mutable_rollouts()) {
      rollout.set_run_id(run_id_);
      generated_tokens += rollout.response_tokens_size();
      v1::ScoredRollout s;
      *s.mutable_rollout() = std::move(rollout);
      scored.push_back(std::move(s));
    }
  }
  if (scored.size() != expected)
    fail("actors returned {} rollouts, expected {}", scored.size(), expected);
  std::sort(scored.begin(), scored.end(), [](const auto& a, const auto& b) {
    return std::pair(a.rollout().prompt_index(), a.rollout().sample_index()) <
           std::pair(b.rollout().prompt_index(), b.rollout().sample_index());
  });
  m.actor_tokens_per_s = m.generate_s > 0 ? double(generated_tokens) / m.generate_s : 0;

  // The grader's score is always recorded (a metric, and the reward of ground_truth runs);
  // the judge sees only non-empty responses: an empty one has nothing to judge.
  v1::ScoreRequest score_request;
  std::vector<size_t> judged;
  const bool judging = rl.reward == "judge" || rl.judge_rollouts;
  for (size_t i = 0; i < scored.size(); ++i) {
    const v1::Prompt& prompt = *by_index[scored[i].rollout().prompt_index()];
    const TaskExample example{prompt.task(), prompt.text(), prompt.reference()};
    scored[i].set_ground_truth_score(suite_.grade(example, scored[i].rollout().text()).score);
    if (!judging || scored[i].rollout().text().empty()) continue;
    auto* item = score_request.add_items();
    item->set_prompt(prompt.text());
    item->set_response(scored[i].rollout().text());
    if (rl.judge_with_reference) item->set_reference(prompt.reference());
    judged.push_back(i);
  }
  t0 = Clock::now();
  if (!judged.empty()) {
    score_request.set_k(rl.judge_k);
    score_request.set_temperature(rl.judge_temperature);
    score_request.set_seed(mix_seed(rl.seed, 0x4A55000000ull + uint64_t(step)));
    const v1::ScoreResponse score_response = scorer_.score(score_request);
    if (size_t(score_response.results_size()) != judged.size())
      fail("reward service returned {} results for {} items", score_response.results_size(),
           judged.size());
    for (size_t j = 0; j < judged.size(); ++j) {
      const v1::PointwiseResult& r = score_response.results(int(j));
      v1::Judgment* judgment = scored[judged[j]].mutable_judgment();
      judgment->set_valid(r.valid());
      judgment->set_score(r.score());
      *judgment->mutable_sample_scores() = r.sample_scores();
      *judgment->mutable_reasoning() = r.reasoning();
      judgment->set_invalid_samples(r.invalid_samples());
      judgment->set_retries(r.retries());
    }
  }
  m.score_s = seconds_since(t0);
  for (v1::ScoredRollout& s : scored) {
    const std::optional<double> reward = rollout_reward(s, rl.reward);
    s.set_reward(reward.value_or(0.0));
  }
  t0 = Clock::now();
  store_.write_step(prompts, scored);
  m.store_s = seconds_since(t0);
  m.rollouts = scored.size();
  return scored;
}

}  // namespace rlhf
