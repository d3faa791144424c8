// rlhf inspect CKPT: what a checkpoint holds, by tensor group, and how many bits each expert
// parameter takes (32 in float, 4.25 in MXFP4, 4.5 in NVFP4, plus a few bytes per matrix).
#include <iostream>
#include <map>

#include <fmt/core.h>

#include "model/checkpoint.h"
#include "model/param_layout.h"
#include "model/safetensors.h"
#include "tools/cli.h"

namespace rlhf::cli {

namespace {

// The group a stored tensor belongs to, from its name.
std::string tensor_group(const std::string& stored) {
  if (stored.starts_with("optim.")) return "optimizer";
  if (stored.starts_with("buffer.")) return "buffers";
  if (stored.starts_with("fp4.") || is_expert_weight(stored)) {
    return stored.find(".shared.") != std::string::npos ? "shared_experts" : "routed_experts";
  }
  if (stored.find("router") != std::string::npos) return "router";
  if (stored.find("norm") != std::string::npos) return "norms";
  if (stored.find(".ffn.") != std::string::npos) return "dense_ffn";
  if (stored.find("embed") != std::string::npos) return "embedding";
  if (stored.find("lm_head") != std::string::npos) return "lm_head";
  return "attention";
}

}  // namespace

void register_inspect(CLI::App& app) {
  struct Options {
    CommonOptions common;
    std::string checkpoint;
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("inspect", "bytes per tensor group and bits per expert parameter");
  cmd->add_option("checkpoint", o->checkpoint, "checkpoint (.safetensors)")->required();
  cmd->add_flag("--json", o->common.json, "print a machine-readable summary as the last line");
  cmd->callback([o] {
    const CheckpointContents info = checkpoint_read_info(o->checkpoint);
    const SafetensorsReader reader(o->checkpoint);
    std::map<std::string, uint64_t> bytes;
    uint64_t total = 0;
    for (const std::string& name : reader.names()) {
      bytes[tensor_group(name)] += reader.bytes(name);
      total += reader.bytes(name);
    }
    int64_t expert_params = 0;
    for (const ExpertMatrixSpec& m : ParamLayout::expert_matrices(info.config)) {
      expert_params += m.rows * m.cols;
    }
    const uint64_t expert_bytes = bytes["shared_experts"] + bytes["routed_experts"];
    const double bits = expert_params ? 8.0 * double(expert_bytes) / double(expert_params) : 0.0;
    const std::string format = info.expert_format ? fp4_format_name(*info.expert_format) : "float32";
    std::cout << fmt::format("{}: experts {}, {} expert parameters\n", o->checkpoint, format,
                             expert_params);
    std::cout << fmt::format("  {:<16} {:>14}\n", "group", "bytes");
    nlohmann::json groups = nlohmann::json::object();
    for (const auto& [group, n] : bytes) {
      if (n == 0) continue;
      std::cout << fmt::format("  {:<16} {:>14}\n", group, n);
      groups[group] = n;
    }
    std::cout << fmt::format("  {:<16} {:>14}\n  expert bits per parameter: {:.3f}\n", "total",
                             total, bits);
    nlohmann::json summary = {{"command", "inspect"},
                              {"checkpoint", o->checkpoint},
                              {"expert_format", format},
                              {"expert_params", expert_params},
                              {"expert_bytes", expert_bytes},
                              {"expert_bits_per_param", bits},
                              {"total_bytes", total},
                              {"groups", groups},
                              {"training_state", info.training.has_value()}};
    if (info.training) summary["step"] = info.training->step;  // steps the checkpoint has done
    print_json(o->common, summary);
  });
}

}  // namespace rlhf::cli
