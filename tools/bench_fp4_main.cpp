// rlhf_bench_fp4: the standalone form of `rlhf bench fp4` (tools/cmd_bench_fp4.h), built only
// with the CUDA backend. Logs go to stderr; stdout carries the table and, with --json, the
// summary as its last line.
#include <cstdio>
#include <exception>
#include <iostream>

#include <CLI/CLI.hpp>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "common/error.h"
#include "tools/cmd_bench_fp4.h"

int main(int argc, char** argv) {
  spdlog::set_default_logger(spdlog::stderr_color_mt("rlhf_bench_fp4"));
  spdlog::set_pattern("%H:%M:%S %^%l%$ %v");
  CLI::App app{"rlhf_bench_fp4: FP4 grouped MoE GEMM vs BF16 cuBLAS on the same problem (GPU)"};
  rlhf::cli::BenchFp4Options options;
  rlhf::cli::bench_fp4_add_options(app, options);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    const nlohmann::json summary = rlhf::cli::bench_fp4_run(options);
    if (options.json) std::cout << summary.dump() << std::endl;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rlhf_bench_fp4: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
