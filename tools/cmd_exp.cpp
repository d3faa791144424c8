// rlhf exp stability: the four-arm stability experiment (learner/stability_experiment.h), and
// rlhf bench routing's sibling measurement of anticipatory routing's step-time overhead.
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>

#include <fmt/core.h>
#include <spdlog/spdlog.h>

#include "common/error.h"
#include "kernels/backend.h"
#include "learner/stability_experiment.h"
#include "tools/cli.h"

namespace rlhf::cli {

namespace fs = std::filesystem;

namespace {

struct StabilityOptions {
  CommonOptions common;
  std::string workdir;  // empty: a new folder under the system temp directory
  std::string out = "docs";
  int overhead_rounds = 60;
};

void write_file(const fs::path& path, const std::string& text) {
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << text;
    if (!out) fail("cannot write '{}'", tmp.string());
  }
  fs::rename(tmp, path);
}

void run_stability(const StabilityOptions& o) {
  const auto start = std::chrono::steady_clock::now();
  const RunConfig config =
      o.common.config.empty()
          ? RunConfig::load_string(embedded_stability_config(), "embedded stability config")
          : RunConfig::load_file(o.common.config);
  check_float_backend(config.runtime.device);  // every arm runs on it: stop before the first
  fs::path workdir = o.workdir;
  if (workdir.empty()) {
    std::string pattern = (fs::temp_directory_path() / "rlhf-exp-stability-XXXXXX").string();
    if (!mkdtemp(pattern.data())) fail("cannot create a work directory under {}", pattern);
    workdir = pattern;
  }
  fs::create_directories(o.out);
  spdlog::info("exp stability: 4 arms of {} steps; work directory {}", config.sft.steps,
               workdir.string());
  const StabilityReport report = run_stability_experiment(config, workdir.string(),
                                                          o.overhead_rounds);
  const fs::path table = fs::path(o.out) / "stability-table.md";
  const fs::path plot = fs::path(o.out) / "stability-loss.svg";
  write_file(table, stability_table_markdown(report));
  write_file(plot, stability_loss_plot_svg(report));

  std::cout << stability_table_markdown(report) << fmt::format("table: {}\nplot:  {}\n",
                                                               table.string(), plot.string());
  nlohmann::json arms = nlohmann::json::array();
  for (const StabilityArmResult& a : report.arms) {
    arms.push_back({{"name", a.name},
                    {"clamping", a.clamping},
                    {"anticipatory", a.anticipatory},
                    {"steps", a.steps},
                    {"spikes", a.spikes},
                    {"max_excursion", a.max_excursion},
                    {"diverged", a.diverged},
                    {"final_loss", a.final_loss},
                    {"anticipatory_steps", a.anticipatory_steps},
                    {"mean_router_flip_rate", a.mean_flip_rate},
                    {"step_s_anticipatory_on", a.step_s_on},
                    {"step_s_anticipatory_off", a.step_s_off},
                    {"workdir", a.workdir}});
  }
  const AnticipatoryOverhead& ov = report.overhead;
  print_json(o.common,
             {{"command", "exp stability"},
              {"arms", arms},
              {"anticipatory_mode", report.anticipatory_mode},
              {"lag", report.lag},
              {"outlier_steps", report.outlier_steps},
              {"outlier_scale", report.outlier_scale},
              {"anticipatory_overhead",
               {{"rounds", ov.rounds},
                {"baseline_step_s", ov.baseline_step_s},
                {"off_step_s", ov.off_step_s},
                {"on_step_s", ov.on_step_s},
                {"overhead_off", ov.overhead_off},
                {"overhead_on", ov.overhead_on}}},
              {"table", table.string()},
              {"plot", plot.string()},
              {"workdir", workdir.string()},
              {"wall_s", std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
                             .count()}});
}

}  // namespace

void register_exp(CLI::App& app) {
  CLI::App* exp = app.add_subcommand("exp", "experiments that can be rerun anywhere");
  exp->require_subcommand(1);
  auto o = std::make_shared<StabilityOptions>();
  CLI::App* cmd = exp->add_subcommand(
      "stability",
      "loss spikes with and without SwiGLU clamping and anticipatory routing (4 arms)");
  cmd->add_option("--config", o->common.config,
                  "YAML run config with a stress setting (default: the embedded "
                  "configs/stability.yaml)");
  cmd->add_flag("--json", o->common.json, "print a machine-readable summary as the last line");
  cmd->add_option("--workdir", o->workdir,
                  "directory for the four arms' runs (default: a new temp directory)");
  cmd->add_option("--out", o->out, "where the table and the plot are written")
      ->capture_default_str();
  cmd->add_option("--overhead-rounds", o->overhead_rounds,
                  "interleaved rounds of the routing overhead measurement")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->callback([o] { run_stability(*o); });
}

}  // namespace rlhf::cli
