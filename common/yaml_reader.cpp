#include "common/yaml_reader.h"

#include <filesystem>

namespace rlhf {

YamlSection::YamlSection(YAML::Node node, std::string path)
    : node_(std::move(node)), path_(std::move(path)) {
  if (node_ && !node_.IsNull() && !node_.IsMap()) {
    fail("{}: expected a mapping of keys to values", path_.empty() ? "config" : path_);
  }
}

bool YamlSection::has(const std::string& key) const {
  return node_ && node_.IsMap() && node_[key];
}

YamlSection YamlSection::section(const std::string& key) {
  read_.insert(key);
  YAML::Node child = (node_ && node_.IsMap()) ? node_[key] : YAML::Node();
  return YamlSection(child, key_path(key));
}

void YamlSection::finish() const {
  if (!node_ || !node_.IsMap()) return;
  std::set<std::string> seen;
  for (const auto& item : node_) {
    const std::string key = item.first.as<std::string>();
    // yaml-cpp keeps both entries of a repeated key and looks up the first, so a second
    // `model:` section (or a key given twice) would be dropped without a word.
    if (!seen.insert(key).second) {
      fail("{}: the key is given twice in this mapping; only one may stay (YAML would use the "
           "first and ignore the other)",
           key_path(key));
    }
    if (!read_.count(key)) {
      std::string known;
      for (const auto& k : read_) known += (known.empty() ? "" : ", ") + k;
      fail("{}: unknown key (known keys here: {})", key_path(key), known);
    }
  }
}

YAML::Node yaml_load_file(const std::string& file) {
  if (!std::filesystem::exists(file)) fail("config file '{}' does not exist", file);
  try {
    return YAML::LoadFile(file);
  } catch (const YAML::Exception& e) {
    fail("config file '{}': YAML error at line {}: {}", file, e.mark.line + 1, e.msg);
  }
}

YAML::Node yaml_load_string(const std::string& text, const std::string& what) {
  try {
    return YAML::Load(text);
  } catch (const YAML::Exception& e) {
    fail("{}: YAML error at line {}: {}", what, e.mark.line + 1, e.msg);
  }
}

}  // namespace rlhf
