// The `rlhf` binary end to end: real processes, real files. Bad input ends in one clear line
// and a non-zero exit; --json puts a parseable summary on the last line of stdout.
#include <sys/wait.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "common/error.h"
#include "kernels/backend.h"

namespace {

namespace fs = std::filesystem;

struct Result {
  int exit_code = -1;
  std::string out;  // stdout
  std::string err;  // stderr
};

Result run(const std::string& args) {
  const fs::path dir = fs::temp_directory_path() / ("rlhf_cli_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const fs::path err_file = dir / "stderr.txt";
  const std::string command = std::string(RLHF_BINARY) + " " + args + " 2> " + err_file.string();
  Result result;
  FILE* pipe = ::popen(command.c_str(), "r");
  if (!pipe) return result;
  std::array<char, 4096> buffer{};
  size_t n = 0;
  while ((n = std::fread(buffer.data(), 1, buffer.size(), pipe)) > 0) result.out.append(buffer.data(), n);
  const int status = ::pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream in(err_file);
  std::stringstream text;
  text << in.rdbuf();
  result.err = text.str();
  return result;
}

std::string last_line(const std::string& text) {
  std::string trimmed = text;
  while (!trimmed.empty() && trimmed.back() == '\n') trimmed.pop_back();
  const size_t pos = trimmed.rfind('\n');
  return pos == std::string::npos ? trimmed : trimmed.substr(pos + 1);
}

fs::path scratch(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() /
                       ("rlhf_cli_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

const char* kTinyConfig = R"(model:
  d_model: 32
  n_layers: 2
  n_heads: 2
  n_kv_heads: 1
  head_dim: 16
  max_seq_len: 40
  d_ff: 64
  n_routed_experts: 4
  d_expert: 32
sft:
  steps: 6
  batch_size: 8
  eval_examples: 16
  eval_batch: 8
  checkpoint_every: 3
runtime:
  threads: 2
)";

fs::path write_config(const fs::path& dir, const std::string& text) {
  const fs::path path = dir / "config.yaml";
  std::ofstream(path) << text;
  return path;
}

TEST(Cli, MissingConfigFileIsOneClearLine) {
  const Result r = run("sft --config /nonexistent/config.yaml --workdir /tmp/x");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("rlhf: error: config file '/nonexistent/config.yaml' does not exist"),
            std::string::npos)
      << r.err;
}

TEST(Cli, UnknownConfigKeyNamesTheKey) {
  const fs::path dir = scratch("unknown_key");
  const fs::path config = write_config(dir, std::string(kTinyConfig) + "sft2: {steps: 1}\n");
  const Result r = run("sft --config " + config.string() + " --workdir " + (dir / "w").string());
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("sft2: unknown key"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir / "w" / "checkpoint.safetensors"));
}

TEST(Cli, UnknownSubcommandAndMissingOptionsFail) {
  EXPECT_NE(run("frobnicate").exit_code, 0);
  EXPECT_NE(run("sft").exit_code, 0);  // --workdir is required
  EXPECT_NE(run("generate --prompt hi").exit_code, 0);  // --checkpoint is required
}

TEST(Cli, SftThenGenerateWithJsonSummaries) {
  const fs::path dir = scratch("sft");
  const fs::path config = write_config(dir, kTinyConfig);
  const fs::path workdir = dir / "run";
  const Result sft = run("sft --json --config " + config.string() + " --workdir " + workdir.string());
  ASSERT_EQ(sft.exit_code, 0) << sft.err;
  const auto summary = nlohmann::json::parse(last_line(sft.out));
  EXPECT_EQ(summary["command"], "sft");
  EXPECT_EQ(summary["steps"], 6);
  for (const char* key : {"heldout_accuracy", "heldout_mean_score", "wall_s"}) {
    ASSERT_TRUE(summary.contains(key)) << key;
  }
  EXPECT_GE(summary["heldout_accuracy"].get<double>(), 0.0);
  EXPECT_LE(summary["heldout_accuracy"].get<double>(), 1.0);
  EXPECT_GE(summary["heldout_mean_score"].get<double>(), 0.0);
  EXPECT_LE(summary["heldout_mean_score"].get<double>(), 10.0);
  EXPECT_NE(sft.err.find("sft step 6/6"), std::string::npos) << "progress goes to stderr";
  EXPECT_TRUE(fs::exists(workdir / "policy.safetensors"));
  EXPECT_TRUE(fs::exists(workdir / "metrics.jsonl"));

  // A second run into the same workdir without --resume must refuse and keep the checkpoint.
  const auto before = fs::last_write_time(workdir / "checkpoint.safetensors");
  const Result again = run("sft --config " + config.string() + " --workdir " + workdir.string());
  EXPECT_EQ(again.exit_code, 1);
  EXPECT_NE(again.err.find("--resume"), std::string::npos) << again.err;
  EXPECT_EQ(fs::last_write_time(workdir / "checkpoint.safetensors"), before);

  const Result gen = run("generate --json --checkpoint " + (workdir / "policy.safetensors").string() +
                         " --prompt '12+3=' --prompt 'rev abc' --max-new-tokens 4");
  ASSERT_EQ(gen.exit_code, 0) << gen.err;
  const auto out = nlohmann::json::parse(last_line(gen.out));
  ASSERT_EQ(out["results"].size(), 2u);
  EXPECT_EQ(out["results"][0]["prompt"], "12+3=");
  EXPECT_LE(out["results"][0]["tokens"].get<int>(), 4);
}

TEST(Cli, TruncatedCheckpointIsAClearError) {
  const fs::path dir = scratch("truncated");
  const fs::path config = write_config(dir, kTinyConfig);
  const fs::path workdir = dir / "run";
  ASSERT_EQ(run("sft --config " + config.string() + " --workdir " + workdir.string()).exit_code, 0);
  const fs::path policy = workdir / "policy.safetensors";
  fs::resize_file(policy, fs::file_size(policy) - 100);
  const Result r = run("generate --checkpoint " + policy.string() + " --prompt hi");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("truncated"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "one line: " << r.err;
}

// Every command that builds a model takes its backend from runtime.device (or --device where
// it has no config). Where `cuda` cannot run (a CPU-only build, or no visible GPU) each stops
// at once with make_float_ops' one line, before it writes anything. Skipped on a machine where
// `cuda` does run (the gpu-labelled tests cover that).
TEST(Cli, DeviceCudaThatCannotRunIsOneClearLineInEveryCommand) {
  std::string expected;
  try {
    rlhf::make_float_ops("cuda");
  } catch (const rlhf::Error& e) {
    expected = e.what();
  }
  if (expected.empty()) GTEST_SKIP() << "a CUDA device is visible here";
  ASSERT_NE(expected.find("runtime.device: cuda"), std::string::npos) << expected;

  const fs::path dir = scratch("device");
  const fs::path cpu_config = write_config(dir, kTinyConfig);
  const fs::path workdir = dir / "run";
  ASSERT_EQ(run("sft --config " + cpu_config.string() + " --workdir " + workdir.string()).exit_code,
            0);
  const std::string policy = (workdir / "policy.safetensors").string();
  const fs::path config = dir / "cuda.yaml";
  std::ofstream(config) << std::string(kTinyConfig) + "  device: cuda\n";  // under runtime:
  const fs::path sequences = dir / "sequences.jsonl";
  std::ofstream(sequences) << "{\"prompt\": \"ab\"}\n";
  const std::string c = " --config " + config.string();
  auto out = [&](const char* name) { return (dir / name).string(); };
  const std::vector<std::string> commands = {
      "sft" + c + " --workdir " + out("sft"),
      "train-grm" + c + " --workdir " + out("grm"),
      "exp stability" + c + " --workdir " + out("exp") + " --out " + out("exp-out"),
      "generate --device cuda --checkpoint " + policy + " --prompt hi",
      "logits --device cuda --checkpoint " + policy + " --sequences " + sequences.string() +
          " --out " + out("logits.json"),
      "serve actor --device cuda --checkpoint " + policy + " --listen 127.0.0.1:0",
      "serve reward --device cuda --checkpoint " + policy + " --listen 127.0.0.1:0",
      "serve learner" + c + " --workdir " + out("learner") + " --policy " + policy +
          " --actors 127.0.0.1:1 --reward 127.0.0.1:1 --listen 127.0.0.1:0",
      "up" + c + " --workdir " + out("up") + " --policy " + policy + " --judge " + policy,
      "eval grm" + c + " --judge " + policy + " --prompts 2",
      "eval winrate" + c + " --a " + policy + " --b " + policy +
          " --judge ground_truth --prompts 2 --workdir " + out("winrate"),
      "bench train" + c,
      "bench generate --device cuda --batches 1 --prompt-len 2 --new-tokens 2",
  };
  for (const std::string& command : commands) {
    SCOPED_TRACE(command);
    const Result r = run(command);
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_NE(r.err.find("rlhf: error: " + expected), std::string::npos) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "one line: " << r.err;
  }
  for (const char* name : {"sft", "grm", "exp", "exp-out", "logits.json", "learner", "winrate"}) {
    EXPECT_TRUE(!fs::exists(dir / name) || fs::is_empty(dir / name)) << name << " was written";
  }
}

// `rlhf logits` feeds the PyTorch parity check (tools/torch_reference/): the logits of every
// position, the next-token logprobs consistent with them, the experts chosen, and a bad record
// named by file and line.
TEST(Cli, LogitsWritesLogitsLogprobsAndRouting) {
  const fs::path dir = scratch("logits");
  const fs::path config = write_config(dir, kTinyConfig);
  const fs::path workdir = dir / "run";
  ASSERT_EQ(run("sft --config " + config.string() + " --workdir " + workdir.string()).exit_code, 0);
  const fs::path sequences = dir / "sequences.jsonl";
  std::ofstream(sequences) << "{\"prompt\": \"12+3=\", \"response\": \"15\"}\n\n"
                              "{\"tokens\": [256, 65, 66, 257]}\n{\"prompt\": \"ab\"}\n";
  const fs::path out_file = dir / "logits.json";
  const std::string policy = (workdir / "policy.safetensors").string();
  const Result r = run("logits --json --checkpoint " + policy + " --sequences " +
                       sequences.string() + " --out " + out_file.string());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(last_line(r.out))["sequences"], 3);
  std::ifstream in(out_file);
  const auto file = nlohmann::json::parse(in);
  ASSERT_EQ(file["sequences"].size(), 3u);
  const int V = file["vocab_size"];
  EXPECT_EQ(V, 262);
  // bos, prompt-marker, 5 bytes, response-marker, 2 bytes, eos; raw ids; a prompt alone.
  const std::vector<size_t> lengths = {11, 4, 5};
  for (size_t s = 0; s < lengths.size(); ++s) {
    const auto& seq = file["sequences"][s];
    const size_t T = lengths[s];
    ASSERT_EQ(seq["tokens"].size(), T);
    ASSERT_EQ(seq["logits"].size(), T);
    ASSERT_EQ(seq["logprobs"].size(), T - 1);
    ASSERT_EQ(seq["expert_ids"].size(), 1u);  // kTinyConfig: 2 layers, the first dense
    ASSERT_EQ(seq["expert_ids"][0].size(), T);
    for (size_t t = 0; t + 1 < T; ++t) {
      const auto& row = seq["logits"][t];
      ASSERT_EQ(row.size(), size_t(V));
      double max_logit = -1e30, sum = 0;
      for (const auto& x : row) max_logit = std::max(max_logit, x.get<double>());
      for (const auto& x : row) sum += std::exp(x.get<double>() - max_logit);
      const double expected = row[seq["tokens"][t + 1].get<int>()].get<double>() - max_logit -
                              std::log(sum);
      EXPECT_NEAR(seq["logprobs"][t].get<double>(), expected, 1e-5) << s << " " << t;
    }
  }
  EXPECT_EQ(file["sequences"][1]["tokens"], nlohmann::json({256, 65, 66, 257}));

  std::ofstream(sequences) << "{\"tokens\": [256, 65]}\n{\"tokens\": [256, 999]}\n";
  const Result bad = run("logits --checkpoint " + policy + " --sequences " + sequences.string() +
                         " --out " + out_file.string());
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_NE(bad.err.find(sequences.string() + ":2: token 999 is outside the vocabulary"),
            std::string::npos)
      << bad.err;
}

TEST(Cli, BenchTrainReportsUtilization) {
  const fs::path dir = scratch("bench");
  const fs::path config = write_config(dir, kTinyConfig);
  const Result r = run("bench train --json --steps 2 --warmup 1 --batch 4 --seq-len 16 --config " +
                       config.string());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto out = nlohmann::json::parse(last_line(r.out));
  EXPECT_EQ(out["device"], "cpu");
  EXPECT_EQ(out["batch"], 4);
  EXPECT_EQ(out["seq_len"], 16);
  EXPECT_GT(out["tokens_per_s"].get<double>(), 0.0);
  EXPECT_GT(out["model_flops_per_step"].get<double>(), 0.0);
  EXPECT_GT(out["sgemm_utilization"].get<double>(), 0.0);
  EXPECT_LT(out["sgemm_utilization"].get<double>(), 1.5);
  EXPECT_EQ(out["cpu_utilization"], out["sgemm_utilization"]);
  EXPECT_FALSE(out.contains("mfu_bf16_peak")) << "the H100 peaks are for the GPU only";
  EXPECT_FALSE(out.contains("torch")) << "no PyTorch without --torch-reference";

  const Result long_seq = run("bench train --seq-len 41 --config " + config.string());
  EXPECT_EQ(long_seq.exit_code, 1);
  EXPECT_NE(long_seq.err.find("--seq-len 41 exceeds model.max_seq_len 40"), std::string::npos)
      << long_seq.err;
}

// The roofline's byte count is pinned here for kTinyConfig (D 32, 2 layers of which 1 MoE with
// 4 experts of width 32, top-2, one shared expert, kv_dim 16, vocabulary 262): every parameter
// but the embedding table and the routed experts, plus the router bias, the batch's embedding
// rows, the experts each step used, and K/V at the mean decode length.
TEST(Cli, BenchGenerateReportsRooflinePerBatch) {
  const fs::path dir = scratch("bench_generate");
  const fs::path config = write_config(dir, kTinyConfig);
  const Result r = run("bench generate --json --batches 1 3 --prompt-len 5 --new-tokens 4 "
                       "--config " + config.string());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto out = nlohmann::json::parse(last_line(r.out));
  EXPECT_EQ(out["prompt_len"], 5);
  EXPECT_EQ(out["decode_steps"], 3);
  EXPECT_GT(out["copy_bandwidth_bytes_per_s"].get<double>(), 0.0);
  ASSERT_EQ(out["results"].size(), 2u);
  const double D = 32, V = 262, E = 4, k = 2, Fe = 32, expert = 3 * Fe * D, kv_dim = 16;
  const double params = out["params"].get<double>();
  const double fixed = params - V * D - E * expert + E;  // + the router bias
  for (size_t i = 0; i < 2; ++i) {
    const auto& row = out["results"][i];
    const double b = i == 0 ? 1 : 3;
    EXPECT_EQ(row["batch"].get<int>(), int(b));
    for (const char* key : {"prefill_tokens_per_s", "decode_tokens_per_s", "ms_per_step",
                            "floor_ms", "roofline_fraction"}) {
      EXPECT_GT(row[key].get<double>(), 0.0) << key;
    }
    const double touched = row["experts_touched"].get<double>();
    if (b == 1) {
      EXPECT_EQ(touched, k) << "one token routes to exactly top_k experts";
    }
    EXPECT_GE(touched, k);
    EXPECT_LE(touched, E);
    EXPECT_NEAR(row["weight_bytes_per_step"].get<double>(), 4 * (fixed + b * D + touched * expert),
                1e-6 * params);
    // Decode steps s = 0, 1, 2 read positions 0..5+s: 7 on average, K and V, 2 layers.
    EXPECT_DOUBLE_EQ(row["kv_bytes_per_step"].get<double>(), 4 * b * 2 * 2 * kv_dim * 7);
    EXPECT_NEAR(row["roofline_fraction"].get<double>(),
                row["floor_ms"].get<double>() / row["ms_per_step"].get<double>(), 1e-9);
  }
  EXPECT_DOUBLE_EQ(out["results"][1]["experts_touched_uniform"].get<double>(),
                   E * (1 - std::pow(1 - k / E, 3)));

  const Result too_long = run("bench generate --prompt-len 38 --new-tokens 4 --config " +
                              config.string());
  EXPECT_EQ(too_long.exit_code, 1);
  EXPECT_NE(too_long.err.find("need 41 positions; model.max_seq_len is 40"), std::string::npos)
      << too_long.err;
}

// --packed-experts times a model holding its experts in FP4 and counts the shared and routed
// experts' bytes packed: half a byte of code plus one scale byte per 32 values (MXFP4).
TEST(Cli, BenchGenerateWithPackedExpertsCountsThemPacked) {
  const fs::path dir = scratch("bench_generate_packed");
  const fs::path config = write_config(dir, kTinyConfig);
  const Result r = run("bench generate --json --batches 2 --prompt-len 5 --new-tokens 3 "
                       "--packed-experts mxfp4 --config " + config.string());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto out = nlohmann::json::parse(last_line(r.out));
  EXPECT_EQ(out["experts"], "mxfp4");
  const double D = 32, V = 262, E = 4, Fe = 32, expert = 3 * Fe * D, shared = 3 * Fe * D;
  const double params = out["params"].get<double>();
  const double fixed = params - V * D - E * expert + E;  // + the router bias; holds the shared
  const auto& row = out["results"][0];
  const double touched = row["experts_touched"].get<double>();
  const double packed_byte = 0.5 + 1.0 / 32;
  EXPECT_NEAR(row["weight_bytes_per_step"].get<double>(),
              4 * (fixed - shared + 2 * D) + packed_byte * (touched * expert + shared),
              1e-6 * params);
  EXPECT_GT(row["decode_tokens_per_s"].get<double>(), 0.0);

  const Result with_torch = run("bench generate --packed-experts nvfp4 --torch-reference "
                                "--config " + config.string());
  EXPECT_EQ(with_torch.exit_code, 1);
  EXPECT_NE(with_torch.err.find("--torch-reference times a float model"), std::string::npos)
      << with_torch.err;
}

// configs/bench-gpu.yaml (216.7M parameters) loads and runs on the CPU backend at the smallest
// shapes: one sequence, a 2-token prompt and one decode step.
TEST(Cli, BenchGpuConfigRunsOnTheCpu) {
  const std::string config = std::string(RLHF_SOURCE_DIR) + "/configs/bench-gpu.yaml";
  const Result r = run("bench generate --json --device cpu --batches 1 --prompt-len 2 "
                       "--new-tokens 2 --config " + config);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto out = nlohmann::json::parse(last_line(r.out));
  EXPECT_EQ(out["device"], "cpu");
  EXPECT_EQ(out["params"], 216675328);
  EXPECT_EQ(out["results"][0]["experts_touched"], 4);
}

// Without torch the script fails; the error names it and shows the end of its stderr. A shell
// script stands in for bench.py, so this runs where there is no Python.
TEST(Cli, BenchTorchReferenceFailureShowsTheScriptsStderr) {
  const fs::path dir = scratch("bench_torch_fail");
  const fs::path config = write_config(dir, kTinyConfig);
  const fs::path script = dir / "crash.sh";
  std::ofstream(script) << "echo 'ModuleNotFoundError: No module named torch' >&2\nexit 3\n";
  const Result r = run("bench generate --batches 1 --prompt-len 3 --new-tokens 2 "
                       "--torch-reference --python /bin/sh --torch-script " + script.string() +
                       " --config " + config.string());
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("PyTorch reference " + script.string() + " (run with /bin/sh) exited "
                       "with status 3"),
            std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("No module named torch"), std::string::npos) << r.err;

  const Result no_python = run("bench train --torch-reference --python /nonexistent/python3 "
                               "--config " + config.string());
  EXPECT_EQ(no_python.exit_code, 1);
  EXPECT_NE(no_python.err.find("--python '/nonexistent/python3' is not an executable file"),
            std::string::npos)
      << no_python.err;
}

// A Python that can import torch, or "" (then the PyTorch tests skip: CI has no torch).
std::string python_with_torch() {
  for (const std::string python : {"python3", "/usr/bin/python3"}) {
    if (std::system((python + " -c 'import torch' > /dev/null 2>&1").c_str()) == 0) return python;
  }
  return "";
}

// The PyTorch reference in the same call (tools/torch_reference/bench.py): its numbers and the
// ratios land in the JSON, and its model computed our checkpoint's function.
TEST(Cli, BenchTorchReferenceInTheSameCallOrSkip) {
  const std::string python = python_with_torch();
  if (python.empty()) {
    GTEST_SKIP() << "no python3 with torch here; the PyTorch reference is untested";
  }
  const fs::path dir = scratch("bench_torch");
  const fs::path config = write_config(dir, kTinyConfig);
  const std::string torch = " --torch-reference --torch-compile off --python " + python;
  const Result gen = run("bench generate --json --batches 2 --prompt-len 4 --new-tokens 3 "
                         "--config " + config.string() + torch);
  ASSERT_EQ(gen.exit_code, 0) << gen.err;
  const auto g = nlohmann::json::parse(last_line(gen.out));
  const auto& row = g["results"][0];
  EXPECT_GT(row["torch_decode_tokens_per_s"].get<double>(), 0.0);
  EXPECT_GT(row["decode_speedup_vs_torch"].get<double>(), 0.0);
  EXPECT_GT(row["prefill_speedup_vs_torch"].get<double>(), 0.0);
  EXPECT_EQ(g["torch"]["prompt_len"], 4);
  EXPECT_EQ(g["torch"]["dtype"], "float32") << "the CPU comparison is FP32 against FP32";
  EXPECT_LT(g["torch"]["parity"]["max_abs_logit_diff"].get<double>(), 1e-3);
  EXPECT_NE(gen.err.find("[torch] bench.py:"), std::string::npos) << "its progress is forwarded";

  const Result train = run("bench train --json --steps 1 --warmup 0 --batch 2 --seq-len 8 "
                           "--config " + config.string() + torch);
  ASSERT_EQ(train.exit_code, 0) << train.err;
  const auto t = nlohmann::json::parse(last_line(train.out));
  EXPECT_EQ(t["torch"]["batch"], 2);
  EXPECT_EQ(t["torch"]["seq_len"], 8);
  EXPECT_GT(t["speedup_vs_torch"].get<double>(), 0.0);
}

// The stability experiment end to end on a tiny config: four arms in their own work
// directories (each with the config it actually ran), the table and the plot, and the --json
// line with one entry per arm.
TEST(Cli, ExpStabilityRunsFourArmsAndWritesTableAndPlot) {
  const fs::path dir = scratch("exp_stability");
  const fs::path config = write_config(dir, std::string(kTinyConfig) + R"(stability:
  anticipatory_routing: {mode: always, lag: 1}
  spike: {warmup: 2}
  stress: {outlier_steps: [3], outlier_scale: 30}
)");
  const Result r = run("exp stability --json --overhead-rounds 2 --config " + config.string() +
                       " --workdir " + (dir / "runs").string() + " --out " + (dir / "out").string());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto out = nlohmann::json::parse(last_line(r.out));
  ASSERT_EQ(out["arms"].size(), 4u);
  const std::vector<std::string> names = {"baseline", "clamping", "anticipatory", "both"};
  for (size_t i = 0; i < names.size(); ++i) {
    const auto& arm = out["arms"][i];
    EXPECT_EQ(arm["name"], names[i]);
    for (const char* key : {"spikes", "max_excursion", "diverged", "final_loss"}) {
      ASSERT_TRUE(arm.contains(key)) << names[i] << " lacks " << key;
    }
    EXPECT_EQ(arm["steps"], 6);
    EXPECT_FALSE(arm["diverged"].get<bool>());
    EXPECT_TRUE(std::isfinite(arm["final_loss"].get<double>()));
    // Anticipatory routing ran on every step of the anticipatory arms, on none of the others.
    EXPECT_EQ(arm["anticipatory_steps"], i >= 2 ? 6 : 0) << names[i];
    std::ifstream arm_config(dir / "runs" / names[i] / "config.yaml");
    std::stringstream text;
    text << arm_config.rdbuf();
    EXPECT_NE(text.str().find(i == 1 || i == 3 ? "enabled: true" : "enabled: false"),
              std::string::npos)
        << names[i] << " config:\n" << text.str();
  }
  EXPECT_TRUE(out.contains("anticipatory_overhead"));
  std::ifstream svg(dir / "out" / "stability-loss.svg");
  std::string first;
  std::getline(svg, first);
  EXPECT_EQ(first.rfind("<svg", 0), 0u) << first;
  EXPECT_TRUE(fs::exists(dir / "out" / "stability-table.md"));
  EXPECT_NE(r.err.find("stress test"), std::string::npos) << "the injection is logged";

  // Rerunning into the same work directory refuses rather than overwriting the runs.
  const Result again = run("exp stability --overhead-rounds 2 --config " + config.string() +
                           " --workdir " + (dir / "runs").string() + " --out " +
                           (dir / "out").string());
  EXPECT_EQ(again.exit_code, 1);
  EXPECT_NE(again.err.find("already holds a run"), std::string::npos) << again.err;
}

// A loss that becomes non-finite stops training with a clear error instead of training on
// NaN weights; the checkpoint written before it stays as it was.
TEST(Cli, SftStopsWithAClearErrorWhenTheLossDiverges) {
  const fs::path dir = scratch("diverge");
  std::string text = kTinyConfig;
  // Expert weights x1e30 before step 5 with clamping off: the expert outputs overflow.
  text.replace(text.find("model:\n"), 7, "model:\n  clamp: {enabled: false}\n");
  text += "stability:\n  stress: {outlier_steps: [4], outlier_scale: 1.0e+30}\n";
  const fs::path config = write_config(dir, text);
  const fs::path workdir = dir / "run";
  const Result r = run("sft --config " + config.string() + " --workdir " + workdir.string());
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("rlhf: error: training diverged: the loss of step 5 is not finite"),
            std::string::npos)
      << r.err;
  EXPECT_FALSE(fs::exists(workdir / "policy.safetensors"));
  // The step-3 checkpoint (checkpoint_every 3) is still there and loads.
  const Result resume = run("inspect --json " + (workdir / "checkpoint.safetensors").string());
  ASSERT_EQ(resume.exit_code, 0) << resume.err;
  EXPECT_EQ(nlohmann::json::parse(last_line(resume.out))["step"], 3);
}


// The generative reward model end to end on a tiny config: train-grm builds judge data from the
// task suite (no policy: references and corrupted references), trains, and eval grm reports the
// judge's metrics. A tiny model trained for a few steps judges badly; this checks the plumbing
// and the value ranges, not quality (docs/grm.md has the quality numbers).
TEST(Cli, TrainGrmThenEvalGrm) {
  const fs::path dir = scratch("grm");
  std::string text = kTinyConfig;
  text.replace(text.find("  max_seq_len: 40"), 16, "  max_seq_len: 96");
  text += "grm: {prompts: 40, judge_fraction: 0.5}\n";
  const fs::path config = write_config(dir, text);
  const fs::path workdir = dir / "judge";
  const Result train = run("train-grm --json --config " + config.string() + " --workdir " +
                           workdir.string());
  ASSERT_EQ(train.exit_code, 0) << train.err;
  const auto t = nlohmann::json::parse(last_line(train.out));
  EXPECT_EQ(t["command"], "train-grm");
  EXPECT_EQ(t["pointwise_records"], 80);  // reference + one corrupted reference per prompt
  EXPECT_TRUE(fs::exists(workdir / "scored.jsonl"));
  EXPECT_TRUE(fs::exists(workdir / "policy.safetensors"));

  const fs::path records = dir / "records.jsonl";
  const Result eval = run("eval grm --json --prompts 6 --k 3 --config " + config.string() +
                          " --judge " + (workdir / "policy.safetensors").string() +
                          " --records " + records.string());
  ASSERT_EQ(eval.exit_code, 0) << eval.err;
  const auto e = nlohmann::json::parse(last_line(eval.out));
  for (const char* key : {"pairwise_accuracy", "invalid_rate", "swap_consistency", "spearman",
                          "pairwise_accuracy_vote_k", "pairwise_accuracy_from_scores"}) {
    ASSERT_TRUE(e.contains(key)) << key;
  }
  for (const char* key : {"pairwise_accuracy", "invalid_rate", "swap_consistency",
                          "pairwise_accuracy_from_scores"}) {
    EXPECT_GE(e[key].get<double>(), 0.0) << key;
    EXPECT_LE(e[key].get<double>(), 1.0) << key;
  }
  EXPECT_GE(e["spearman"].get<double>(), -1.0);
  EXPECT_LE(e["spearman"].get<double>(), 1.0);
  EXPECT_GT(e["pairs"].get<int>(), 0);
  // 4 pointwise items per prompt at most; every judge sample is counted.
  EXPECT_GE(e["judge_samples"].get<int>(), e["pointwise_items"].get<int>() + 2 * e["pairs"].get<int>());

  // --records: one line per pointwise item and per pair, from which the summary's figures
  // follow again (the Voting@1 accuracy and the swap consistency, counted here from the lines).
  EXPECT_EQ(e["records"], records.string());
  std::ifstream in(records);
  std::string line;
  int pointwise = 0, pairwise = 0, right = 0, both_valid = 0, consistent = 0;
  const std::map<std::string, std::string> mirrored = {{"A", "B"}, {"B", "A"}, {"tie", "tie"}};
  while (std::getline(in, line)) {
    const auto r = nlohmann::json::parse(line);
    EXPECT_EQ(r["judge"], "judge");
    if (r["kind"] == "pointwise") {
      ++pointwise;
      EXPECT_TRUE(r.contains("truth") && r.contains("score") && r.contains("reasoning")) << line;
      continue;
    }
    ASSERT_EQ(r["kind"], "pairwise") << line;
    ++pairwise;
    EXPECT_NE(r["truth_a"], r["truth_b"]) << line;  // ground-truth ties are not judged
    const auto& forward = r["forward"];
    const auto& backward = r["backward"];
    right += forward["valid"].get<bool>() && forward["verdict"] == r["better"];
    if (forward["valid"].get<bool>() && backward["valid"].get<bool>()) {
      ++both_valid;
      consistent += mirrored.at(backward["verdict"].get<std::string>()) == forward["verdict"];
    }
  }
  EXPECT_EQ(pointwise, e["pointwise_items"].get<int>());
  EXPECT_EQ(pairwise, e["pairs"].get<int>());
  EXPECT_DOUBLE_EQ(double(right) / pairwise, e["pairwise_accuracy"].get<double>());
  EXPECT_DOUBLE_EQ(both_valid ? double(consistent) / both_valid : 0.0,
                   e["swap_consistency"].get<double>());
  // A records file that cannot be written fails before the evaluation, and leaves nothing.
  const Result unwritable = run("eval grm --prompts 2 --config " + config.string() + " --judge " +
                                (workdir / "policy.safetensors").string() + " --records " +
                                (dir / "no-such-dir" / "r.jsonl").string());
  EXPECT_EQ(unwritable.exit_code, 1);
  EXPECT_NE(unwritable.err.find("--records"), std::string::npos) << unwritable.err;
  EXPECT_EQ(unwritable.out.find("pairwise accuracy"), std::string::npos) << unwritable.out;

  // User data with a bad line: one clear error naming the file and line, nothing trained.
  const fs::path bad = dir / "bad.jsonl";
  std::ofstream(bad) << R"({"prompt":"1+1=","response":"2","reasoning":"expected 2; exact","score":10})"
                     << "\n" << R"({"prompt":"1+1=","response":"3","reasoning":"x","score":0})" << "\n";
  const Result user = run("train-grm --config " + config.string() + " --workdir " +
                          (dir / "user").string() + " --data " + bad.string());
  EXPECT_EQ(user.exit_code, 1);
  EXPECT_NE(user.err.find("bad.jsonl:2: key 'score' must be in 1..10"), std::string::npos) << user.err;
  EXPECT_FALSE(fs::exists(dir / "user" / "checkpoint.safetensors"));
}

TEST(Cli, EvalWinrateAndRatingsReportStoreAndRefuseBadInput) {
  const fs::path dir = scratch("winrate");
  const fs::path config = write_config(dir, kTinyConfig);
  std::string shorter = kTinyConfig;
  shorter.replace(shorter.find("  steps: 6"), 9, "  steps: 2");
  const fs::path config_b = dir / "config-b.yaml";
  std::ofstream(config_b) << shorter;
  ASSERT_EQ(run("sft --config " + config.string() + " --workdir " + (dir / "a").string()).exit_code, 0);
  ASSERT_EQ(run("sft --config " + config_b.string() + " --workdir " + (dir / "b").string()).exit_code, 0);
  const std::string a = (dir / "a" / "policy.safetensors").string();
  const std::string b = (dir / "b" / "policy.safetensors").string();
  const std::string settings = " --config " + config.string() + " --prompts 8 --round 4 --workdir " +
                               (dir / "eval").string();
  const std::string common = settings + " --judge ground_truth";

  const Result eval = run("eval winrate --json --a " + a + " --b " + b + common);
  ASSERT_EQ(eval.exit_code, 0) << eval.err;
  const auto e = nlohmann::json::parse(last_line(eval.out));
  for (const char* key : {"wins", "ties", "losses", "invalid", "win_rate", "ci_low", "ci_high",
                          "p_value", "swap_consistency", "lc_win_rate", "per_task",
                          "mean_length_a", "mean_length_b"}) {
    ASSERT_TRUE(e.contains(key)) << key;
  }
  EXPECT_EQ(e["wins"].get<int>() + e["ties"].get<int>() + e["losses"].get<int>() +
                e["invalid"].get<int>(),
            8);
  EXPECT_LE(e["ci_low"].get<double>(), e["win_rate"].get<double>());
  EXPECT_GE(e["ci_high"].get<double>(), e["win_rate"].get<double>());
  EXPECT_TRUE(fs::exists(e["report"].get<std::string>()));
  EXPECT_TRUE(fs::exists(e["chart"].get<std::string>()));
  EXPECT_NE(eval.err.find("round 2/2"), std::string::npos) << "progress goes to stderr";
  EXPECT_NE(eval.out.find("95% CI"), std::string::npos) << "the table goes to stdout";

  // The same command again re-reports the stored judgments, judging nothing.
  const Result again = run("eval winrate --json --a " + a + " --b " + b + common);
  ASSERT_EQ(again.exit_code, 0) << again.err;
  EXPECT_NE(again.err.find("already judged"), std::string::npos) << again.err;
  EXPECT_EQ(nlohmann::json::parse(last_line(again.out))["win_rate"], e["win_rate"]);

  // Bad input: one clear line each, nothing stored under a wrong spec.
  const Result votes = run("eval winrate --a " + a + " --b " + b + settings +
                           " --judge-temperature 0 --k 3 --judge " + a);
  EXPECT_EQ(votes.exit_code, 1);
  EXPECT_NE(votes.err.find("--judge-temperature"), std::string::npos) << votes.err;
  const Result missing = run("eval winrate --a " + a + " --b " + (dir / "none.safetensors").string() + common);
  EXPECT_EQ(missing.exit_code, 1);
  EXPECT_NE(missing.err.find("none.safetensors"), std::string::npos) << missing.err;
  const Result changed = run("eval winrate --a " + a + " --b " + b + common + " --eval-id " +
                             e["eval_id"].get<std::string>() + " --seed 12345");
  EXPECT_EQ(changed.exit_code, 1);
  EXPECT_NE(changed.err.find("seed"), std::string::npos) << changed.err;

  const Result twice = run("eval ratings --checkpoints " + a + " " + b + " " + a + common);
  EXPECT_EQ(twice.exit_code, 1);
  EXPECT_NE(twice.err.find("given twice"), std::string::npos) << twice.err;
  const Result ratings = run("eval ratings --json --checkpoints " + a + " " + b + common);
  ASSERT_EQ(ratings.exit_code, 0) << ratings.err;
  const auto r = nlohmann::json::parse(last_line(ratings.out));
  ASSERT_EQ(r["models"].size(), 2u);
  ASSERT_EQ(r["pairs"].size(), 1u);
  // The pair was already evaluated above: the same eval id, reported from the store.
  EXPECT_EQ(r["pairs"][0]["eval_id"], e["eval_id"]);
  for (const auto& m : r["models"]) {
    EXPECT_LE(m["ci_low"].get<double>(), m["rating"].get<double>() + 1e-9);
    EXPECT_GE(m["ci_high"].get<double>(), m["rating"].get<double>() - 1e-9);
  }
}

}  // namespace
