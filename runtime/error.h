// Error handling: every failure is an exception carrying file:line and a sentence a user can act on.
// Destructors never throw; they log through omniq_log_error instead.
#pragma once
#include <stdexcept>
#include <string>

namespace omniq {

// Thrown for every user-facing error (bad input, bad config, device failure).
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// Thrown when a device allocation fails: callers (e.g. a sweep) may catch it specifically.
class OutOfMemoryError : public Error {
 public:
  explicit OutOfMemoryError(const std::string& what) : Error(what) {}
};

// printf-style formatting into a std::string.
std::string strformat(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

[[noreturn]] void throw_error(const char* file, int line, const std::string& msg);
void log_error(const char* file, int line, const std::string& msg);

}  // namespace omniq

// OMNIQ_CHECK(cond, fmt, ...): throws omniq::Error("file:line: <message>") when cond is false.
#define OMNIQ_CHECK(cond, ...)                                                   \
  do {                                                                           \
    if (!(cond)) ::omniq::throw_error(__FILE__, __LINE__, ::omniq::strformat(__VA_ARGS__)); \
  } while (0)

#define OMNIQ_FAIL(...) ::omniq::throw_error(__FILE__, __LINE__, ::omniq::strformat(__VA_ARGS__))
