#include "reward/winrate_eval.h"

#include <cerrno>
#include <chrono>
#include <cstring>
#include <cmath>
#include <fstream>
#include <map>
#include <set>

#include <fmt/core.h>
#include <google/protobuf/util/message_differencer.h>

#include "actor/actor_client.h"
#include "common/crc32c.h"
#include "common/error.h"
#include "common/rng.h"
#include "reward/reward_client.h"
#include "rollout/rollout_store.h"

namespace rlhf {

namespace {

// The verdict of an order that showed B first, in terms of the pair's A and B.
std::string swap_label(const std::string& verdict) {
  return verdict == "A" ? "B" : verdict == "B" ? "A" : verdict;
}

OrderJudgment order_judgment(const v1::CompareResponse& response, bool b_shown_first) {
  OrderJudgment j;
  j.valid = response.valid();
  j.verdict = !j.valid ? "invalid" : b_shown_first ? swap_label(response.verdict())
                                                   : response.verdict();
  if (j.valid) {
    j.preference_a = b_shown_first ? 1.0 - response.preference_a() : response.preference_a();
  }
  j.reasoning.assign(response.reasoning().begin(), response.reasoning().end());
  j.invalid_samples = response.invalid_samples();
  j.retries = response.retries();
  return j;
}

// Response length in tokens: the eos that ended it is not part of the answer.
uint32_t answer_tokens(const v1::Rollout& rollout) {
  const int n = rollout.response_tokens_size();
  return uint32_t(rollout.finished() && n > 0 ? n - 1 : n);
}

}  // namespace

ServiceJudge::ServiceJudge(RewardClient& client, int k, double temperature, bool with_reference,
                           FitsContext fits_context)
    : client_(client), k_(k), temperature_(temperature), with_reference_(with_reference),
      fits_context_(std::move(fits_context)) {}

std::vector<PairJudgment> ServiceJudge::judge(const std::vector<EvalPair>& pairs,
                                              uint64_t seed) {
  std::vector<PairJudgment> judgments(pairs.size());
  // Each pair that fits goes twice, as two items: A shown first, then B shown first. Every
  // item is judged with both_orders off, so an item's k votes all see one order and the two
  // orders' verdicts can be compared.
  v1::CompareBatchRequest request;
  request.set_k(k_);
  request.set_temperature(temperature_);
  request.set_seed(seed);
  request.set_both_orders(false);
  std::vector<size_t> sent;  // pairs[sent[j]] is items 2j and 2j + 1
  for (size_t i = 0; i < pairs.size(); ++i) {
    const EvalPair& pair = pairs[i];
    const bool with_reference = with_reference_ && pair.has_reference;
    if (fits_context_ && !fits_context_(pair, with_reference)) {
      OrderJudgment too_long;
      too_long.reasoning = {"not judged: the judge prompt is longer than the judge's context"};
      judgments[i] = {too_long, too_long};
      continue;
    }
    sent.push_back(i);
    for (const bool b_first : {false, true}) {
      v1::CompareItem& item = *request.add_items();
      item.set_prompt(pair.example.prompt);
      item.set_response_a(b_first ? pair.response_b : pair.response_a);
      item.set_response_b(b_first ? pair.response_a : pair.response_b);
      if (with_reference) item.set_reference(pair.example.reference);
    }
  }
  if (sent.empty()) return judgments;
  const v1::CompareBatchResponse response = client_.compare_batch(request);
  RLHF_CHECK(response.results_size() == request.items_size(),
             "CompareBatch answered {} results for {} items", response.results_size(),
             request.items_size());
  for (size_t j = 0; j < sent.size(); ++j) {
    judgments[sent[j]].a_first = order_judgment(response.results(int(2 * j)), false);
    judgments[sent[j]].b_first = order_judgment(response.results(int(2 * j + 1)), true);
  }
  return judgments;
}

std::vector<PairJudgment> GroundTruthJudge::judge(const std::vector<EvalPair>& pairs,
                                                  uint64_t /*seed: the graders are exact*/) {
  std::vector<PairJudgment> judgments;
  judgments.reserve(pairs.size());
  for (const EvalPair& pair : pairs) {
    if (!pair.has_reference || pair.example.task.empty()) {
      fail("judge ground_truth: prompt '{}' has no task family and reference to grade it by",
           pair.example.prompt);
    }
    const Grade a = suite_.grade(pair.example, pair.response_a);
    const Grade b = suite_.grade(pair.example, pair.response_b);
    OrderJudgment j;
    j.valid = true;
    j.verdict = a.score > b.score ? "A" : a.score < b.score ? "B" : "tie";
    j.preference_a = a.score > b.score ? 1.0 : a.score < b.score ? 0.0 : 0.5;
    j.reasoning = {fmt::format("A: {} ({:g}/10). B: {} ({:g}/10).", a.reason, a.score, b.reason,
                               b.score)};
    judgments.push_back({j, j});
  }
  return judgments;
}

std::string pair_verdict(const OrderJudgment& a_first, const OrderJudgment& b_first) {
  if (!a_first.valid || !b_first.valid) return "invalid";
  return a_first.verdict == b_first.verdict ? a_first.verdict : "tie";
}

PairOutcome outcome_of(const v1::EvalRecord& record) {
  const std::string& v = record.verdict();
  if (v == "A") return PairOutcome::kWinA;
  if (v == "B") return PairOutcome::kLossA;
  if (v == "tie") return PairOutcome::kTie;
  if (v == "invalid") return PairOutcome::kInvalid;
  fail("eval '{}', prompt {}: stored verdict '{}' is none of A, B, tie, invalid",
       record.eval_id(), record.prompt_index(), v);
}

uint32_t file_crc32c(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot open '{}': {}", path, std::strerror(errno));
  uint32_t crc = 0;
  std::vector<char> buffer(1 << 20);
  while (in) {
    in.read(buffer.data(), std::streamsize(buffer.size()));
    const std::streamsize got = in.gcount();
    if (got > 0) {
      crc = crc32c_extend(crc, std::as_bytes(std::span(buffer.data(), size_t(got))));
    }
  }
  if (in.bad()) fail("reading '{}' failed", path);
  return crc;
}

void check_or_store_eval_spec(RolloutStore& store, const v1::EvalSpec& spec) {
  const std::optional<v1::EvalSpec> stored = store.eval_spec(spec.eval_id());
  if (!stored) {
    store.put_eval_spec(spec);
    return;
  }
  google::protobuf::util::MessageDifferencer differencer;
  std::string differences;
  differencer.ReportDifferencesToString(&differences);
  if (differencer.Compare(*stored, spec)) return;
  // One line: "modified: seed: 7 -> 5; modified: k: 1 -> 3".
  while (!differences.empty() && differences.back() == '\n') differences.pop_back();
  for (size_t at = differences.find('\n'); at != std::string::npos; at = differences.find('\n'))
    differences.replace(at, 1, "; ");
  fail("eval '{}' in store '{}' was started with other settings (stored -> now: {}); resume "
       "it with the same settings, or choose another --eval-id",
       spec.eval_id(), store.path(), differences);
}

int run_winrate(RolloutStore& store, const v1::EvalSpec& spec,
                const std::vector<TaskExample>& prompts, ActorClient& actor_a,
                ActorClient& actor_b, PairJudge& judge,
                const std::function<void(const WinrateProgress&)>& progress) {
  using Clock = std::chrono::steady_clock;
  RLHF_CHECK(spec.round_prompts() > 0, "round_prompts must be positive");
  RLHF_CHECK(spec.prompts() == prompts.size(), "spec has {} prompts, {} given", spec.prompts(),
             prompts.size());
  std::set<uint64_t> stored;
  store.for_each_eval(spec.eval_id(),
                      [&](const v1::EvalRecord& r) { stored.insert(r.prompt_index()); });

  const uint64_t n = prompts.size();
  const uint64_t per_round = uint64_t(spec.round_prompts());
  const int rounds = int((n + per_round - 1) / per_round);
  int rounds_run = 0;
  for (int round = 0; round < rounds; ++round) {
    const auto start = Clock::now();
    const uint64_t lo = uint64_t(round) * per_round;
    const uint64_t hi = std::min(n, lo + per_round);
    bool complete = true;
    for (uint64_t i = lo; i < hi && complete; ++i) complete = stored.count(i) > 0;
    WinrateProgress p{round + 1, rounds, hi, n, complete, 0.0};
    if (complete) {
      if (progress) progress(p);
      continue;
    }

    // Both policies answer the round's prompts with the same request: the same sampling
    // settings, and seeds that depend only on (seed, prompt index).
    v1::GenerateRequest request;
    for (uint64_t i = lo; i < hi; ++i) {
      v1::GenerateRequest::PromptItem& item = *request.add_prompts();
      item.set_prompt_index(i);
      item.set_text(prompts[i].prompt);
    }
    request.set_n(1);
    request.set_temperature(spec.temperature());
    request.set_top_k(spec.top_k());
    request.set_top_p(spec.top_p());
    request.set_max_new_tokens(spec.max_new_tokens());
    request.set_seed(spec.seed());
    auto answers = [&](ActorClient& actor, const char* name) {
      std::map<uint64_t, v1::Rollout> by_prompt;
      for (const v1::GenerateResponse& response : actor.generate(request)) {
        RLHF_CHECK(response.rollouts_size() == 1, "actor {} ({}) sent {} samples for prompt {}",
                   name, actor.address(), response.rollouts_size(), response.prompt_index());
        by_prompt[response.prompt_index()] = response.rollouts(0);
      }
      RLHF_CHECK(by_prompt.size() == hi - lo, "actor {} ({}) answered {} of {} prompts", name,
                 actor.address(), by_prompt.size(), hi - lo);
      return by_prompt;
    };
    const std::map<uint64_t, v1::Rollout> a = answers(actor_a, "A");
    const std::map<uint64_t, v1::Rollout> b = answers(actor_b, "B");

    std::vector<v1::EvalRecord> records;
    std::vector<EvalPair> to_judge;
    std::vector<size_t> judged_record;  // to_judge[j] is records[judged_record[j]]
    for (uint64_t i = lo; i < hi; ++i) {
      const v1::Rollout& ra = a.at(i);
      const v1::Rollout& rb = b.at(i);
      v1::EvalRecord r;
      r.set_eval_id(spec.eval_id());
      r.set_prompt_index(i);
      r.set_prompt(prompts[i].prompt);
      r.set_task(prompts[i].task);
      r.set_response_a(ra.text());
      r.set_response_b(rb.text());
      r.set_length_a(answer_tokens(ra));
      r.set_length_b(answer_tokens(rb));
      if (ra.text().empty() || rb.text().empty()) {
        const std::string verdict = ra.text().empty() && rb.text().empty() ? "tie"
                                    : ra.text().empty()                    ? "B"
                                                                           : "A";
        const double preference = verdict == "A" ? 1.0 : verdict == "B" ? 0.0 : 0.5;
        r.set_verdict(verdict);
        r.set_verdict_ab(verdict);
        r.set_verdict_ba(verdict);
        r.set_preference_a(preference);
        r.set_preference_a_ab(preference);
        r.set_preference_a_ba(preference);
        r.set_decided_without_judge(true);
        r.add_reasoning(verdict == "tie" ? "both responses are empty"
                        : verdict == "B" ? "response A is empty"
                                         : "response B is empty");
      } else {
        judged_record.push_back(records.size());
        to_judge.push_back({prompts[i], !prompts[i].reference.empty(), ra.text(), rb.text()});
      }
      records.push_back(std::move(r));
    }

    const std::vector<PairJudgment> judgments =
        judge.judge(to_judge, mix_seed(spec.seed(), 0xE7A1, uint64_t(round)));
    RLHF_CHECK(judgments.size() == to_judge.size(), "judge returned {} judgments for {} pairs",
               judgments.size(), to_judge.size());
    for (size_t j = 0; j < judgments.size(); ++j) {
      const PairJudgment& pj = judgments[j];
      v1::EvalRecord& r = records[judged_record[j]];
      r.set_verdict(pair_verdict(pj.a_first, pj.b_first));
      r.set_verdict_ab(pj.a_first.verdict);
      r.set_verdict_ba(pj.b_first.verdict);
      r.set_preference_a_ab(pj.a_first.preference_a);
      r.set_preference_a_ba(pj.b_first.preference_a);
      if (r.verdict() != "invalid") {
        r.set_preference_a((pj.a_first.preference_a + pj.b_first.preference_a) / 2);
      }
      for (const std::string& text : pj.a_first.reasoning) r.add_reasoning(text);
      for (const std::string& text : pj.b_first.reasoning) r.add_reasoning_ba(text);
      r.set_invalid_samples(pj.a_first.invalid_samples + pj.b_first.invalid_samples);
      r.set_retries(pj.a_first.retries + pj.b_first.retries);
    }
    store.write_evals(records);  // the round, as one atomic write
    ++rounds_run;
    p.round_s = std::chrono::duration<double>(Clock::now() - start).count();
    if (progress) progress(p);
  }
  return rounds_run;
}

std::vector<v1::EvalRecord> read_eval_records(const RolloutStore& store,
                                              const std::string& eval_id) {
  std::vector<v1::EvalRecord> records;
  store.for_each_eval(eval_id, [&](const v1::EvalRecord& r) { records.push_back(r); });
  return records;
}

WinrateReport winrate_report(const std::string& eval_id,
                             const std::vector<v1::EvalRecord>& records, int resamples,
                             uint64_t seed) {
  WinrateReport report;
  report.eval_id = eval_id;
  report.prompts = int(records.size());
  std::vector<PairOutcome> outcomes;
  std::map<std::string, std::vector<PairOutcome>> by_task;
  std::vector<double> preference, length_difference;
  int agree = 0;
  for (const v1::EvalRecord& r : records) {
    const PairOutcome o = outcome_of(r);
    outcomes.push_back(o);
    by_task[r.task().empty() ? "(none)" : r.task()].push_back(o);
    report.mean_length_a += r.length_a();
    report.mean_length_b += r.length_b();
    report.decided_without_judge += r.decided_without_judge();
    report.identical_answers += r.response_a() == r.response_b();
    report.invalid_samples += r.invalid_samples();
    report.retries += r.retries();
    if (!r.decided_without_judge() && r.verdict_ab() != "invalid" &&
        r.verdict_ba() != "invalid") {
      ++report.judged_in_both_orders;
      agree += r.verdict_ab() == r.verdict_ba();
    }
    if (o != PairOutcome::kInvalid) {
      preference.push_back(o == PairOutcome::kWinA ? 1.0 : o == PairOutcome::kTie ? 0.5 : 0.0);
      length_difference.push_back(double(r.length_a()) - double(r.length_b()));
    }
  }
  if (!records.empty()) {
    report.mean_length_a /= double(records.size());
    report.mean_length_b /= double(records.size());
  }
  report.swap_consistency =
      report.judged_in_both_orders == 0 ? 0.0 : double(agree) / report.judged_in_both_orders;
  report.overall = win_rate(outcomes, resamples, seed);
  report.lc_win_rate =
      preference.empty() ? 0.5 : length_controlled_win_rate(preference, length_difference);
  uint64_t task_index = 0;  // each task's bootstrap draws from a stream of its own
  for (const auto& [task, task_outcomes] : by_task) {
    report.per_task.push_back(
        {task, win_rate(task_outcomes, resamples, mix_seed(seed + ++task_index, 7))});
  }
  return report;
}

RatingsReport bradley_terry_ratings(int n_models, const std::vector<PairRecords>& pairs,
                                    int resamples, uint64_t seed, double confidence) {
  if (n_models < 2) fail("ratings: need at least 2 models, got {}", n_models);
  if (resamples < 1) fail("ratings: resamples must be >= 1, got {}", resamples);
  // outcome[prompt] = the valid results of every pair on that prompt.
  std::map<uint64_t, std::vector<PairwiseResult>> by_prompt;
  RatingsReport report;
  for (const PairRecords& pair : pairs) {
    for (const v1::EvalRecord& r : pair.records) {
      const PairOutcome o = outcome_of(r);
      if (o == PairOutcome::kInvalid) continue;
      const double score = o == PairOutcome::kWinA ? 1.0 : o == PairOutcome::kTie ? 0.5 : 0.0;
      by_prompt[r.prompt_index()].push_back({pair.a, pair.b, score});
      ++report.valid_comparisons;
    }
  }
  std::vector<uint64_t> prompt_ids;
  std::vector<PairwiseResult> all;
  for (const auto& [prompt, results] : by_prompt) {
    prompt_ids.push_back(prompt);
    all.insert(all.end(), results.begin(), results.end());
  }
  // Elo scale: a difference of 400 is 10:1 odds.
  const double elo = 400.0 / std::log(10.0);
  const std::vector<double> theta = bradley_terry(n_models, all, 0.5, 10000, 1e-9);
  report.rating.resize(size_t(n_models));
  for (int m = 0; m < n_models; ++m) report.rating[size_t(m)] = 1000 + elo * theta[size_t(m)];

  std::vector<std::vector<double>> samples(static_cast<size_t>(n_models));
  Rng rng(seed);
  for (int s = 0; s < resamples && !prompt_ids.empty(); ++s) {
    std::vector<PairwiseResult> drawn;
    drawn.reserve(all.size());
    for (size_t i = 0; i < prompt_ids.size(); ++i) {
      const uint64_t p = prompt_ids[size_t(rng.uniform_int(0, int64_t(prompt_ids.size()) - 1))];
      const std::vector<PairwiseResult>& results = by_prompt.at(p);
      drawn.insert(drawn.end(), results.begin(), results.end());
    }
    const std::vector<double> t = bradley_terry(n_models, drawn, 0.5, 10000, 1e-9);
    for (int m = 0; m < n_models; ++m) samples[size_t(m)].push_back(1000 + elo * t[size_t(m)]);
  }
  report.ci_low.resize(size_t(n_models));
  report.ci_high.resize(size_t(n_models));
  for (int m = 0; m < n_models; ++m) {
    if (samples[size_t(m)].empty()) {
      report.ci_low[size_t(m)] = report.ci_high[size_t(m)] = report.rating[size_t(m)];
    } else {
      std::tie(report.ci_low[size_t(m)], report.ci_high[size_t(m)]) =
          percentile_interval(samples[size_t(m)], confidence);
    }
  }
  report.rank.assign(size_t(n_models), 1);
  for (int m = 0; m < n_models; ++m) {
    for (int other = 0; other < n_models; ++other) {
      if (report.ci_low[size_t(other)] > report.ci_high[size_t(m)]) ++report.rank[size_t(m)];
    }
  }
  return report;
}

}  // namespace rlhf
