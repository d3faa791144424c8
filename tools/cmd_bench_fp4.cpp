// bench fp4: the FP4 grouped MoE GEMM against a BF16 cuBLAS baseline of the same grouped problem
// (the same dequantized weights, the same activations), both measured in this run.
//
// Problem: a layer of `experts` experts W_e [n, k] of which `active` hold `tokens` rows of x
// each (spread evenly over the layer; the others hold none and are never read). Per shape,
// format and token count:
//  - fp4: one sm90_fp4_moe_grouped launch (all experts, the heuristic's kernel);
//  - cuBLAS loop: one cublasGemmEx per active expert, one stream;
//  - cuBLAS batched: one cublasGemmStridedBatchedEx over the active experts (valid here because
//    every active expert has the same token count);
// Timing: the weights exist in several copies ("sets", enough that their total is over 3x the
// L2), and one CUDA graph holds 2 * sets launches that cycle through them, so every launch
// reads its weights from HBM, as a layer of a real model does, and back-to-back launches carry
// no per-launch host or event overhead. The graph is replayed `warmup` times untimed, then
// `reps` times, each between two CUDA events; a launch's time is the replay's over its
// launches, and the median is reported. The BF16 baseline is the faster cuBLAS variant. GB/s
// counts the packed weight bytes of the active experts (codes + scales) over the fp4 time.
#include "tools/cmd_bench_fp4.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <iostream>
#include <memory>
#include <optional>

#include <fmt/core.h>
#include <spdlog/spdlog.h>

#include "common/error.h"
#include "common/rng.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/fp4_moe_layout.h"
#include "kernels/cuda/sm90_fp4_bf16_moe_grouped.cuh"
#include "kernels/fp4/fp4.h"

namespace rlhf::cli {
namespace {

#define CUBLAS_CHECK(expr)                                                                \
  do {                                                                                    \
    const cublasStatus_t rlhf_cublas_status_ = (expr);                                    \
    if (rlhf_cublas_status_ != CUBLAS_STATUS_SUCCESS) {                                   \
      ::rlhf::cuda_check_failed(#expr, cublasGetStatusString(rlhf_cublas_status_),        \
                                __FILE__, __LINE__);                                      \
    }                                                                                     \
  } while (0)

struct Shape {
  std::string name;
  int64_t n, k;
};

Shape parse_shape(const std::string& text) {
  const auto eq = text.find('=');
  const auto x = text.find('x', eq == std::string::npos ? 0 : eq);
  Shape s{eq == std::string::npos ? text : text.substr(0, eq), 0, 0};
  try {
    if (eq == std::string::npos || x == std::string::npos) throw std::invalid_argument("");
    s.n = std::stoll(text.substr(eq + 1, x - eq - 1));
    s.k = std::stoll(text.substr(x + 1));
  } catch (const std::exception&) {
    fail("bench fp4: shape '{}' is not NAME=NxK (e.g. gate_up=2048x7168)", text);
  }
  return s;
}

template <typename T>
struct DeviceArray {
  T* ptr = nullptr;
  explicit DeviceArray(size_t n) {
    CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&ptr), std::max<size_t>(n, 1) * sizeof(T)));
  }
  ~DeviceArray() { cudaFree(ptr); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
};

uint16_t bf16_bits(float x) {
  const uint32_t u = fp4_float_bits(x);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
float bf16_float(uint16_t b) { return fp4_float_from_bits(uint32_t{b} << 16); }

// Median time of one launch: a graph of `launches` calls of enqueue(i), replayed.
class Timer {
 public:
  Timer(cudaStream_t stream, int warmup, int reps) : stream_(stream), warmup_(warmup), reps_(reps) {
    CUDA_CHECK(cudaEventCreate(&start_));
    CUDA_CHECK(cudaEventCreate(&stop_));
  }
  ~Timer() {
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
  }

  template <typename F>
  double median_us(int launches, F&& enqueue) {
    cudaGraph_t graph;
    CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed));
    for (int i = 0; i < launches; ++i) enqueue(i);
    CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
    cudaGraphExec_t exec;
    CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    CUDA_CHECK(cudaGraphDestroy(graph));
    std::vector<float> ms;
    for (int i = 0; i < warmup_ + reps_; ++i) {
      CUDA_CHECK(cudaEventRecord(start_, stream_));
      CUDA_CHECK(cudaGraphLaunch(exec, stream_));
      CUDA_CHECK(cudaEventRecord(stop_, stream_));
      CUDA_CHECK(cudaEventSynchronize(stop_));
      float t = 0.0f;
      CUDA_CHECK(cudaEventElapsedTime(&t, start_, stop_));
      if (i >= warmup_) ms.push_back(t / static_cast<float>(launches));
    }
    CUDA_CHECK(cudaGraphExecDestroy(exec));
    std::nth_element(ms.begin(), ms.begin() + ms.size() / 2, ms.end());
    return 1e3 * ms[ms.size() / 2];
  }

  // Device-to-device copy of `bytes`, counting bytes read plus written: the HBM ceiling.
  double copy_gbps(size_t bytes) {
    DeviceArray<uint8_t> a(bytes), b(bytes);
    CUDA_CHECK(cudaMemset(a.ptr, 1, bytes));
    const double us = median_us(4, [&](int) {
      CUDA_CHECK(cudaMemcpyAsync(b.ptr, a.ptr, bytes, cudaMemcpyDeviceToDevice, stream_));
    });
    return 2.0 * static_cast<double>(bytes) / us * 1e-3;
  }

 private:
  cudaStream_t stream_;
  int warmup_, reps_;
  cudaEvent_t start_{}, stop_{};
};

// W_e [n, k]: normal values of the size of trained expert weights, different for every expert.
std::vector<float> random_weights(uint64_t seed, int64_t n, int64_t k) {
  std::vector<float> w(static_cast<size_t>(n * k));
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n; ++r) {
    Rng rng(mix_seed(seed, static_cast<uint64_t>(r)));
    for (int64_t c = 0; c < k; ++c) w[static_cast<size_t>(r * k + c)] = 0.02f * float(rng.normal());
  }
  return w;
}

// --config: "auto" (nullopt) or decode/T/R | warp/T | prefill/T.
std::optional<Sm90Fp4MoeConfig> parse_config(const std::string& text) {
  if (text == "auto") return std::nullopt;
  Sm90Fp4MoeConfig c;
  int tokens = 0, rows = 0;
  if (std::sscanf(text.c_str(), "warp/%d", &tokens) == 1 && (tokens == 8 || tokens == 16)) {
    c.kernel = Sm90Fp4MoeKernel::decode;
    c.schedule = Sm90Fp4MoeSchedule::warp;
    c.tokens_per_tile = tokens;
    c.row_tiles_per_block = 1;
    return c;
  }
  if (std::sscanf(text.c_str(), "decode/%d/%d", &tokens, &rows) == 2 &&
      (tokens == 8 || tokens == 16) && rows >= 1 && rows <= 8) {
    c.kernel = Sm90Fp4MoeKernel::decode;
    c.tokens_per_tile = tokens;
    c.row_tiles_per_block = rows;
    return c;
  }
  char suffix[8] = {};
  const int fields = std::sscanf(text.c_str(), "prefill/%d/%7s", &tokens, suffix);
  if ((fields == 1 || (fields == 2 && std::string(suffix) == "mc")) &&
      (tokens == 128 || tokens == 256)) {
    c.kernel = Sm90Fp4MoeKernel::prefill;
    c.tokens_per_tile = tokens;
    c.row_tiles_per_block = 2;
    c.x_multicast = fields == 2;
    return c;
  }
  fail("bench fp4: --config '{}' is not auto, decode/8|16/1..8, warp/8|16 or "
       "prefill/128|256[/mc]",
       text);
}

std::string config_name(const Sm90Fp4MoeConfig& c) {
  if (c.kernel == Sm90Fp4MoeKernel::prefill) {
    return fmt::format("prefill/{}{}", c.tokens_per_tile, c.x_multicast ? "/mc" : "");
  }
  if (c.schedule == Sm90Fp4MoeSchedule::warp) return fmt::format("warp/{}", c.tokens_per_tile);
  return fmt::format("decode/{}/R{}", c.tokens_per_tile, c.row_tiles_per_block);
}

// The weights of one (shape, format) on the device, in `sets` copies: packed FP4 for every
// expert slot (only the active ones written), BF16 copies of the active experts' dequantized
// values for cuBLAS.
struct BenchWeights {
  int64_t expert_bytes;
  int sets;
  std::vector<std::unique_ptr<DeviceArray<uint8_t>>> fp4;    // [sets] of [experts, expert_bytes]
  std::vector<std::unique_ptr<DeviceArray<uint16_t>>> bf16;  // [sets] of [active, n, k]
  DeviceArray<float> factors;                                // [experts]
  BenchWeights(const BenchFp4Options& o, const Shape& s, Fp4Format format, uint64_t seed,
               int64_t l2_bytes)
      : expert_bytes(fp4_moe_expert_bytes(format, s.n, s.k)), factors(size_t(o.experts)) {
    // Enough copies that the FP4 sets total over 3x the L2 (BF16 is 3.8x larger still).
    const int64_t set_bytes = int64_t{o.active} * expert_bytes;
    sets = static_cast<int>(std::clamp<int64_t>(3 * l2_bytes / set_bytes + 2, 4, 64));
    for (int c = 0; c < sets; ++c) {
      fp4.push_back(std::make_unique<DeviceArray<uint8_t>>(size_t(o.experts * expert_bytes)));
      bf16.push_back(std::make_unique<DeviceArray<uint16_t>>(size_t(o.active * s.n * s.k)));
    }
    std::vector<float> host_factors(static_cast<size_t>(o.experts), 1.0f);
    std::vector<uint8_t> packed(static_cast<size_t>(expert_bytes));
    std::vector<float> deq(static_cast<size_t>(s.n * s.k));
    std::vector<uint16_t> deq_bf16(deq.size());
    for (int i = 0; i < o.active; ++i) {
      const int e = i * (o.experts / o.active);
      const std::vector<float> w = random_weights(mix_seed(seed, static_cast<uint64_t>(e)), s.n, s.k);
      const Fp4Tensor t = fp4_quantize(w.data(), s.n, s.k, format, s.name);
      host_factors[static_cast<size_t>(e)] = fp4_moe_layout_pack_expert(t, s.name, packed.data());
      fp4_dequantize(t, deq.data());
      for (size_t j = 0; j < deq.size(); ++j) deq_bf16[j] = bf16_bits(deq[j]);  // exact
      for (int c = 0; c < sets; ++c) {
        CUDA_CHECK(cudaMemcpy(fp4[c]->ptr + e * expert_bytes, packed.data(), packed.size(),
                              cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemcpy(bf16[c]->ptr + i * s.n * s.k, deq_bf16.data(),
                              deq_bf16.size() * sizeof(uint16_t), cudaMemcpyHostToDevice));
      }
    }
    CUDA_CHECK(cudaMemcpy(factors.ptr, host_factors.data(), host_factors.size() * sizeof(float),
                          cudaMemcpyHostToDevice));
  }
};

// max |a - b| over max |b|, a and b bf16 bits; infinite if a holds a NaN (y is poisoned with
// NaN before the fp4 runs: an element they never wrote).
double max_rel_diff(const std::vector<uint16_t>& a, const std::vector<uint16_t>& b) {
  double diff = 0.0, scale = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(double(bf16_float(a[i])) - double(bf16_float(b[i])));
    if (std::isnan(d)) return INFINITY;
    diff = std::max(diff, d);
    scale = std::max(scale, std::fabs(double(bf16_float(b[i]))));
  }
  return scale > 0.0 ? diff / scale : diff;
}

void check_options(const BenchFp4Options& o) {
  if (o.experts < 1 || o.experts > kFp4MoeMaxExperts) {
    fail("bench fp4: --experts {} is outside 1..{}", o.experts, kFp4MoeMaxExperts);
  }
  if (o.active < 1 || o.active > o.experts) {
    fail("bench fp4: --active {} is outside 1..--experts ({})", o.active, o.experts);
  }
  if (o.reps < 1 || o.warmup < 0) fail("bench fp4: --reps must be >= 1 and --warmup >= 0");
  for (int t : o.tokens) {
    if (t < 1) fail("bench fp4: --tokens {} must be >= 1", t);
  }
}

}  // namespace

void bench_fp4_add_options(CLI::App& command, BenchFp4Options& o) {
  command.add_option("--shapes", o.shapes, "expert shapes NAME=NxK (W_e is [N, K], K reduced)")
      ->capture_default_str();
  command.add_option("--tokens", o.tokens, "rows of x per active expert")->capture_default_str();
  command.add_option("--experts", o.experts, "experts in the layer")->capture_default_str();
  command.add_option("--active", o.active, "experts that receive tokens")->capture_default_str();
  command.add_option("--formats", o.formats, "mxfp4 and/or nvfp4")->capture_default_str();
  command.add_option("--warmup", o.warmup, "untimed graph replays per measurement")
      ->capture_default_str();
  command.add_option("--reps", o.reps, "timed graph replays per measurement (median)")
      ->capture_default_str();
  command.add_option("--seed", o.seed, "weights and activations seed")->capture_default_str();
  command.add_option("--config", o.configs,
                     "auto (the heuristic) or forced kernels, each measured: "
                     "decode/TOKENS/ROW_TILES (8|16, 1..8; the block schedule), warp/TOKENS "
                     "(8|16; the warp schedule), prefill/TOKENS (128|256) or prefill/TOKENS/mc (x "
                     "multicast to pairs of blocks)")
      ->capture_default_str();
  command.add_flag("--no-pdl", o.no_pdl,
                   "launch the decode kernel without programmatic dependent launch (each launch "
                   "then starts only after the previous one has ended)");
  command.add_flag("--json", o.json, "print a JSON summary as the last line");
}

nlohmann::json bench_fp4_run(const BenchFp4Options& o) {
  check_options(o);
  std::vector<std::optional<Sm90Fp4MoeConfig>> configs;
  for (const std::string& c : o.configs) configs.push_back(parse_config(c));
  if (configs.empty()) configs.push_back(std::nullopt);
  std::vector<Shape> shapes;
  for (const std::string& s : o.shapes) shapes.push_back(parse_shape(s));
  std::vector<Fp4Format> formats;
  for (const std::string& f : o.formats) formats.push_back(fp4_format_from_name(f));
  for (const Shape& s : shapes) fp4_moe_check_shape("bench fp4", formats[0], o.experts, s.n, s.k);

  // No GPU (or no driver) is a user's situation, not a broken invariant: say so in one line.
  int device_count = 0;
  const cudaError_t probe = cudaGetDeviceCount(&device_count);
  if (probe != cudaSuccess || device_count == 0) {
    fail("bench fp4 needs a CUDA GPU, and none is usable here ({})",
         probe != cudaSuccess ? cudaGetErrorString(probe) : "no device");
  }
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  cudaStream_t stream;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cublasHandle_t cublas;
  CUBLAS_CHECK(cublasCreate(&cublas));
  CUBLAS_CHECK(cublasSetStream(cublas, stream));
  DeviceArray<uint8_t> cublas_workspace(size_t{64} << 20);
  CUBLAS_CHECK(cublasSetWorkspace(cublas, cublas_workspace.ptr, size_t{64} << 20));
  Timer timer(stream, o.warmup, o.reps);
  const double copy_gbps = timer.copy_gbps(size_t{1} << 30);
  spdlog::info("{}: {} SMs, {} MB L2; device-to-device copy {:.0f} GB/s (read + write)",
               prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20, copy_gbps);

  const int max_tokens = *std::max_element(o.tokens.begin(), o.tokens.end());
  nlohmann::json rows = nlohmann::json::array();
  std::printf("%-8s %-6s %5s %6s %-15s %9s %8s %8s %10s %10s %8s %9s\n", "shape", "format",
              "tok/e", "rows", "kernel", "fp4 us", "GB/s", "TFLOP/s", "cublas us", "batched us",
              "speedup", "max diff");
  for (const Shape& s : shapes) {
    // x [active * max_tokens, k]: expert i's rows first-to-last, for every token count.
    const int64_t max_rows = int64_t{o.active} * max_tokens;
    std::vector<uint16_t> host_x(static_cast<size_t>(max_rows * s.k));
    Rng rng(mix_seed(o.seed, 0x5eed, static_cast<uint64_t>(s.n * 131 + s.k)));
    for (uint16_t& v : host_x) v = bf16_bits(float(rng.normal()));
    DeviceArray<uint16_t> x(host_x.size());
    CUDA_CHECK(cudaMemcpy(x.ptr, host_x.data(), host_x.size() * 2, cudaMemcpyHostToDevice));
    DeviceArray<uint16_t> y_fp4(static_cast<size_t>(max_rows * s.n));
    DeviceArray<uint16_t> y_ref(static_cast<size_t>(max_rows * s.n));
    DeviceArray<int32_t> offsets(static_cast<size_t>(o.experts + 1));

    for (Fp4Format format : formats) {
      spdlog::info("{} [{} x {}] {}: quantizing and packing {} experts", s.name, s.n, s.k,
                   fp4_format_name(format), o.active);
      const BenchWeights w(o, s, format, mix_seed(o.seed, static_cast<uint64_t>(format)),
                           prop.l2CacheSize);
      const int launches = 2 * w.sets;
      const double packed_bytes = double(o.active) * double(w.expert_bytes);
      for (int t : o.tokens) {
        std::vector<int32_t> host_offsets(static_cast<size_t>(o.experts + 1), 0);
        for (int e = 0; e < o.experts; ++e) {
          const bool has_rows = e % (o.experts / o.active) == 0 && e / (o.experts / o.active) < o.active;
          host_offsets[static_cast<size_t>(e + 1)] = host_offsets[static_cast<size_t>(e)] + (has_rows ? t : 0);
        }
        CUDA_CHECK(cudaMemcpy(offsets.ptr, host_offsets.data(), host_offsets.size() * 4,
                              cudaMemcpyHostToDevice));
        const int64_t m = int64_t{o.active} * t;
        Sm90Fp4MoeParams p;
        p.format = format;
        p.experts = o.experts;
        p.n = s.n;
        p.k = s.k;
        p.weights = w.fp4[0]->ptr;
        p.expert_factors = w.factors.ptr;
        p.x = reinterpret_cast<const __nv_bfloat16*>(x.ptr);
        p.offsets = offsets.ptr;
        p.total_rows = m;
        p.y = y_fp4.ptr;
        p.out_type = MoeOutType::bf16;
        p.active_experts_hint = o.active;
        p.programmatic_launch = !o.no_pdl;
        // The fp4 kernels first, then cuBLAS (the first version's order: the compute-bound
        // prefill rows run measurably slower right after the cuBLAS runs, which heat the GPU).
        struct Fp4Run {
          std::string kernel;
          double us;
          std::vector<uint16_t> y;
        };
        std::vector<Fp4Run> fp4_runs;
        for (const std::optional<Sm90Fp4MoeConfig>& forced : configs) {
          const Sm90Fp4MoeConfig config =
              forced ? *forced : sm90_fp4_moe_choose_config(p, prop.multiProcessorCount);
          CUDA_CHECK(cudaMemset(y_fp4.ptr, 0xff, static_cast<size_t>(m * s.n) * 2));
          const double fp4_us = timer.median_us(launches, [&](int i) {
            Sm90Fp4MoeParams q = p;
            q.weights = w.fp4[static_cast<size_t>(i % w.sets)]->ptr;
            if (forced) {
              sm90_fp4_moe_grouped_launch(q, config, stream);
            } else {
              sm90_fp4_moe_grouped(q, stream);
            }
          });
          CUDA_CHECK(cudaStreamSynchronize(stream));
          std::vector<uint16_t> a(static_cast<size_t>(m * s.n));
          CUDA_CHECK(cudaMemcpy(a.data(), y_fp4.ptr, a.size() * 2, cudaMemcpyDeviceToHost));
          fp4_runs.push_back({config_name(config), fp4_us, std::move(a)});
        }
        const float one = 1.0f, zero = 0.0f;
        const int n = static_cast<int>(s.n), k = static_cast<int>(s.k);
        const double loop_us = timer.median_us(launches, [&](int i) {
          const uint16_t* wb = w.bf16[static_cast<size_t>(i % w.sets)]->ptr;
          for (int e = 0; e < o.active; ++e) {
            CUBLAS_CHECK(cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, n, t, k, &one,
                                      wb + int64_t{e} * n * k, CUDA_R_16BF, k,
                                      x.ptr + int64_t{e} * t * k, CUDA_R_16BF, k, &zero,
                                      y_ref.ptr + int64_t{e} * t * n, CUDA_R_16BF, n,
                                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
          }
        });
        const double batched_us = timer.median_us(launches, [&](int i) {
          CUBLAS_CHECK(cublasGemmStridedBatchedEx(
              cublas, CUBLAS_OP_T, CUBLAS_OP_N, n, t, k, &one,
              w.bf16[static_cast<size_t>(i % w.sets)]->ptr, CUDA_R_16BF, k, int64_t{n} * k, x.ptr,
              CUDA_R_16BF, k, int64_t{t} * k, &zero, y_ref.ptr, CUDA_R_16BF, n, int64_t{t} * n,
              o.active, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        });
        CUDA_CHECK(cudaStreamSynchronize(stream));
        std::vector<uint16_t> b(static_cast<size_t>(m * s.n));
        CUDA_CHECK(cudaMemcpy(b.data(), y_ref.ptr, b.size() * 2, cudaMemcpyDeviceToHost));
        const double base_us = std::min(loop_us, batched_us);

        for (const Fp4Run& run : fp4_runs) {
          const double fp4_us = run.us, diff = max_rel_diff(run.y, b);
          const double flops = 2.0 * double(m) * double(s.n) * double(s.k);
          const double gbps = packed_bytes / fp4_us * 1e-3;
          std::printf("%-8s %-6s %5d %6lld %-15s %9.1f %8.0f %8.1f %10.1f %10.1f %7.2fx %9.1e\n",
                      s.name.c_str(), fp4_format_name(format), t, static_cast<long long>(m),
                      run.kernel.c_str(), fp4_us, gbps, flops / fp4_us * 1e-6, loop_us,
                      batched_us, base_us / fp4_us, diff);
          std::fflush(stdout);
          rows.push_back({{"shape", s.name},
                          {"n", s.n},
                          {"k", s.k},
                          {"format", fp4_format_name(format)},
                          {"tokens_per_expert", t},
                          {"rows", m},
                          {"kernel", run.kernel},
                          {"weight_sets", w.sets},
                          {"fp4_us", fp4_us},
                          {"packed_weight_bytes", packed_bytes},
                          {"fp4_packed_gbps", gbps},
                          {"fp4_tflops", flops / fp4_us * 1e-6},
                          {"cublas_loop_us", loop_us},
                          {"cublas_strided_batched_us", batched_us},
                          {"bf16_baseline_us", base_us},
                          {"bf16_tflops", flops / base_us * 1e-6},
                          {"speedup_vs_bf16", base_us / fp4_us},
                          {"max_rel_diff_vs_cublas", diff}});
        }
      }
    }
  }
  CUBLAS_CHECK(cublasDestroy(cublas));
  CUDA_CHECK(cudaStreamDestroy(stream));

  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  return {{"command", "bench fp4"},
          {"date", date},
          {"device", prop.name},
          {"sms", prop.multiProcessorCount},
          {"l2_bytes", prop.l2CacheSize},
          {"copy_gbps_read_plus_write", copy_gbps},
          {"experts", o.experts},
          {"active_experts", o.active},
          {"warmup", o.warmup},
          {"reps", o.reps},
          {"configs", o.configs},
          {"programmatic_dependent_launch", !o.no_pdl},
          {"timing", "median over CUDA-event-timed graph replays of the mean launch time; each "
                     "graph cycles through weight copies totalling over 3x the L2"},
          {"baseline", "faster of a cublasGemmEx loop and one cublasGemmStridedBatchedEx, BF16 "
                       "in and out, FP32 compute"},
          {"results", rows}};
}

void register_bench_fp4(CLI::App& bench) {
  auto options = std::make_shared<BenchFp4Options>();
  CLI::App* command = bench.add_subcommand(
      "fp4", "FP4 grouped MoE GEMM vs BF16 cuBLAS on the same grouped problem (GPU)");
  bench_fp4_add_options(*command, *options);
  command->callback([options] {
    const nlohmann::json summary = bench_fp4_run(*options);
    if (options->json) std::cout << summary.dump() << std::endl;
  });
}

}  // namespace rlhf::cli
