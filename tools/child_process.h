#pragma once
// A service started by `rlhf up` (or `rlhf demo`) as a child process: its stderr is read line
// by line, forwarded to ours with a name prefix, and watched for the "listening on ADDR" line
// each `rlhf serve ...` command logs once it is bound. Also a script a benchmark runs (the
// PyTorch reference), whose last stderr lines go into the error when it fails.
#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace rlhf::cli {

class ChildProcess {
 public:
  // Starts `argv` (argv[0] a path) in its own process group, so a Ctrl-C at the terminal
  // reaches only the parent, which stops its children in order. The child's signal mask is
  // reset; OMP_WAIT_POLICY=passive is set unless the environment has one (several OpenMP
  // processes on a few cores must not spin while they wait for each other).
  ChildProcess(std::string name, std::vector<std::string> argv);
  ~ChildProcess();  // terminate() and wait()
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  // The address from the child's "listening on ADDR" line; rlhf::Error if the child exits
  // first or `timeout` passes.
  std::string wait_for_address(std::chrono::seconds timeout);
  // SIGTERM (the services shut down cleanly on it); a no-op once the child has exited.
  void terminate();
  void kill_now();  // SIGKILL, for tests of crash recovery
  // Waits for the exit; returns the exit status (128 + signal when killed by one).
  int wait();
  pid_t pid() const { return pid_; }
  const std::string& name() const { return name_; }
  // The last lines (at most kTailLines) the child wrote to stderr, newline-separated, without
  // the name prefix. Complete once wait() has returned.
  std::string stderr_tail();
  static constexpr size_t kTailLines = 20;

 private:
  void read_stderr(int fd);

  std::string name_;
  pid_t pid_ = -1;
  bool reaped_ = false;
  int exit_status_ = 0;
  std::thread reader_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::string address_;
  std::deque<std::string> tail_;
  bool stderr_closed_ = false;
};

// The path of the running rlhf binary (/proc/self/exe), to start services from.
std::string self_executable();

}  // namespace rlhf::cli
