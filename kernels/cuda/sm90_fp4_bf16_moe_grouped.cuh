#pragma once
// Grouped MoE GEMM for Hopper (sm_90a) on packed FP4 expert weights:
//
//   y[r, :] = factor_e * x[r, :] W_e^T   for every row r of expert e (offsets[e] <= r < offsets[e+1])
//
// x [total_rows, k] BF16, W_e [n, k] packed MXFP4 or NVFP4 in the layout of fp4_moe_layout.h,
// y [total_rows, n] BF16 or FP32, FP32 accumulation. All experts of a layer in one launch; experts
// with no rows cost nothing. The weights are dequantized in registers to exactly
// fp4_dequantize's values (bf16 holds every E2M1 value times its block scale); the products run
// on BF16 tensor cores: mma.sync for few rows per expert (decode, memory-bound), wgmma for many
// (prefill, compute-bound). docs/fp4.md, "CUDA grouped MoE GEMM", has the design.
//
// Plain C++ header (.cpp files include it); device code in sm90_fp4_bf16_moe_grouped.cu. Three
// layers, as ggml and DeepGEMM split them: sm90_fp4_moe_choose_config (heuristic),
// sm90_fp4_moe_grouped_launch (launch of a given config), sm90_fp4_moe_grouped (checked entry).
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/fp4/fp4.h"

namespace rlhf {

enum class MoeOutType : uint8_t {
  bf16,  // round to nearest even
  f32,
};

struct Sm90Fp4MoeParams {
  Fp4Format format = Fp4Format::mxfp4;  // format the weights were packed from
  int32_t experts = 0;                  // E, 1..kFp4MoeMaxExperts
  int64_t n = 0;                        // rows of each W_e (output features), multiple of 64
  int64_t k = 0;                        // columns of each W_e (reduction dim), multiple of 64
  const uint8_t* weights = nullptr;     // device [E, fp4_moe_expert_bytes]: Fp4MoeLayout::bytes,
                                        //   16-byte aligned
  const float* expert_factors = nullptr;  // device [E]: Fp4MoeLayout::expert_factors
  const __nv_bfloat16* x = nullptr;     // device [total_rows, k], row-major, experts' rows in
                                        //   order, 16-byte aligned
  const int32_t* offsets = nullptr;     // device [E + 1]: non-decreasing, offsets[0] = 0,
                                        //   offsets[E] = total_rows; expert e owns rows
                                        //   offsets[e] .. offsets[e+1] of x and y
  int64_t total_rows = 0;               // host copy of offsets[E] (sizes the grid), < 2^31
  void* y = nullptr;                    // device [total_rows, n], row-major, of out_type
  MoeOutType out_type = MoeOutType::bf16;
  int32_t active_experts_hint = 0;      // host's estimate of the experts with rows, for the
                                        //   heuristic only (0: min(E, total_rows)); any value
                                        //   gives the right result, a close one the fast kernel
  bool programmatic_launch = true;      // decode with 8-token tiles: launch as a programmatic
                                        //   dependent of the previous kernel in the stream (its
                                        //   launch overlaps that kernel's end; same results)
};

enum class Sm90Fp4MoeKernel : uint8_t {
  decode,   // mma.sync m16n8k16; 8 warps, each 64 weight rows x a k slice x 8|16 token columns
  prefill,  // wgmma m64n128|256k16, A (weights) from registers; 2 consumer warpgroups, 128 rows
            //   x 128|256 tokens, and a producer warpgroup feeding them through the copy engine
};

// How the decode kernel shares the work out.
enum class Sm90Fp4MoeSchedule : uint8_t {
  // A block owns row_tiles_per_block row tiles of an m-tile; its other warps split k, and each
  // row tile's warps sum their slices in shared memory. For few row tiles with long k (gate_up:
  // k = 7168).
  block,
  // Every warp owns whole row tiles (all of k) of an m-tile and writes y itself: no block
  // barrier after the start, so a warp's results leave as soon as it is done. For many row
  // tiles with short k (down: 112 row tiles per expert, k = 2048), where the block schedule
  // would give each warp a whole row tile anyway; there it took 9 to 20% less time than the
  // block schedule on the H100 (docs/perf.md).
  warp,
};

// Launch configuration; sm90_fp4_moe_choose_config picks one, tests may force any valid one.
struct Sm90Fp4MoeConfig {
  Sm90Fp4MoeKernel kernel = Sm90Fp4MoeKernel::decode;
  int tokens_per_tile = 8;      // decode: 8 or 16 rows of x per tile; prefill: 128 or 256
  int row_tiles_per_block = 1;  // decode, block schedule: 64-row tiles per block (1 to 8); the
                                //   block's other warps split k: 8 / row_tiles_per_block slices
                                //   (rounded down; the warps past the last whole slice idle).
                                //   decode, warp schedule: unused (1). prefill: 2
  Sm90Fp4MoeSchedule schedule = Sm90Fp4MoeSchedule::block;  // decode only
  bool x_multicast = false;     // prefill: blocks run in clusters of two on the same m-tile and
                                //   neighbouring row blocks, each x chunk fetched once by the
                                //   copy engine for both (TMA multicast, half the x traffic)
};

// The heuristic: decode when the average active expert (active_experts_hint, else
// min(E, total_rows)) has at most 16 rows, with at most one block per multiprocessor (the warp
// schedule where the block schedule would leave one k slice per row tile); else prefill with
// 128- or 256-row tiles.
Sm90Fp4MoeConfig sm90_fp4_moe_choose_config(const Sm90Fp4MoeParams& p, int sm_count);

// Queues the kernel of `config` on `stream`. Shapes and config are checked (rlhf::Error for an
// unsupported shape, fatal for a bad config or null pointer); the device data is not read.
void sm90_fp4_moe_grouped_launch(const Sm90Fp4MoeParams& p, const Sm90Fp4MoeConfig& config,
                                 cudaStream_t stream);

// The checked entry point: validates p, chooses the config for the current device, launches.
// Asynchronous; a call with total_rows == 0 does nothing.
void sm90_fp4_moe_grouped(const Sm90Fp4MoeParams& p, cudaStream_t stream = nullptr);

}  // namespace rlhf
