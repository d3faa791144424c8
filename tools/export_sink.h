#pragma once
// A JSON-lines output of a command (`db export --out`, `eval grm --records`): stdout, or a
// temporary file beside FILE that is renamed over it once complete.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>

#include <fmt/core.h>

#include "common/error.h"

namespace rlhf::cli {

// Where the JSON lines go: stdout (FILE empty or "-"), or a temporary file beside FILE that is
// renamed over it once complete, so an interrupted command leaves no half-written FILE behind.
class ExportSink {
 public:
  ExportSink(const std::string& path, const std::string& option) : path_(path), option_(option) {
    if (to_stdout()) return;
    temp_ = fmt::format("{}.tmp.{}", path, ::getpid());
    file_.open(temp_, std::ios::binary | std::ios::trunc);
    if (!file_) fail("{} '{}': cannot open '{}' for writing", option_, path, temp_);
  }
  ~ExportSink() {
    if (!temp_.empty() && !committed_) {
      std::error_code ignored;
      std::filesystem::remove(temp_, ignored);
    }
  }
  ExportSink(const ExportSink&) = delete;
  ExportSink& operator=(const ExportSink&) = delete;

  bool to_stdout() const { return path_.empty() || path_ == "-"; }
  std::ostream& stream() { return to_stdout() ? std::cout : file_; }

  void commit() {
    stream().flush();
    if (!stream()) fail("{} '{}': write failed (disk full?)", option_, to_stdout() ? "-" : path_);
    if (to_stdout()) return;
    file_.close();
    if (!file_) fail("{} '{}': write failed (disk full?)", option_, path_);
    std::error_code ec;
    std::filesystem::rename(temp_, path_, ec);
    if (ec) fail("{} '{}': cannot rename '{}' to it: {}", option_, path_, temp_, ec.message());
    committed_ = true;
  }

 private:
  std::string path_;
  std::string option_;  // the command-line option that named the file, for errors
  std::string temp_;
  std::ofstream file_;
  bool committed_ = false;
};

}  // namespace rlhf::cli
