// rlhf plot METRICS: the main curves of a run's metrics.jsonl as one SVG (small multiples, one
// panel per metric, the raw per-step value thin and a 10-step moving mean thick). Works for RL
// runs (reward, ground truth, KL, entropy, clip fraction, logprob mismatch, response length)
// and for SFT runs (loss, grad norm); --keys picks others. SVG, because it needs no library and
// every browser shows it.
#include <cmath>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>

#include <fmt/core.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include "common/error.h"
#include "tools/cli.h"

namespace rlhf::cli {

namespace {

struct Series {
  std::string key;
  std::vector<std::pair<double, double>> points;  // (step, value)
};

// Reads numeric `keys` (dotted paths reach into objects: "time_s.train") from every line.
std::vector<Series> read_series(const std::string& path, const std::vector<std::string>& keys) {
  std::ifstream in(path);
  if (!in) fail("{}: cannot open", path);
  std::vector<Series> series;
  for (const std::string& k : keys) series.push_back({k, {}});
  std::string line;
  int line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (line.empty()) continue;
    const auto row = nlohmann::json::parse(line, nullptr, false);
    if (row.is_discarded() || !row.is_object())
      fail("{}:{}: not a JSON object", path, line_no);
    if (!row.contains("step") || !row["step"].is_number())
      fail("{}:{}: no numeric \"step\"", path, line_no);
    const double step = row["step"].get<double>();
    for (Series& s : series) {
      const nlohmann::json* value = &row;
      std::stringstream parts(s.key);
      std::string part;
      while (value && std::getline(parts, part, '.'))
        value = value->is_object() && value->contains(part) ? &(*value)[part] : nullptr;
      if (value && value->is_number()) s.points.emplace_back(step, value->get<double>());
      else if (value && value->is_boolean()) s.points.emplace_back(step, value->get<bool>() ? 1 : 0);
    }
  }
  return series;
}

std::string plot_svg(const std::vector<Series>& series, const std::string& title) {
  const int columns = 2;
  const double panel_w = 440, panel_h = 220, margin_l = 60, margin_t = 40, gap = 30;
  const int rows = int((series.size() + columns - 1) / columns);
  const double width = columns * (panel_w + margin_l) + gap;
  const double height = margin_t + rows * (panel_h + gap + 20);
  std::string svg = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{:.0f}\" height=\"{:.0f}\" "
      "font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" "
      "fill=\"white\"/>\n<text x=\"10\" y=\"20\" font-size=\"14\">{}</text>\n",
      width, height, title);
  for (size_t k = 0; k < series.size(); ++k) {
    const Series& s = series[k];
    const double x0 = margin_l + double(k % columns) * (panel_w + margin_l);
    const double y0 = margin_t + double(k / columns) * (panel_h + gap + 20);
    svg += fmt::format("<text x=\"{:.0f}\" y=\"{:.0f}\" font-size=\"12\">{}</text>\n", x0,
                       y0 - 6, s.key);
    svg += fmt::format("<rect x=\"{:.0f}\" y=\"{:.0f}\" width=\"{:.0f}\" height=\"{:.0f}\" "
                       "fill=\"none\" stroke=\"#444\"/>\n",
                       x0, y0, panel_w, panel_h);
    if (s.points.empty()) {
      svg += fmt::format("<text x=\"{:.0f}\" y=\"{:.0f}\">(no values)</text>\n", x0 + 10,
                         y0 + 20);
      continue;
    }
    double x_min = s.points.front().first, x_max = x_min, y_min = INFINITY, y_max = -INFINITY;
    for (auto [x, y] : s.points) {
      x_min = std::min(x_min, x);
      x_max = std::max(x_max, x);
      if (std::isfinite(y)) {
        y_min = std::min(y_min, y);
        y_max = std::max(y_max, y);
      }
    }
    if (!std::isfinite(y_min)) y_min = y_max = 0;
    if (y_max == y_min) {
      y_max += 0.5;
      y_min -= 0.5;
    }
    if (x_max == x_min) x_max = x_min + 1;
    auto px = [&](double x) { return x0 + panel_w * (x - x_min) / (x_max - x_min); };
    auto py = [&](double y) { return y0 + panel_h * (1 - (y - y_min) / (y_max - y_min)); };
    for (int t = 0; t <= 4; ++t) {
      const double y = y_min + (y_max - y_min) * t / 4;
      svg += fmt::format("<line x1=\"{:.1f}\" x2=\"{:.1f}\" y1=\"{:.1f}\" y2=\"{:.1f}\" "
                         "stroke=\"#eee\"/><text x=\"{:.1f}\" y=\"{:.1f}\" "
                         "text-anchor=\"end\">{:.3g}</text>\n",
                         x0, x0 + panel_w, py(y), py(y), x0 - 4, py(y) + 4, y);
    }
    svg += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\">{:g}</text><text x=\"{:.1f}\" "
                       "y=\"{:.1f}\" text-anchor=\"end\">step {:g}</text>\n",
                       x0, y0 + panel_h + 14, x_min, x0 + panel_w, y0 + panel_h + 14, x_max);
    std::string raw, smooth;
    double sum = 0;
    size_t in_window = 0;
    for (size_t i = 0; i < s.points.size(); ++i) {
      const auto [x, y] = s.points[i];
      if (!std::isfinite(y)) continue;
      raw += fmt::format("{:.1f},{:.1f} ", px(x), py(y));
      sum += y;
      ++in_window;
      if (i >= 10 && std::isfinite(s.points[i - 10].second)) {
        sum -= s.points[i - 10].second;
        --in_window;
      }
      smooth += fmt::format("{:.1f},{:.1f} ", px(x), py(sum / double(std::max<size_t>(1, in_window))));
    }
    svg += fmt::format("<polyline points=\"{}\" fill=\"none\" stroke=\"#1f77b4\" "
                       "stroke-width=\"0.8\" stroke-opacity=\"0.4\"/>\n<polyline points=\"{}\" "
                       "fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.8\"/>\n",
                       raw, smooth);
  }
  svg += "</svg>\n";
  return svg;
}

}  // namespace

void register_plot(CLI::App& app) {
  struct Options {
    std::string metrics;
    std::string out;
    std::vector<std::string> keys;
    bool json = false;
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("plot", "draw a run's metrics.jsonl curves as an SVG");
  cmd->add_option("metrics", o->metrics, "a metrics.jsonl (RL or SFT run)")->required();
  cmd->add_option("--out", o->out, "output SVG (default: METRICS with .svg)");
  cmd->add_option("--keys", o->keys,
                  "metrics to draw; dotted paths reach into objects (default: the main RL "
                  "curves, or loss and grad_norm for an SFT run)");
  cmd->add_flag("--json", o->json, "print a JSON summary line last");
  cmd->callback([o] {
    std::vector<std::string> keys = o->keys;
    if (keys.empty()) {
      keys = {"reward_mean", "ground_truth_mean", "kl", "entropy", "clip_fraction",
              "logprob_mismatch", "response_tokens", "judge_invalid_rate"};
      // An SFT run has none of those: draw its own curves instead.
      const auto probe = read_series(o->metrics, {"reward_mean"});
      if (probe[0].points.empty()) keys = {"loss", "grad_norm", "lr", "router_flip_rate"};
    }
    const std::vector<Series> series = read_series(o->metrics, keys);
    size_t points = 0;
    for (const Series& s : series) points += s.points.size();
    if (points == 0) fail("{}: none of the keys [{}] has a numeric value", o->metrics, fmt::join(keys, ", "));
    std::string out = o->out;
    if (out.empty()) {
      out = o->metrics;
      const size_t dot = out.rfind(".jsonl");
      out = (dot == std::string::npos ? out : out.substr(0, dot)) + ".svg";
    }
    std::ofstream file(out);
    if (!file) fail("{}: cannot write", out);
    file << plot_svg(series, o->metrics);
    spdlog::info("wrote {} ({} panels)", out, series.size());
    if (o->json) {
      nlohmann::json summary = {{"command", "plot"}, {"out", out}, {"keys", keys}};
      for (const Series& s : series) summary["points"][s.key] = s.points.size();
      std::cout << summary.dump() << std::endl;
    }
  });
}

}  // namespace rlhf::cli
