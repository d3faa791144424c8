#pragma once
// Two error channels (see docs/architecture.md):
//  - rlhf::Error: recoverable, caused by input (config, CLI, files, checkpoints). Carries one
//    clear line naming what was wrong; the CLI prints it and exits non-zero.
//  - RLHF_CHECK: a broken internal invariant (a programming error). Fatal, with file:line.
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include <fmt/core.h>

namespace rlhf {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw Error(fmt::format(format, std::forward<Args>(args)...));
}

[[noreturn]] inline void check_failed(const char* expr, const char* file, int line,
                                      const std::string& message) {
  std::fprintf(stderr, "rlhf: internal check failed: %s (%s) at %s:%d\n", expr, message.c_str(),
               file, line);
  std::abort();
}

}  // namespace rlhf

#define RLHF_CHECK(cond, ...)                                                          \
  do {                                                                                 \
    if (!(cond)) ::rlhf::check_failed(#cond, __FILE__, __LINE__, fmt::format("" __VA_ARGS__)); \
  } while (0)
