#include "tools/cli.h"

#include <iostream>

#include "tools/embedded_config.h"

namespace rlhf::cli {

void add_common_options(CLI::App& command, CommonOptions& options) {
  command.add_option("--config", options.config,
                     "YAML run config (default: the embedded configs/demo.yaml)");
  command.add_flag("--json", options.json, "print a machine-readable summary as the last line");
}

void add_device_option(CLI::App& command, std::string& device) {
  command.add_option("--device", device, "backend the model computes on (as runtime.device)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
}

const char* embedded_demo_config() { return kEmbeddedDemoConfig; }
const char* embedded_stability_config() { return kEmbeddedStabilityConfig; }
const char* embedded_grm_config() { return kEmbeddedGrmConfig; }
const char* embedded_rl_config() { return kEmbeddedRlConfig; }

RunConfig load_config(const CommonOptions& options) {
  if (options.config.empty()) {
    return RunConfig::load_string(kEmbeddedDemoConfig, "embedded demo config");
  }
  return RunConfig::load_file(options.config);
}

void print_json(const CommonOptions& options, const nlohmann::json& summary) {
  // Model output can be any bytes; invalid UTF-8 becomes U+FFFD rather than failing the run.
  if (options.json) {
    std::cout << summary.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)
              << std::endl;
  }
}

}  // namespace rlhf::cli
