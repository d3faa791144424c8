#include "tools/bench_torch.h"

#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include <fmt/core.h>
#include <spdlog/spdlog.h>

#include "common/error.h"
#include "tools/child_process.h"

namespace rlhf::cli {

namespace fs = std::filesystem;

void add_torch_reference_options(CLI::App& command, TorchReferenceOptions& options) {
  CLI::Option* flag = command.add_flag(
      "--torch-reference", options.enabled,
      "also time the PyTorch reference (tools/torch_reference/bench.py) at the same shapes, in "
      "this call, and print the ratios");
  command.add_option("--python", options.python, "Python interpreter with torch")
      ->capture_default_str()
      ->needs(flag);
  command.add_option("--torch-script", options.script,
                     "bench.py to run (default: found from the working directory or the binary)")
      ->needs(flag);
  command.add_option("--torch-compile", options.compile, "bench.py --compile")
      ->check(CLI::IsMember({"auto", "on", "off"}))
      ->capture_default_str()
      ->needs(flag);
}

ScratchDir::ScratchDir() {
  static std::atomic<int> counter{0};
  path_ = fs::temp_directory_path() /
          fmt::format("rlhf-bench-{}-{}", ::getpid(), counter.fetch_add(1));
  fs::remove_all(path_);
  fs::create_directories(path_);
}

ScratchDir::~ScratchDir() {
  std::error_code ignored;  // a scratch directory that cannot be removed is not worth a crash
  fs::remove_all(path_, ignored);
}

namespace {

// `name` if it is a path, else the first executable `name` on PATH (execve does not search).
std::string find_executable(const std::string& name) {
  if (name.find('/') != std::string::npos) {
    if (::access(name.c_str(), X_OK) != 0) fail("--python '{}' is not an executable file", name);
    return name;
  }
  const char* path = std::getenv("PATH");
  std::stringstream dirs(path ? path : "");
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    const fs::path candidate = fs::path(dir.empty() ? "." : dir) / name;
    if (::access(candidate.c_str(), X_OK) == 0) return candidate.string();
  }
  fail("--python '{}' was not found on PATH (give a path to a Python with torch)", name);
}

std::string find_script(const std::string& given) {
  if (!given.empty()) {
    if (!fs::is_regular_file(given)) fail("--torch-script '{}' is not a file", given);
    return given;
  }
  const fs::path relative = fs::path("tools") / "torch_reference" / "bench.py";
  const std::vector<fs::path> candidates = {
      fs::current_path() / relative,
      fs::path(self_executable()).parent_path() / ".." / ".." / relative};
  for (const fs::path& c : candidates) {
    if (fs::is_regular_file(c)) return fs::weakly_canonical(c).string();
  }
  fail("tools/torch_reference/bench.py is in neither {} nor {}; run from the source tree or give "
       "--torch-script",
       candidates[0].string(), candidates[1].string());
}

}  // namespace

nlohmann::json run_torch_reference(const TorchReferenceOptions& options,
                                   const std::vector<std::string>& args,
                                   const fs::path& scratch) {
  const std::string python = find_executable(options.python);
  const std::string script = find_script(options.script);
  const fs::path out = scratch / "torch.json";
  std::vector<std::string> argv = {python, script};
  argv.insert(argv.end(), args.begin(), args.end());
  argv.insert(argv.end(), {"--compile", options.compile, "--out", out.string()});
  std::string command;
  for (const std::string& a : argv) command += (command.empty() ? "" : " ") + a;
  spdlog::info("PyTorch reference: {}", command);

  ChildProcess child("torch", argv);
  const int status = child.wait();
  auto failure = [&](const std::string& what) {
    fail("PyTorch reference {} (run with {}) {}; the end of its stderr:\n{}", script, python, what,
         child.stderr_tail());
  };
  if (status != 0) failure(fmt::format("exited with status {}", status));
  std::ifstream in(out);
  if (!in) failure("exited 0 but wrote no " + out.string());
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    failure(fmt::format("wrote invalid JSON to {} ({})", out.string(), e.what()));
  }
  return {};  // not reached: failure() throws
}

}  // namespace rlhf::cli
