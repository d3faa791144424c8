#pragma once
// Small helpers shared by the test files.
#include <functional>
#include <string>

#include "common/error.h"

namespace rlhf {

// The message of the rlhf::Error that `fn` throws; "" when it throws none.
inline std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace rlhf
