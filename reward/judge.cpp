#include "reward/judge.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <numeric>

#include "common/error.h"
#include "common/rng.h"

namespace rlhf {

void VotingParams::validate() const {
  if (k < 1 || k > kMaxVotes) fail("k: must be in 1..{}, got {}", kMaxVotes, k);
  if (!(temperature >= 0) || !std::isfinite(temperature)) {
    fail("temperature: must be a finite number >= 0, got {}", temperature);
  }
  if (max_retries < 0 || max_retries > 16) {
    fail("max_retries: must be in 0..16, got {}", max_retries);
  }
  if (max_new_tokens < 1) fail("max_new_tokens: must be >= 1, got {}", max_new_tokens);
}

int judge_layout_of(const CheckpointContents& info, const std::string& path) {
  const auto columns_it = info.metadata.find(kJudgeColumnsKey);
  const auto layout_it = info.metadata.find(kJudgeLayoutKey);
  if (columns_it != info.metadata.end() && layout_it != info.metadata.end()) {
    fail("checkpoint '{}': metadata '{}' and '{}' name two prompt layouts; a judge has one", path,
         kJudgeColumnsKey, kJudgeLayoutKey);
  }
  if (layout_it != info.metadata.end()) {
    if (layout_it->second != "tagged") {
      fail("checkpoint '{}': metadata '{}' must be 'tagged', got '{}'", path, kJudgeLayoutKey,
           layout_it->second);
    }
    return kJudgeTaggedLayout;
  }
  if (columns_it == info.metadata.end()) return kJudgeLinesLayout;
  int columns = -1;
  const std::string& text = columns_it->second;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), columns);
  if (error != std::errc() || end != text.data() + text.size() || columns < 0 ||
      columns > kMaxJudgeColumns) {
    fail("checkpoint '{}': metadata '{}' must be an integer in 0..{}, got '{}'", path,
         kJudgeColumnsKey, kMaxJudgeColumns, text);
  }
  return columns;
}

std::map<std::string, std::string> judge_layout_annotations(int layout) {
  check_judge_layout(layout);
  if (layout == kJudgeTaggedLayout) return {{kJudgeLayoutKey, "tagged"}};
  if (layout > 0) return {{kJudgeColumnsKey, std::to_string(layout)}};
  return {};
}

std::string judge_layout_name(int layout) {
  check_judge_layout(layout);
  if (layout == kJudgeTaggedLayout) return "tagged layout";
  if (layout > 0) return "column layout of " + std::to_string(layout);
  return "line layout";
}

Judge::Judge(Transformer<float>& model, const Tokenizer& tokenizer, int max_batch, int layout)
    : model_(model), tokenizer_(tokenizer), generator_(model, tokenizer, max_batch),
      layout_(layout) {
  check_judge_layout(layout);
}

template <typename IsValid>
std::vector<std::string> Judge::generate_with_retries(const std::vector<std::string>& prompts,
                                                      const VotingParams& params,
                                                      uint64_t seed_base, IsValid valid,
                                                      std::vector<int>& retries) {
  std::vector<std::vector<int32_t>> tokens;
  tokens.reserve(prompts.size());
  for (const std::string& p : prompts) {
    tokens.push_back(format_prompt(tokenizer_, p, SpecialToken::kJudge));
  }
  std::vector<std::string> outputs(prompts.size());
  std::vector<size_t> todo(prompts.size());  // prompts whose output is not valid yet
  std::iota(todo.begin(), todo.end(), size_t(0));
  SamplingParams sampling;
  sampling.temperature = params.temperature;
  sampling.max_new_tokens = params.max_new_tokens;
  for (int attempt = 0; attempt <= params.max_retries && !todo.empty(); ++attempt) {
    sampling.seed = mix_seed(seed_base, uint64_t(attempt));
    // A greedy retry would repeat the same output: retries sample at temperature >= 1.
    if (attempt > 0) sampling.temperature = std::max(params.temperature, 1.0);
    std::vector<std::vector<int32_t>> batch;
    batch.reserve(todo.size());
    for (size_t i : todo) batch.push_back(tokens[i]);
    const std::vector<Generation> generations = generator_.generate(batch, sampling);
    std::vector<size_t> still_invalid;
    for (size_t j = 0; j < todo.size(); ++j) {
      const size_t i = todo[j];
      // A judge cut off by max_new_tokens has not finished its verdict ("Score: 1" may be
      // the start of "Score: 10"), so only outputs that ended with eos can be valid.
      outputs[i] = generations[j].finished ? generations[j].text : std::string();
      if (attempt > 0) ++retries[i];
      if (!generations[j].finished || !valid(outputs[i])) still_invalid.push_back(i);
    }
    todo = std::move(still_invalid);
  }
  for (size_t i : todo) outputs[i].clear();  // stayed INVALID
  return outputs;
}

std::vector<PointwiseJudgment> Judge::score(const std::vector<JudgeRequest>& requests,
                                            const VotingParams& params) {
  params.validate();
  const int k = params.k;
  std::vector<std::string> prompts;
  prompts.reserve(requests.size() * k);
  for (const JudgeRequest& r : requests) {
    const std::string text =
        pointwise_judge_prompt(r.prompt, r.response, r.reference, layout_);
    for (int s = 0; s < k; ++s) prompts.push_back(text);
  }
  std::vector<int> retries(prompts.size(), 0);
  const std::vector<std::string> outputs = generate_with_retries(
      prompts, params, mix_seed(params.seed, 0x5C0E),
      [](const std::string& out) { return parse_pointwise(out).valid; }, retries);
  std::vector<PointwiseJudgment> results(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    PointwiseJudgment& j = results[i];
    for (int s = 0; s < k; ++s) {
      const size_t at = i * k + s;
      j.retries += retries[at];
      const ParsedScore parsed = parse_pointwise(outputs[at]);
      if (!parsed.valid) {
        ++j.invalid_samples;
        continue;
      }
      j.sample_scores.push_back(parsed.score);
      j.reasoning.push_back(parsed.reasoning);
    }
    j.valid = !j.sample_scores.empty();
    for (int sc : j.sample_scores) j.score += double(sc) / double(j.sample_scores.size());
  }
  return results;
}

std::vector<PairwiseJudgment> Judge::compare(const std::vector<PairwiseRequest>& requests,
                                             const VotingParams& params) {
  params.validate();
  const int k = params.k;
  auto swapped = [&](int sample) { return params.swap_order && sample % 2 == 1; };
  std::vector<std::string> prompts;
  prompts.reserve(requests.size() * k);
  for (const PairwiseRequest& r : requests) {
    for (int s = 0; s < k; ++s) {
      prompts.push_back(
          swapped(s)
              ? pairwise_judge_prompt(r.prompt, r.response_b, r.response_a, r.reference,
                                      layout_)
              : pairwise_judge_prompt(r.prompt, r.response_a, r.response_b, r.reference,
                                      layout_));
    }
  }
  std::vector<int> retries(prompts.size(), 0);
  const std::vector<std::string> outputs = generate_with_retries(
      prompts, params, mix_seed(params.seed, 0xC0AE),
      [](const std::string& out) { return parse_pairwise(out).valid; }, retries);
  std::vector<PairwiseJudgment> results(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    PairwiseJudgment& j = results[i];
    double for_a = 0;
    for (int s = 0; s < k; ++s) {
      const size_t at = i * k + s;
      j.retries += retries[at];
      const ParsedVerdict parsed = parse_pairwise(outputs[at]);
      if (!parsed.valid) {
        ++j.invalid_samples;
        continue;
      }
      Verdict v = parsed.verdict;
      if (swapped(s) && v != Verdict::kTie) v = v == Verdict::kA ? Verdict::kB : Verdict::kA;
      j.votes.push_back(v);
      j.reasoning.push_back(parsed.reasoning);
      for_a += v == Verdict::kA ? 1.0 : v == Verdict::kTie ? 0.5 : 0.0;
    }
    j.valid = !j.votes.empty();
    if (!j.valid) continue;
    j.preference_a = for_a / double(j.votes.size());
    j.verdict = j.preference_a > 0.5 ? Verdict::kA : j.preference_a < 0.5 ? Verdict::kB : Verdict::kTie;
  }
  return results;
}

}  // namespace rlhf
