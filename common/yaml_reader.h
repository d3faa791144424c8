#pragma once
// Strict reading of one YAML mapping: every key must be known, every value must have the
// right type, and errors name the full key path ("model.d_model: expected an integer, got 'x'").
// A section reader is finished with `finish()`, which rejects keys nobody asked for.
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include <yaml-cpp/yaml.h>

#include "common/error.h"

namespace rlhf {

class YamlSection {
 public:
  // `node` may be null/undefined (section absent): every get() then returns its default.
  YamlSection(YAML::Node node, std::string path);

  template <typename T>
  T get(const std::string& key, const T& fallback);
  template <typename T>
  T require(const std::string& key);
  bool has(const std::string& key) const;
  YamlSection section(const std::string& key);
  // Rejects keys that were present in the YAML but never read, and keys given twice.
  void finish() const;

  const std::string& path() const { return path_; }
  std::string key_path(const std::string& key) const {
    return path_.empty() ? key : path_ + "." + key;
  }

 private:
  template <typename T>
  T convert(const YAML::Node& value, const std::string& key) const;

  YAML::Node node_;
  std::string path_;
  std::set<std::string> read_;
};

// Loads a YAML file; a missing file or a syntax error is an rlhf::Error naming the file.
YAML::Node yaml_load_file(const std::string& file);
YAML::Node yaml_load_string(const std::string& text, const std::string& what);

template <typename T>
T YamlSection::get(const std::string& key, const T& fallback) {
  read_.insert(key);
  if (!node_ || !node_.IsMap() || !node_[key]) return fallback;
  return convert<T>(node_[key], key);
}

template <typename T>
T YamlSection::require(const std::string& key) {
  read_.insert(key);
  if (!node_ || !node_.IsMap() || !node_[key]) fail("{}: required key is missing", key_path(key));
  return convert<T>(node_[key], key);
}

template <typename T>
T YamlSection::convert(const YAML::Node& value, const std::string& key) const {
  const char* expected = "a value of the right type";
  if constexpr (std::is_same_v<T, bool>) expected = "true or false";
  else if constexpr (std::is_integral_v<T>) expected = "an integer";
  else if constexpr (std::is_floating_point_v<T>) expected = "a number";
  else if constexpr (std::is_same_v<T, std::string>) expected = "a string";
  else expected = "a list";
  if (!value.IsScalar() && !std::is_same_v<T, std::vector<std::string>> &&
      !std::is_same_v<T, std::vector<int>> && !std::is_same_v<T, std::vector<int64_t>>) {
    fail("{}: expected {}, got a {}", key_path(key), expected,
         value.IsMap() ? "mapping" : value.IsSequence() ? "list" : "null");
  }
  try {
    return value.as<T>();
  } catch (const YAML::Exception&) {
    fail("{}: expected {}, got '{}'", key_path(key), expected,
         value.IsScalar() ? value.Scalar() : std::string("<non-scalar>"));
  }
}

}  // namespace rlhf
