#include "reward/grm_eval.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include <fmt/core.h>
#include <spdlog/spdlog.h>

#include "common/error.h"
#include "common/rng.h"
#include "model/generate.h"
#include "reward/judge.h"

namespace rlhf {

namespace {

std::vector<double> average_ranks(const std::vector<double>& v) {
  std::vector<size_t> order(v.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return v[a] < v[b]; });
  std::vector<double> ranks(v.size());
  for (size_t i = 0; i < order.size();) {
    size_t j = i;
    while (j + 1 < order.size() && v[order[j + 1]] == v[order[i]]) ++j;
    const double rank = 0.5 * double(i + j);  // ties share the mean of their positions
    for (size_t t = i; t <= j; ++t) ranks[order[t]] = rank;
    i = j + 1;
  }
  return ranks;
}

struct Candidate {
  std::string text;
  double truth = 0;  // grader score 0..10
};

}  // namespace

double spearman_correlation(const std::vector<double>& x, const std::vector<double>& y) {
  RLHF_CHECK(x.size() == y.size(), "spearman needs equal lengths");
  if (x.size() < 2) return 0;
  const std::vector<double> rx = average_ranks(x), ry = average_ranks(y);
  const double mx = std::accumulate(rx.begin(), rx.end(), 0.0) / double(rx.size());
  const double my = std::accumulate(ry.begin(), ry.end(), 0.0) / double(ry.size());
  double sxy = 0, sxx = 0, syy = 0;
  for (size_t i = 0; i < rx.size(); ++i) {
    sxy += (rx[i] - mx) * (ry[i] - my);
    sxx += (rx[i] - mx) * (rx[i] - mx);
    syy += (ry[i] - my) * (ry[i] - my);
  }
  return sxx > 0 && syy > 0 ? sxy / std::sqrt(sxx * syy) : 0.0;
}

GrmEvalResult evaluate_grm(Transformer<float>& judge_model, const Tokenizer& tokenizer,
                           const TaskSuite& suite, const GrmEvalOptions& options) {
  RLHF_CHECK(options.prompts > 0 && options.k > 0, "evaluate_grm needs prompts and k");
  GrmEvalResult result;
  result.prompts = options.prompts;
  result.k = options.k;
  Rng rng(mix_seed(options.seed, 0xE7A1));

  // Responses of graded quality for every held-out prompt.
  std::vector<TaskExample> examples;
  std::vector<std::string> prompt_texts;
  for (int i = 0; i < options.prompts; ++i) {
    examples.push_back(suite.example(Split::kHeldOut, uint64_t(i)));
    prompt_texts.push_back(examples.back().prompt);
  }
  std::vector<Generation> own;
  {
    Generator policy(judge_model, tokenizer, options.max_batch);
    SamplingParams params;
    params.temperature = 1.0;
    params.max_new_tokens = 24;
    params.seed = mix_seed(options.seed, 0x9011);
    own = policy.generate_text(prompt_texts, params);
  }
  std::vector<std::vector<Candidate>> candidates(examples.size());
  for (size_t i = 0; i < examples.size(); ++i) {
    const TaskExample& ex = examples[i];
    std::vector<std::string> texts = {ex.reference, corrupt_response(ex, rng, nullptr),
                                      corrupt_response(ex, rng, nullptr)};
    if (!own[i].text.empty()) texts.push_back(own[i].text);
    for (const std::string& t : texts) {
      candidates[i].push_back({t, suite.grade(ex, t).score});
    }
  }
  const std::optional<std::string> no_reference;
  auto reference_of = [&](size_t i) {
    return options.with_reference ? std::optional<std::string>(examples[i].reference)
                                  : no_reference;
  };

  Judge judge(judge_model, tokenizer, options.max_batch, options.layout);
  result.pair_judging =
      pair_judging_name(options.layout, options.with_reference, options.separate_sides,
                        options.verdict_from_scores);
  auto count = [&](int invalid, int retries, int samples) {
    result.invalid_samples += invalid;
    result.retries += retries;
    result.judge_samples += samples;
  };

  // ---- pointwise: Spearman against the grader
  std::vector<JudgeRequest> point_requests;
  std::vector<double> truth;
  std::vector<size_t> first_item(examples.size());  // pointwise item of candidate 0 of prompt i
  for (size_t i = 0; i < examples.size(); ++i) {
    first_item[i] = point_requests.size();
    for (const Candidate& c : candidates[i]) {
      point_requests.push_back({examples[i].prompt, c.text, reference_of(i)});
      truth.push_back(c.truth);
    }
  }
  VotingParams greedy;
  greedy.k = 1;
  greedy.temperature = 0;
  greedy.seed = options.seed;
  greedy.swap_order = false;
  greedy.max_new_tokens = options.max_new_tokens;
  greedy.separate_sides = options.separate_sides;
  greedy.verdict_from_scores = options.verdict_from_scores;
  spdlog::info("eval grm: {} pointwise judgments", point_requests.size());
  const std::vector<PointwiseJudgment> scores = judge.score(point_requests, greedy);
  std::vector<double> judged, judged_truth;
  for (size_t i = 0; i < scores.size(); ++i) {
    result.pointwise_judgments.push_back(
        {point_requests[i].prompt, point_requests[i].response, point_requests[i].reference,
         truth[i], scores[i]});
    count(scores[i].invalid_samples, scores[i].retries, 1);
    if (!scores[i].valid) continue;
    judged.push_back(scores[i].score);
    judged_truth.push_back(truth[i]);
    if (result.examples.size() < 4) {
      result.examples.push_back(fmt::format("{} -> {} | {} | Score: {} (grader {:g})",
                                            point_requests[i].prompt, point_requests[i].response,
                                            scores[i].reasoning[0], scores[i].score, truth[i]));
    }
  }
  result.pointwise_items = int64_t(point_requests.size());
  result.spearman = spearman_correlation(judged, judged_truth);

  // ---- pairwise: pairs with different ground truth, in a random order
  std::vector<PairwiseRequest> pairs, swapped_pairs;
  std::vector<int> better;  // 0: A is better, 1: B is better
  std::vector<std::pair<size_t, size_t>> pair_items;  // the pair's A and B as pointwise items
  for (size_t i = 0; i < examples.size(); ++i) {
    const auto& cs = candidates[i];
    std::vector<std::pair<size_t, size_t>> options_here;
    for (size_t a = 0; a < cs.size(); ++a) {
      for (size_t b = a + 1; b < cs.size(); ++b) {
        if (cs[a].truth != cs[b].truth && cs[a].text != cs[b].text) options_here.push_back({a, b});
      }
    }
    for (int p = 0; p < options.pairs_per_prompt && !options_here.empty(); ++p) {
      const size_t pick = size_t(rng.uniform_int(0, int64_t(options_here.size()) - 1));
      auto [a, b] = options_here[pick];
      options_here.erase(options_here.begin() + long(pick));
      if (rng.uniform() < 0.5) std::swap(a, b);
      pairs.push_back({examples[i].prompt, cs[a].text, cs[b].text, reference_of(i)});
      swapped_pairs.push_back({examples[i].prompt, cs[b].text, cs[a].text, reference_of(i)});
      better.push_back(cs[a].truth > cs[b].truth ? 0 : 1);
      pair_items.push_back({first_item[i] + a, first_item[i] + b});
    }
  }
  result.pairs = int64_t(pairs.size());
  spdlog::info("eval grm: {} pairs, greedy in both orders and {} votes", pairs.size(), options.k);
  const std::vector<PairwiseJudgment> forward = judge.compare(pairs, greedy);
  const std::vector<PairwiseJudgment> backward = judge.compare(swapped_pairs, greedy);
  VotingParams voting;
  voting.k = options.k;
  voting.temperature = options.temperature;
  voting.seed = options.seed + 1;
  voting.swap_order = true;
  voting.max_new_tokens = options.max_new_tokens;
  voting.separate_sides = options.separate_sides;
  voting.verdict_from_scores = options.verdict_from_scores;
  const std::vector<PairwiseJudgment> voted = judge.compare(pairs, voting);
  int64_t correct = 0, correct_k = 0, consistent = 0, both_valid = 0, correct_scores = 0;
  for (size_t i = 0; i < pairs.size(); ++i) {
    const Verdict want = better[i] == 0 ? Verdict::kA : Verdict::kB;
    // The same pair decided by the two greedy pointwise scores (no extra generation).
    const PointwiseJudgment& sa = scores[pair_items[i].first];
    const PointwiseJudgment& sb = scores[pair_items[i].second];
    if (sa.valid && sb.valid && sa.score != sb.score) {
      correct_scores += (sa.score > sb.score ? Verdict::kA : Verdict::kB) == want;
    }
    count(forward[i].invalid_samples, forward[i].retries, 1);
    count(backward[i].invalid_samples, backward[i].retries, 1);
    count(voted[i].invalid_samples, voted[i].retries, options.k);
    result.pair_judgments.push_back({pairs[i].prompt, pairs[i].response_a, pairs[i].response_b,
                                     truth[pair_items[i].first], truth[pair_items[i].second],
                                     pair_items[i].first, pair_items[i].second, forward[i],
                                     backward[i], voted[i]});
    correct += forward[i].valid && forward[i].verdict == want;
    correct_k += voted[i].valid && voted[i].verdict == want;
    if (forward[i].valid && backward[i].valid) {
      ++both_valid;
      const Verdict back = backward[i].verdict == Verdict::kA   ? Verdict::kB
                           : backward[i].verdict == Verdict::kB ? Verdict::kA
                                                                : Verdict::kTie;
      consistent += back == forward[i].verdict;
    }
  }
  if (!pairs.empty()) {
    result.pairwise_accuracy = double(correct) / double(pairs.size());
    result.pairwise_accuracy_vote_k = double(correct_k) / double(pairs.size());
    result.pairwise_accuracy_from_scores = double(correct_scores) / double(pairs.size());
  }
  result.swap_consistency = both_valid ? double(consistent) / double(both_valid) : 0.0;
  result.invalid_rate =
      result.judge_samples ? double(result.invalid_samples) / double(result.judge_samples) : 0.0;
  return result;
}

}  // namespace rlhf
