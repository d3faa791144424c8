#pragma once
// Parsing one JSON record read from outside (a line of a prompt file or of scored data, a
// checkpoint's header). nlohmann keeps only the last value of a key given twice in an object, so
// a record with a repeated key ("prompt" twice, a tensor listed twice) would lose the other value
// without a word; the readers refuse such a record instead, naming the key.
#include <string>
#include <unordered_set>

#include <nlohmann/json.hpp>

namespace rlhf {

// nlohmann::json::parse(text, callback, allow_exceptions) that also sets `repeated_key` to the
// first key the top-level object gives twice ("" when its keys are distinct or it is no object).
inline nlohmann::json parse_json_record(const std::string& text, std::string& repeated_key,
                                        bool allow_exceptions = true) {
  repeated_key.clear();
  std::unordered_set<std::string> seen;  // the top-level object's keys so far
  const auto note_key = [&](int depth, nlohmann::json::parse_event_t event,
                            nlohmann::json& parsed) {
    if (event == nlohmann::json::parse_event_t::key && depth == 1 &&
        !seen.insert(parsed.get<std::string>()).second && repeated_key.empty()) {
      repeated_key = parsed.get<std::string>();
    }
    return true;
  };
  return nlohmann::json::parse(text, note_key, allow_exceptions);
}

}  // namespace rlhf
