#pragma once
// Progress for long work: logs "sft step 120/600 loss 1.2340 tok/s 8100 elapsed 0:15 eta 0:42"
// through spdlog at
// most every `interval_s` seconds (and at the last step), so long runs show they are alive.
#include <chrono>
#include <cstdint>
#include <string>

namespace rlhf {

class ProgressMeter {
 public:
  ProgressMeter(std::string label, int64_t total_steps, double interval_s = 5.0);

  // `tokens` is the number processed by this step; `extra` is appended to the line as is.
  void update(int64_t step, double loss, int64_t tokens, const std::string& extra = "");
  double elapsed_s() const;
  double tokens_per_s() const;

 private:
  using Clock = std::chrono::steady_clock;
  std::string label_;
  int64_t total_steps_;
  double interval_s_;
  Clock::time_point start_;
  Clock::time_point last_log_;
  int64_t steps_done_ = 0;
  int64_t tokens_done_ = 0;
};

std::string format_duration(double seconds);

}  // namespace rlhf
