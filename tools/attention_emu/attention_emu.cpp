// Host emulation of the tiled attention kernels in kernels/cuda/cuda_ops_attention.cu: each
// block runs as 128 std::threads (std::barrier for __syncthreads and the warp shuffles), then
// out, lse, dq, dk, dv are compared with a double reference. For reviewing index math without a
// GPU; slow, so keep shapes small. Usage: ./run.sh B T S Hq Hkv head_dim (start[b] random).
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <random>
#include <thread>
#include <type_traits>
#include <algorithm>
#include <vector>
#include "kernels/ops.h"
using rlhf::AttentionShape;
struct float4 { float x, y, z, w; };
struct Dim3 { unsigned x = 1, y = 1, z = 1; };
namespace emu {
struct Block {
  std::vector<float> smem;
  float xch[4][32];
  std::barrier<> block_bar{128};
  std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
  Block(size_t n) : smem(n, std::nanf("")) { for (int i = 0; i < 4; ++i) warp_bar.emplace_back(new std::barrier<>(32)); }
};
thread_local Block* blk;
thread_local Dim3 tid, bid;
Dim3 grid;
float* smem() { return blk->smem.data(); }
}
#define threadIdx emu::tid
#define blockIdx emu::bid
#define gridDim emu::grid
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __syncthreads() emu::blk->block_bar.arrive_and_wait()
using std::min; using std::max;
inline float shfl(float v, int src) {
  int w = threadIdx.x / 32, l = threadIdx.x % 32;
  emu::blk->xch[w][l] = v; emu::blk->warp_bar[w]->arrive_and_wait();
  float r = emu::blk->xch[w][src]; emu::blk->warp_bar[w]->arrive_and_wait(); return r;
}
#define __shfl_sync(m, v, s) shfl(v, s)
inline float warp_sum(float x) { for (int o = 16; o > 0; o >>= 1) x += shfl(x, (threadIdx.x % 32) ^ o); return x; }
inline float warp_max(float x) { for (int o = 16; o > 0; o >>= 1) x = std::fmax(x, shfl(x, (threadIdx.x % 32) ^ o)); return x; }
#define CUDA_CHECK(x)
#define cudaFuncSetAttribute(...) 0
namespace rlhf::cuda { namespace {
#include "chunk.inc"
template <typename F> void launch(Dim3 g, size_t smem_bytes, F f) {
  emu::grid = g;
  for (unsigned z = 0; z < g.z; ++z) for (unsigned y = 0; y < g.y; ++y) for (unsigned x = 0; x < g.x; ++x) {
    emu::Block b(smem_bytes / 4);
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < 128; ++t) ts.emplace_back([&, t] { emu::blk = &b; emu::tid = {t, 0, 0}; emu::bid = {x, y, z}; f(); });
    for (auto& t : ts) t.join();
  }
}
template <int HD>
void run(const AttentionShape& s, std::vector<float>& out, std::vector<float>& lse, std::vector<float>& dq, std::vector<float>& dk, std::vector<float>& dv,
         const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v, const std::vector<float>& dout) {
  float scale = 1.0f / std::sqrt(float(HD));
  ForwardSplit f = forward_split(s);
  printf("  row_tiles %d splits %d keys/split %d\n", f.row_tiles, f.splits, f.keys_per_split);
  std::vector<float> part(f.splits > 1 ? f.splits * size_t(s.batch) * s.n_heads * s.n_new * (HD + 2) : 0, std::nanf(""));
  launch({unsigned(f.row_tiles), unsigned(f.splits), unsigned(s.batch * s.n_kv_heads)}, forward_smem_bytes(HD), [&] {
    attention_forward_tiled_kernel<HD>(out.data(), lse.data(), part.data(), q.data(), k.data(), v.data(), s, scale, f.keys_per_split); });
  if (f.splits > 1) {
    int64_t rows = int64_t(s.batch) * s.n_heads * s.n_new;
    emu::grid = {unsigned(rows), 1, 1};
    for (int64_t r = 0; r < rows; ++r) for (unsigned t = 0; t < 32; ++t) { emu::bid = {unsigned(r), 0, 0}; emu::tid = {t, 0, 0};
      attention_combine_kernel(out.data(), lse.data(), part.data(), s, f.splits); }
  }
  std::vector<float> delta(size_t(s.batch) * s.n_heads * s.n_new, std::nanf(""));
  unsigned kvb = s.batch * s.n_kv_heads;
  launch({unsigned(ceil_div(int64_t(s.n_new) * (s.n_heads / s.n_kv_heads), kTile)), 1, kvb}, dq_smem_bytes(HD), [&] {
    attention_backward_dq_tiled_kernel<HD>(dq.data(), delta.data(), dout.data(), out.data(), lse.data(), q.data(), k.data(), v.data(), s, scale); });
  launch({unsigned(ceil_div(s.capacity, kTile)), 1, kvb}, dkv_smem_bytes(HD), [&] {
    attention_backward_dkv_tiled_kernel<HD>(dk.data(), dv.data(), dout.data(), delta.data(), lse.data(), q.data(), k.data(), v.data(), s, scale); });
}
}}
// double reference
void ref(const AttentionShape& s, const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v, const std::vector<float>& dout,
         std::vector<double>& out, std::vector<double>& lse, std::vector<double>& dq, std::vector<double>& dk, std::vector<double>& dv) {
  int hd = s.head_dim, g = s.n_heads / s.n_kv_heads; double scale = 1.0 / std::sqrt(double(hd));
  for (int b = 0; b < s.batch; ++b) for (int h = 0; h < s.n_heads; ++h) for (int t = 0; t < s.n_new; ++t) {
    int kvh = h / g, last = s.start[b] + t;
    auto Q = [&](const std::vector<float>& x, int c) { return double(x[((size_t(b) * s.n_new + t) * s.n_heads + h) * hd + c]); };
    auto K = [&](const std::vector<float>& x, int j, int c) { return double(x[((size_t(b) * s.capacity + j) * s.n_kv_heads + kvh) * hd + c]); };
    std::vector<double> sc(last + 1); double m = -1e300;
    for (int j = 0; j <= last; ++j) { double d = 0; for (int c = 0; c < hd; ++c) d += Q(q, c) * K(k, j, c); sc[j] = d * scale; m = std::max(m, sc[j]); }
    double l = 0; for (int j = 0; j <= last; ++j) { sc[j] = std::exp(sc[j] - m); l += sc[j]; }
    size_t qi = ((size_t(b) * s.n_new + t) * s.n_heads + h) * hd;
    std::vector<double> o(hd, 0);
    for (int j = 0; j <= last; ++j) { sc[j] /= l; for (int c = 0; c < hd; ++c) o[c] += sc[j] * K(v, j, c); }
    for (int c = 0; c < hd; ++c) out[qi + c] = o[c];
    lse[(size_t(b) * s.n_heads + h) * s.n_new + t] = m + std::log(l);
    double delta = 0; for (int c = 0; c < hd; ++c) delta += Q(dout, c) * o[c];
    for (int j = 0; j <= last; ++j) {
      double dp = 0; for (int c = 0; c < hd; ++c) dp += Q(dout, c) * K(v, j, c);
      double ds = sc[j] * (dp - delta) * scale;
      size_t kj = ((size_t(b) * s.capacity + j) * s.n_kv_heads + kvh) * hd;
      for (int c = 0; c < hd; ++c) { dq[qi + c] += ds * K(k, j, c); dk[kj + c] += ds * Q(q, c); dv[kj + c] += sc[j] * Q(dout, c); }
    }
  }
}
double maxerr(const std::vector<float>& a, const std::vector<double>& b) {
  double e = 0, m = 0; for (size_t i = 0; i < a.size(); ++i) { double d = std::fabs(a[i] - b[i]); if (!(d <= e)) e = d; m = std::max(m, std::fabs(b[i])); }
  return e / std::max(m, 1e-30);
}
int main(int argc, char** argv) {
  int B = atoi(argv[1]), T = atoi(argv[2]), S = atoi(argv[3]), Hq = atoi(argv[4]), Hkv = atoi(argv[5]), hd = atoi(argv[6]);
  std::mt19937 rng(7); std::normal_distribution<float> nd; std::vector<int32_t> start(B);
  for (auto& x : start) x = std::uniform_int_distribution<int>(0, S - T)(rng);
  AttentionShape s{B, T, S, Hq, Hkv, hd, start.data()};
  size_t qn = size_t(B) * T * Hq * hd, kn = size_t(B) * S * Hkv * hd;
  auto rnd = [&](size_t n) { std::vector<float> x(n); for (auto& y : x) y = nd(rng); return x; };
  auto q = rnd(qn), k = rnd(kn), v = rnd(kn), dout = rnd(qn);
  std::vector<float> out(qn, NAN), lse(size_t(B) * Hq * T, NAN), dq(qn, NAN), dk(kn, NAN), dv(kn, NAN);
  rlhf::cuda::with_head_dim(hd, [&](auto h) { rlhf::cuda::run<decltype(h)::value>(s, out, lse, dq, dk, dv, q, k, v, dout); });
  std::vector<double> ro(qn, 0), rl(lse.size(), 0), rq(qn, 0), rk(kn, 0), rv(kn, 0);
  ref(s, q, k, v, dout, ro, rl, rq, rk, rv);
  const double errs[] = {maxerr(out, ro), maxerr(lse, rl), maxerr(dq, rq), maxerr(dk, rk), maxerr(dv, rv)};
  printf("out %.2e lse %.2e dq %.2e dk %.2e dv %.2e (max error / max |reference|)\n", errs[0], errs[1], errs[2], errs[3], errs[4]);
  for (double e : errs) {
    if (!(e <= 1e-5)) return 1;  // test_cuda_ops' kReduction bound; NaN (an unwritten output) fails too
  }
  return 0;
}
