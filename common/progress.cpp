#include "common/progress.h"

#include <cmath>

#include <fmt/core.h>
#include <spdlog/spdlog.h>

namespace rlhf {

ProgressMeter::ProgressMeter(std::string label, int64_t total_steps, double interval_s)
    : label_(std::move(label)), total_steps_(total_steps), interval_s_(interval_s),
      start_(Clock::now()), last_log_(start_) {}

double ProgressMeter::elapsed_s() const {
  return std::chrono::duration<double>(Clock::now() - start_).count();
}

double ProgressMeter::tokens_per_s() const {
  const double t = elapsed_s();
  return t > 0 ? tokens_done_ / t : 0.0;
}

void ProgressMeter::update(int64_t step, double loss, int64_t tokens, const std::string& extra) {
  ++steps_done_;
  tokens_done_ += tokens;
  const auto now = Clock::now();
  const bool last = step >= total_steps_;
  if (!last && std::chrono::duration<double>(now - last_log_).count() < interval_s_) return;
  last_log_ = now;
  const double elapsed = elapsed_s();
  const double per_step = elapsed / static_cast<double>(steps_done_);
  const double eta = per_step * static_cast<double>(total_steps_ - step);
  spdlog::info("{} step {}/{} loss {:.4f} tok/s {:.0f} elapsed {} eta {}{}{}", label_, step,
               total_steps_, loss, tokens_per_s(), format_duration(elapsed), format_duration(eta),
               extra.empty() ? "" : " ", extra);
}

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) seconds = 0;
  const auto total = static_cast<int64_t>(seconds + 0.5);
  if (total >= 3600) return fmt::format("{}:{:02}:{:02}", total / 3600, total / 60 % 60, total % 60);
  return fmt::format("{}:{:02}", total / 60, total % 60);
}

}  // namespace rlhf
