#pragma once
// What every `rlhf serve ...` command and `rlhf up` share: signal handling that turns SIGINT
// and SIGTERM into ordinary code, gRPC's log lines routed through spdlog, and the bound
// address in the "listening on" line that `rlhf up` and the tests read.
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <functional>
#include <string>
#include <thread>

#include <grpc/support/log.h>
#include <spdlog/spdlog.h>

#include "common/error.h"

namespace rlhf::cli {

// SIGINT and SIGTERM are blocked in this thread and so in every thread started after it
// (gRPC's, OpenMP's, the workers'), and taken by one thread with sigwait: the shutdown then
// runs as ordinary code, not inside a signal handler, where almost nothing may be called.
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
  // The mask in force before this object blocked the signals (a child process restores it).
  const sigset_t& previous() const { return previous_; }

 private:
  sigset_t signals_;
  sigset_t previous_;
};

// While it lives, runs `on_stop(signal)` on a thread of its own when SIGINT or SIGTERM
// arrives (through `signals`): how a long job is asked to stop cleanly. Its destructor wakes
// that thread with a SIGTERM to this process (blocked in every other thread, so only its
// sigwait takes it) and joins it, without calling on_stop: the job ended on its own.
class StopWatcher {
 public:
  StopWatcher(const StopSignals& signals, std::function<void(int)> on_stop)
      : thread_([this, &signals, on_stop = std::move(on_stop)] {
          const int signal = signals.wait();
          if (!released_) on_stop(signal);
        }) {}
  ~StopWatcher() {
    released_ = true;
    ::kill(::getpid(), SIGTERM);
    thread_.join();
    // If a real signal woke the thread first, the wake-up SIGTERM is still pending; it must
    // not fire once StopSignals unblocks the signals (the process would die with status 143).
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGTERM);
    const timespec no_wait{0, 0};
    while (sigtimedwait(&stop, nullptr, &no_wait) > 0) {
    }
  }
  StopWatcher(const StopWatcher&) = delete;
  StopWatcher& operator=(const StopWatcher&) = delete;

 private:
  std::atomic<bool> released_{false};  // before thread_: initialized before the thread starts
  std::thread thread_;
};

inline const char* signal_name(int signal) { return signal == SIGINT ? "SIGINT" : "SIGTERM"; }

// gRPC's own log lines (by default only its errors, e.g. why a bind failed) go through spdlog
// like every other line the command writes.
inline void log_grpc_through_spdlog(gpr_log_func_args* args) {
  spdlog::level::level_enum level = spdlog::level::debug;
  if (args->severity == GPR_LOG_SEVERITY_ERROR) level = spdlog::level::err;
  if (args->severity == GPR_LOG_SEVERITY_INFO) level = spdlog::level::info;
  spdlog::log(level, "grpc: {}", args->message);
}

// "127.0.0.1:0" with port 50123 bound -> "127.0.0.1:50123".
inline std::string bound_address(const std::string& listen_address, int port) {
  return listen_address.substr(0, listen_address.rfind(':')) + ":" + std::to_string(port);
}

}  // namespace rlhf::cli
