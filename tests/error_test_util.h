// The message of an expected omniq::Error, shared by the YAML layer tests
// (tests/test_experiment_config.cpp, tests/test_sweep_paper.cpp).
#pragma once
#include <gtest/gtest.h>

#include <string>

#include "runtime/error.h"

namespace omniq::error_test {

// The error message of `f`, or a failure when it does not throw omniq::Error.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an omniq::Error";
  return "";
}

}  // namespace omniq::error_test
