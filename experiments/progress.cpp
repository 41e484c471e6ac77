#include "experiments/progress.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>

namespace omniq {

std::string format_duration(double s) {
  char buf[32];
  if (s < 60) {
    std::snprintf(buf, sizeof buf, "%.1fs", s);
  } else if (s < 3600) {
    std::snprintf(buf, sizeof buf, "%dm%02ds", static_cast<int>(s) / 60, static_cast<int>(s) % 60);
  } else {
    std::snprintf(buf, sizeof buf, "%dh%02dm", static_cast<int>(s) / 3600, (static_cast<int>(s) % 3600) / 60);
  }
  return buf;
}

bool ProgressBar::enabled() {
  static bool on = isatty(STDERR_FILENO) && std::getenv("OMNIQ_NO_PROGRESS") == nullptr;
  return on;
}

ProgressBar::ProgressBar(std::string label, int64_t total, std::string unit)
    : label_(std::move(label)), unit_(std::move(unit)), total_(total) {
  start_ = last_draw_ = std::chrono::steady_clock::now();
}

ProgressBar::~ProgressBar() { finish(); }

void ProgressBar::update(int64_t done, const std::string& suffix) {
  done_ = done;
  if (!enabled()) return;
  auto now = std::chrono::steady_clock::now();
  // Redraw at most 10 times a second, and always at the end.
  if (done < total_ && drawn_ && now - last_draw_ < std::chrono::milliseconds(100)) return;
  last_draw_ = now;
  double elapsed = std::chrono::duration<double>(now - start_).count();
  double frac = total_ > 0 ? static_cast<double>(done) / static_cast<double>(total_) : 1.0;
  const int width = 28;
  int filled = static_cast<int>(frac * width);
  std::string bar(static_cast<size_t>(filled), '#');
  bar.resize(width, '.');
  double rate = elapsed > 0 ? static_cast<double>(done) / elapsed : 0;
  std::string eta = (done > 0 && done < total_) ? format_duration(elapsed / static_cast<double>(done) *
                                                                  static_cast<double>(total_ - done))
                                                : "-";
  std::fprintf(stderr, "\r%s [%s] %lld/%lld %.2f %s/s elapsed %s eta %s %s\033[K", label_.c_str(), bar.c_str(),
               static_cast<long long>(done), static_cast<long long>(total_), rate, unit_.c_str(),
               format_duration(elapsed).c_str(), eta.c_str(), suffix.c_str());
  std::fflush(stderr);
  drawn_ = true;
}

void ProgressBar::finish() {
  if (finished_) return;
  finished_ = true;
  if (drawn_) {
    std::fputc('\n', stderr);
    std::fflush(stderr);
  }
}

}  // namespace omniq
