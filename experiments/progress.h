// A progress bar with rate and ETA on stderr, redrawn in place when stderr is a terminal and
// silent otherwise (logs and CI stay clean).
#pragma once
#include <chrono>
#include <cstdint>
#include <string>

namespace omniq {

class ProgressBar {
 public:
  ProgressBar(std::string label, int64_t total, std::string unit = "it");
  ~ProgressBar();
  void update(int64_t done, const std::string& suffix = "");
  void finish();  // draws the final state and a newline (only if something was drawn)
  static bool enabled();  // stderr is a TTY and OMNIQ_NO_PROGRESS is unset

 private:
  std::string label_, unit_;
  int64_t total_;
  int64_t done_ = 0;
  bool drawn_ = false, finished_ = false;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

// "1h02m", "3m05s", "12.3s"
std::string format_duration(double seconds);

}  // namespace omniq
