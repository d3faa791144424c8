#pragma once
// Parsing one JSON record read from outside (a line of a prompt file or of scored data, a
// checkpoint's header). nlohmann keeps only the last value of a key given twice in an object, so
// a record with a repeated key ("prompt" twice, a tensor listed twice) would lose the other value
// without a word; the readers refuse such a record instead, naming the key.
#include <algorithm>
#include <cstddef>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace rlhf {

// nlohmann::json::parse(text, callback, allow_exceptions) that also sets `repeated_key` to the
// first key the top-level object gives twice ("" when its keys are distinct or it is no object).
inline nlohmann::json parse_json_record(const std::string& text, std::string& repeated_key,
                                        bool allow_exceptions = true) {
  std::vector<std::string> keys;  // the top-level object's keys, in the order they come
  const auto collect_keys = [&keys](int depth, nlohmann::json::parse_event_t event,
                                    nlohmann::json& parsed) {
    if (event == nlohmann::json::parse_event_t::key && depth == 1) {
      keys.push_back(parsed.get<std::string>());
    }
    return true;
  };
  nlohmann::json record = nlohmann::json::parse(text, collect_keys, allow_exceptions);
  repeated_key.clear();
  for (size_t i = 0; i < keys.size() && repeated_key.empty(); ++i) {
    const auto end = keys.begin() + static_cast<std::ptrdiff_t>(i);
    if (std::find(keys.begin(), end, keys[i]) != end) repeated_key = keys[i];
  }
  return record;
}

}  // namespace rlhf
