// rlhf bench train|generate: throughput on the CPU backend, each measured next to a baseline
// taken in the same run (the machine's own single-precision GEMM rate), because these
// machines are noisy and absolute numbers from different runs do not compare.
// rlhf bench routing: anticipatory routing's step-time overhead against plain routing,
// interleaved step by step in one run for the same reason.
#include <algorithm>
#include <chrono>
#include <iostream>
#include <vector>

#include <cblas.h>
#include <fmt/core.h>
#include <spdlog/spdlog.h>

#include "common/error.h"
#include "common/rng.h"
#include "kernels/cpu/cpu_ops.h"
#include "learner/optimizer.h"
#include "learner/sft.h"
#include "learner/stability_experiment.h"
#include "model/generate.h"
#include "model/tokenizer.h"
#include "tools/cli.h"
#ifdef RLHF_HAVE_CUDA
#include "tools/cmd_bench_fp4.h"
#endif

namespace rlhf::cli {

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Best-of-n FLOP/s of one square SGEMM through the same BLAS and thread count the model uses:
// the practical peak this machine reaches for single-precision matrix multiplication.
double measure_sgemm_flops(int n, int repeats) {
  std::vector<float> a(size_t(n) * n), b(size_t(n) * n), c(size_t(n) * n);
  Rng rng(3);
  for (auto& x : a) x = float(rng.uniform() - 0.5);
  for (auto& x : b) x = float(rng.uniform() - 0.5);
  double best = 1e30;
  for (int r = 0; r < repeats + 1; ++r) {
    const auto t = Clock::now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, a.data(), n, b.data(), n,
                0.0f, c.data(), n);
    if (r > 0) best = std::min(best, seconds_since(t));  // the first run warms caches and threads
  }
  return 2.0 * n * n * double(n) / best;
}

void bench_train(const CommonOptions& common, int steps, int warmup) {
  const RunConfig config = load_config(common);
  require_cpu_device(config, "bench train");
  cpu_set_threads(config.runtime.threads);
  const auto tokenizer = make_tokenizer(config.model.tokenizer);
  const TaskSuite suite(config.tasks);
  CpuOps<float> ops;
  Transformer<float> model(ops, config.model, config.sft.batch_size, config.model.max_seq_len);
  model.init_random(1);
  AdamW<float> optimizer(ops, model.layout(), config.sft.optimizer);
  spdlog::info("measuring SGEMM peak ({} threads)", cpu_threads());
  const double gemm_flops = measure_sgemm_flops(1024, 5);

  Rng rng(11);
  double time_s = 0, flops = 0;
  int64_t tokens = 0;
  for (int step = 0; step < warmup + steps; ++step) {
    std::vector<uint64_t> indices(config.sft.batch_size);
    for (auto& i : indices) i = rng.next_u64() >> 24;
    const std::vector<TokenBatch> batches = sft_make_batches(
        suite, *tokenizer, indices, config.model.max_seq_len, config.sft.length_buckets);
    const auto t = Clock::now();
    model.zero_grads();
    double step_flops = 0;
    int64_t step_tokens = 0;
    for (const TokenBatch& batch : batches) {
      model.forward_backward(batch);
      // Backward costs two forwards (a gradient for the input and one for the weights).
      step_flops += 3.0 * model.last_forward_flops();
      step_tokens += int64_t(batch.batch) * batch.seq_len;
    }
    optimizer.step(model.params(), model.grads(), step, warmup + steps);
    model.update_router_bias();
    const double dt = seconds_since(t);
    if (step < warmup) continue;
    time_s += dt;
    flops += step_flops;
    tokens += step_tokens;
  }
  const double model_flops = flops / time_s;
  const double utilization = model_flops / gemm_flops;
  std::cout << fmt::format(
      "bench train: {} steps, batch {}, {} threads\n"
      "  tokens/s            {:.0f}\n"
      "  model GFLOP/s       {:.2f}\n"
      "  SGEMM GFLOP/s       {:.2f}  (1024^3, same threads: the baseline)\n"
      "  cpu_utilization     {:.3f}  (model FLOP/s / SGEMM FLOP/s)\n",
      steps, config.sft.batch_size, cpu_threads(), double(tokens) / time_s, model_flops / 1e9,
      gemm_flops / 1e9, utilization);
  print_json(common, {{"command", "bench train"},
                      {"steps", steps},
                      {"threads", cpu_threads()},
                      {"tokens_per_s", double(tokens) / time_s},
                      {"model_flops_per_s", model_flops},
                      {"sgemm_flops_per_s", gemm_flops},
                      {"cpu_utilization", utilization},
                      {"step_ms", 1e3 * time_s / steps}});
}

void bench_generate(const CommonOptions& common, int new_tokens) {
  const RunConfig config = load_config(common);
  require_cpu_device(config, "bench generate");
  cpu_set_threads(config.runtime.threads);
  const auto tokenizer = make_tokenizer(config.model.tokenizer);
  const TaskSuite suite(config.tasks);
  const int max_batch = 64;
  CpuOps<float> ops;
  Transformer<float> model(ops, config.model, max_batch, config.model.max_seq_len);
  model.init_random(1);
  Generator generator(model, *tokenizer, max_batch);
  SamplingParams params;
  params.temperature = 1.0;
  params.stop_at_eos = false;  // a fixed number of decode steps per sequence
  params.seed = 5;
  nlohmann::json rows = nlohmann::json::array();
  std::cout << fmt::format("bench generate: {} threads, random-init model\n", cpu_threads());
  std::cout << fmt::format("  {:>5} {:>14} {:>12}\n", "batch", "decode tok/s", "ms/step");
  for (int batch : {1, 64}) {
    std::vector<std::string> prompts;
    for (int i = 0; i < batch; ++i) prompts.push_back(suite.example(Split::kHeldOut, i).prompt);
    int prompt_max = 0;
    for (const auto& p : prompts) {
      prompt_max = std::max<int>(prompt_max, int(format_prompt(*tokenizer, p).size()));
    }
    params.max_new_tokens = std::min(new_tokens, config.model.max_seq_len - prompt_max);
    generator.generate_text(prompts, params);  // warm-up
    const auto t = Clock::now();
    const auto outputs = generator.generate_text(prompts, params);
    const double dt = seconds_since(t);
    int64_t generated = 0;
    for (const auto& g : outputs) generated += int64_t(g.tokens.size());
    const double tps = double(generated) / dt;
    const double ms_per_step = 1e3 * dt / params.max_new_tokens;
    std::cout << fmt::format("  {:>5} {:>14.0f} {:>12.2f}\n", batch, tps, ms_per_step);
    rows.push_back({{"batch", batch}, {"decode_tokens_per_s", tps}, {"ms_per_step", ms_per_step},
                    {"new_tokens", params.max_new_tokens}});
  }
  print_json(common, {{"command", "bench generate"}, {"threads", cpu_threads()}, {"results", rows}});
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

  struct TrainOptions {
    CommonOptions common;
    int steps = 20;
    int warmup = 3;
  };
  auto train = std::make_shared<TrainOptions>();
  CLI::App* train_cmd = bench->add_subcommand("train", "training tokens/s and CPU utilization");
  add_common_options(*train_cmd, train->common);
  train_cmd->add_option("--steps", train->steps, "measured steps")->check(CLI::PositiveNumber);
  train_cmd->add_option("--warmup", train->warmup, "unmeasured steps first")
      ->check(CLI::NonNegativeNumber);
  train_cmd->callback([train] { bench_train(train->common, train->steps, train->warmup); });

  struct GenerateOptions {
    CommonOptions common;
    int new_tokens = 32;
  };
  auto gen = std::make_shared<GenerateOptions>();
  CLI::App* gen_cmd = bench->add_subcommand("generate", "decode tokens/s at batch 1 and 64");
  add_common_options(*gen_cmd, gen->common);
  gen_cmd->add_option("--new-tokens", gen->new_tokens, "decode steps per sequence")
      ->check(CLI::PositiveNumber);
  gen_cmd->callback([gen] { bench_generate(gen->common, gen->new_tokens); });

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
