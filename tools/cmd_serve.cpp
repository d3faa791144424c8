// rlhf serve reward: the reward service (reward/reward_service.h) on a judge checkpoint, until
// SIGINT or SIGTERM.
#include <pthread.h>
#include <signal.h>

#include <cstring>
#include <memory>
#include <string>
#include <thread>

#include <grpc/support/log.h>
#include <spdlog/spdlog.h>

#include "common/error.h"
#include "kernels/cpu/cpu_ops.h"
#include "model/checkpoint.h"
#include "model/tokenizer.h"
#include "reward/judge.h"
#include "reward/reward_service.h"
#include "tools/cli.h"

namespace rlhf::cli {
namespace {

// SIGINT and SIGTERM are blocked in this thread and so in every thread started after it (gRPC's,
// OpenMP's, the judge's), and taken by one thread with sigwait: the shutdown then runs as
// ordinary code, not inside a signal handler, where almost nothing may be called.
class StopSignals {
 public:
  StopSignals() {
    sigemptyset(&signals_);
    sigaddset(&signals_, SIGINT);
    sigaddset(&signals_, SIGTERM);
    const int err = pthread_sigmask(SIG_BLOCK, &signals_, &previous_);
    if (err != 0) fail("cannot block SIGINT/SIGTERM: {}", std::strerror(err));
  }
  ~StopSignals() { pthread_sigmask(SIG_SETMASK, &previous_, nullptr); }
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

  // Blocks until SIGINT or SIGTERM arrives; returns it.
  int wait() const {
    int signal = 0;
    sigwait(&signals_, &signal);
    return signal;
  }

 private:
  sigset_t signals_;
  sigset_t previous_;
};

// gRPC's own log lines (by default only its errors, e.g. why a bind failed) go through spdlog
// like every other line the command writes.
void log_grpc_through_spdlog(gpr_log_func_args* args) {
  spdlog::level::level_enum level = spdlog::level::debug;
  if (args->severity == GPR_LOG_SEVERITY_ERROR) level = spdlog::level::err;
  if (args->severity == GPR_LOG_SEVERITY_INFO) level = spdlog::level::info;
  spdlog::log(level, "grpc: {}", args->message);
}

// "127.0.0.1:0" with port 50123 bound -> "127.0.0.1:50123".
std::string bound_address(const std::string& listen_address, int port) {
  return listen_address.substr(0, listen_address.rfind(':')) + ":" + std::to_string(port);
}

void register_serve_reward(CLI::App& serve) {
  struct Options {
    std::string checkpoint;
    std::string listen = "127.0.0.1:50051";
    int max_batch = 16;
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
  cmd->add_option("--threads", o->threads, "CPU threads (0 = every core)")
      ->check(CLI::NonNegativeNumber);
  cmd->callback([o] {
    const StopSignals stop_signals;  // first: before any thread exists
    gpr_set_log_function(log_grpc_through_spdlog);
    cpu_set_threads(o->threads);
    const CheckpointContents info = checkpoint_read_info(o->checkpoint);
    const auto tokenizer = make_tokenizer(info.tokenizer);
    CpuOps<float> ops;
    const auto model = checkpoint_load_model(o->checkpoint, ops, o->max_batch);
    Judge judge(*model, *tokenizer, o->max_batch);
    spdlog::info("judge: {} ({} layers, d_model {}, context {} tokens, tokenizer {})",
                 o->checkpoint, info.config.n_layers, info.config.d_model,
                 info.config.max_seq_len, info.tokenizer);

    RewardServer server(judge, o->listen);
    spdlog::info("reward service listening on {}", bound_address(o->listen, server.port()));
    std::thread stopper([&server, &stop_signals] {
      const int signal = stop_signals.wait();
      spdlog::info("reward service: {} received, shutting down",
                   signal == SIGINT ? "SIGINT" : "SIGTERM");
      server.shutdown();
    });
    server.wait();
    stopper.join();
    spdlog::info("reward service stopped");
  });
}

}  // namespace

void register_serve(CLI::App& app) {
  CLI::App* serve = app.add_subcommand("serve", "run a service until SIGINT or SIGTERM");
  serve->require_subcommand(1);
  register_serve_reward(*serve);
}

}  // namespace rlhf::cli
