// Anticipatory routing and the spike detector (learner/stability.h).
#include <cmath>
#include <functional>
#include <vector>

#include <gtest/gtest.h>

#include "common/error.h"
#include "common/rng.h"
#include "common/yaml_reader.h"
#include "kernels/cpu/cpu_ops.h"
#include "learner/optimizer.h"
#include "learner/stability.h"
#include "learner/stability_experiment.h"
#include "model/transformer.h"

namespace rlhf {
namespace {

// n_layers 3 = one dense and two MoE layers. Tests that compare expert choices with a second
// model use n_layers 2 (one MoE layer): below the first MoE layer the two models' residual
// streams differ (their gates differ), so deeper choices are not comparable.
ModelConfig small_moe_config(int n_layers = 3) {
  ModelConfig c;
  c.vocab_size = 29;
  c.d_model = 16;
  c.n_layers = n_layers;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 4;
  c.max_seq_len = 8;
  c.n_dense_layers = 1;
  c.d_ff = 12;
  c.n_routed_experts = 6;
  c.n_shared_experts = 1;
  c.top_k = 2;
  c.d_expert = 8;
  c.init_std = 0.3;
  c.bias_update_rate = 0.01;
  return c;
}

TokenBatch random_batch(const ModelConfig& c, Rng& rng, int batch = 3, int seq = 7) {
  TokenBatch b;
  b.batch = batch;
  b.seq_len = seq;
  for (int i = 0; i < batch * seq; ++i) {
    b.tokens.push_back(int32_t(rng.uniform_int(0, c.vocab_size - 1)));
    b.targets.push_back(int32_t(rng.uniform_int(0, c.vocab_size - 1)));
    b.weights.push_back(1.0f / float(batch * seq));
  }
  return b;
}

// With lag 0 the selection router is the latest router, so anticipatory routing must compute
// exactly what normal routing computes: same losses, same updated parameters, bit for bit, over
// several optimizer steps (each of which moves the router and its balance bias).
TEST(AnticipatoryRouting, LagZeroIsIdenticalToNormalRouting) {
  const ModelConfig c = small_moe_config();
  CpuOps<float> ops;
  Transformer<float> normal(ops, c, 3, 8), anticipatory(ops, c, 3, 8);
  normal.init_random(3);
  anticipatory.init_random(3);
  OptimizerConfig opt;
  opt.lr = 1e-2;
  opt.warmup_steps = 0;
  AdamW<float> opt_normal(ops, normal.layout(), opt), opt_anticipatory(ops, anticipatory.layout(), opt);
  AnticipatoryRouting<float> routing({AnticipatoryMode::kAlways, /*lag=*/0, /*window=*/1});
  Rng rng(17);
  for (int step = 0; step < 6; ++step) {
    const TokenBatch batch = random_batch(c, rng);
    ASSERT_TRUE(routing.begin_step(anticipatory, step));
    normal.zero_grads();
    anticipatory.zero_grads();
    const double loss_normal = normal.forward_backward(batch);
    const double loss_anticipatory = anticipatory.forward_backward(batch);
    EXPECT_EQ(loss_normal, loss_anticipatory) << "step " << step;
    ASSERT_EQ(anticipatory.last_stats().router_flips.size(), size_t(c.n_moe_layers()));
    for (int64_t flips : anticipatory.last_stats().router_flips) EXPECT_EQ(flips, 0);
    opt_normal.step(normal.params(), normal.grads(), step, 6);
    opt_anticipatory.step(anticipatory.params(), anticipatory.grads(), step, 6);
    normal.update_router_bias();
    anticipatory.update_router_bias();
  }
  for (int64_t i = 0; i < normal.layout().total(); ++i) {
    ASSERT_EQ(normal.params()[i], anticipatory.params()[i]) << "parameter " << i;
  }
}

// With a frozen selection router, the experts chosen are the ones the frozen router picks (not
// the latest router's), and the loss is a smooth function of the latest router: its gradient,
// which flows through the gates, matches central differences.
TEST(AnticipatoryRouting, FrozenSelectionRouterSelectsWhileLatestRouterGetsTheGradient) {
  const ModelConfig c = small_moe_config();
  CpuOps<double> ops;
  Transformer<double> model(ops, c, 3, 8), frozen_copy(ops, c, 3, 8);
  model.init_random(5);
  frozen_copy.init_random(5);
  const std::vector<double> frozen = model.router_state();

  // Move the latest routers far enough that many tokens would be routed differently.
  Rng rng(23);
  const int E = c.n_routed_experts, D = c.d_model;
  for (int l = c.n_dense_layers; l < c.n_layers; ++l) {
    double* router = model.weights().layers[l].router;
    for (int i = 0; i < E * D; ++i) router[i] += 0.6 * rng.normal();
  }
  const TokenBatch batch = random_batch(c, rng);

  // Reference choices: what the frozen router picks (frozen_copy still has it as its router).
  // Compared in the first MoE layer, where both models see the same input (see above).
  RoutingTrace frozen_choice, latest_choice, anticipatory_choice;
  frozen_copy.forward(batch.tokens.data(), batch.batch, batch.seq_len, nullptr, nullptr,
                      &frozen_choice);
  model.forward(batch.tokens.data(), batch.batch, batch.seq_len, nullptr, nullptr,
                &latest_choice);
  const size_t first_layer = size_t(frozen_choice.n_tokens) * c.top_k;
  auto first_moe_layer = [&](const RoutingTrace& t) {
    return std::vector<int32_t>(t.expert_ids.begin(), t.expert_ids.begin() + first_layer);
  };
  ASSERT_NE(first_moe_layer(frozen_choice), first_moe_layer(latest_choice))
      << "the perturbation must change some routing for this test to mean anything";

  model.set_selection_router(frozen);
  model.forward(batch.tokens.data(), batch.batch, batch.seq_len, nullptr, nullptr,
                &anticipatory_choice);
  EXPECT_EQ(first_moe_layer(anticipatory_choice), first_moe_layer(frozen_choice));
  int64_t flips = 0;
  for (int64_t f : model.last_stats().router_flips) flips += f;
  EXPECT_GT(flips, 0);

  model.zero_grads();
  model.forward_backward(batch);
  // forward_backward accumulates gradients, so keep the analytic ones before differencing.
  const std::vector<double> grads(model.grads(), model.grads() + model.layout().total());
  // Finite differences on every MoE router weight. Central differences in double with
  // h = 1e-6: truncation ~1e-12 and rounding ~1e-10 relative, so 1e-5 of the largest gradient
  // entry leaves a wide margin while any missing or wrong gate-path term would be far outside.
  for (int l = c.n_dense_layers; l < c.n_layers; ++l) {
    double* router = model.weights().layers[l].router;
    const double* grad = grads.data() + (router - model.params());
    double scale = 0;
    for (int i = 0; i < E * D; ++i) scale = std::max(scale, std::abs(grad[i]));
    ASSERT_GT(scale, 1e-8) << "the latest router of layer " << l << " receives no gradient";
    std::vector<double> analytic(grad, grad + E * D);
    for (int i = 0; i < E * D; i += 5) {
      const double saved = router[i], h = 1e-6;
      router[i] = saved + h;
      const double up = model.forward_backward(batch);
      router[i] = saved - h;
      const double down = model.forward_backward(batch);
      router[i] = saved;
      EXPECT_NEAR(analytic[i], (up - down) / (2 * h), 1e-5 * scale)
          << "layer " << l << " router weight " << i;
    }
  }
  // Back to normal routing: the latest router's choices again.
  model.clear_selection_router();
  RoutingTrace again;
  model.forward(batch.tokens.data(), batch.batch, batch.seq_len, nullptr, nullptr, &again);
  EXPECT_EQ(again.expert_ids, latest_choice.expert_ids);
  EXPECT_TRUE(model.last_stats().router_flips.empty());
}

TEST(AnticipatoryRouting, SelectionRouterOfTheWrongSizeIsAnError) {
  const ModelConfig c = small_moe_config();
  CpuOps<float> ops;
  Transformer<float> model(ops, c, 1, 8);
  EXPECT_THROW(model.set_selection_router(std::vector<float>(3)), Error);
}

// The history hands out the router of exactly `lag` steps ago once that many steps have run.
TEST(AnticipatoryRouting, AlwaysModeUsesTheRouterFromLagStepsAgo) {
  const ModelConfig c = small_moe_config(2);
  CpuOps<float> ops;
  Transformer<float> model(ops, c, 1, 8), probe(ops, c, 1, 8);
  model.init_random(1);
  probe.init_random(1);
  const int lag = 2;
  AnticipatoryRouting<float> routing({AnticipatoryMode::kAlways, lag, 1});
  std::vector<std::vector<float>> routers;  // router at the start of each step
  Rng rng(4);
  for (int step = 0; step < 5; ++step) {
    routers.push_back(model.router_state());
    routing.begin_step(model, step);
    // What the model selects with now must be what the router `lag` steps back selects.
    const TokenBatch batch = random_batch(c, rng, 1, 8);
    probe.set_selection_router(routers[size_t(std::max(0, step - lag))]);
    RoutingTrace got, want;
    model.forward(batch.tokens.data(), 1, 8, nullptr, nullptr, &got);
    probe.forward(batch.tokens.data(), 1, 8, nullptr, nullptr, &want);
    EXPECT_EQ(got.expert_ids, want.expert_ids) << "step " << step;
    // A new router for the next step.
    for (int l = c.n_dense_layers; l < c.n_layers; ++l) {
      float* router = model.weights().layers[l].router;
      for (int i = 0; i < c.n_routed_experts * c.d_model; ++i) router[i] += float(0.5 * rng.normal());
    }
  }
}

TEST(AnticipatoryRouting, OnSpikeModeOpensAWindowAfterASpike) {
  AnticipatoryRouting<float> routing({AnticipatoryMode::kOnSpike, 4, 10});
  EXPECT_FALSE(routing.on_at(0));
  EXPECT_FALSE(routing.on_at(50));
  routing.on_spike(50);
  EXPECT_FALSE(routing.on_at(50));  // the spiking step's forward has already run
  EXPECT_TRUE(routing.on_at(51));
  EXPECT_TRUE(routing.on_at(60));
  EXPECT_FALSE(routing.on_at(61));
  AnticipatoryRouting<float> off({AnticipatoryMode::kOff, 4, 10});
  off.on_spike(5);
  EXPECT_FALSE(off.on_at(6));
}

// ---------------------------------------------------------------- spike detector

// A smooth, noisy training curve: loss decaying from 3 to 0.5 with 2% multiplicative noise,
// gradient norm drifting down with 10% noise.
std::vector<std::pair<double, double>> smooth_curve(int steps, uint64_t seed) {
  Rng rng(seed);
  std::vector<std::pair<double, double>> curve;
  for (int t = 0; t < steps; ++t) {
    const double loss = (0.5 + 2.5 * std::exp(-t / 150.0)) * (1 + 0.02 * rng.normal());
    const double grad = (0.3 + 2.0 * std::exp(-t / 100.0)) * std::exp(0.1 * rng.normal());
    curve.push_back({loss, grad});
  }
  return curve;
}

TEST(SpikeDetector, QuietOnASmoothCurve) {
  for (uint64_t seed : {1, 2, 3}) {
    SpikeDetector detector(SpikeDetectorConfig{});
    for (const auto& [loss, grad] : smooth_curve(1000, seed)) {
      EXPECT_FALSE(detector.observe(loss, grad).spike) << "seed " << seed;
    }
    EXPECT_EQ(detector.spikes(), 0);
  }
}

TEST(SpikeDetector, FiresOnAnInjectedLossSpikeAndGradientSpike) {
  SpikeDetector detector(SpikeDetectorConfig{});
  auto curve = smooth_curve(600, 9);
  curve[300].first *= 2.0;   // loss doubles for one step
  curve[450].second *= 20;   // the gradient norm jumps 20x for one step
  std::vector<int> fired;
  for (size_t t = 0; t < curve.size(); ++t) {
    const SpikeCheck check = detector.observe(curve[t].first, curve[t].second);
    if (check.spike) fired.push_back(int(t));
    if (t == 300) {
      EXPECT_TRUE(check.loss_spike);
    }
    if (t == 450) {
      EXPECT_TRUE(check.grad_spike);
    }
  }
  EXPECT_EQ(fired, (std::vector<int>{300, 450}));
}

TEST(SpikeDetector, NotDuringWarmupButAlwaysOnANonFiniteLoss) {
  SpikeDetectorConfig config;
  config.warmup = 20;
  SpikeDetector detector(config);
  for (int t = 0; t < 10; ++t) detector.observe(1.0 + 0.01 * t, 1.0);
  EXPECT_FALSE(detector.observe(50.0, 1.0).spike);  // still warming up
  EXPECT_TRUE(detector.observe(std::nan(""), 1.0).spike);
  EXPECT_TRUE(detector.observe(1.0, INFINITY).spike);
}

TEST(SpikeDetector, SkipsUpdatesFarOutsideTheWindowWhenAsked) {
  SpikeDetectorConfig config;
  config.skip_update_z = 8;
  SpikeDetector detector(config);
  const auto curve = smooth_curve(200, 4);
  for (const auto& [loss, grad] : curve) EXPECT_FALSE(detector.observe(loss, grad).skip_update);
  EXPECT_TRUE(detector.observe(curve.back().first, curve.back().second * 1000).skip_update);
}

TEST(StabilityConfig, ReadsAndRejectsBadValuesByName) {
  auto read = [](const std::string& yaml) {
    YamlSection s(yaml_load_string(yaml, "test"), "stability");
    return StabilityConfig::read(s);
  };
  const StabilityConfig c = read(
      "anticipatory_routing: {mode: on_spike, lag: 3, window: 40}\nspike: {loss_z: 5}\n");
  EXPECT_EQ(c.anticipatory.mode, AnticipatoryMode::kOnSpike);
  EXPECT_EQ(c.anticipatory.lag, 3);
  EXPECT_EQ(c.anticipatory.window, 40);
  EXPECT_EQ(c.spike.loss_z, 5);
  auto message = [&](const std::string& yaml) {
    try {
      read(yaml);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message("anticipatory_routing: {mode: sometimes}\n")
                .find("stability.anticipatory_routing.mode"),
            std::string::npos);
  EXPECT_NE(message("anticipatory_routing: {lag: -1}\n").find("stability.anticipatory_routing.lag"),
            std::string::npos);
  EXPECT_NE(message("spike: {decay: 1.5}\n").find("stability.spike.decay"), std::string::npos);
  EXPECT_NE(message("spike: {z: 3}\n").find("z"), std::string::npos);
}


// ---------------------------------------------------------------- stress and experiment helpers

TEST(StressInjection, ScalesOneExpertsGateAndUpPerMoeLayerAndNothingElse) {
  const ModelConfig c = small_moe_config();
  CpuOps<float> ops;
  Transformer<float> model(ops, c, 1, 8);
  model.init_random(2);
  const std::vector<float> before(model.params(), model.params() + model.layout().total());
  const std::vector<int> experts = inject_expert_outlier(model, 30.0, 77);
  ASSERT_EQ(experts.size(), size_t(c.n_moe_layers()));
  const int64_t block = int64_t(c.d_expert) * c.d_model;
  int64_t changed = 0;
  for (int64_t i = 0; i < model.layout().total(); ++i) {
    if (model.params()[i] == before[i]) continue;
    ++changed;
    EXPECT_FLOAT_EQ(model.params()[i], 30.0f * before[i]);
  }
  // Exactly the chosen expert's [Fe, D] gate and up blocks in each MoE layer (random-normal
  // weights are never exactly zero, so every one of them changes).
  EXPECT_EQ(changed, int64_t(c.n_moe_layers()) * 2 * block);
  for (int m = 0; m < c.n_moe_layers(); ++m) {
    const LayerWeights<float>& w = model.weights().layers[c.n_dense_layers + m];
    const int64_t first = (w.expert_gate - model.params()) + experts[m] * block;
    EXPECT_FLOAT_EQ(model.params()[first], 30.0f * before[first]);
  }
}

TEST(StabilityExperiment, LossExcursionIsTheRiseAboveTheRecentMedian) {
  std::vector<double> flat(40, 2.0);
  EXPECT_DOUBLE_EQ(max_loss_excursion(flat), 0.0);
  flat[30] = 3.5;  // one spike of 1.5 over a flat history
  EXPECT_DOUBLE_EQ(max_loss_excursion(flat), 1.5);
  flat[35] = std::nan("");  // divergence ends the scan; it is reported on its own
  EXPECT_DOUBLE_EQ(max_loss_excursion(flat), 1.5);
  // A steadily falling curve never rises above its recent median.
  std::vector<double> falling;
  for (int t = 0; t < 100; ++t) falling.push_back(5.0 - 0.03 * t);
  EXPECT_DOUBLE_EQ(max_loss_excursion(falling), 0.0);
}

}  // namespace
}  // namespace rlhf
