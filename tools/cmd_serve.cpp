// rlhf serve reward|actor (`serve learner` is in tools/cmd_rl.cpp): the reward service
// (reward/reward_service.h) on a judge checkpoint,
// the actor service (actor/actor_service.h) on a policy checkpoint, until SIGINT or SIGTERM.
#include <pthread.h>
#include <signal.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include <grpc/support/log.h>
#include <spdlog/spdlog.h>

#include "actor/actor_client.h"
#include "actor/actor_engine.h"
#include "actor/actor_service.h"
#include "common/error.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/fp4/fp4.h"
#include "model/checkpoint.h"
#include "model/tokenizer.h"
#include "reward/judge.h"
#include "reward/reward_service.h"
#include "tools/cli.h"
#include "tools/service_support.h"

namespace rlhf::cli {
namespace {

// Logs "<name> listening on HOST:PORT" (tests and `rlhf up` find the bound port after
// "listening on "), then serves until SIGINT or SIGTERM and shuts the server down.
template <typename Server>
void serve_until_stop_signal(const char* name, const std::string& listen, Server& server,
                             const StopSignals& stop_signals) {
  spdlog::info("{} listening on {}", name, bound_address(listen, server.port()));
  std::thread stopper([&server, &stop_signals, name] {
    const int signal = stop_signals.wait();
    spdlog::info("{}: {} received, shutting down", name, signal == SIGINT ? "SIGINT" : "SIGTERM");
    server.shutdown();
  });
  server.wait();
  stopper.join();
  spdlog::info("{} stopped", name);
}

void register_serve_reward(CLI::App& serve) {
  struct Options {
    std::string checkpoint;
    std::string listen = "127.0.0.1:50051";
    int max_batch = 16;
    std::string device = "cpu";
    int threads = 0;
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd =
      serve.add_subcommand("reward", "judge responses over gRPC (rlhf.v1.RewardService)");
  cmd->add_option("--checkpoint", o->checkpoint, "judge model checkpoint (.safetensors)")
      ->required();
  cmd->add_option("--listen", o->listen, "host:port to listen on; port 0 picks a free one")
      ->capture_default_str();
  cmd->add_option("--max-batch", o->max_batch, "judge samples decoded together")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  add_device_option(*cmd, o->device);
  cmd->add_option("--threads", o->threads, "CPU threads (0 = every core)")
      ->check(CLI::NonNegativeNumber);
  cmd->callback([o] {
    const StopSignals stop_signals;  // first: before any thread exists
    gpr_set_log_function(log_grpc_through_spdlog);
    cpu_set_threads(o->threads);
    const CheckpointContents info = checkpoint_read_info(o->checkpoint);
    const auto tokenizer = make_tokenizer(info.tokenizer);
    const std::unique_ptr<Ops<float>> ops = make_float_ops(o->device);
    const auto model = checkpoint_load_model(o->checkpoint, *ops, o->max_batch);
    Judge judge(*model, *tokenizer, o->max_batch, judge_layout_of(info, o->checkpoint));
    spdlog::info("judge: {} ({} layers, d_model {}, context {} tokens, tokenizer {}, {})",
                 o->checkpoint, info.config.n_layers, info.config.d_model,
                 info.config.max_seq_len, info.tokenizer,
                 judge_layout_name(judge.layout()));

    RewardServer server(judge, o->listen);
    serve_until_stop_signal("reward service", o->listen, server, stop_signals);
  });
}

void register_serve_actor(CLI::App& serve) {
  struct Options {
    std::string checkpoint;
    std::string listen = "127.0.0.1:50052";
    std::string expert_format = "mxfp4";
    int max_batch = 16;
    std::string learner;
    int learner_wait_s = 60;
    std::string device = "cpu";
    int threads = 0;
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd =
      serve.add_subcommand("actor", "generate rollouts over gRPC (rlhf.v1.ActorService)");
  cmd->add_option("--checkpoint", o->checkpoint,
                  "policy checkpoint (.safetensors, float or packed)")
      ->required();
  cmd->add_option("--listen", o->listen, "host:port to listen on; port 0 picks a free one")
      ->capture_default_str();
  cmd->add_option("--expert-format", o->expert_format,
                  "serve the experts packed in this FP4 format (a float checkpoint is packed at "
                  "load), or none for float experts")
      ->check(CLI::IsMember({"mxfp4", "nvfp4", "none"}))
      ->capture_default_str();
  cmd->add_option("--max-batch", o->max_batch, "sequences decoded together")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  add_device_option(*cmd, o->device);
  cmd->add_option("--learner", o->learner,
                  "learner host:port: pull its current policy before serving (LearnerService."
                  "GetWeights), so a restarted actor catches up");
  cmd->add_option("--learner-wait", o->learner_wait_s,
                  "seconds to keep retrying an unreachable learner before giving up")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd->add_option("--threads", o->threads, "CPU threads (0 = every core)")
      ->check(CLI::NonNegativeNumber);
  cmd->callback([o] {
    const StopSignals stop_signals;  // first: before any thread exists
    gpr_set_log_function(log_grpc_through_spdlog);
    cpu_set_threads(o->threads);
    ActorEngineOptions options;
    options.max_batch = o->max_batch;
    options.device = o->device;
    options.expert_format = o->expert_format == "none"
                                ? std::nullopt
                                : std::optional<Fp4Format>(fp4_format_from_name(o->expert_format));
    ActorEngine engine(o->checkpoint, options);
    const ModelConfig& config = engine.config();
    spdlog::info("actor: {} ({} layers, d_model {}, context {} tokens, experts {}), version {}",
                 o->checkpoint, config.n_layers, config.d_model, config.max_seq_len,
                 engine.expert_format_name(), engine.version());
    // Before listening: once the address is logged, the actor serves the learner's policy.
    if (!o->learner.empty()) {
      const WeightPayload payload =
          fetch_learner_weights(o->learner, std::chrono::seconds(o->learner_wait_s));
      if (payload.version > engine.version()) {
        engine.apply_weights(payload);
      } else {
        spdlog::info("actor: the learner at {} has version {}, not newer than {}; serving the "
                     "checkpoint",
                     o->learner, payload.version, engine.version());
      }
    }

    ActorServer server(engine, o->listen);
    serve_until_stop_signal("actor service", o->listen, server, stop_signals);
  });
}

}  // namespace

void register_serve(CLI::App& app) {
  CLI::App* serve = app.add_subcommand("serve", "run a service until SIGINT or SIGTERM");
  serve->require_subcommand(1);
  register_serve_reward(*serve);
  register_serve_actor(*serve);
  register_serve_learner(*serve);
}

}  // namespace rlhf::cli
