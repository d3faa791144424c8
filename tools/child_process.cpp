#include "tools/child_process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string_view>

#include <spdlog/spdlog.h>

#include "common/error.h"

namespace rlhf::cli {

std::string self_executable() {
  std::string path = std::filesystem::read_symlink("/proc/self/exe").string();
  // The kernel marks the link when the file this process runs from was replaced (a rebuild)
  // or removed since it started: exec would fail, and the services must be this very build.
  constexpr std::string_view kDeleted = " (deleted)";
  if (path.size() > kDeleted.size() && path.ends_with(kDeleted)) {
    path.resize(path.size() - kDeleted.size());
    fail("this rlhf binary ({}) was replaced or removed while it ran, so it cannot start its "
         "services from it; run the command again",
         path);
  }
  return path;
}

ChildProcess::ChildProcess(std::string name, std::vector<std::string> argv)
    : name_(std::move(name)) {
  if (argv.empty()) fail("{}: no program to run", name_);
  // Checked here, where the error can name the program: the child can only report "exec failed".
  if (access(argv[0].c_str(), X_OK) != 0) {
    fail("{}: cannot run {}: {}", name_, argv[0], std::strerror(errno));
  }
  int pipe_fds[2];
  if (pipe2(pipe_fds, O_CLOEXEC) != 0) fail("{}: pipe: {}", name_, std::strerror(errno));
  std::vector<char*> args;
  for (std::string& a : argv) args.push_back(a.data());
  args.push_back(nullptr);
  // The environment is built here, not in the child: after fork in a threaded process only
  // async-signal-safe calls are allowed, and setenv is not one.
  std::vector<std::string> env_strings;
  bool has_wait_policy = false;
  for (char** e = environ; *e; ++e) {
    env_strings.emplace_back(*e);
    has_wait_policy |= env_strings.back().rfind("OMP_WAIT_POLICY=", 0) == 0;
  }
  if (!has_wait_policy) env_strings.emplace_back("OMP_WAIT_POLICY=passive");
  std::vector<char*> env;
  for (std::string& e : env_strings) env.push_back(e.data());
  env.push_back(nullptr);
  pid_ = fork();
  if (pid_ < 0) fail("{}: fork: {}", name_, std::strerror(errno));
  if (pid_ == 0) {
    // The child: only async-signal-safe calls until exec.
    setpgid(0, 0);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    dup2(pipe_fds[1], STDERR_FILENO);
    const int devnull = open("/dev/null", O_RDONLY);
    if (devnull >= 0) dup2(devnull, STDIN_FILENO);
    execve(args[0], args.data(), env.data());
    const char msg[] = "rlhf: error: exec failed\n";
    (void)!write(STDERR_FILENO, msg, sizeof(msg) - 1);
    _exit(127);
  }
  close(pipe_fds[1]);
  reader_ = std::thread([this, fd = pipe_fds[0]] { read_stderr(fd); });
}

ChildProcess::~ChildProcess() {
  terminate();
  wait();
}

void ChildProcess::read_stderr(int fd) {
  FILE* in = fdopen(fd, "r");
  char* line = nullptr;
  size_t capacity = 0;
  ssize_t length;
  while ((length = getline(&line, &capacity, in)) > 0) {
    std::string text(line, size_t(length));
    while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
    // One write per line keeps lines of different children from interleaving mid-line.
    const std::string forwarded = "[" + name_ + "] " + text + "\n";
    (void)!::write(STDERR_FILENO, forwarded.data(), forwarded.size());
    std::lock_guard lock(mutex_);
    tail_.push_back(text);
    if (tail_.size() > kTailLines) tail_.pop_front();
    const size_t at = text.find("listening on ");
    if (at != std::string::npos) {
      std::string address = text.substr(at + 13);
      address = address.substr(0, address.find_first_of(" \t"));
      if (address_.empty()) address_ = address;
      changed_.notify_all();
    }
  }
  free(line);
  fclose(in);
  std::lock_guard lock(mutex_);
  stderr_closed_ = true;
  changed_.notify_all();
}

std::string ChildProcess::wait_for_address(std::chrono::seconds timeout) {
  std::unique_lock lock(mutex_);
  changed_.wait_for(lock, timeout, [&] { return !address_.empty() || stderr_closed_; });
  if (!address_.empty()) return address_;
  if (stderr_closed_) fail("{} exited before it was listening (its log is above)", name_);
  fail("{} did not report a listening address within {} s", name_, timeout.count());
}

std::string ChildProcess::stderr_tail() {
  std::lock_guard lock(mutex_);
  std::string text;
  for (const std::string& line : tail_) text += line + "\n";
  return text;
}

void ChildProcess::terminate() {
  if (!reaped_ && pid_ > 0) ::kill(pid_, SIGTERM);
}

void ChildProcess::kill_now() {
  if (!reaped_ && pid_ > 0) ::kill(pid_, SIGKILL);
}

int ChildProcess::wait() {
  if (!reaped_ && pid_ > 0) {
    int status = 0;
    while (waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
    reaped_ = true;
    exit_status_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
  if (reader_.joinable()) reader_.join();
  return exit_status_;
}

}  // namespace rlhf::cli
