// rlhf bench train|generate: training and decode throughput on the config's backend
// (runtime.device), each next to baselines measured in the same run, because absolute numbers
// from different runs on shared machines do not compare:
//  - train: model FLOP/s against one large square SGEMM through the same backend (and, on the
//    GPU, against the H100's datasheet peaks);
//  - generate: decode step time against its memory-bandwidth floor (the bytes a step must read,
//    over the bandwidth of a large copy through the same backend);
//  - both, with --torch-reference: the PyTorch reference (tools/torch_reference/bench.py) at the
//    same shapes, run as a child process on a checkpoint of the same random-init model.
// rlhf bench routing: anticipatory routing's step-time overhead against plain routing,
// interleaved step by step in one run for the same reason.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <fmt/core.h>
#include <spdlog/spdlog.h>

#include "common/error.h"
#include "common/rng.h"
#include "kernels/backend.h"
#include "kernels/buffer.h"
#include "kernels/cpu/cpu_ops.h"
#include "learner/optimizer.h"
#include "learner/stability_experiment.h"
#include "model/checkpoint.h"
#include "model/transformer.h"
#include "tools/bench_torch.h"
#include "tools/cli.h"
#ifdef RLHF_HAVE_CUDA
#include <cuda_runtime.h>

#include "tools/cmd_bench_fp4.h"
#endif

namespace rlhf::cli {

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Dense peaks of the H100 SXM (datasheet, without sparsity), the yardstick GPU training
// throughput is quoted against: FP32 on the CUDA cores (what our FP32 backend can use) and
// BF16 on the tensor cores (what the PyTorch reference uses).
constexpr double kH100Fp32Peak = 67e12;
constexpr double kH100Bf16Peak = 989e12;

// Everything queued on the backend has finished once this returns: a 4-byte read to the host
// (on the GPU a blocking copy on the stream every op uses; CPU ops are synchronous anyway).
void backend_wait(Ops<float>& ops, const float* any) {
  float value;
  ops.copy_to_host(&value, any, sizeof value);
}

std::string device_name(const std::string& device) {
#ifdef RLHF_HAVE_CUDA
  cudaDeviceProp prop{};
  if (device == "cuda" && cudaGetDeviceProperties(&prop, 0) == cudaSuccess) return prop.name;
#endif
  return device;
}

// Best-of-`repeats` FLOP/s of one n x n x n matmul_forward through the backend, after one
// warm-up: the practical single-precision GEMM rate (OpenBLAS SGEMM with the model's thread
// count on the CPU, cuBLAS FP32 SGEMM on the GPU).
double measure_gemm_flops(Ops<float>& ops, int n, int repeats) {
  const int64_t count = int64_t(n) * n;
  Buffer<float, Ops<float>> a(ops, count), b(ops, count), c(ops, count);
  std::vector<float> host(static_cast<size_t>(count));
  Rng rng(3);
  for (auto& x : host) x = float(rng.uniform() - 0.5);
  a.from_host(host.data(), count);
  b.from_host(host.data(), count);
  double best = 1e30;
  for (int r = 0; r < repeats + 1; ++r) {
    const auto t = Clock::now();
    ops.matmul_forward(c.data(), a.data(), b.data(), n, n, n, false);
    backend_wait(ops, c.data());
    if (r > 0) best = std::min(best, seconds_since(t));
  }
  return 2.0 * n * n * double(n) / best;
}

// Best-of-`repeats` bytes/s of one copy of n floats through the backend (device to device on
// the GPU, memcpy on the CPU), counting bytes read and written: the rate a memory-bound step
// can stream at most.
double measure_copy_bandwidth(Ops<float>& ops, int64_t n, int repeats) {
  Buffer<float, Ops<float>> src(ops, n), dst(ops, n);
  ops.fill(src.data(), 1.0f, n);
  ops.fill(dst.data(), 0.0f, n);
  double best = 1e30;
  for (int r = 0; r < repeats + 1; ++r) {
    backend_wait(ops, dst.data());
    const auto t = Clock::now();
    ops.copy(dst.data(), src.data(), n);
    backend_wait(ops, dst.data());
    if (r > 0) best = std::min(best, seconds_since(t));
  }
  return 2.0 * sizeof(float) * double(n) / best;
}

double ratio(double a, double b) { return b > 0 ? a / b : 0.0; }

// ---------------------------------------------------------------- train

struct TrainBenchOptions {
  CommonOptions common;
  std::string device;  // overrides runtime.device when set
  int steps = 20;
  int warmup = 3;
  int batch = 0;    // 0: sft.batch_size
  int seq_len = 0;  // 0: model.max_seq_len
  TorchReferenceOptions torch;
};

void bench_train(const TrainBenchOptions& o) {
  RunConfig config = load_config(o.common);
  if (!o.device.empty()) config.runtime.device = o.device;
  cpu_set_threads(config.runtime.threads);
  const ModelConfig& mc = config.model;
  const std::string& device = config.runtime.device;
  const int B = o.batch > 0 ? o.batch : config.sft.batch_size;
  const int T = o.seq_len > 0 ? o.seq_len : mc.max_seq_len;
  if (T > mc.max_seq_len) fail("--seq-len {} exceeds model.max_seq_len {}", T, mc.max_seq_len);
  const int gemm_n = device == "cpu" ? 1024 : 8192;
  std::unique_ptr<ScratchDir> scratch;
  if (o.torch.enabled) scratch = std::make_unique<ScratchDir>();

  double gemm_flops = 0, time_s = 0, flops_per_step = 0;
  int64_t params = 0;
  {
    const std::unique_ptr<Ops<float>> ops = make_float_ops(device);
    spdlog::info("bench train on {}: measuring the {}^3 SGEMM baseline", device, gemm_n);
    gemm_flops = measure_gemm_flops(*ops, gemm_n, 5);
    Transformer<float> model(*ops, mc, B, T);
    model.init_random(1);
    params = model.layout().total();
    if (scratch) {
      checkpoint_save((scratch->path() / "model.safetensors").string(), model, mc.tokenizer);
    }
    AdamW<float> optimizer(*ops, model.layout(), config.sft.optimizer);
    // Random tokens, every position weighted: the same fixed shape the PyTorch side trains on.
    Rng rng(11);
    TokenBatch batch{B, T, {}, {}, std::vector<float>(size_t(B) * T, 1.0f)};
    for (int b = 0; b < B; ++b) {
      std::vector<int32_t> seq(size_t(T) + 1);
      for (auto& t : seq) t = int32_t(rng.next_u64() % uint64_t(mc.vocab_size));
      batch.tokens.insert(batch.tokens.end(), seq.begin(), seq.end() - 1);
      batch.targets.insert(batch.targets.end(), seq.begin() + 1, seq.end());
    }
    spdlog::info("bench train: {} warm-up and {} measured steps of {} x {} tokens", o.warmup,
                 o.steps, B, T);
    for (int step = 0; step < o.warmup + o.steps; ++step) {
      const auto t = Clock::now();
      model.zero_grads();
      model.forward_backward(batch);
      optimizer.step(model.params(), model.grads(), step, o.warmup + o.steps);
      model.update_router_bias();
      backend_wait(*ops, model.params());
      const double dt = seconds_since(t);
      // Backward costs two forwards (a gradient for the input and one for the weights).
      flops_per_step = 3.0 * model.last_forward_flops();
      if (step >= o.warmup) time_s += dt;
    }
  }
  const double tokens_per_s = double(B) * T * o.steps / time_s;
  const double step_s = time_s / o.steps;
  const double model_flops = flops_per_step / step_s;
  const bool gpu = device != "cpu";

  nlohmann::json torch;
  if (o.torch.enabled) {
    const OptimizerConfig& opt = config.sft.optimizer;
    torch = run_torch_reference(
        o.torch,
        {"train", "--checkpoint", (scratch->path() / "model.safetensors").string(), "--device",
         gpu ? "cuda" : "cpu", "--dtype", gpu ? "bfloat16" : "float32", "--threads",
         std::to_string(cpu_threads()), "--batch", std::to_string(B), "--seq-len",
         std::to_string(T), "--steps", std::to_string(o.steps), "--warmup",
         std::to_string(o.warmup), "--lr", fmt::format("{}", opt.lr), "--beta1",
         fmt::format("{}", opt.beta1), "--beta2", fmt::format("{}", opt.beta2), "--eps",
         fmt::format("{}", opt.eps), "--weight-decay", fmt::format("{}", opt.weight_decay),
         "--grad-clip", fmt::format("{}", opt.grad_clip)},
        scratch->path());
  }

  std::cout << fmt::format(
      "bench train: device {} ({}), {} threads, random-init model of {:.1f}M parameters\n"
      "  {} measured steps after {} warm-up, batch {} x {} tokens, random tokens\n"
      "  tokens/s              {:.0f}\n"
      "  step ms               {:.2f}\n"
      "  model GFLOP/s         {:.1f}  (3 x forward FLOPs per step / step time)\n"
      "  SGEMM GFLOP/s         {:.1f}  ({}^3 matmul_forward through the same backend: the "
      "baseline)\n"
      "  sgemm_utilization     {:.3f}  (model FLOP/s / SGEMM FLOP/s)\n",
      device, device_name(device), cpu_threads(), params / 1e6, o.steps, o.warmup, B, T,
      tokens_per_s, 1e3 * step_s, model_flops / 1e9, gemm_flops / 1e9, gemm_n,
      model_flops / gemm_flops);
  nlohmann::json summary = {{"command", "bench train"},
                            {"device", device},
                            {"device_name", device_name(device)},
                            {"threads", cpu_threads()},
                            {"params", params},
                            {"steps", o.steps},
                            {"warmup", o.warmup},
                            {"batch", B},
                            {"seq_len", T},
                            {"tokens_per_s", tokens_per_s},
                            {"step_ms", 1e3 * step_s},
                            {"model_flops_per_step", flops_per_step},
                            {"model_flops_per_s", model_flops},
                            {"sgemm_n", gemm_n},
                            {"sgemm_flops_per_s", gemm_flops},
                            {"sgemm_utilization", model_flops / gemm_flops}};
  if (!gpu) {
    summary["cpu_utilization"] = model_flops / gemm_flops;
  } else {
    std::cout << fmt::format(
        "  MFU vs FP32 peak      {:.4f}  (H100 SXM datasheet, dense FP32: 67 TFLOP/s)\n"
        "  MFU vs BF16 peak      {:.4f}  (H100 SXM datasheet, dense BF16 tensor cores: 989 "
        "TFLOP/s)\n",
        model_flops / kH100Fp32Peak, model_flops / kH100Bf16Peak);
    summary["peaks"] = "H100 SXM datasheet, dense: FP32 67 TFLOP/s, BF16 989 TFLOP/s";
    summary["mfu_fp32_peak"] = model_flops / kH100Fp32Peak;
    summary["mfu_bf16_peak"] = model_flops / kH100Bf16Peak;
  }
  if (o.torch.enabled) {
    const double torch_tps = torch.at("tokens_per_s").get<double>();
    const double torch_flops = flops_per_step / (torch.at("step_ms").get<double>() / 1e3);
    std::cout << fmt::format(
        "PyTorch reference: torch {} on {}, {}, {} ({})\n"
        "  tokens/s              {:.0f}  (ours / torch: {:.2f}x)\n"
        "  step ms               {:.2f}\n",
        torch.at("torch").get<std::string>(), torch.at("device_name").get<std::string>(),
        torch.at("precision").get<std::string>(), torch.at("mode").get<std::string>(),
        torch.at("optimizer").get<std::string>(), torch_tps, ratio(tokens_per_s, torch_tps),
        torch.at("step_ms").get<double>());
    if (gpu) {
      std::cout << fmt::format("  MFU vs BF16 peak      {:.4f}  (same model FLOPs per step)\n",
                               torch_flops / kH100Bf16Peak);
      summary["torch_mfu_bf16_peak"] = torch_flops / kH100Bf16Peak;
    }
    summary["torch_tokens_per_s"] = torch_tps;
    summary["speedup_vs_torch"] = ratio(tokens_per_s, torch_tps);
    summary["torch"] = torch;
  }
  print_json(o.common, summary);
}

// ---------------------------------------------------------------- generate

struct GenerateBenchOptions {
  CommonOptions common;
  std::string device;
  std::vector<int> batches = {1, 16, 64, 256};
  int prompt_len = 0;  // 0: max_seq_len / 4
  int new_tokens = 0;  // 0: max_seq_len / 4
  std::string packed_experts;  // "": float experts; mxfp4 | nvfp4: a packed model
  TorchReferenceOptions torch;
};

// One batch's measurement: the prefill, then new_tokens - 1 decode steps.
struct DecodeRun {
  int batch = 0;
  double prefill_s = 0;
  double decode_s = 0;
  double experts_touched = 0;  // distinct routed experts per MoE layer per decode step (mean)
  double expert_values = 0;    // expert weight values the decode steps read (mean per step)
};

// Greedy: the lowest id among the largest logits.
int32_t argmax(const float* row, int n) {
  return int32_t(std::max_element(row, row + n) - row);
}

// Prefill of `batch` prompts of P tokens, then steps decode steps, greedy, eos ignored. The
// prompts are token (b, t) = (31 b + 17 t + 5) mod 256, as bench.py's.
DecodeRun run_decode(Transformer<float>& model, int batch, int P, int steps) {
  const ModelConfig& c = model.config();
  Ops<float>& ops = model.ops();
  const int V = c.vocab_size;
  KvCache<float> cache(ops, c, batch, P + steps);
  std::vector<int32_t> tokens(size_t(batch) * P), start(size_t(batch), 0);
  for (int b = 0; b < batch; ++b) {
    for (int t = 0; t < P; ++t) {
      tokens[size_t(b) * P + t] = (31 * b + 17 * t + 5) % std::min(256, V);
    }
  }
  std::vector<float> logits(size_t(batch) * V);
  DecodeRun run;
  run.batch = batch;
  backend_wait(ops, model.params());
  auto t = Clock::now();
  const float* out = model.forward(tokens.data(), batch, P, &cache, start.data());
  for (int b = 0; b < batch; ++b) {
    ops.copy_to_host(logits.data() + size_t(b) * V, out + (int64_t(b) * P + P - 1) * V,
                     sizeof(float) * size_t(V));
  }
  tokens.resize(size_t(batch));
  for (int b = 0; b < batch; ++b) tokens[b] = argmax(logits.data() + size_t(b) * V, V);
  run.prefill_s = seconds_since(t);
  const int64_t expert_matrix = 3 * int64_t(c.d_expert) * c.d_model;  // gate, up, down
  int64_t touched = 0;
  t = Clock::now();
  for (int i = 0; i < steps; ++i) {
    t = Clock::now();
    std::fill(start.begin(), start.end(), P + i);
    out = model.forward(tokens.data(), batch, 1, &cache, start.data());
    ops.copy_to_host(logits.data(), out, sizeof(float) * logits.size());
    for (int b = 0; b < batch; ++b) tokens[b] = argmax(logits.data() + size_t(b) * V, V);
    run.decode_s += seconds_since(t);
    // Untimed: the expert loads are read back from the device (a generator never asks), after
    // the logits copy has waited for the step anyway.
    for (const auto& load : model.last_stats().expert_load) {
      touched += std::count_if(load.begin(), load.end(), [](int64_t n) { return n > 0; });
    }
  }
  run.experts_touched = double(touched) / (double(steps) * std::max(1, c.n_moe_layers()));
  run.expert_values = double(touched) * expert_matrix / steps;
  return run;
}

void bench_generate(const GenerateBenchOptions& o) {
  RunConfig config = load_config(o.common);
  if (!o.device.empty()) config.runtime.device = o.device;
  cpu_set_threads(config.runtime.threads);
  const ModelConfig& mc = config.model;
  const std::string& device = config.runtime.device;
  const int P = o.prompt_len > 0 ? o.prompt_len : std::max(1, mc.max_seq_len / 4);
  const int new_tokens = o.new_tokens > 0 ? o.new_tokens : std::max(2, mc.max_seq_len / 4);
  if (new_tokens < 2) fail("--new-tokens must be >= 2 (one from the prefill, then decode steps)");
  // The last processed position is P + new_tokens - 2 (the last token is never fed back).
  if (P + new_tokens - 1 > mc.max_seq_len) {
    fail("--prompt-len {} + --new-tokens {} need {} positions; model.max_seq_len is {}", P,
         new_tokens, P + new_tokens - 1, mc.max_seq_len);
  }
  const int steps = new_tokens - 1;
  const int max_batch = *std::max_element(o.batches.begin(), o.batches.end());
  std::optional<Fp4Format> packed;
  if (!o.packed_experts.empty()) {
    packed = fp4_format_from_name(o.packed_experts);
    if (o.torch.enabled) {
      fail("--torch-reference times a float model; run it without --packed-experts");
    }
  }
  const int64_t copy_values = device == "cpu" ? (int64_t(1) << 24) : (int64_t(1) << 28);
  std::unique_ptr<ScratchDir> scratch;
  if (o.torch.enabled) scratch = std::make_unique<ScratchDir>();

  // Values every decode step reads whatever the batch: every parameter but the embedding table
  // (only the batch's rows are read) and the routed experts (only those routed to), plus the
  // router biases.
  const ParamLayout layout = ParamLayout::parameters(mc);
  int64_t params = layout.total(), fixed_values = ParamLayout::buffers(mc).total();
  int64_t shared_values = 0;  // of fixed_values: the shared experts (packed with --packed-experts)
  for (const TensorSpec& t : layout.tensors()) {
    if (t.name != "embed" && t.name.find(".experts.") == std::string::npos) fixed_values += t.numel;
    if (t.name.find(".shared.") != std::string::npos) shared_values += t.numel;
  }

  double bandwidth = 0;
  std::vector<DecodeRun> runs;
  {
    const std::unique_ptr<Ops<float>> ops = make_float_ops(device);
    spdlog::info("bench generate on {}: measuring copy bandwidth ({} MiB)", device,
                 copy_values * sizeof(float) >> 20);
    bandwidth = measure_copy_bandwidth(*ops, copy_values, 10);
    // The prefill is the largest forward: max_batch prompts of P tokens.
    Transformer<float> float_model(*ops, mc, max_batch, P);
    float_model.init_random(1);
    if (scratch) {
      checkpoint_save((scratch->path() / "model.safetensors").string(), float_model,
                      mc.tokenizer);
    }
    // A packed model: the float model's experts quantized (checkpoint_save_packed), loaded into
    // a model that holds them only in FP4, as the actors serve them.
    std::unique_ptr<Transformer<float>> packed_model;
    if (packed) {
      const ScratchDir dir;
      const std::string path = (dir.path() / "packed.safetensors").string();
      checkpoint_save_packed(path, float_model, mc.tokenizer, *packed);
      packed_model = std::make_unique<Transformer<float>>(*ops, mc, max_batch, P, *packed);
      checkpoint_load_weights(path, *packed_model);
    }
    Transformer<float>& model = packed_model ? *packed_model : float_model;
    for (int batch : o.batches) {
      run_decode(model, batch, P, steps);  // warm-up
      runs.push_back(run_decode(model, batch, P, steps));
      const DecodeRun& r = runs.back();
      spdlog::info("batch {}: prefill {:.0f} tok/s, decode {:.0f} tok/s ({:.3f} ms/step)", batch,
                   batch * P / r.prefill_s, batch * steps / r.decode_s, 1e3 * r.decode_s / steps);
    }
  }

  nlohmann::json torch;
  if (o.torch.enabled) {
    std::string batches;
    for (int b : o.batches) batches += (batches.empty() ? "" : ",") + std::to_string(b);
    const bool gpu = device != "cpu";
    torch = run_torch_reference(
        o.torch,
        {"generate", "--checkpoint", (scratch->path() / "model.safetensors").string(), "--device",
         gpu ? "cuda" : "cpu", "--dtype", gpu ? "bfloat16" : "float32", "--threads",
         std::to_string(cpu_threads()), "--batches", batches, "--prompt-len", std::to_string(P),
         "--new-tokens", std::to_string(new_tokens)},
        scratch->path());
  }

  std::cout << fmt::format(
      "bench generate: device {} ({}), {} threads, random-init model of {:.1f}M parameters\n"
      "  prompt {} tokens, {} new tokens ({} decode steps after the prefill), greedy, eos "
      "ignored\n"
      "  copy bandwidth {:.1f} GB/s ({} MiB copy through the backend, read + write counted)\n"
      "  floor: bytes a decode step must read (non-expert weights, the routed experts it used, "
      "the KV cache at each step's length; FP32{}) / copy bandwidth\n",
      device, device_name(device), cpu_threads(), params / 1e6, P, new_tokens, steps,
      bandwidth / 1e9, copy_values * sizeof(float) >> 20,
      packed ? fmt::format(", experts packed in {}", fp4_format_name(*packed)) : "");
  std::cout << fmt::format("  {:>5} {:>14} {:>13} {:>9} {:>14} {:>9} {:>9}\n", "batch",
                           "prefill tok/s", "decode tok/s", "ms/step", "experts/layer",
                           "floor ms", "roofline");
  nlohmann::json rows = nlohmann::json::array();
  const nlohmann::json* torch_rows = o.torch.enabled ? &torch.at("results") : nullptr;
  const double torch_bytes_per_value =
      o.torch.enabled && torch.at("dtype").get<std::string>() == "bfloat16" ? 2 : 4;
  for (size_t i = 0; i < runs.size(); ++i) {
    const DecodeRun& r = runs[i];
    const int b = r.batch;
    // K and V of every layer at positions 0..P+s for decode step s, averaged over the steps.
    const double kv_values =
        double(b) * mc.n_layers * 2.0 * mc.kv_dim() * (P + 1 + (steps - 1) / 2.0);
    const double weight_values =
        double(fixed_values) + double(std::min(b, mc.vocab_size)) * mc.d_model + r.expert_values;
    // Packed: the shared and routed experts' values at their packed size (a half byte of code
    // plus a scale byte per block; NVFP4's per-tensor scale is negligible).
    const double expert_value_bytes =
        packed ? 0.5 + 1.0 / fp4_block_size(*packed) : double(sizeof(float));
    const double weight_bytes = (weight_values - r.expert_values - shared_values) * sizeof(float) +
                                (r.expert_values + shared_values) * expert_value_bytes;
    const double floor_s = (weight_bytes + kv_values * sizeof(float)) / bandwidth;
    const double step_s = r.decode_s / steps;
    const int E = mc.n_routed_experts, k = mc.top_k;
    const double uniform = E > 0 ? E * (1.0 - std::pow(1.0 - double(k) / E, b)) : 0.0;
    std::cout << fmt::format("  {:>5} {:>14.0f} {:>13.0f} {:>9.3f} {:>14.2f} {:>9.3f} {:>9.3f}\n",
                             b, b * P / r.prefill_s, b * steps / r.decode_s, 1e3 * step_s,
                             r.experts_touched, 1e3 * floor_s, floor_s / step_s);
    nlohmann::json row = {{"batch", b},
                          {"prefill_ms", 1e3 * r.prefill_s},
                          {"prefill_tokens_per_s", b * P / r.prefill_s},
                          {"decode_tokens_per_s", b * steps / r.decode_s},
                          {"ms_per_step", 1e3 * step_s},
                          {"new_tokens", new_tokens},
                          {"experts_touched", r.experts_touched},
                          {"experts_touched_uniform", uniform},
                          {"weight_bytes_per_step", weight_bytes},
                          {"kv_bytes_per_step", kv_values * sizeof(float)},
                          {"floor_ms", 1e3 * floor_s},
                          {"roofline_fraction", floor_s / step_s}};
    if (torch_rows) {
      const nlohmann::json& t = torch_rows->at(i);
      if (t.at("batch").get<int>() != b) fail("the PyTorch reference's rows are out of order");
      // The same values in the reference's storage precision (in BF16 its router, 0.1% of the
      // values, stays FP32).
      const double torch_floor_s = floor_s * torch_bytes_per_value / sizeof(float);
      const double torch_step_s = t.at("ms_per_step").get<double>() / 1e3;
      row["torch_prefill_tokens_per_s"] = t.at("prefill_tokens_per_s");
      row["torch_decode_tokens_per_s"] = t.at("decode_tokens_per_s");
      row["torch_ms_per_step"] = t.at("ms_per_step");
      row["prefill_speedup_vs_torch"] =
          ratio(b * P / r.prefill_s, t.at("prefill_tokens_per_s").get<double>());
      row["decode_speedup_vs_torch"] = ratio(torch_step_s, step_s);
      row["torch_floor_ms"] = 1e3 * torch_floor_s;
      row["torch_roofline_fraction"] = torch_floor_s / torch_step_s;
    }
    rows.push_back(row);
  }
  nlohmann::json summary = {{"command", "bench generate"},
                            {"device", device},
                            {"device_name", device_name(device)},
                            {"threads", cpu_threads()},
                            {"params", params},
                            {"prompt_len", P},
                            {"new_tokens", new_tokens},
                            {"decode_steps", steps},
                            {"sampling", "greedy, eos ignored"},
                            {"copy_bandwidth_bytes_per_s", bandwidth},
                            {"bytes_per_value", sizeof(float)},
                            {"experts", packed ? fp4_format_name(*packed) : "float"},
                            {"results", rows}};
  if (o.torch.enabled) {
    std::cout << fmt::format(
        "PyTorch reference: torch {} on {}, {}, compile: {} (floor: the same values in {})\n",
        torch.at("torch").get<std::string>(), torch.at("device_name").get<std::string>(),
        torch.at("dtype").get<std::string>(),
        torch.at("compile").at("used").get<bool>()
            ? std::string("used")
            : "not used (" + torch.at("compile").at("note").get<std::string>() + ")",
        torch.at("dtype").get<std::string>());
    std::cout << fmt::format("  {:>5} {:>14} {:>8} {:>13} {:>8} {:>9} {:>9}\n", "batch",
                             "prefill tok/s", "ours/pt", "decode tok/s", "ours/pt", "ms/step",
                             "roofline");
    for (const nlohmann::json& row : rows) {
      std::cout << fmt::format("  {:>5} {:>14.0f} {:>8.2f} {:>13.0f} {:>8.2f} {:>9.3f} {:>9.3f}\n",
                               row.at("batch").get<int>(),
                               row.at("torch_prefill_tokens_per_s").get<double>(),
                               row.at("prefill_speedup_vs_torch").get<double>(),
                               row.at("torch_decode_tokens_per_s").get<double>(),
                               row.at("decode_speedup_vs_torch").get<double>(),
                               row.at("torch_ms_per_step").get<double>(),
                               row.at("torch_roofline_fraction").get<double>());
    }
    summary["torch"] = torch;
  }
  print_json(o.common, summary);
}

void bench_routing(const CommonOptions& common, int rounds) {
  const RunConfig config = load_config(common);
  spdlog::info("anticipatory routing overhead: {} interleaved rounds, lag {}", rounds,
               config.stability.anticipatory.lag);
  const AnticipatoryOverhead o = measure_anticipatory_overhead(config, rounds);
  std::cout << fmt::format(
      "bench routing: {} rounds, batch {}, {} threads, lag {} (overhead: median per-round "
      "ratio to the baseline)\n"
      "  baseline (no anticipatory routing)   {:.2f} ms/step\n"
      "  on_spike mode, outside a window      {:.2f} ms/step  ({:+.1f}%)\n"
      "  anticipatory routing on              {:.2f} ms/step  ({:+.1f}%)\n",
      rounds, config.sft.batch_size, cpu_threads(), config.stability.anticipatory.lag,
      1e3 * o.baseline_step_s, 1e3 * o.off_step_s, 100 * o.overhead_off, 1e3 * o.on_step_s,
      100 * o.overhead_on);
  print_json(common, {{"command", "bench routing"},
                      {"rounds", rounds},
                      {"threads", cpu_threads()},
                      {"lag", config.stability.anticipatory.lag},
                      {"baseline_step_s", o.baseline_step_s},
                      {"off_step_s", o.off_step_s},
                      {"on_step_s", o.on_step_s},
                      {"overhead_off", o.overhead_off},
                      {"overhead_on", o.overhead_on}});
}

}  // namespace

void register_bench(CLI::App& app) {
  CLI::App* bench = app.add_subcommand("bench", "throughput benchmarks");
  bench->require_subcommand(1);

  const auto add_device = [](CLI::App& cmd, std::string& device) {
    cmd.add_option("--device", device, "override runtime.device (the backend)")
        ->check(CLI::IsMember({"cpu", "cuda"}));
  };

  auto train = std::make_shared<TrainBenchOptions>();
  CLI::App* train_cmd = bench->add_subcommand(
      "train", "training tokens/s and model FLOP/s against a same-run SGEMM baseline");
  add_common_options(*train_cmd, train->common);
  add_device(*train_cmd, train->device);
  train_cmd->add_option("--steps", train->steps, "measured steps")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  train_cmd->add_option("--warmup", train->warmup, "unmeasured steps first")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  train_cmd->add_option("--batch", train->batch, "sequences per step (default: sft.batch_size)")
      ->check(CLI::PositiveNumber);
  train_cmd->add_option("--seq-len", train->seq_len,
                        "tokens per sequence (default: model.max_seq_len)")
      ->check(CLI::PositiveNumber);
  add_torch_reference_options(*train_cmd, train->torch);
  train_cmd->callback([train] { bench_train(*train); });

  auto gen = std::make_shared<GenerateBenchOptions>();
  CLI::App* gen_cmd = bench->add_subcommand(
      "generate", "prefill and decode tokens/s per batch size against the memory-bandwidth floor");
  add_common_options(*gen_cmd, gen->common);
  add_device(*gen_cmd, gen->device);
  gen_cmd->add_option("--batches", gen->batches, "batch sizes, each timed on its own")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  gen_cmd->add_option("--prompt-len", gen->prompt_len,
                      "prompt tokens per sequence (default: model.max_seq_len / 4)")
      ->check(CLI::PositiveNumber);
  gen_cmd->add_option("--packed-experts", gen->packed_experts,
                      "time a model whose experts are packed in this FP4 format (mxfp4 or "
                      "nvfp4), as the actors serve them; the floor counts them packed")
      ->check(CLI::IsMember({"mxfp4", "nvfp4"}));
  gen_cmd->add_option("--new-tokens", gen->new_tokens,
                      "generated tokens per sequence, the first from the prefill (default: "
                      "model.max_seq_len / 4)")
      ->check(CLI::PositiveNumber);
  add_torch_reference_options(*gen_cmd, gen->torch);
  gen_cmd->callback([gen] { bench_generate(*gen); });

  struct RoutingOptions {
    CommonOptions common;
    int rounds = 100;
  };
  auto routing = std::make_shared<RoutingOptions>();
  CLI::App* routing_cmd = bench->add_subcommand(
      "routing", "step-time overhead of anticipatory routing, off (on_spike idle) and on");
  add_common_options(*routing_cmd, routing->common);
  routing_cmd->add_option("--rounds", routing->rounds, "rounds of one step per setting, interleaved")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  routing_cmd->callback([routing] { bench_routing(routing->common, routing->rounds); });

#ifdef RLHF_HAVE_CUDA
  register_bench_fp4(*bench);
#else
  bench->add_subcommand("fp4", "FP4 grouped MoE GEMM vs BF16 cuBLAS (needs the CUDA build)")
      ->allow_extras()
      ->callback([] { fail("this rlhf was built without CUDA; `rlhf bench fp4` needs a GPU build"); });
#endif
}

}  // namespace rlhf::cli
