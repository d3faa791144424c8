#include "learner/stability_experiment.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>

#include <fmt/core.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>
#include <yaml-cpp/yaml.h>

#include "common/error.h"
#include "common/rng.h"
#include "common/yaml_reader.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu_ops.h"
#include "learner/sft.h"
#include "learner/stability.h"

namespace rlhf {

namespace fs = std::filesystem;

namespace {

struct ArmSpec {
  const char* name;
  bool clamping;
  bool anticipatory;
};
constexpr ArmSpec kArms[] = {{"baseline", false, false},
                             {"clamping", true, false},
                             {"anticipatory", false, true},
                             {"both", true, true}};

// The arm's config, written as YAML so its work directory's config.yaml is exactly what it ran:
// clamping on or off, anticipatory routing off or in `mode`, one checkpoint at the end.
RunConfig arm_config(const RunConfig& base, const ArmSpec& arm, AnticipatoryMode mode) {
  YAML::Node root = yaml_load_string(base.source, "the experiment's config");
  root["model"]["clamp"]["enabled"] = arm.clamping;
  root["stability"]["anticipatory_routing"]["mode"] =
      anticipatory_mode_name(arm.anticipatory ? mode : AnticipatoryMode::kOff);
  root["sft"]["checkpoint_every"] = base.sft.steps;
  YAML::Emitter out;
  out << root;
  return RunConfig::load_string(std::string(out.c_str()) + "\n",
                                fmt::format("the {} arm's config", arm.name));
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

}  // namespace

double max_loss_excursion(const std::vector<double>& losses, int window) {
  double worst = 0;
  for (size_t t = size_t(window); t < losses.size(); ++t) {
    if (!std::isfinite(losses[t])) break;  // divergence is reported on its own
    const std::vector<double> before(losses.begin() + long(t) - window, losses.begin() + long(t));
    worst = std::max(worst, losses[t] - median(before));
  }
  return worst;
}

AnticipatoryOverhead measure_anticipatory_overhead(const RunConfig& config, int rounds) {
  RLHF_CHECK(rounds > 0, "overhead rounds must be positive");
  cpu_set_threads(config.runtime.threads);
  const auto tokenizer = make_tokenizer(config.model.tokenizer);
  const TaskSuite suite(config.tasks);
  const std::unique_ptr<Ops<float>> ops = make_float_ops(config.runtime.device);
  Transformer<float> model(*ops, config.model, config.sft.batch_size, config.model.max_seq_len);
  model.init_random(mix_seed(config.sft.seed, 0x1417));
  AdamW<float> optimizer(*ops, model.layout(), config.sft.optimizer);
  const int lag = config.stability.anticipatory.lag;
  AnticipatoryRouting<float> none({AnticipatoryMode::kOff, lag, 1});
  AnticipatoryRouting<float> idle({AnticipatoryMode::kOnSpike, lag, 1});  // no spike: stays off
  AnticipatoryRouting<float> always({AnticipatoryMode::kAlways, lag, 1});
  AnticipatoryRouting<float>* modes[] = {&none, &idle, &always};
  double seconds[3] = {0, 0, 0};
  std::vector<double> round_s[3];
  Rng rng(mix_seed(config.sft.seed, 0x0E7E));
  const int warmup = 3;
  int64_t step = 0;
  for (int round = 0; round < warmup + rounds; ++round) {
    std::vector<uint64_t> indices(config.sft.batch_size);
    for (auto& i : indices) i = rng.next_u64() >> 24;
    const std::vector<TokenBatch> batches = sft_make_batches(
        suite, *tokenizer, indices, config.model.max_seq_len, config.sft.length_buckets);
    for (int k = 0; k < 3; ++k) {
      const int mode = (round + k) % 3;  // rotate the order so no mode always runs first
      const auto start = std::chrono::steady_clock::now();
      modes[mode]->begin_step(model, step);
      model.zero_grads();
      for (const TokenBatch& batch : batches) model.forward_backward(batch);
      optimizer.step(model.params(), model.grads(), step, (warmup + rounds) * 3);
      model.params_changed();
      model.update_router_bias();
      // A read from the backend waits for everything queued before it (ops run in call
      // order), so on a GPU the time below is the whole step and not just its launches.
      float fence = 0;
      ops->copy_to_host(&fence, model.params(), sizeof(fence));
      ++step;
      if (round >= warmup) {
        const double dt =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        seconds[mode] += dt;
        round_s[mode].push_back(dt);
      }
    }
  }
  AnticipatoryOverhead o;
  o.rounds = rounds;
  o.baseline_step_s = seconds[0] / rounds;
  o.off_step_s = seconds[1] / rounds;
  o.on_step_s = seconds[2] / rounds;
  // The overheads are medians of per-round ratios: each round runs all three on the same
  // batch within a fraction of a second, so slow drifts and one-off stalls cancel out.
  std::vector<double> off_ratio, on_ratio;
  for (int r = 0; r < rounds; ++r) {
    off_ratio.push_back(round_s[1][r] / round_s[0][r]);
    on_ratio.push_back(round_s[2][r] / round_s[0][r]);
  }
  o.overhead_off = median(off_ratio) - 1;
  o.overhead_on = median(on_ratio) - 1;
  return o;
}

StabilityReport run_stability_experiment(const RunConfig& config, const std::string& workdir,
                                         int overhead_rounds) {
  StabilityReport report;
  report.outlier_steps = config.stability.stress.outlier_steps;
  report.outlier_scale = config.stability.stress.outlier_scale;
  // Anticipatory arms run in the config's mode; a config that switches it off means "always".
  AnticipatoryMode mode = config.stability.anticipatory.mode;
  if (mode == AnticipatoryMode::kOff) mode = AnticipatoryMode::kAlways;
  report.anticipatory_mode = anticipatory_mode_name(mode);
  report.lag = config.stability.anticipatory.lag;
  for (const ArmSpec& arm : kArms) {
    if (fs::exists(fs::path(workdir) / arm.name / "checkpoint.safetensors")) {
      fail("'{}' already holds a run of the {} arm; choose a new --workdir", workdir, arm.name);
    }
  }
  for (const ArmSpec& arm : kArms) {
    StabilityArmResult r;
    r.name = arm.name;
    r.clamping = arm.clamping;
    r.anticipatory = arm.anticipatory;
    r.workdir = (fs::path(workdir) / arm.name).string();
    spdlog::info("arm {}: clamping {}, anticipatory routing {}", arm.name,
                 arm.clamping ? "on" : "off",
                 arm.anticipatory ? anticipatory_mode_name(mode) : "off");
    SftTrainer trainer(arm_config(config, arm, mode), r.workdir, false);
    trainer.train();
    double on_s = 0, off_s = 0, flips = 0;
    int64_t off_steps = 0;
    for (const TrainStep& s : trainer.history()) {
      r.losses.push_back(s.loss);
      r.spikes += s.spike ? 1 : 0;
      if (s.anticipatory) {
        ++r.anticipatory_steps;
        on_s += s.step_s;
        flips += s.router_flip_rate;
      } else {
        ++off_steps;
        off_s += s.step_s;
      }
    }
    r.steps = int64_t(r.losses.size());
    r.diverged = trainer.diverged_at() >= 0;
    r.max_excursion = max_loss_excursion(r.losses);
    const size_t tail = std::min<size_t>(50, r.losses.size());
    for (size_t i = r.losses.size() - tail; i < r.losses.size(); ++i) {
      r.final_loss += r.losses[i] / double(tail);
    }
    if (r.anticipatory_steps) {
      r.step_s_on = on_s / double(r.anticipatory_steps);
      r.mean_flip_rate = flips / double(r.anticipatory_steps);
    }
    if (off_steps) r.step_s_off = off_s / double(off_steps);
    spdlog::info("arm {}: {} spikes, max excursion {:.3f}, {}final loss {:.4f}", arm.name,
                 r.spikes, r.max_excursion, r.diverged ? "DIVERGED, " : "", r.final_loss);
    report.arms.push_back(std::move(r));
  }
  spdlog::info("measuring anticipatory routing overhead ({} interleaved rounds)", overhead_rounds);
  report.overhead = measure_anticipatory_overhead(config, overhead_rounds);
  return report;
}

std::string stability_table_markdown(const StabilityReport& report) {
  std::string out =
      "| arm | clamping | anticipatory routing | spikes | max loss excursion | diverged | "
      "final loss (last 50 steps) | steps with AR on | mean router flip rate while on |\n"
      "|---|---|---|---:|---:|---|---:|---:|---:|\n";
  for (const StabilityArmResult& a : report.arms) {
    out += fmt::format("| {} | {} | {} | {} | {:.3f} | {} | {:.4f} | {} | {} |\n", a.name,
                       a.clamping ? "on" : "off",
                       a.anticipatory ? fmt::format("{} (lag {})", report.anticipatory_mode,
                                                    report.lag)
                                      : "off",
                       a.spikes, a.max_excursion, a.diverged ? "yes" : "no", a.final_loss,
                       a.anticipatory_steps,
                       a.anticipatory_steps ? fmt::format("{:.3f}", a.mean_flip_rate) : "-");
  }
  const AnticipatoryOverhead& o = report.overhead;
  out += fmt::format(
      "\nAnticipatory routing step time, {} interleaved rounds on one model (overhead: median "
      "per-round ratio): baseline {:.2f} ms, on_spike mode while off {:.2f} ms ({:+.1f}%), on "
      "{:.2f} ms ({:+.1f}%).\n",
      o.rounds, 1e3 * o.baseline_step_s, 1e3 * o.off_step_s, 100 * o.overhead_off,
      1e3 * o.on_step_s, 100 * o.overhead_on);
  return out;
}

std::string stability_loss_plot_svg(const StabilityReport& report) {
  const double width = 900, height = 480, left = 60, right = 150, top = 30, bottom = 50;
  const double plot_w = width - left - right, plot_h = height - top - bottom;
  size_t steps = 1;
  double y_max = 0;
  for (const auto& a : report.arms) {
    steps = std::max(steps, a.losses.size());
    for (double l : a.losses) {
      if (std::isfinite(l)) y_max = std::max(y_max, l);
    }
  }
  y_max = std::min(y_max, 8.0);  // the first steps' loss (about ln 262) would flatten the rest
  y_max = std::ceil(y_max);
  auto x_of = [&](double step) { return left + plot_w * step / double(steps); };
  auto y_of = [&](double loss) {
    return top + plot_h * (1 - std::clamp(loss, 0.0, y_max) / y_max);
  };
  const char* colors[] = {"#d62728", "#1f77b4", "#2ca02c", "#9467bd"};
  std::string svg = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" "
      "font-family=\"sans-serif\" font-size=\"12\">\n"
      "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      "<text x=\"{}\" y=\"18\" font-size=\"14\">Training loss per step (thin) and its 10-step "
      "mean (thick); dashed: injected expert outliers</text>\n",
      width, height, left);
  // Axes, ticks and grid.
  svg += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" "
                     "stroke=\"#444\"/>\n",
                     left, top, plot_w, plot_h);
  for (int i = 0; i <= int(y_max); ++i) {
    svg += fmt::format("<line x1=\"{}\" x2=\"{}\" y1=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"#ddd\"/>"
                       "<text x=\"{}\" y=\"{:.1f}\" text-anchor=\"end\">{}</text>\n",
                       left, left + plot_w, y_of(i), y_of(i), left - 6, y_of(i) + 4, i);
  }
  const int x_tick = steps > 1000 ? 200 : 100;
  for (size_t s = 0; s <= steps; s += x_tick) {
    svg += fmt::format("<text x=\"{:.1f}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
                       x_of(double(s)), top + plot_h + 16, s);
  }
  svg += fmt::format("<text x=\"{:.1f}\" y=\"{}\" text-anchor=\"middle\">step</text>\n",
                     left + plot_w / 2, height - 10);
  svg += fmt::format("<text x=\"14\" y=\"{:.1f}\" transform=\"rotate(-90 14 {:.1f})\" "
                     "text-anchor=\"middle\">loss</text>\n",
                     top + plot_h / 2, top + plot_h / 2);
  for (int64_t s : report.outlier_steps) {
    svg += fmt::format("<line x1=\"{:.1f}\" x2=\"{:.1f}\" y1=\"{}\" y2=\"{}\" stroke=\"#888\" "
                       "stroke-dasharray=\"4 4\"/>\n",
                       x_of(double(s)), x_of(double(s)), top, top + plot_h);
  }
  for (size_t k = 0; k < report.arms.size(); ++k) {
    const auto& losses = report.arms[k].losses;
    const char* color = colors[k % 4];
    std::string raw, smooth;
    double sum = 0;
    for (size_t t = 0; t < losses.size(); ++t) {
      if (!std::isfinite(losses[t])) break;
      raw += fmt::format("{:.1f},{:.1f} ", x_of(double(t)), y_of(losses[t]));
      sum += losses[t];
      if (t >= 10) sum -= losses[t - 10];
      const double mean = sum / double(std::min<size_t>(t + 1, 10));
      smooth += fmt::format("{:.1f},{:.1f} ", x_of(double(t)), y_of(mean));
    }
    svg += fmt::format("<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"0.7\" "
                       "stroke-opacity=\"0.35\"/>\n",
                       raw, color);
    svg += fmt::format("<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" "
                       "stroke-width=\"1.8\"/>\n",
                       smooth, color);
    const double ly = top + 20 + 20 * double(k);
    svg += fmt::format("<line x1=\"{}\" x2=\"{}\" y1=\"{}\" y2=\"{}\" stroke=\"{}\" "
                       "stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">{}</text>\n",
                       left + plot_w + 10, left + plot_w + 30, ly, ly, color, left + plot_w + 36,
                       ly + 4, report.arms[k].name);
  }
  svg += "</svg>\n";
  return svg;
}

}  // namespace rlhf
