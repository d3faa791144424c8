#pragma once
// The RL pieces `rlhf serve learner`, `rlhf up` and `rlhf demo` share (tools/cmd_rl.cpp).
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "learner/rl_trainer.h"
#include "tools/child_process.h"
#include "tools/service_support.h"

namespace rlhf::cli {

// The reward service and the actors, each an `rlhf serve ...` child process on a free
// loopback port.
struct RlServiceProcesses {
  std::vector<std::unique_ptr<ChildProcess>> processes;
  std::string reward_address;  // empty when no reward service was started
  std::vector<std::string> actor_addresses;
  // SIGTERM to every service, then waits for each.
  void stop();
};

// Starts a reward service on `judge` (unless it is empty and the run uses ground-truth
// rewards) and `actors` actors on `policy`, serving packed experts when the config trains
// with QAT, all on the config's runtime.device. Returns once every service has reported its
// address.
RlServiceProcesses start_rl_services(const RunConfig& config, const std::string& policy,
                                     const std::string& judge, int actors);

// Runs the learner in this process against running services, with a LearnerService on
// `listen`. SIGINT/SIGTERM (taken through `signals`) stop it after the current step, with a
// checkpoint; then it returns nullopt. Otherwise it evaluates and returns the summary.
std::optional<RlSummary> run_learner(const RunConfig& config, const std::string& workdir,
                                     bool resume, const std::vector<std::string>& actors,
                                     const std::string& reward, const std::string& listen,
                                     const std::string& store, const StopSignals& signals);

}  // namespace rlhf::cli
