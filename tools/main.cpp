// rlhf: the one command-line tool. Each subcommand lives in its own tools/cmd_*.cpp and
// registers itself here. Errors caused by input end as one line "rlhf: error: ..." and exit 1.
#include <cstdio>
#include <exception>

#include <CLI/CLI.hpp>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "common/error.h"
#include "tools/cli.h"

int main(int argc, char** argv) {
  // Logs and progress go to stderr, so stdout carries only results (and the --json line).
  auto logger = spdlog::stderr_color_mt("rlhf");
  spdlog::set_default_logger(logger);
  spdlog::set_pattern("%H:%M:%S %^%l%$ %v");

  CLI::App app{"rlhf: RLHF training for Mixture-of-Experts language models"};
  app.require_subcommand(1);
  std::string log_level = "info";
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error"}))
      ->each([](const std::string& level) { spdlog::set_level(spdlog::level::from_str(level)); });
  rlhf::cli::register_demo(app);
  rlhf::cli::register_sft(app);
  rlhf::cli::register_generate(app);
  rlhf::cli::register_bench(app);
  rlhf::cli::register_inspect(app);
  rlhf::cli::register_logits(app);
  rlhf::cli::register_exp(app);
  rlhf::cli::register_serve(app);
  rlhf::cli::register_grm(app);
  CLI::App* eval = app.add_subcommand("eval", "evaluations: judge quality, win rates, ratings");
  eval->require_subcommand(1);
  rlhf::cli::register_eval_grm(*eval);
  rlhf::cli::register_eval_winrate(*eval);
  rlhf::cli::register_db(app);
  rlhf::cli::register_up(app);
  rlhf::cli::register_collect(app);
  rlhf::cli::register_plot(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const rlhf::Error& e) {
    std::fprintf(stderr, "rlhf: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rlhf: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
