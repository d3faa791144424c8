#include "reward/judge.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <numeric>
#include <optional>

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

std::string pair_judging_name(int layout, bool with_reference, bool separate_sides,
                              bool verdict_from_scores) {
  check_judge_layout(layout);
  if (layout != kJudgeSplitPairLayout || !with_reference) return "one prompt";
  if (!separate_sides) return "two turns";
  return verdict_from_scores ? "separate sides, verdict from scores" : "separate sides";
}

Judge::Judge(Transformer<float>& model, const Tokenizer& tokenizer, int max_batch, int layout)
    : model_(model), tokenizer_(tokenizer), generator_(model, tokenizer, max_batch),
      layout_(layout) {
  check_judge_layout(layout);
}

namespace {

// Whether a turn generated with `stop` as its stop token ended there (not at eos, the token
// limit or the context).
bool ended_with(const Generation& g, int32_t stop) {
  return g.finished && !g.tokens.empty() && g.tokens.back() == stop;
}

// The retry loop of every judging call. `attempt(pending, sampling)` generates once for the
// items `pending` (indices into 0..items-1) and returns, per entry of pending, the item's
// finished output, or nullopt where generation was cut off: a judge cut off by max_new_tokens
// has not finished its verdict ("Score: 1" may be the start of "Score: 10"). Outputs that
// `valid` rejects are retried up to max_retries times, each time with a new seed; retries[i]
// counts item i's. Returns "" for the items that stayed INVALID.
template <typename Attempt, typename IsValid>
std::vector<std::string> retry_until_valid(size_t items, const VotingParams& params,
                                           uint64_t seed_base, Attempt attempt, IsValid valid,
                                           std::vector<int>& retries) {
  std::vector<std::string> outputs(items);
  std::vector<size_t> pending(items);  // items whose output is not valid yet
  std::iota(pending.begin(), pending.end(), size_t(0));
  SamplingParams sampling;
  sampling.temperature = params.temperature;
  sampling.max_new_tokens = params.max_new_tokens;
  for (int round = 0; round <= params.max_retries && !pending.empty(); ++round) {
    sampling.seed = mix_seed(seed_base, uint64_t(round));
    // A greedy retry would repeat the same output: retries sample at temperature >= 1.
    if (round > 0) sampling.temperature = std::max(params.temperature, 1.0);
    const std::vector<std::optional<std::string>> got = attempt(pending, sampling);
    std::vector<size_t> still_invalid;
    for (size_t j = 0; j < pending.size(); ++j) {
      const size_t i = pending[j];
      if (round > 0) ++retries[i];
      if (got[j] && valid(*got[j])) {
        outputs[i] = *got[j];
      } else {
        still_invalid.push_back(i);
      }
    }
    pending = std::move(still_invalid);
  }
  return outputs;
}

}  // namespace

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
  auto attempt = [&](const std::vector<size_t>& pending, const SamplingParams& sampling) {
    std::vector<std::vector<int32_t>> batch;
    batch.reserve(pending.size());
    for (size_t i : pending) batch.push_back(tokens[i]);
    std::vector<std::optional<std::string>> got;
    got.reserve(pending.size());
    for (Generation& g : generator_.generate(batch, sampling)) {
      got.push_back(g.finished ? std::optional<std::string>(std::move(g.text)) : std::nullopt);
    }
    return got;
  };
  return retry_until_valid(prompts.size(), params, seed_base, attempt, valid, retries);
}

std::vector<Generation> Judge::last_turn(const std::vector<std::vector<int32_t>>& contexts,
                                         const SamplingParams& sampling) {
  if (contexts.empty()) return {};
  SamplingParams params = sampling;
  params.seed = mix_seed(sampling.seed, 0x5EC0);
  return generator_.generate(contexts, params);
}

int32_t Judge::newline_token() const {
  const std::vector<int32_t> tokens = tokenizer_.encode("\n");
  RLHF_CHECK(tokens.size() == 1, "the tokenizer encodes a newline as one token");
  return tokens[0];
}

std::vector<std::optional<std::string>> Judge::split_pair_attempt(
    const std::vector<SplitPairTurns>& turns, const std::vector<size_t>& pending,
    const SamplingParams& sampling) {
  const int32_t newline = newline_token();
  // Turn 1: the reasoning about A, which ends at its newline.
  std::vector<std::vector<int32_t>> first;
  first.reserve(pending.size());
  for (size_t i : pending) {
    first.push_back(format_prompt(tokenizer_, turns[i].prompt, SpecialToken::kJudge));
  }
  SamplingParams first_params = sampling;
  first_params.stop_token = newline;
  const std::vector<Generation> a_turns = generator_.generate(first, first_params);
  // Turn 2: the context so far and B's line, then the reasoning about B and the verdict.
  // A first turn that stopped otherwise (eos, max_new_tokens, the context) is INVALID, and so
  // is a pair whose second turn would start at the end of the context.
  std::vector<size_t> second_of;  // index into pending of each second turn
  std::vector<std::vector<int32_t>> second;
  for (size_t j = 0; j < pending.size(); ++j) {
    const Generation& g = a_turns[j];
    if (!ended_with(g, newline)) continue;
    std::vector<int32_t> context = g.prompt_tokens;
    context.insert(context.end(), g.tokens.begin(), g.tokens.end());
    const std::vector<int32_t> b_line = tokenizer_.encode(turns[pending[j]].b_line);
    context.insert(context.end(), b_line.begin(), b_line.end());
    if (int(context.size()) >= model_.config().max_seq_len) continue;
    second_of.push_back(j);
    second.push_back(std::move(context));
  }
  const std::vector<Generation> b_turns = last_turn(second, sampling);
  std::vector<std::optional<std::string>> got(pending.size());
  for (size_t m = 0; m < second_of.size(); ++m) {
    const size_t j = second_of[m];
    if (b_turns[m].finished) got[j] = a_turns[j].text + b_turns[m].text;
  }
  return got;
}

std::vector<std::optional<std::string>> Judge::separate_sides_attempt(
    const std::vector<SplitPairTurns>& turns,
    const std::vector<std::array<std::string, 2>>& side_prompts,
    const std::vector<size_t>& pending, const SamplingParams& sampling,
    bool verdict_from_scores) {
  const int32_t newline = newline_token();
  const size_t n = pending.size();
  // The pointwise readings: side A's for entries 0..n-1, side B's for n..2n-1.
  std::vector<std::vector<int32_t>> readings_in;
  readings_in.reserve(2 * n);
  for (int side = 0; side < 2; ++side) {
    for (size_t i : pending) {
      readings_in.push_back(format_prompt(tokenizer_, side_prompts[i][side], SpecialToken::kJudge));
    }
  }
  SamplingParams reading_params = sampling;
  reading_params.stop_token = newline;
  const std::vector<Generation> readings = generator_.generate(readings_in, reading_params);
  auto part = [&](const Generation& g, bool side_b) -> std::optional<std::string> {
    if (!ended_with(g, newline)) return std::nullopt;
    return side_turn(g.text, side_b);
  };
  // The verdict turn: A's prompt, A's part, B's line and B's part given; the judge writes the
  // verdict line. A reading that stopped other than at its newline makes the pair INVALID.
  // With verdict_from_scores, readings whose scores differ decide the verdict themselves.
  std::vector<std::optional<std::string>> got(n);
  std::vector<size_t> verdict_of;  // index into pending of each verdict turn
  std::vector<std::string> given_parts;
  std::vector<std::vector<int32_t>> verdict_turns;
  for (size_t j = 0; j < n; ++j) {
    const std::optional<std::string> a_part = part(readings[j], false);
    const std::optional<std::string> b_part = part(readings[n + j], true);
    if (!a_part || !b_part) continue;
    if (verdict_from_scores) {
      if (const std::optional<Verdict> v = verdict_from_readings(*a_part, *b_part)) {
        const std::string both = *a_part + *b_part;  // each part ends with its newline
        got[j] = pairwise_judge_output(std::string_view(both).substr(0, both.size() - 1), *v);
        continue;
      }
    }
    const SplitPairTurns& t = turns[pending[j]];
    std::vector<int32_t> context = format_prompt(tokenizer_, t.prompt, SpecialToken::kJudge);
    const std::vector<int32_t> given = tokenizer_.encode(*a_part + t.b_line + *b_part);
    context.insert(context.end(), given.begin(), given.end());
    if (int(context.size()) >= model_.config().max_seq_len) continue;
    verdict_of.push_back(j);
    given_parts.push_back(*a_part + *b_part);
    verdict_turns.push_back(std::move(context));
  }
  const std::vector<Generation> verdicts = last_turn(verdict_turns, sampling);
  for (size_t m = 0; m < verdict_of.size(); ++m) {
    if (verdicts[m].finished) got[verdict_of[m]] = given_parts[m] + verdicts[m].text;
  }
  return got;
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
  std::vector<std::array<std::string, 2>> side_prompts;  // with separate_sides
  std::vector<size_t> split_items;
  for (size_t i = 0; i < requests.size(); ++i) {
    const PairwiseRequest& r = requests[i];
    for (int s = 0; s < k; ++s) {
      const std::string& first = swapped(s) ? r.response_b : r.response_a;
      const std::string& second = swapped(s) ? r.response_a : r.response_b;
      if (layout_ == kJudgeSplitPairLayout && r.reference) {
        split.push_back(split_pair_turns(r.prompt, first, second, *r.reference));
        if (params.separate_sides) {
          side_prompts.push_back({pointwise_judge_prompt(r.prompt, first, r.reference, layout_),
                                  pointwise_judge_prompt(r.prompt, second, r.reference, layout_)});
        }
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
    auto attempt = [&](const std::vector<size_t>& pending, const SamplingParams& sampling) {
      return params.separate_sides
                 ? separate_sides_attempt(split, side_prompts, pending, sampling,
                                          params.verdict_from_scores)
                 : split_pair_attempt(split, pending, sampling);
    };
    gather(split_items,
           retry_until_valid(
               split.size(), params, seed_base, attempt,
               [](const std::string& out) { return parse_pairwise(out).valid; }, spent),
           spent);
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
