#pragma once
// bench fp4 (GPU only): the FP4 grouped MoE GEMM (kernels/cuda/sm90_fp4_bf16_moe_grouped.cuh)
// against cuBLAS BF16 on the same grouped problem, measured in the same run. Built into the
// standalone rlhf_bench_fp4 (tools/bench_fp4_main.cpp); register_bench_fp4 hangs the same
// command under `rlhf bench` once the CLI links the CUDA libraries.
#include <cstdint>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

namespace rlhf::cli {

struct BenchFp4Options {
  std::vector<std::string> shapes = {"gate_up=2048x7168", "down=7168x2048"};  // name=NxK of W_e
  std::vector<int> tokens = {1, 4, 16, 128, 512};  // rows of x per active expert
  int experts = 256;                               // experts in the layer (weights allocated)
  int active = 8;                                  // experts with tokens, spread over the layer
  std::vector<std::string> formats = {"mxfp4", "nvfp4"};
  int warmup = 3;                                  // untimed graph replays per measurement
  int reps = 20;                                   // timed graph replays; the median is reported
  // the kernel heuristic's choice ("auto"), or decode/T/R | warp/T | prefill/T forced;
  // several are measured one after the other on the same weights
  std::vector<std::string> configs = {"auto"};
  bool no_pdl = false;  // decode launches without programmatic dependent launch
  uint64_t seed = 1;
  bool json = false;
};

void bench_fp4_add_options(CLI::App& command, BenchFp4Options& options);

// Runs the sweep, prints the table on stdout, returns the summary (printed last with --json by
// the caller). Throws rlhf::Error on bad options.
nlohmann::json bench_fp4_run(const BenchFp4Options& options);

// `fp4` under the given `bench` command: options, run, --json line.
void register_bench_fp4(CLI::App& bench);

}  // namespace rlhf::cli
