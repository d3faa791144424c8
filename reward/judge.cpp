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
    if (layout_it->second == "tagged") return kJudgeTaggedLayout;
    if (layout_it->second == "tagged-split") return kJudgeSplitPairLayout;
    fail("checkpoint '{}': metadata '{}' must be 'tagged' or 'tagged-split', got '{}'", path,
         kJudgeLayoutKey, layout_it->second);
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
  if (layout == kJudgeSplitPairLayout) return {{kJudgeLayoutKey, "tagged-split"}};
  if (layout > 0) return {{kJudgeColumnsKey, std::to_string(layout)}};
  return {};
}

std::string judge_layout_name(int layout) {
  check_judge_layout(layout);
  if (layout == kJudgeTaggedLayout) return "tagged layout";
  if (layout == kJudgeSplitPairLayout) return "tagged layout, split pairs";
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

std::vector<std::string> Judge::generate_split_with_retries(
    const std::vector<SplitPairTurns>& turns, const VotingParams& params, uint64_t seed_base,
    std::vector<int>& retries) {
  const std::vector<int32_t> newline_tokens = tokenizer_.encode("\n");
  RLHF_CHECK(newline_tokens.size() == 1, "the tokenizer encodes a newline as one token");
  const int32_t newline = newline_tokens[0];
  std::vector<std::string> outputs(turns.size());
  std::vector<size_t> todo(turns.size());  // pairs whose output is not valid yet
  std::iota(todo.begin(), todo.end(), size_t(0));
  SamplingParams sampling;
  sampling.temperature = params.temperature;
  sampling.max_new_tokens = params.max_new_tokens;
  for (int attempt = 0; attempt <= params.max_retries && !todo.empty(); ++attempt) {
    sampling.seed = mix_seed(seed_base, uint64_t(attempt));
    if (attempt > 0) sampling.temperature = std::max(params.temperature, 1.0);
    // Turn 1: the reasoning about A, which ends at its newline.
    std::vector<std::vector<int32_t>> first;
    first.reserve(todo.size());
    for (size_t i : todo) {
      first.push_back(format_prompt(tokenizer_, turns[i].prompt, SpecialToken::kJudge));
    }
    SamplingParams first_params = sampling;
    first_params.stop_token = newline;
    const std::vector<Generation> a_turns = generator_.generate(first, first_params);
    // Turn 2: the context so far and B's line, then the reasoning about B and the verdict.
    // A first turn that stopped otherwise (eos, max_new_tokens, the context) is INVALID, and so
    // is a pair whose second turn would start at the end of the context.
    std::vector<size_t> second_of;  // index into todo of each second turn
    std::vector<std::vector<int32_t>> second;
    for (size_t j = 0; j < todo.size(); ++j) {
      const Generation& g = a_turns[j];
      if (!g.finished || g.tokens.back() != newline) continue;
      std::vector<int32_t> context = g.prompt_tokens;
      context.insert(context.end(), g.tokens.begin(), g.tokens.end());
      const std::vector<int32_t> b_line = tokenizer_.encode(turns[todo[j]].b_line);
      context.insert(context.end(), b_line.begin(), b_line.end());
      if (int(context.size()) >= model_.config().max_seq_len) continue;
      second_of.push_back(j);
      second.push_back(std::move(context));
    }
    SamplingParams second_params = sampling;
    second_params.seed = mix_seed(sampling.seed, 0x5EC0);
    const std::vector<Generation> b_turns =
        second.empty() ? std::vector<Generation>() : generator_.generate(second, second_params);
    std::vector<bool> done(todo.size(), false);
    for (size_t m = 0; m < second_of.size(); ++m) {
      const size_t j = second_of[m];
      if (!b_turns[m].finished) continue;  // cut off: the verdict is not finished
      std::string out = a_turns[j].text + b_turns[m].text;
      if (!parse_pairwise(out).valid) continue;
      outputs[todo[j]] = std::move(out);
      done[j] = true;
    }
    std::vector<size_t> still_invalid;
    for (size_t j = 0; j < todo.size(); ++j) {
      if (attempt > 0) ++retries[todo[j]];
      if (!done[j]) still_invalid.push_back(todo[j]);
    }
    todo = std::move(still_invalid);
  }
  return outputs;  // "" for the pairs that stayed INVALID
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
  // Sample s of request i is item i * k + s. The split pair layout judges the items that have
  // a reference in two turns; every other item is one prompt.
  std::vector<std::string> prompts;
  std::vector<size_t> prompt_items;
  std::vector<SplitPairTurns> split;
  std::vector<size_t> split_items;
  for (size_t i = 0; i < requests.size(); ++i) {
    const PairwiseRequest& r = requests[i];
    for (int s = 0; s < k; ++s) {
      const std::string& first = swapped(s) ? r.response_b : r.response_a;
      const std::string& second = swapped(s) ? r.response_a : r.response_b;
      if (layout_ == kJudgeSplitPairLayout && r.reference) {
        split.push_back(split_pair_turns(r.prompt, first, second, *r.reference));
        split_items.push_back(i * k + s);
      } else {
        prompts.push_back(pairwise_judge_prompt(r.prompt, first, second, r.reference, layout_));
        prompt_items.push_back(i * k + s);
      }
    }
  }
  const uint64_t seed_base = mix_seed(params.seed, 0xC0AE);
  std::vector<std::string> outputs(requests.size() * k);
  std::vector<int> retries(requests.size() * k, 0);
  auto gather = [&](const std::vector<size_t>& items, const std::vector<std::string>& texts,
                    const std::vector<int>& spent) {
    for (size_t n = 0; n < items.size(); ++n) {
      outputs[items[n]] = texts[n];
      retries[items[n]] = spent[n];
    }
  };
  if (!prompts.empty()) {
    std::vector<int> spent(prompts.size(), 0);
    gather(prompt_items,
           generate_with_retries(
               prompts, params, seed_base,
               [](const std::string& out) { return parse_pairwise(out).valid; }, spent),
           spent);
  }
  if (!split.empty()) {
    std::vector<int> spent(split.size(), 0);
    gather(split_items, generate_split_with_retries(split, params, seed_base, spent), spent);
  }
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
