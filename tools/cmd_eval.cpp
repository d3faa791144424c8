// rlhf eval winrate: how often policy A's answer is preferred to policy B's, judged in both
// orders, with a bootstrap interval (reward/winrate_eval.h, docs/eval.md).
// rlhf eval ratings: Bradley-Terry ratings of several policies from all their pairs.
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>

#include <fmt/core.h>
#include <spdlog/spdlog.h>

#include "actor/actor_client.h"
#include "actor/actor_engine.h"
#include "actor/actor_service.h"
#include "common/crc32c.h"
#include "common/error.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu_ops.h"
#include "model/checkpoint.h"
#include "model/tokenizer.h"
#include "reward/judge.h"
#include "reward/reward_client.h"
#include "reward/reward_service.h"
#include "reward/winrate_eval.h"
#include "rollout/prompt_jsonl.h"
#include "rollout/rollout_store.h"
#include "tools/cli.h"
#include "tools/eval_commands.h"

namespace rlhf::cli {

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr const char* kGroundTruth = "ground_truth";
constexpr int kDefaultHeldOutPrompts = 256;

// A policy served by an actor in this process, on a free loopback port.
struct LocalActor {
  ActorEngine engine;
  ActorServer server;
  ActorClient client;

  LocalActor(const std::string& checkpoint, const ActorEngineOptions& options)
      : engine(checkpoint, options), server(engine, "127.0.0.1:0"),
        client(fmt::format("127.0.0.1:{}", server.port())) {}
};

// The judge checkpoint behind a reward service in this process, on a free loopback port.
struct LocalJudge {
  static constexpr int kMaxBatch = 64;  // judge sequences decoded together
  CheckpointContents info;  // first: the members below are built from it
  std::unique_ptr<Tokenizer> tokenizer;
  std::unique_ptr<Ops<float>> ops;  // before the model, which frees its buffers through it
  std::unique_ptr<Transformer<float>> model;
  Judge judge;
  RewardServiceLimits limits;
  RewardServer server;
  RewardClient client;

  LocalJudge(const std::string& checkpoint, const std::string& device)
      : info(checkpoint_read_info(checkpoint)), tokenizer(make_tokenizer(info.tokenizer)),
        ops(make_float_ops(device)), model(checkpoint_load_model(checkpoint, *ops, kMaxBatch)),
        judge(*model, *tokenizer, kMaxBatch, judge_layout_of(info, checkpoint)),
        server(judge, "127.0.0.1:0", limits),
        client(fmt::format("127.0.0.1:{}", server.port())) {}

  // The service's own checks, made before sending, so that one pair that would fail them is
  // INVALID on its own instead of failing its whole batch.
  bool fits(const EvalPair& pair, bool with_reference) const {
    const std::optional<std::string> reference =
        with_reference ? std::optional<std::string>(pair.example.reference) : std::nullopt;
    try {
      check_pairwise_request({pair.example.prompt, pair.response_a, pair.response_b, reference},
                             "", judge, limits);
      return true;
    } catch (const Error&) {
      return false;
    }
  }
};

// What every pair of one command shares: prompts, the judge, the store, the spec's settings.
struct EvalSetup {
  WinrateSettings settings;
  TaskSuite suite;
  std::vector<TaskExample> prompts;
  v1::EvalSpec base_spec;  // without checkpoints and eval id
  std::unique_ptr<LocalJudge> local_judge;
  std::unique_ptr<PairJudge> judge;
  std::unique_ptr<RolloutStore> store;
  ActorEngineOptions actor_options;

  EvalSetup(const RunConfig& config, const WinrateSettings& s) : settings(s), suite(config.tasks) {
    if (s.k < 1 || s.k > VotingParams::kMaxVotes)
      fail("--k: must be in 1..{}, got {}", VotingParams::kMaxVotes, s.k);
    if (s.k > 1 && s.judge_temperature == 0) {
      fail("--k {} with --judge-temperature 0 gives {} identical votes; set a temperature "
           "(e.g. 1.0) or use --k 1",
           s.k, s.k);
    }
    if (s.judge.empty()) fail("--judge: give a judge checkpoint or '{}'", kGroundTruth);
    check_float_backend(config.runtime.device);  // before the store: nothing written yet
    cpu_set_threads(s.threads > 0 ? s.threads : config.runtime.threads);

    // Prompts: the held-out split of the config's task suite, or a file.
    if (s.prompts_file.empty()) {
      const int n = s.prompts > 0 ? s.prompts : kDefaultHeldOutPrompts;
      for (int i = 0; i < n; ++i) prompts.push_back(suite.example(Split::kHeldOut, uint64_t(i)));
      base_spec.set_prompts_source("held_out");
      // The suite's settings decide which prompts these are.
      const std::string suite_yaml = config.tasks.to_yaml();
      base_spec.set_prompts_crc32c(crc32c(std::as_bytes(std::span(suite_yaml))));
    } else {
      prompts = read_prompts_jsonl(s.prompts_file, &suite);
      if (prompts.empty()) fail("--prompts-file '{}': no prompts", s.prompts_file);
      if (s.prompts > 0 && size_t(s.prompts) < prompts.size()) prompts.resize(size_t(s.prompts));
      base_spec.set_prompts_source(fs::absolute(s.prompts_file).lexically_normal().string());
      base_spec.set_prompts_crc32c(file_crc32c(s.prompts_file));
    }
    base_spec.set_prompts(prompts.size());

    const SamplingConfig& sampling = config.sampling;
    base_spec.set_temperature(s.temperature.value_or(sampling.temperature));
    base_spec.set_top_k(s.top_k.value_or(sampling.top_k));
    base_spec.set_top_p(s.top_p.value_or(sampling.top_p));
    base_spec.set_max_new_tokens(s.max_new_tokens.value_or(sampling.max_new_tokens));
    base_spec.set_seed(s.seed.value_or(sampling.seed));
    base_spec.set_expert_format(s.expert_format == "none" ? "fp32" : s.expert_format);
    base_spec.set_round_prompts(s.round_prompts);
    base_spec.set_k(s.k);
    base_spec.set_judge_temperature(s.judge_temperature);
    base_spec.set_with_reference(s.with_reference);

    actor_options.max_batch = std::max(1, s.round_prompts);
    actor_options.device = config.runtime.device;
    actor_options.expert_format =
        s.expert_format == "none" ? std::nullopt
                                  : std::optional<Fp4Format>(fp4_format_from_name(s.expert_format));

    if (s.judge == kGroundTruth) {
      base_spec.set_judge(kGroundTruth);
      judge = std::make_unique<GroundTruthJudge>(suite);
    } else {
      base_spec.set_judge(fs::absolute(s.judge).lexically_normal().string());
      base_spec.set_judge_crc32c(file_crc32c(s.judge));
      local_judge = std::make_unique<LocalJudge>(s.judge, config.runtime.device);
      spdlog::info("eval: judge {} behind a reward service at 127.0.0.1:{}", s.judge,
                   local_judge->server.port());
      LocalJudge* lj = local_judge.get();
      judge = std::make_unique<ServiceJudge>(
          local_judge->client, s.k, s.judge_temperature, s.with_reference,
          [lj](const EvalPair& pair, bool with_reference) { return lj->fits(pair, with_reference); });
    }

    const std::string db = s.db.empty() ? (fs::path(s.workdir) / "store").string() : s.db;
    fs::create_directories(s.workdir);
    store = RolloutStore::open(db, RolloutStore::Mode::kReadWrite);
  }

  std::unique_ptr<LocalActor> start_actor(const std::string& checkpoint) const {
    auto actor = std::make_unique<LocalActor>(checkpoint, actor_options);
    spdlog::info("eval: {} served by an actor at {} ({} experts)", checkpoint,
                 actor->client.address(), actor->engine.expert_format_name());
    return actor;
  }

  // The spec of A against B; its id is --eval-id or one derived from everything in the spec,
  // so the same command finds (and resumes or re-reports) its own evaluation.
  v1::EvalSpec spec_for(const std::string& a, const std::string& b,
                        const std::string& eval_id) const {
    v1::EvalSpec spec = base_spec;
    spec.set_checkpoint_a(fs::absolute(a).lexically_normal().string());
    spec.set_checkpoint_b(fs::absolute(b).lexically_normal().string());
    spec.set_checkpoint_a_crc32c(file_crc32c(a));
    spec.set_checkpoint_b_crc32c(file_crc32c(b));
    if (!eval_id.empty()) {
      spec.set_eval_id(eval_id);
      return spec;
    }
    std::string bytes;
    RLHF_CHECK(spec.SerializeToString(&bytes), "EvalSpec does not serialize");
    spec.set_eval_id(fmt::format("{}-vs-{}-{:08x}", label(a), label(b),
                                 crc32c(std::as_bytes(std::span(bytes)))));
    return spec;
  }

  // Runs what is not stored yet and returns every record of the evaluation.
  std::vector<v1::EvalRecord> evaluate(const v1::EvalSpec& spec, LocalActor& a, LocalActor& b) {
    check_or_store_eval_spec(*store, spec);
    const auto start = Clock::now();
    const int rounds_run =
        run_winrate(*store, spec, prompts, a.client, b.client, *judge,
                    [&](const WinrateProgress& p) {
                      if (p.skipped) return;
                      const double elapsed =
                          std::chrono::duration<double>(Clock::now() - start).count();
                      spdlog::info("eval {}: round {}/{}, {}/{} prompts, {:.1f} s", spec.eval_id(),
                                   p.round, p.rounds, p.prompts_done, p.prompts, elapsed);
                    });
    if (rounds_run == 0) {
      spdlog::info("eval {}: every prompt already judged in {}; reporting the stored judgments",
                   spec.eval_id(), store->path());
    }
    std::vector<v1::EvalRecord> records = read_eval_records(*store, spec.eval_id());
    RLHF_CHECK(records.size() == prompts.size(), "eval {}: {} records stored for {} prompts",
               spec.eval_id(), records.size(), prompts.size());
    return records;
  }

  // A short name for a checkpoint: its file stem, or its directory's name when the stem is a
  // generic one ("policy", "checkpoint").
  static std::string label(const std::string& path) {
    const fs::path p = fs::absolute(path).lexically_normal();
    std::string stem = p.stem().string();
    if ((stem == "policy" || stem == "checkpoint") && p.has_parent_path())
      stem = p.parent_path().filename().string() + "-" + stem;
    for (char& c : stem)
      if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_') c = '_';
    return stem.substr(0, 40);
  }
};

// ---- Output --------------------------------------------------------------------------------

struct ChartRow {
  std::string label;
  double value = 0, low = 0, high = 0;
  std::string note;
};

std::string xml_escape(const std::string& text) {
  std::string out;
  for (char c : text) {
    if (c == '<') out += "&lt;";
    else if (c == '>') out += "&gt;";
    else if (c == '&') out += "&amp;";
    else if (c == '"') out += "&quot;";
    else out += c;
  }
  return out;
}

// One row per estimate: a dot at the value and a bar over its interval, on a shared x axis,
// with a dashed line at `reference` (0.5 for win rates, the mean rating for ratings).
std::string interval_chart_svg(const std::string& title, const std::vector<ChartRow>& rows,
                               double x_min, double x_max, double reference) {
  const double left = 150, right = 220, top = 40, row_height = 26, width = 760;
  const double plot_w = width - left - right;
  const double height = top + row_height * double(rows.size()) + 40;
  auto x_of = [&](double v) {
    return left + plot_w * (std::clamp(v, x_min, x_max) - x_min) / (x_max - x_min);
  };
  std::string svg = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{:.0f}\" height=\"{:.0f}\" "
      "font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" "
      "fill=\"white\"/>\n<text x=\"10\" y=\"20\" font-size=\"14\">{}</text>\n",
      width, height, xml_escape(title));
  const double bottom = top + row_height * double(rows.size());
  for (int t = 0; t <= 4; ++t) {
    const double v = x_min + (x_max - x_min) * t / 4.0;
    svg += fmt::format("<line x1=\"{0:.1f}\" x2=\"{0:.1f}\" y1=\"{1:.0f}\" y2=\"{2:.0f}\" "
                       "stroke=\"#ddd\"/><text x=\"{0:.1f}\" y=\"{3:.0f}\" "
                       "text-anchor=\"middle\">{4:.3g}</text>\n",
                       x_of(v), top - 6, bottom, bottom + 16, v);
  }
  svg += fmt::format("<line x1=\"{0:.1f}\" x2=\"{0:.1f}\" y1=\"{1:.0f}\" y2=\"{2:.0f}\" "
                     "stroke=\"#888\" stroke-dasharray=\"4 3\"/>\n",
                     x_of(reference), top - 6, bottom);
  for (size_t i = 0; i < rows.size(); ++i) {
    const ChartRow& r = rows[i];
    const double y = top + row_height * (double(i) + 0.5);
    svg += fmt::format("<text x=\"{:.0f}\" y=\"{:.1f}\" text-anchor=\"end\">{}</text>\n",
                       left - 10, y + 4, xml_escape(r.label));
    svg += fmt::format("<line x1=\"{:.1f}\" x2=\"{:.1f}\" y1=\"{:.1f}\" y2=\"{:.1f}\" "
                       "stroke=\"#1f77b4\" stroke-width=\"3\"/>\n",
                       x_of(r.low), x_of(r.high), y, y);
    svg += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"5\" fill=\"#1f77b4\"/>\n",
                       x_of(r.value), y);
    svg += fmt::format("<text x=\"{:.0f}\" y=\"{:.1f}\">{}</text>\n", width - right + 10, y + 4,
                       xml_escape(r.note));
  }
  return svg + "</svg>\n";
}

void write_text_file(const fs::path& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
  if (!out.flush()) fail("cannot write '{}'", path.string());
}

nlohmann::json rate_json(const WinRate& r) {
  return {{"wins", r.wins},         {"ties", r.ties},       {"losses", r.losses},
          {"invalid", r.invalid},   {"win_rate", r.win_rate}, {"ci_low", r.ci_low},
          {"ci_high", r.ci_high},   {"p_value", r.p_value}};
}

std::string rate_row(const std::string& name, const WinRate& r) {
  return fmt::format("{:<10} {:>6} {:>6} {:>7} {:>8} {:>9.3f}  [{:.3f}, {:.3f}]  {:>9.3g}\n", name,
                     r.wins, r.ties, r.losses, r.invalid, r.win_rate, r.ci_low, r.ci_high,
                     r.p_value);
}

void print_winrate(const v1::EvalSpec& spec, const WinrateReport& report) {
  std::cout << fmt::format(
      "eval winrate {}\n  A = {}\n  B = {}\n  judge {} (k {} per order, both orders), {} prompts "
      "({})\n\n",
      spec.eval_id(), spec.checkpoint_a(), spec.checkpoint_b(), spec.judge(), spec.k(),
      report.prompts, spec.prompts_source());
  std::cout << fmt::format("{:<10} {:>6} {:>6} {:>7} {:>8} {:>9}  {:<16}  {:>9}\n", "", "wins",
                           "ties", "losses", "invalid", "win rate", "95% CI", "p (sign)");
  std::cout << rate_row("all", report.overall);
  for (const auto& t : report.per_task) std::cout << rate_row(t.task, t.rate);
  std::cout << fmt::format(
      "\nswap consistency {:.3f} (of {} pairs judged in both orders)   length-controlled win "
      "rate {:.3f}\nmean response length A {:.1f}, B {:.1f} tokens   identical answers {}   "
      "decided without the judge (empty answer) {}   invalid judge samples {}, retries {}\n",
      report.swap_consistency, report.judged_in_both_orders, report.lc_win_rate,
      report.mean_length_a, report.mean_length_b, report.identical_answers,
      report.decided_without_judge, report.invalid_samples, report.retries);
}

nlohmann::json winrate_json(const v1::EvalSpec& spec, const WinrateReport& report) {
  nlohmann::json out = rate_json(report.overall);
  out["eval_id"] = spec.eval_id();
  out["a"] = spec.checkpoint_a();
  out["b"] = spec.checkpoint_b();
  out["judge"] = spec.judge();
  out["k"] = spec.k();
  out["prompts"] = report.prompts;
  out["swap_consistency"] = report.swap_consistency;
  out["judged_in_both_orders"] = report.judged_in_both_orders;
  out["lc_win_rate"] = report.lc_win_rate;
  out["mean_length_a"] = report.mean_length_a;
  out["mean_length_b"] = report.mean_length_b;
  out["decided_without_judge"] = report.decided_without_judge;
  out["identical_answers"] = report.identical_answers;
  out["invalid_samples"] = report.invalid_samples;
  out["retries"] = report.retries;
  nlohmann::json per_task = nlohmann::json::object();
  for (const auto& t : report.per_task) per_task[t.task] = rate_json(t.rate);
  out["per_task"] = per_task;
  return out;
}

std::vector<ChartRow> winrate_chart_rows(const WinrateReport& report) {
  auto row = [](const std::string& name, const WinRate& r) {
    return ChartRow{name, r.win_rate, r.ci_low, r.ci_high,
                    fmt::format("{:.3f} [{:.3f}, {:.3f}] n={}", r.win_rate, r.ci_low, r.ci_high,
                                r.wins + r.ties + r.losses)};
  };
  std::vector<ChartRow> rows = {row("all", report.overall)};
  for (const auto& t : report.per_task) rows.push_back(row(t.task, t.rate));
  return rows;
}

// ---- Commands ------------------------------------------------------------------------------

void add_settings_options(CLI::App& cmd, WinrateSettings& s) {
  cmd.add_option("--judge", s.judge,
                 "judge checkpoint (a generative reward model), or ground_truth for the task "
                 "graders")
      ->required();
  cmd.add_option("--prompts", s.prompts,
                 "prompts: held-out prompts of the config's task suite (default 256), or at most "
                 "this many of --prompts-file")
      ->check(CLI::Range(1, 1000000));
  cmd.add_option("--prompts-file", s.prompts_file,
                 "prompts as JSONL ({\"task\", \"prompt\", \"reference\"}) instead of the suite");
  cmd.add_option("--k", s.k, "judge votes per order")->check(CLI::Range(1, 32))->capture_default_str();
  cmd.add_option("--judge-temperature", s.judge_temperature,
                 "judge sampling temperature (0: greedy; needs > 0 with --k > 1)")
      ->check(CLI::Range(0.0, 10.0))
      ->capture_default_str();
  cmd.add_flag("--with-reference", s.with_reference, "show the judge the reference answer");
  cmd.add_option("--temperature", s.temperature,
                 "the policies' sampling temperature (default: sampling.temperature)")
      ->check(CLI::Range(0.0, 10.0));
  cmd.add_option("--top-k", s.top_k, "the policies' top-k (default: sampling.top_k)")
      ->check(CLI::NonNegativeNumber);
  cmd.add_option("--top-p", s.top_p, "the policies' top-p (default: sampling.top_p)")
      ->check(CLI::Range(0.0, 1.0));
  cmd.add_option("--max-new-tokens", s.max_new_tokens,
                 "the policies' answer budget (default: sampling.max_new_tokens)")
      ->check(CLI::Range(1, 1 << 20));
  cmd.add_option("--seed", s.seed, "the policies' sampling seed (default: sampling.seed)");
  cmd.add_option("--expert-format", s.expert_format,
                 "experts the actors serve: packed mxfp4 / nvfp4, or none (float)")
      ->check(CLI::IsMember({"mxfp4", "nvfp4", "none"}))
      ->capture_default_str();
  cmd.add_option("--round", s.round_prompts,
                 "prompts per round (a round is generated, judged and stored at once)")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  cmd.add_option("--resamples", s.resamples, "bootstrap resamples")
      ->check(CLI::Range(1000, 1000000))
      ->capture_default_str();
  cmd.add_option("--workdir", s.workdir, "store and report files")->capture_default_str();
  cmd.add_option("--db", s.db, "rollout store to keep the judgments in (default WORKDIR/store)");
  cmd.add_option("--threads", s.threads, "CPU threads (default: runtime.threads)")
      ->check(CLI::NonNegativeNumber);
}

void eval_ratings(const CommonOptions& common, const std::vector<std::string>& checkpoints,
                  const WinrateSettings& settings) {
  const auto start = Clock::now();
  if (checkpoints.size() < 2) fail("--checkpoints: give at least 2, got {}", checkpoints.size());
  for (size_t i = 0; i < checkpoints.size(); ++i)
    for (size_t j = i + 1; j < checkpoints.size(); ++j)
      if (fs::absolute(checkpoints[i]).lexically_normal() ==
          fs::absolute(checkpoints[j]).lexically_normal())
        fail("--checkpoints: '{}' is given twice", checkpoints[i]);
  const RunConfig config = load_config(common);
  EvalSetup setup(config, settings);
  std::vector<std::unique_ptr<LocalActor>> actors;
  for (const std::string& c : checkpoints) actors.push_back(setup.start_actor(c));

  std::vector<PairRecords> pairs;
  nlohmann::json pair_json = nlohmann::json::array();
  for (int i = 0; i < int(checkpoints.size()); ++i) {
    for (int j = i + 1; j < int(checkpoints.size()); ++j) {
      const v1::EvalSpec spec = setup.spec_for(checkpoints[size_t(i)], checkpoints[size_t(j)], "");
      pairs.push_back({i, j, setup.evaluate(spec, *actors[size_t(i)], *actors[size_t(j)])});
      const WinrateReport r =
          winrate_report(spec.eval_id(), pairs.back().records, settings.resamples, spec.seed());
      nlohmann::json p = rate_json(r.overall);
      p["a"] = i;
      p["b"] = j;
      p["eval_id"] = spec.eval_id();
      pair_json.push_back(p);
    }
  }
  const RatingsReport ratings = bradley_terry_ratings(int(checkpoints.size()), pairs,
                                                      settings.resamples, setup.base_spec.seed());

  std::cout << fmt::format("eval ratings: {} models, {} pairs, {} valid comparisons, judge {}\n\n",
                           checkpoints.size(), pairs.size(), ratings.valid_comparisons,
                           setup.base_spec.judge());
  std::cout << fmt::format("{:>4}  {:>8}  {:<18}  {}\n", "rank", "rating", "95% CI", "checkpoint");
  std::vector<size_t> order(checkpoints.size());
  for (size_t m = 0; m < order.size(); ++m) order[m] = m;
  std::sort(order.begin(), order.end(),
            [&](size_t x, size_t y) { return ratings.rating[x] > ratings.rating[y]; });
  nlohmann::json models = nlohmann::json::array();
  std::vector<ChartRow> rows;
  double lo = 1e300, hi = -1e300;
  for (size_t m : order) {
    std::cout << fmt::format("{:>4}  {:>8.1f}  [{:>7.1f}, {:>7.1f}]  {}\n", ratings.rank[m],
                             ratings.rating[m], ratings.ci_low[m], ratings.ci_high[m],
                             checkpoints[m]);
    models.push_back({{"checkpoint", checkpoints[m]},
                      {"rating", ratings.rating[m]},
                      {"ci_low", ratings.ci_low[m]},
                      {"ci_high", ratings.ci_high[m]},
                      {"rank", ratings.rank[m]}});
    rows.push_back({EvalSetup::label(checkpoints[m]), ratings.rating[m], ratings.ci_low[m],
                    ratings.ci_high[m],
                    fmt::format("{:.0f} [{:.0f}, {:.0f}] rank {}", ratings.rating[m],
                                ratings.ci_low[m], ratings.ci_high[m], ratings.rank[m])});
    lo = std::min(lo, ratings.ci_low[m]);
    hi = std::max(hi, ratings.ci_high[m]);
  }
  std::cout << "\nmodels share a rank when their intervals overlap\n";

  const double pad = std::max(10.0, 0.1 * (hi - lo));
  const fs::path chart = fs::path(settings.workdir) / "ratings.svg";
  write_text_file(chart, interval_chart_svg("Bradley-Terry ratings (Elo scale), 95% bootstrap "
                                            "intervals",
                                            rows, lo - pad, hi + pad, 1000));
  nlohmann::json out = {{"command", "eval ratings"},
                        {"models", models},
                        {"pairs", pair_json},
                        {"valid_comparisons", ratings.valid_comparisons},
                        {"judge", setup.base_spec.judge()},
                        {"prompts", setup.prompts.size()},
                        {"chart", chart.string()}};
  const fs::path report = fs::path(settings.workdir) / "ratings.json";
  out["report"] = report.string();
  out["wall_s"] = std::chrono::duration<double>(Clock::now() - start).count();
  write_text_file(report, out.dump(2) + "\n");
  std::cout << fmt::format("report {}, chart {}\n", report.string(), chart.string());
  print_json(common, out);
}

}  // namespace

nlohmann::json run_winrate_eval(const RunConfig& config, const std::string& checkpoint_a,
                                const std::string& checkpoint_b,
                                const WinrateSettings& settings) {
  const auto start = Clock::now();
  EvalSetup setup(config, settings);
  const v1::EvalSpec spec = setup.spec_for(checkpoint_a, checkpoint_b, settings.eval_id);
  const auto actor_a = setup.start_actor(checkpoint_a);
  const auto actor_b = setup.start_actor(checkpoint_b);
  const std::vector<v1::EvalRecord> records = setup.evaluate(spec, *actor_a, *actor_b);
  const WinrateReport report =
      winrate_report(spec.eval_id(), records, settings.resamples, spec.seed());
  print_winrate(spec, report);

  const fs::path chart = fs::path(settings.workdir) / (spec.eval_id() + ".svg");
  write_text_file(chart, interval_chart_svg(
                             fmt::format("Win rate of {} over {} (ties half), 95% bootstrap "
                                         "intervals",
                                         EvalSetup::label(checkpoint_a),
                                         EvalSetup::label(checkpoint_b)),
                             winrate_chart_rows(report), 0.0, 1.0, 0.5));
  nlohmann::json out = winrate_json(spec, report);
  out["store"] = setup.store->path();
  out["chart"] = chart.string();
  const fs::path file = fs::path(settings.workdir) / (spec.eval_id() + ".json");
  out["report"] = file.string();
  out["wall_s"] = std::chrono::duration<double>(Clock::now() - start).count();
  write_text_file(file, out.dump(2) + "\n");
  std::cout << fmt::format("report {}, chart {}, judgments in {} (eval id {})\n", file.string(),
                           chart.string(), setup.store->path(), spec.eval_id());
  return out;
}

void register_eval_winrate(CLI::App& eval) {
  struct Options {
    CommonOptions common;
    std::string a, b;
    WinrateSettings settings;
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd = eval.add_subcommand(
      "winrate", "win rate of policy A over policy B, judged in both orders, with a bootstrap "
                 "interval");
  add_common_options(*cmd, o->common);
  cmd->add_option("--a", o->a, "checkpoint of policy A")->required();
  cmd->add_option("--b", o->b, "checkpoint of policy B")->required();
  add_settings_options(*cmd, o->settings);
  cmd->add_option("--eval-id", o->settings.eval_id,
                  "name of the evaluation in the store (default: derived from the settings, so "
                  "the same command resumes or re-reports it)");
  cmd->callback([o] {
    nlohmann::json out =
        run_winrate_eval(load_config(o->common), o->a, o->b, o->settings);
    out["command"] = "eval winrate";
    print_json(o->common, out);
  });

  struct RatingsOptions {
    CommonOptions common;
    std::vector<std::string> checkpoints;
    WinrateSettings settings;
  };
  auto r = std::make_shared<RatingsOptions>();
  CLI::App* ratings = eval.add_subcommand(
      "ratings", "Bradley-Terry ratings of several policies from all their pairwise win rates");
  add_common_options(*ratings, r->common);
  ratings->add_option("--checkpoints", r->checkpoints, "policy checkpoints (at least 2)")
      ->required()
      ->expected(2, 64);
  add_settings_options(*ratings, r->settings);
  ratings->callback([r] { eval_ratings(r->common, r->checkpoints, r->settings); });
}

}  // namespace rlhf::cli
