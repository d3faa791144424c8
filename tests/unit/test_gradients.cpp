// Finite-difference gradient checks against a double-precision reference: every op's
// backward, then the whole model (dense + MoE layers, clamping on and off), and the float
// model's analytic gradients against the double model's.
//
// Tolerances: central differences in double with h = 1e-6 have truncation error O(h^2 f''')
// ~ 1e-12 and rounding error O(eps / h) ~ 1e-10 relative to the loss, so an analytic gradient
// must agree to ~1e-6 relative (we allow 1e-5 to stay clear of noise). The float-vs-double
// comparison allows 2e-3 relative to the gradient's largest entry: float GEMMs accumulate
// ~1e-7 relative error per operation over a few hundred terms and a dozen ops.
#include <cmath>
#include <functional>
#include <vector>

#include <gtest/gtest.h>

#include "common/rng.h"
#include "kernels/cpu/cpu_ops.h"
#include "model/param_layout.h"
#include "model/transformer.h"

namespace rlhf {
namespace {

using Vec = std::vector<double>;

Vec random_vec(Rng& rng, size_t n, double scale = 1.0) {
  Vec v(n);
  for (auto& x : v) x = rng.normal() * scale;
  return v;
}

// Checks d(loss)/d(x) against central differences on up to `samples` coordinates.
void expect_gradient(const std::string& what, Vec& x, const Vec& analytic,
                     const std::function<double()>& loss, int samples = 40,
                     double tolerance = 1e-5) {
  ASSERT_EQ(x.size(), analytic.size());
  double scale = 1e-3;
  for (double g : analytic) scale = std::max(scale, std::abs(g));
  const size_t step = std::max<size_t>(1, x.size() / samples);
  for (size_t i = 0; i < x.size(); i += step) {
    const double saved = x[i];
    const double h = 1e-6;
    x[i] = saved + h;
    const double up = loss();
    x[i] = saved - h;
    const double down = loss();
    x[i] = saved;
    const double numeric = (up - down) / (2 * h);
    EXPECT_NEAR(analytic[i], numeric, tolerance * scale)
        << what << " coordinate " << i << " analytic " << analytic[i] << " numeric " << numeric;
  }
}

double dot(const Vec& a, const Vec& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

class OpGradients : public ::testing::Test {
 protected:
  CpuOps<double> ops;
  Rng rng{1234};
};

TEST_F(OpGradients, Matmul) {
  const int M = 5, N = 4, K = 6;
  Vec x = random_vec(rng, M * K), w = random_vec(rng, N * K), r = random_vec(rng, M * N);
  Vec out(M * N), dx(M * K), dw(N * K, 0.0);
  auto loss = [&] {
    ops.matmul_forward(out.data(), x.data(), w.data(), M, N, K, false);
    return dot(out, r);
  };
  ops.matmul_backward(dx.data(), dw.data(), r.data(), x.data(), w.data(), M, N, K, false);
  expect_gradient("matmul dx", x, dx, loss);
  expect_gradient("matmul dw", w, dw, loss);
}

TEST_F(OpGradients, RmsNorm) {
  const int N = 4, D = 8;
  Vec x = random_vec(rng, N * D), w = random_vec(rng, D), r = random_vec(rng, N * D);
  Vec out(N * D), rstd(N), dx(N * D, 0.0), dw(D, 0.0);
  auto loss = [&] {
    ops.rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), N, D, 1e-5);
    return dot(out, r);
  };
  loss();
  ops.rmsnorm_backward(dx.data(), dw.data(), r.data(), x.data(), w.data(), rstd.data(), N, D);
  expect_gradient("rmsnorm dx", x, dx, loss);
  expect_gradient("rmsnorm dw", w, dw, loss);
}

TEST_F(OpGradients, Rope) {
  const int N = 5, H = 2, hd = 8;
  Vec x = random_vec(rng, N * H * hd), r = random_vec(rng, N * H * hd);
  std::vector<int32_t> pos = {0, 3, 7, 1, 12};
  auto loss = [&] {
    Vec y = x;
    ops.rope_forward(y.data(), pos.data(), N, H, hd, 10000.0);
    return dot(y, r);
  };
  Vec dx = r;
  ops.rope_backward(dx.data(), pos.data(), N, H, hd, 10000.0);
  expect_gradient("rope dx", x, dx, loss);
}

TEST_F(OpGradients, CausalGroupedAttention) {
  const int B = 2, T = 5, Hq = 4, Hkv = 2, hd = 4;
  const std::vector<int32_t> start(B, 0);
  AttentionShape shape{B, T, T, Hq, Hkv, hd, start.data()};
  Vec q = random_vec(rng, B * T * Hq * hd), k = random_vec(rng, B * T * Hkv * hd),
      v = random_vec(rng, B * T * Hkv * hd), r = random_vec(rng, B * T * Hq * hd);
  Vec out(q.size()), lse(B * Hq * T), dq(q.size()), dk(k.size()), dv(v.size());
  auto loss = [&] {
    ops.attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), shape);
    return dot(out, r);
  };
  loss();
  ops.attention_backward(dq.data(), dk.data(), dv.data(), r.data(), out.data(), lse.data(),
                         q.data(), k.data(), v.data(), shape);
  expect_gradient("attention dq", q, dq, loss);
  expect_gradient("attention dk", k, dk, loss);
  expect_gradient("attention dv", v, dv, loss);
}

TEST_F(OpGradients, SwigluWithAndWithoutClamping) {
  const int64_t n = 64;
  for (bool clamp_on : {false, true}) {
    SwigluClampConfig clamp{clamp_on, 0.5, 0.7};  // low limits so some units clamp
    Vec g = random_vec(rng, n), u = random_vec(rng, n), r = random_vec(rng, n);
    Vec h(n), dg(n), du(n);
    auto loss = [&] {
      ops.swiglu_forward(h.data(), g.data(), u.data(), n, clamp, nullptr);
      return dot(h, r);
    };
    int64_t counts[2] = {0, 0};
    ops.swiglu_forward(h.data(), g.data(), u.data(), n, clamp, counts);
    ops.swiglu_backward(dg.data(), du.data(), r.data(), g.data(), u.data(), n, clamp);
    if (clamp_on) {
      EXPECT_GT(counts[0], 0);
      EXPECT_GT(counts[1], 0);
      // Clamped units get exactly zero gradient.
      for (int64_t i = 0; i < n; ++i) {
        if (g[i] > clamp.gate_max) { EXPECT_EQ(dg[i], 0.0); }
        if (std::abs(u[i]) > clamp.linear_limit) { EXPECT_EQ(du[i], 0.0); }
      }
    } else {
      EXPECT_EQ(counts[0] + counts[1], 0);
    }
    expect_gradient("swiglu dgate", g, dg, loss, 64);
    expect_gradient("swiglu dup", u, du, loss, 64);
  }
}

TEST_F(OpGradients, RouterDispatchExpertsCombine) {
  // The whole routed path: logits -> router -> dispatch -> per-expert matmul -> combine.
  const int N = 6, E = 4, K = 2, D = 3, F = 5;
  Vec logits = random_vec(rng, N * E), x = random_vec(rng, N * D), w = random_vec(rng, E * F * D);
  Vec bias = {0.3, -0.2, 0.0, 0.1};
  Vec r = random_vec(rng, N * F * 0 + N * D);
  std::vector<int32_t> ids(N * K), offsets(E + 1), sorted_token(N * K), sorted_choice(N * K),
      slot(N * K);
  MoeRouting routing{N, K, E, ids.data(), offsets.data(), sorted_token.data(),
                     sorted_choice.data(), slot.data()};
  Vec w_down = random_vec(rng, E * D * F);
  Vec scores(N * E), gates(N * K), xe(N * K * D), he(N * K * F), ye(N * K * D), out(N * D);
  bool first = true;
  auto loss = [&] {
    // The first call selects experts; later calls replay that selection so finite
    // differences never cross a top-k boundary.
    ops.router_forward(scores.data(), gates.data(), routing, logits.data(), bias.data(), 1.5,
                       !first);
    first = false;
    ops.moe_dispatch_forward(xe.data(), x.data(), routing, D);
    ops.grouped_matmul_forward(he.data(), xe.data(), w.data(), offsets.data(), E, N * K, F, D);
    ops.grouped_matmul_forward(ye.data(), he.data(), w_down.data(), offsets.data(), E, N * K, D, F);
    std::fill(out.begin(), out.end(), 0.0);
    ops.moe_combine_forward(out.data(), ye.data(), gates.data(), routing, D);
    return dot(out, r);
  };
  loss();
  Vec dye(N * K * D), dgates(N * K), dhe(N * K * F), dxe(N * K * D), dx(N * D, 0.0),
      dw(E * F * D, 0.0), dw_down(E * D * F, 0.0), dlogits(N * E);
  ops.moe_combine_backward(dye.data(), dgates.data(), r.data(), ye.data(), gates.data(), routing,
                           D);
  ops.grouped_matmul_backward(dhe.data(), dw_down.data(), dye.data(), he.data(), w_down.data(),
                              offsets.data(), E, D, F, false);
  ops.grouped_matmul_backward(dxe.data(), dw.data(), dhe.data(), xe.data(), w.data(),
                              offsets.data(), E, F, D, false);
  ops.moe_dispatch_backward(dx.data(), dxe.data(), routing, D);
  ops.router_backward(dlogits.data(), dgates.data(), scores.data(), gates.data(), routing, 1.5);
  expect_gradient("moe dx", x, dx, loss);
  expect_gradient("moe dw_gate", w, dw, loss);
  expect_gradient("moe dw_down", w_down, dw_down, loss);
  expect_gradient("router dlogits", logits, dlogits, loss);
}

TEST_F(OpGradients, SequenceBalanceLoss) {
  const int N = 8, E = 4, K = 2, T = 4;
  Vec logits = random_vec(rng, N * E);
  std::vector<int32_t> ids(N * K), offsets(E + 1), st(N * K), sc(N * K), slot(N * K);
  MoeRouting routing{N, K, E, ids.data(), offsets.data(), st.data(), sc.data(), slot.data()};
  Vec scores(N * E), gates(N * K), dlogits(N * E, 0.0), scratch(N * E, 0.0);
  bool first = true;
  auto loss = [&] {
    ops.router_forward(scores.data(), gates.data(), routing, logits.data(), nullptr, 1.0, !first);
    first = false;
    std::fill(scratch.begin(), scratch.end(), 0.0);
    return ops.seq_balance_loss(scratch.data(), scores.data(), routing, T, 0.1, 2.0);
  };
  EXPECT_GT(loss(), 0.0);
  ops.seq_balance_loss(dlogits.data(), scores.data(), routing, T, 0.1, 2.0);
  expect_gradient("balance dlogits", logits, dlogits, loss);
}

TEST_F(OpGradients, CrossEntropyAndEmbedding) {
  const int N = 5, V = 7, D = 3;
  Vec logits = random_vec(rng, N * V), table = random_vec(rng, V * D);
  std::vector<int32_t> targets = {1, 0, 6, 3, 3}, tokens = {2, 2, 5, 0, 6};
  Vec weights = {0.5, 0.0, 1.0, 0.25, 0.25};
  Vec dlogits(N * V);
  auto loss = [&] {
    Vec scratch(N * V);
    return ops.cross_entropy_forward_backward(scratch.data(), logits.data(), targets.data(),
                                              weights.data(), N, V);
  };
  ops.cross_entropy_forward_backward(dlogits.data(), logits.data(), targets.data(),
                                     weights.data(), N, V);
  for (int c = 0; c < V; ++c) EXPECT_EQ(dlogits[1 * V + c], 0.0);  // weight 0: no gradient
  expect_gradient("cross-entropy dlogits", logits, dlogits, loss);

  Vec r = random_vec(rng, N * D), out(N * D), dtable(V * D, 0.0);
  auto emb_loss = [&] {
    ops.embedding_forward(out.data(), tokens.data(), table.data(), N, D);
    return dot(out, r);
  };
  ops.embedding_backward(dtable.data(), r.data(), tokens.data(), N, D, V);
  expect_gradient("embedding dtable", table, dtable, emb_loss);
}

// ---------------------------------------------------------------- whole model

ModelConfig tiny_config(bool clamp_on) {
  ModelConfig c;
  c.vocab_size = 23;
  c.d_model = 16;
  c.n_layers = 3;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 4;
  c.max_seq_len = 8;
  c.n_dense_layers = 1;
  c.d_ff = 12;
  c.n_routed_experts = 4;
  c.n_shared_experts = 1;
  c.top_k = 2;
  c.d_expert = 8;
  c.route_scale = 1.3;
  c.seq_balance_loss = 0.05;
  c.init_std = 0.5;  // large weights so the clamp limits below are actually reached
  c.clamp = SwigluClampConfig{clamp_on, 0.4, 0.4};
  return c;
}

TokenBatch tiny_batch(const ModelConfig& c, Rng& rng) {
  TokenBatch b;
  b.batch = 2;
  b.seq_len = 6;
  for (int i = 0; i < b.batch * b.seq_len; ++i) {
    b.tokens.push_back(int32_t(rng.uniform_int(0, c.vocab_size - 1)));
    b.targets.push_back(int32_t(rng.uniform_int(0, c.vocab_size - 1)));
    b.weights.push_back(i % 5 == 0 ? 0.0f : 0.1f);
  }
  return b;
}

class ModelGradients : public ::testing::TestWithParam<bool> {};

TEST_P(ModelGradients, MatchFiniteDifferencesInDouble) {
  const ModelConfig c = tiny_config(GetParam());
  CpuOps<double> ops;
  Transformer<double> model(ops, c, 2, 8);
  model.init_random(7);
  Rng rng(99);
  // Random, non-zero router bias so selection is not just by affinity.
  for (int64_t i = 0; i < model.buffer_layout().total(); ++i) model.buffers()[i] = 0.05 * rng.normal();
  const TokenBatch batch = tiny_batch(c, rng);

  // Record the routing once and replay it: finite differences must not flip a top-k choice.
  RoutingTrace trace;
  model.forward(batch.tokens.data(), batch.batch, batch.seq_len, nullptr, nullptr, &trace);
  const ForwardStats stats = model.last_stats();
  if (GetParam()) {
    int64_t clamped = 0;
    for (const auto& cc : stats.clamp) clamped += cc.gate + cc.linear;
    EXPECT_GT(clamped, 0) << "the clamp-on case must actually clamp something";
  }

  model.zero_grads();
  model.forward_backward(batch, &trace);
  const int64_t n = model.layout().total();
  std::vector<double> analytic(model.grads(), model.grads() + n);

  for (const TensorSpec& t : model.layout().tensors()) {
    Vec x(model.params() + t.offset, model.params() + t.offset + t.numel);
    Vec g(analytic.begin() + t.offset, analytic.begin() + t.offset + t.numel);
    auto loss = [&] {
      std::copy(x.begin(), x.end(), model.params() + t.offset);
      model.zero_grads();
      return model.forward_backward(batch, &trace);
    };
    expect_gradient(t.name, x, g, loss, 6);
    std::copy(x.begin(), x.end(), model.params() + t.offset);
  }
}

INSTANTIATE_TEST_SUITE_P(ClampOnOff, ModelGradients, ::testing::Values(false, true),
                         [](const auto& test_info) { return test_info.param ? "clamp_on" : "clamp_off"; });

TEST(ModelGradientsFloat, FloatMatchesDoubleReference) {
  const ModelConfig c = tiny_config(true);
  CpuOps<double> ops_d;
  CpuOps<float> ops_f;
  Transformer<double> ref(ops_d, c, 2, 8);
  Transformer<float> model(ops_f, c, 2, 8);
  ref.init_random(11);
  const int64_t n = ref.layout().total();
  for (int64_t i = 0; i < n; ++i) {
    model.params()[i] = float(ref.params()[i]);
    ref.params()[i] = double(model.params()[i]);  // same rounded weights in both
  }
  Rng rng(5);
  const TokenBatch batch = tiny_batch(c, rng);
  RoutingTrace trace;
  ref.forward(batch.tokens.data(), batch.batch, batch.seq_len, nullptr, nullptr, &trace);
  ref.zero_grads();
  model.zero_grads();
  const double loss_d = ref.forward_backward(batch, &trace);
  const double loss_f = model.forward_backward(batch, &trace);
  EXPECT_NEAR(loss_f, loss_d, 1e-4 * std::abs(loss_d));
  for (const TensorSpec& t : ref.layout().tensors()) {
    double scale = 1e-6;
    for (int64_t i = 0; i < t.numel; ++i) scale = std::max(scale, std::abs(ref.grads()[t.offset + i]));
    for (int64_t i = 0; i < t.numel; ++i) {
      ASSERT_NEAR(model.grads()[t.offset + i], ref.grads()[t.offset + i], 2e-3 * scale)
          << t.name << "[" << i << "]";
    }
  }
}

}  // namespace
}  // namespace rlhf
