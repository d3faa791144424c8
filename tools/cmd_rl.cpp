// rlhf serve learner: the RL learner (learner/rl_trainer.h) against running actor and reward
//                     services, with its own LearnerService.
// rlhf collect:       collection alone (learner/collector.h) into a store: prompts -> actors ->
//                     reward service -> RolloutStore, no training; resumable from the store's
//                     cursor.
// rlhf up:            starts the reward service, the actor(s) and the learner as processes on
//                     loopback and runs the RL loop; Ctrl-C stops them all, learner first.
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

#include <fmt/core.h>
#include <spdlog/spdlog.h>

#include "common/error.h"
#include "common/progress.h"
#include "kernels/backend.h"
#include "learner/actor_pool.h"
#include "learner/collector.h"
#include "learner/learner_service.h"
#include "learner/rl_trainer.h"
#include "reward/reward_client.h"
#include "tools/child_process.h"
#include "tools/cli.h"
#include "tools/rl_commands.h"
#include "tools/rl_report.h"
#include "tools/service_support.h"

namespace rlhf::cli {

namespace {

using Clock = std::chrono::steady_clock;

// The reward service as the learner's scorer.
class RewardServiceScorer : public RolloutScorer {
 public:
  explicit RewardServiceScorer(const std::string& address) : client_(address) {}
  v1::ScoreResponse score(const v1::ScoreRequest& request) override {
    return client_.score(request);
  }

 private:
  RewardClient client_;
};

std::vector<std::string> split_addresses(const std::string& list) {
  std::vector<std::string> out;
  std::stringstream in(list);
  std::string item;
  while (std::getline(in, item, ','))
    if (!item.empty()) out.push_back(item);
  if (out.empty()) fail("--actors: give at least one host:port");
  return out;
}

struct ServeLearnerOptions {
  CommonOptions common;
  std::string workdir = "runs/rl";
  std::string actors;
  std::string reward;
  std::string listen = "127.0.0.1:50053";
  std::string store;
  std::string policy;
  int64_t steps = 0;
  bool resume = false;
};

void serve_learner(const ServeLearnerOptions& o) {
  const StopSignals stop_signals;  // first: before any thread exists
  gpr_set_log_function(log_grpc_through_spdlog);
  const auto start = Clock::now();
  RunConfig config = load_config(o.common);
  if (!o.policy.empty()) config.rl.policy = o.policy;
  if (o.steps > 0) config.rl.steps = o.steps;
  const std::optional<RlSummary> summary =
      run_learner(config, o.workdir, o.resume, split_addresses(o.actors), o.reward, o.listen,
                  o.store, stop_signals);
  if (!summary) return;
  print_rl_summary(*summary);
  nlohmann::json out = rl_summary_json(*summary);
  out["command"] = "serve learner";
  out["wall_s"] = std::chrono::duration<double>(Clock::now() - start).count();
  print_json(o.common, out);
}

void register_serve_learner_impl(CLI::App& serve) {
  auto o = std::make_shared<ServeLearnerOptions>();
  CLI::App* cmd = serve.add_subcommand(
      "learner", "run RL against running actor and reward services (rlhf.v1.LearnerService)");
  add_common_options(*cmd, o->common);
  cmd->add_option("--workdir", o->workdir, "directory for checkpoints, metrics and the store")
      ->capture_default_str();
  cmd->add_option("--actors", o->actors, "actor addresses, comma-separated host:port")
      ->required();
  cmd->add_option("--reward", o->reward, "reward service address host:port")->required();
  cmd->add_option("--listen", o->listen, "host:port for the LearnerService; port 0 picks one")
      ->capture_default_str();
  cmd->add_option("--store", o->store, "RolloutStore path (default WORKDIR/store)");
  cmd->add_option("--policy", o->policy, "start policy (overrides rl.policy)");
  cmd->add_option("--steps", o->steps, "RL steps (overrides rl.steps)")
      ->check(CLI::PositiveNumber);
  cmd->add_flag("--resume", o->resume, "continue the run in WORKDIR from its checkpoint");
  cmd->callback([o] { serve_learner(*o); });
}

struct CollectOptions {
  CommonOptions common;
  std::string actors;
  std::string reward;
  std::string store;
  std::string run = "collect";
  int64_t steps = 0;
};

void collect(const CollectOptions& o) {
  const StopSignals stop_signals;  // first: before any thread exists
  gpr_set_log_function(log_grpc_through_spdlog);
  const auto start = Clock::now();
  const RunConfig config = load_config(o.common);
  const int64_t steps = o.steps > 0 ? o.steps : config.rl.steps;
  const TaskSuite suite(config.tasks);
  auto store = RolloutStore::open(o.store, RolloutStore::Mode::kReadWrite);
  ActorPool actors(split_addresses(o.actors));
  RewardServiceScorer scorer(o.reward);
  Collector collector(config, o.run, suite, actors, scorer, *store);
  // The cursor counts the steps stored: a second `collect` with the same --run continues.
  const std::optional<v1::LearnerCursor> cursor = store->cursor(o.run);
  int64_t step = cursor ? int64_t(cursor->step()) : 0;
  if (step > 0) spdlog::info("collect: run '{}' continues at step {}", o.run, step);
  std::atomic<bool> stop{false};
  ProgressMeter progress("collect", steps);
  int64_t rollouts = 0, judged = 0, invalid = 0, graded = 0;
  double gt_sum = 0, judge_sum = 0;
  {
    const StopWatcher watcher(stop_signals, [&](int) {
      spdlog::info("collect: stopping after the current step");
      stop = true;
    });
    while (step < steps && !stop) {
      CollectStats stats;
      const auto scored = collector.collect(step, 0, false, stats);
      ++step;
      v1::LearnerCursor next;
      next.set_run_id(o.run);
      next.set_step(uint64_t(step));
      next.set_next_prompt_index(uint64_t(step) * uint64_t(config.rl.prompts_per_step));
      store->put_cursor(next);
      int64_t tokens = 0;
      for (const auto& s : scored) {
        ++rollouts;
        tokens += s.rollout().response_tokens_size();
        if (s.has_ground_truth_score()) {
          gt_sum += s.ground_truth_score();
          ++graded;
        }
        if (s.judgment().valid()) {
          judge_sum += s.judgment().score();
          ++judged;
        } else {
          ++invalid;
        }
      }
      progress.update(step, 0, tokens,
                      fmt::format("ground truth {:.2f} judge {:.2f} (generate {:.1f} s, score "
                                  "{:.1f} s)",
                                  graded ? gt_sum / double(graded) : 0,
                                  judged ? judge_sum / double(judged) : 0, stats.generate_s,
                                  stats.score_s));
    }
  }
  std::cout << fmt::format("collected run '{}': {} rollouts this time, steps done {} of {}, "
                           "store {}\n",
                           o.run, rollouts, step, steps, o.store);
  nlohmann::json out = {{"command", "collect"},
                        {"run_id", o.run},
                        {"steps_done", step},
                        {"steps", steps},
                        {"rollouts", rollouts},
                        {"ground_truth_mean", graded ? gt_sum / double(graded) : 0},
                        {"judge_mean", judged ? judge_sum / double(judged) : 0},
                        {"without_judgment", invalid},
                        {"store", o.store},
                        {"wall_s", std::chrono::duration<double>(Clock::now() - start).count()}};
  print_json(o.common, out);
}

void register_collect_impl(CLI::App& app) {
  auto o = std::make_shared<CollectOptions>();
  CLI::App* cmd = app.add_subcommand(
      "collect", "sample, judge and store rollouts from running services, without training");
  add_common_options(*cmd, o->common);
  cmd->add_option("--actors", o->actors, "actor addresses, comma-separated host:port")
      ->required();
  cmd->add_option("--reward", o->reward, "reward service address host:port")->required();
  cmd->add_option("--store", o->store, "RolloutStore path (created if missing)")->required();
  cmd->add_option("--run", o->run, "run id the records are stored under")->capture_default_str();
  cmd->add_option("--steps", o->steps, "steps of rl.prompts_per_step prompts (default rl.steps)")
      ->check(CLI::PositiveNumber);
  cmd->callback([o] { collect(*o); });
}

struct UpOptions {
  CommonOptions common;
  std::string workdir = "runs/rl";
  int actors = 1;
  std::string judge;
  std::string policy;
  int64_t steps = 0;
  bool resume = false;
};

void up(const UpOptions& o) {
  const StopSignals stop_signals;
  const RunConfig config = load_config(o.common);  // validated before anything starts
  check_float_backend(config.runtime.device);      // every process runs on it
  const std::string policy = o.policy.empty() ? config.rl.policy : o.policy;
  const std::string judge = o.judge.empty() ? config.rl.judge : o.judge;
  if (policy.empty()) fail("rl.policy (or --policy): the start policy is required");
  if (judge.empty() && (config.rl.reward == "judge" || config.rl.judge_rollouts)) {
    fail("rl.judge (or --judge): the reward service needs a judge checkpoint (rl.reward is "
         "'{}', rl.judge_rollouts {}); set both to ground_truth / false to run without a judge",
         config.rl.reward, config.rl.judge_rollouts);
  }
  std::filesystem::create_directories(o.workdir);
  // The learner re-reads the config from a file: the one given, or the embedded one written
  // into the workdir.
  std::string config_path = o.common.config;
  if (config_path.empty()) {
    config_path = (std::filesystem::path(o.workdir) / "up-config.yaml").string();
    std::ofstream(config_path) << config.source;
  }
  const std::string exe = self_executable();
  RlServiceProcesses services = start_rl_services(config, policy, judge, o.actors);
  std::string actor_addresses;
  for (const std::string& a : services.actor_addresses)
    actor_addresses += (actor_addresses.empty() ? "" : ",") + a;
  // Without a judge the learner never calls the reward service (checked above), but its
  // --reward option is required: any address does.
  const std::string reward_address =
      services.reward_address.empty() ? "127.0.0.1:1" : services.reward_address;
  std::vector<std::string> learner_args = {exe, "serve", "learner", "--config", config_path,
                                           "--workdir", o.workdir, "--actors", actor_addresses,
                                           "--reward", reward_address, "--listen", "127.0.0.1:0",
                                           "--policy", policy};
  if (o.steps > 0) learner_args.insert(learner_args.end(), {"--steps", std::to_string(o.steps)});
  if (o.resume) learner_args.push_back("--resume");
  if (o.common.json) learner_args.push_back("--json");
  // The learner's stdout (its summary and --json line) is ours: it inherits the descriptor.
  ChildProcess learner("learner", learner_args);

  int learner_status = 0;
  {
    const StopWatcher watcher(stop_signals, [&](int signal) {
      spdlog::info("up: {} received; stopping the learner first (it checkpoints), then the "
                   "services",
                   signal_name(signal));
      learner.terminate();
    });
    learner_status = learner.wait();
  }
  services.stop();
  if (learner_status != 0) fail("the learner exited with status {}", learner_status);
}

void register_up_impl(CLI::App& app) {
  auto o = std::make_shared<UpOptions>();
  CLI::App* cmd = app.add_subcommand(
      "up", "start reward, actor(s) and learner on loopback and run the RL loop");
  add_common_options(*cmd, o->common);
  cmd->add_option("--workdir", o->workdir, "the learner's work directory")->capture_default_str();
  cmd->add_option("--actors", o->actors, "actor processes to start")
      ->check(CLI::Range(1, 16))
      ->capture_default_str();
  cmd->add_option("--judge", o->judge, "judge checkpoint (overrides rl.judge)");
  cmd->add_option("--policy", o->policy, "start policy (overrides rl.policy)");
  cmd->add_option("--steps", o->steps, "RL steps (overrides rl.steps)")
      ->check(CLI::PositiveNumber);
  cmd->add_flag("--resume", o->resume, "continue the run in WORKDIR");
  cmd->callback([o] { up(*o); });
}

}  // namespace

void RlServiceProcesses::stop() {
  for (auto& p : processes) p->terminate();
  for (auto& p : processes) p->wait();
  processes.clear();
}

RlServiceProcesses start_rl_services(const RunConfig& config, const std::string& policy,
                                     const std::string& judge, int actors) {
  const std::string exe = self_executable();
  const std::string& device = config.runtime.device;
  RlServiceProcesses services;
  if (config.rl.reward == "judge" || !judge.empty()) {
    services.processes.push_back(std::make_unique<ChildProcess>(
        "reward", std::vector<std::string>{exe, "serve", "reward", "--checkpoint", judge,
                                           "--listen", "127.0.0.1:0", "--device", device}));
    services.reward_address = services.processes.back()->wait_for_address(std::chrono::seconds(120));
  }
  const std::string expert_format =
      config.fp4.enabled() ? std::string(fp4_format_name(config.fp4.format)) : "none";
  for (int i = 0; i < actors; ++i) {
    services.processes.push_back(std::make_unique<ChildProcess>(
        fmt::format("actor-{}", i),
        std::vector<std::string>{exe, "serve", "actor", "--checkpoint", policy, "--listen",
                                 "127.0.0.1:0", "--expert-format", expert_format, "--device",
                                 device}));
    services.actor_addresses.push_back(
        services.processes.back()->wait_for_address(std::chrono::seconds(120)));
  }
  return services;
}

std::optional<RlSummary> run_learner(const RunConfig& config, const std::string& workdir,
                                     bool resume, const std::vector<std::string>& actor_addresses,
                                     const std::string& reward, const std::string& listen,
                                     const std::string& store, const StopSignals& signals) {
  ActorPool actors(actor_addresses);
  RewardServiceScorer scorer(reward);
  RlTrainer trainer(config, workdir, resume, actors, scorer, store);
  LearnerServer server(trainer, listen);
  spdlog::info("learner listening on {} (run '{}', step {} of {}, store {})",
               bound_address(listen, server.port()), trainer.run_id(), trainer.steps_done(),
               config.rl.steps, trainer.store().path());
  {
    const StopWatcher watcher(signals, [&](int signal) {
      spdlog::info("learner: {} received; finishing the current step, then checkpointing",
                   signal_name(signal));
      trainer.stop();
    });
    trainer.train();
  }
  if (trainer.steps_done() < config.rl.steps) {
    spdlog::info("learner stopped at step {} of {}; continue with --resume", trainer.steps_done(),
                 config.rl.steps);
    return std::nullopt;
  }
  RlSummary summary = trainer.finish();
  server.shutdown();
  return summary;
}

void register_serve_learner(CLI::App& serve) { register_serve_learner_impl(serve); }
void register_up(CLI::App& app) { register_up_impl(app); }
void register_collect(CLI::App& app) { register_collect_impl(app); }

}  // namespace rlhf::cli
