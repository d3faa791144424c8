// rlhf db stats|export: what a rollout store (rollout/rollout_store.h) holds, and its records as
// JSON lines. Both open the store read-only, which takes no lock, so they work while a learner
// writes it; they see the store as it was when they opened it.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>

#include <fmt/core.h>
#include <google/protobuf/util/json_util.h>
#include <spdlog/spdlog.h>

#include "common/error.h"
#include "rollout/rollout_store.h"
#include "tools/cli.h"
#include "tools/export_sink.h"

namespace rlhf::cli {

namespace {

void print_stats(const RolloutStore::Stats& stats) {
  std::cout << fmt::format("{}: {} runs, {} eval records, {} cursors, {} bytes in table files\n",
                           stats.path, stats.runs.size(), stats.evals, stats.cursors,
                           stats.live_sst_bytes);
  if (stats.runs.empty()) return;
  std::cout << fmt::format("  {:<24} {:>10} {:>10} {:>10} {:>10} {:>11} {:>17}\n", "run", "prompts",
                           "rollouts", "judgments", "versions", "mean reward", "mean ground truth");
  for (const RolloutStore::RunStats& run : stats.runs) {
    const std::string versions =
        run.rollouts ? fmt::format("{}..{}", run.min_version, run.max_version) : "-";
    const std::string reward = run.judgments ? fmt::format("{:.3f}", run.mean_reward) : "-";
    // The count beside it: ground truth exists only for prompts with a grader.
    const std::string truth =
        run.with_ground_truth
            ? fmt::format("{:.3f} ({})", run.mean_ground_truth, run.with_ground_truth)
            : "-";
    std::cout << fmt::format("  {:<24} {:>10} {:>10} {:>10} {:>10} {:>11} {:>17}\n", run.run_id,
                             run.prompts, run.rollouts, run.judgments, versions, reward, truth);
  }
}

nlohmann::json stats_json(const RolloutStore::Stats& stats) {
  nlohmann::json runs = nlohmann::json::array();
  for (const RolloutStore::RunStats& run : stats.runs) {
    runs.push_back({{"run_id", run.run_id},
                    {"prompts", run.prompts},
                    {"rollouts", run.rollouts},
                    {"judgments", run.judgments},
                    {"min_version", run.min_version},
                    {"max_version", run.max_version},
                    {"mean_reward", run.mean_reward},
                    {"mean_ground_truth", run.mean_ground_truth},
                    {"with_ground_truth", run.with_ground_truth}});
  }
  return {{"command", "db stats"},
          {"path", stats.path},
          {"runs", runs},
          {"evals", stats.evals},
          {"cursors", stats.cursors},
          {"live_sst_bytes", stats.live_sst_bytes}};
}


// Logs how far a long export has got, at most every few seconds: a store holds millions of
// rollouts, and an export of them should show it is alive.
class ExportProgress {
 public:
  explicit ExportProgress(std::string kind) : kind_(std::move(kind)) {}
  void count() {
    ++records_;
    // Asking the clock per record would cost more than formatting small records does.
    if (records_ % 1024 != 0) return;
    const auto now = Clock::now();
    if (now - last_log_ < std::chrono::seconds(5)) return;
    last_log_ = now;
    spdlog::info("db export: {} records ({}) so far", records_, kind_);
  }
  uint64_t records() const { return records_; }

 private:
  using Clock = std::chrono::steady_clock;
  std::string kind_;
  uint64_t records_ = 0;
  Clock::time_point last_log_ = Clock::now();
};

}  // namespace

void register_db(CLI::App& app) {
  CLI::App* db = app.add_subcommand("db", "read a rollout store (RocksDB): stats, export");
  db->require_subcommand(1);

  struct StatsOptions {
    CommonOptions common;
    std::string path;
  };
  auto s = std::make_shared<StatsOptions>();
  CLI::App* stats = db->add_subcommand("stats", "records per run, versions, mean reward, bytes");
  stats->add_option("--db", s->path, "the store (a RocksDB directory)")->required();
  stats->add_flag("--json", s->common.json, "print a machine-readable summary as the last line");
  stats->callback([s] {
    const auto store = RolloutStore::open(s->path, RolloutStore::Mode::kReadOnly);
    const RolloutStore::Stats result = store->stats();
    print_stats(result);
    print_json(s->common, stats_json(result));
  });

  struct ExportOptions {
    CommonOptions common;
    std::string path;
    std::string kind = "scored";
    std::string run;
    std::string out;
  };
  auto e = std::make_shared<ExportOptions>();
  CLI::App* exp = db->add_subcommand("export", "records as JSON lines, one per line");
  exp->add_option("--db", e->path, "the store (a RocksDB directory)")->required();
  exp->add_option("--kind", e->kind, "scored (rollout with judgment), prompts, evals, cursors")
      ->check(CLI::IsMember({"scored", "prompts", "evals", "cursors"}))
      ->capture_default_str();
  exp->add_option("--run", e->run, "only this run (for --kind evals: this eval id); default all");
  exp->add_option("--out", e->out, "the JSONL file; default (or -) stdout");
  exp->add_flag("--json", e->common.json, "print a machine-readable summary as the last line");
  exp->callback([e] {
    const auto store = RolloutStore::open(e->path, RolloutStore::Mode::kReadOnly);
    ExportSink sink(e->out, "--out");
    ExportProgress progress(e->kind);
    google::protobuf::util::JsonPrintOptions json;
    json.preserve_proto_field_names = true;
    // Every line carries every field, zeros and empty lists included, so a reader needs no
    // knowledge of proto3's defaults (sample_index 0 and finished false would vanish otherwise).
    json.always_print_primitive_fields = true;
    auto emit = [&](const google::protobuf::Message& record) {
      std::string line;
      const auto status = google::protobuf::util::MessageToJsonString(record, &line, json);
      if (!status.ok()) fail("db export: {}: {}", record.GetTypeName(), status.ToString());
      sink.stream() << line << '\n';
      progress.count();
    };
    if (e->kind == "scored") {
      store->for_each_scored(e->run, emit);
    } else if (e->kind == "prompts") {
      store->for_each_prompt(e->run, emit);
    } else if (e->kind == "evals") {
      store->for_each_eval(e->run, emit);
    } else {
      store->for_each_cursor([&](const v1::LearnerCursor& cursor) {
        if (e->run.empty() || cursor.run_id() == e->run) emit(cursor);
      });
    }
    sink.commit();
    const std::string out = sink.to_stdout() ? "stdout" : e->out;
    spdlog::info("db export: {} records ({}) to {}", progress.records(), e->kind, out);
    print_json(e->common, {{"command", "db export"},
                           {"path", e->path},
                           {"kind", e->kind},
                           {"run", e->run},
                           {"out", sink.to_stdout() ? "-" : e->out},
                           {"records", progress.records()}});
  });
}

}  // namespace rlhf::cli
