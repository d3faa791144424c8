#include "rollout/prompt_jsonl.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/json_record.h"

namespace rlhf {
namespace {

constexpr const char* kKeys[] = {"task", "prompt", "reference"};

bool is_blank(const std::string& line) {
  return std::all_of(line.begin(), line.end(),
                     [](char c) { return c == ' ' || c == '\t' || c == '\r'; });
}

// nlohmann's message starts with "[json.exception.parse_error.101] parse error at line 1,
// column 5: "; inside one JSONL line only the part after the column is worth showing.
std::string parse_error_detail(const nlohmann::json::parse_error& error) {
  const std::string what = error.what();
  const size_t column = what.find("column ");
  const size_t colon = column == std::string::npos ? column : what.find(": ", column);
  const std::string detail = colon == std::string::npos ? what : what.substr(colon + 2);
  return fmt::format("column {}: {}", error.byte, detail);
}

TaskExample parse_record(const std::string& line, const std::string& where) {
  nlohmann::json record;
  std::string repeated_key;
  try {
    record = parse_json_record(line, repeated_key);
  } catch (const nlohmann::json::parse_error& e) {
    fail("{}: not valid JSON ({})", where, parse_error_detail(e));
  }
  if (!record.is_object()) fail("{}: expected a JSON object, got {}", where, record.type_name());
  if (!repeated_key.empty()) fail("{}: key '{}' is given twice", where, repeated_key);
  for (const auto& item : record.items()) {
    if (std::find(std::begin(kKeys), std::end(kKeys), item.key()) == std::end(kKeys)) {
      fail("{}: unknown key '{}' (expected task, prompt, reference)", where, item.key());
    }
  }
  std::string values[3];
  for (int i = 0; i < 3; ++i) {
    const auto value = record.find(kKeys[i]);
    if (value == record.end()) fail("{}: missing key '{}'", where, kKeys[i]);
    if (!value->is_string()) {
      fail("{}: key '{}' must be a string, got {}", where, kKeys[i], value->type_name());
    }
    values[i] = value->get<std::string>();
  }
  const std::vector<std::string>& known = task_family_names();
  if (std::find(known.begin(), known.end(), values[0]) == known.end()) {
    fail("{}: unknown task '{}' (known: {})", where, values[0], fmt::join(known, ", "));
  }
  return TaskExample{values[0], values[1], values[2]};
}

// Makes a finished rename survive a crash; some filesystems cannot fsync a directory, and the
// file itself is already complete, so a failure here is not worth failing the write for.
void sync_parent_directory(const std::filesystem::path& path) {
  const std::filesystem::path parent = path.has_parent_path() ? path.parent_path() : ".";
  const int fd = ::open(parent.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

}  // namespace

std::vector<TaskExample> read_prompts_jsonl(const std::string& path,
                                            const TaskSuite* validate_with) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("prompts file '{}': cannot open: {}", path, std::strerror(errno));
  std::vector<TaskExample> examples;
  std::string line;
  for (int64_t line_number = 1; std::getline(in, line); ++line_number) {
    if (is_blank(line)) continue;
    const std::string where = fmt::format("{}:{}", path, line_number);
    TaskExample example = parse_record(line, where);
    if (validate_with) {
      try {
        validate_with->check(example);
      } catch (const Error& e) {
        fail("{}: {}", where, e.what());
      }
    }
    examples.push_back(std::move(example));
  }
  if (in.bad()) fail("prompts file '{}': read error: {}", path, std::strerror(errno));
  return examples;
}

void write_prompts_jsonl(const std::string& path, const std::vector<TaskExample>& examples) {
  std::string text;
  for (size_t i = 0; i < examples.size(); ++i) {
    // ordered_json keeps the keys in the documented order (task, prompt, reference).
    const nlohmann::ordered_json record = {{"task", examples[i].task},
                                           {"prompt", examples[i].prompt},
                                           {"reference", examples[i].reference}};
    try {
      text += record.dump();
    } catch (const nlohmann::json::type_error&) {
      fail("prompts file '{}': record {} (task '{}') is not valid UTF-8", path, i,
           examples[i].task);
    }
    text += '\n';
  }

  const std::string temp = fmt::format("{}.tmp.{}", path, ::getpid());
  std::FILE* file = std::fopen(temp.c_str(), "wb");
  if (!file) fail("prompts file '{}': cannot create '{}': {}", path, temp, std::strerror(errno));
  const bool written = std::fwrite(text.data(), 1, text.size(), file) == text.size() &&
                       std::fflush(file) == 0 && ::fsync(::fileno(file)) == 0;
  const int saved_errno = errno;
  const bool closed = std::fclose(file) == 0;
  if (!written || !closed) {
    std::remove(temp.c_str());
    fail("prompts file '{}': cannot write '{}': {}", path, temp,
         std::strerror(written ? errno : saved_errno));
  }
  std::error_code error;
  std::filesystem::rename(temp, path, error);
  if (error) {
    std::remove(temp.c_str());
    fail("prompts file '{}': cannot replace it with '{}': {}", path, temp, error.message());
  }
  sync_parent_directory(path);
}

}  // namespace rlhf
