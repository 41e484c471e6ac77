#include "runtime/error.h"

#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <vector>

namespace omniq {

std::string strformat(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  va_list copy;
  va_copy(copy, args);
  int n = std::vsnprintf(nullptr, 0, fmt, copy);
  va_end(copy);
  std::string out;
  if (n > 0) {
    std::vector<char> buf(static_cast<size_t>(n) + 1);
    std::vsnprintf(buf.data(), buf.size(), fmt, args);
    out.assign(buf.data(), static_cast<size_t>(n));
  }
  va_end(args);
  return out;
}

static const char* short_path(const char* file) {
  // Keep the path relative to the repository (drop everything up to the layer folder).
  static const char* layers[] = {"runtime/", "ops/", "autograd/", "models/", "quant/", "experiments/", "tests/", "bench/"};
  const char* best = file;
  for (const char* layer : layers) {
    for (const char* p = file; (p = std::strstr(p, layer)); ++p) {
      if ((p == file || p[-1] == '/') && p > best) best = p;  // the rightmost layer folder
    }
  }
  return best;
}

void throw_error(const char* file, int line, const std::string& msg) {
  if (msg.rfind("out of memory", 0) == 0 || msg.find("out of GPU memory") != std::string::npos) {
    throw OutOfMemoryError(strformat("%s:%d: %s", short_path(file), line, msg.c_str()));
  }
  throw Error(strformat("%s:%d: %s", short_path(file), line, msg.c_str()));
}

void log_error(const char* file, int line, const std::string& msg) {
  std::fprintf(stderr, "omniq error (%s:%d): %s\n", short_path(file), line, msg.c_str());
}

}  // namespace omniq
