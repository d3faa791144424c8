#pragma once
// `rlhf bench train|generate --torch-reference`: the PyTorch reference timed in the same call.
// The benchmark saves its random-init model as a checkpoint in a scratch directory, runs
// tools/torch_reference/bench.py on it as a child process at the same shapes, and reads back
// the one JSON object the script writes. Without the flag no Python is needed.
#include <filesystem>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

namespace rlhf::cli {

struct TorchReferenceOptions {
  bool enabled = false;
  std::string python = "python3";  // a path, or a name looked up on PATH
  std::string script;              // empty: tools/torch_reference/bench.py, found as below
  std::string compile = "auto";    // bench.py --compile: auto | on | off
};

// --torch-reference, --python, --torch-script, --torch-compile.
void add_torch_reference_options(CLI::App& command, TorchReferenceOptions& options);

// A fresh directory under the system's temporary directory, removed with its contents when
// this goes out of scope.
class ScratchDir {
 public:
  ScratchDir();
  ~ScratchDir();
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// Runs `python bench.py <args> --out <scratch>/torch.json` and returns the parsed JSON. The
// script's stderr is forwarded to ours as it runs, prefixed "[torch]". rlhf::Error naming the
// interpreter and script when either is missing, and the exit status and the last lines of the
// script's stderr when it fails (no torch, a crash) or writes no valid JSON.
// The script is --torch-script, else the first of ./tools/torch_reference/bench.py and
// <rlhf binary>/../../tools/torch_reference/bench.py (the source tree of build/<preset>/rlhf).
nlohmann::json run_torch_reference(const TorchReferenceOptions& options,
                                   const std::vector<std::string>& args,
                                   const std::filesystem::path& scratch);

}  // namespace rlhf::cli
