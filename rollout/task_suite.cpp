#include "rollout/task_suite.h"

#include <string>

#include <fmt/core.h>
#include <fmt/format.h>

#include "common/error.h"
#include "common/yaml_reader.h"
#include "rollout/task_family.h"

namespace rlhf {
namespace {

using task_detail::TaskFamily;

// Seed streams: every example draws from Rng(mix_seed(seed, stream, index)). Training and
// held-out prompts never share a seed, and the flaw decision of a demonstration has its own
// stream so that turning flaws on or off does not change which prompts are trained on.
constexpr uint64_t kTrainStream = 1;
constexpr uint64_t kHeldOutStream = 2;
constexpr uint64_t kFlawStream = 3;

// Held-out prompts are the ones whose hash falls in 1 of kHeldOutBuckets buckets; each split
// redraws until it lands on its side. The partition depends on the prompt text only (not on the
// seed), so no run, whatever its seed, ever trains on a held-out prompt.
constexpr uint64_t kHeldOutBuckets = 8;
// Redraws needed are geometric with mean 8 (held-out) or 8/7 (train); validate() keeps every
// prompt space at 100+ prompts, so running out is an internal error, not an input error.
constexpr int kMaxDrawsPerExample = 1000;

// Limits on the difficulty ranges. The upper ones keep prompts under 24 bytes; the lower ones
// keep every prompt space big enough to split into train and held-out.
constexpr int kMinAddDigits = 1, kMaxAddDigits = 9;     // "123456789+123456789=": 20 bytes
constexpr int kMinSortLen = 2, kMaxSortLen = 9;         // "sort 1 2 3 4 5 6 7 8 9": 22 bytes
constexpr int kMinReverseLen = 2, kMaxReverseLen = 16;  // "rev " + 16 letters: 20 bytes
constexpr int kMinCountLen = 1, kMaxCountLen = 14;      // "count a " + 14 letters: 22 bytes

const std::vector<const TaskFamily*>& all_families() {
  static const std::vector<const TaskFamily*> families = {
      &task_detail::add_task_family(), &task_detail::sort_task_family(),
      &task_detail::reverse_task_family(), &task_detail::count_task_family()};
  return families;
}

const TaskFamily* find_family(std::string_view name) {
  for (const TaskFamily* family : all_families()) {
    if (name == family->name) return family;
  }
  return nullptr;
}

// The family of a record whose prompt parses and whose reference agrees with it.
const TaskFamily& checked_family(const TaskExample& example) {
  const TaskFamily* family = find_family(example.task);
  if (!family) {
    fail("unknown task '{}' (known: {})", example.task, fmt::join(task_family_names(), ", "));
  }
  const std::string expected = family->reference(example.prompt);
  if (example.reference != expected) {
    fail("task '{}': reference '{}' disagrees with prompt '{}' (expected '{}')", example.task,
         example.reference, example.prompt, expected);
  }
  return *family;
}

bool prompt_is_held_out(std::string_view prompt) {
  uint64_t hash = 0xcbf29ce484222325ull;  // FNV-1a
  for (char c : prompt) hash = (hash ^ static_cast<unsigned char>(c)) * 0x100000001b3ull;
  // FNV-1a's low bits depend only on the bytes' low bits ('0' and '8' collide); mix first.
  return splitmix64(hash) % kHeldOutBuckets == 0;
}

void validate_range(const std::string& family, const char* min_key, const char* max_key, int min,
                    int max, int lowest, int highest) {
  if (min < lowest || min > highest) {
    fail("tasks.{}.{}: must be in [{}, {}], got {}", family, min_key, lowest, highest, min);
  }
  if (max < min) {
    fail("tasks.{}.{}: must be >= {} ({}), got {}", family, max_key, min_key, min, max);
  }
  if (max > highest) {
    fail("tasks.{}.{}: must be at most {} (keeps prompts under 24 bytes), got {}", family, max_key,
         highest, max);
  }
}

void validate_fraction(const char* key, double value) {
  if (!(value >= 0.0 && value <= 1.0)) fail("tasks.{}: must be in [0, 1], got {}", key, value);
}

}  // namespace

const char* split_name(Split split) { return split == Split::kTrain ? "train" : "held_out"; }

const std::vector<std::string>& task_family_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> result;
    for (const TaskFamily* family : all_families()) result.emplace_back(family->name);
    return result;
  }();
  return names;
}

void TaskSuiteConfig::validate() const {
  if (families.empty()) fail("tasks.families: must name at least one family");
  for (size_t i = 0; i < families.size(); ++i) {
    if (!find_family(families[i])) {
      fail("tasks.families: unknown family '{}' (known: {})", families[i],
           fmt::join(task_family_names(), ", "));
    }
    for (size_t j = 0; j < i; ++j) {
      if (families[j] == families[i]) fail("tasks.families: '{}' is listed twice", families[i]);
    }
  }
  validate_fraction("flawed_fraction", flawed_fraction);
  validate_range("add", "min_digits", "max_digits", add.min_digits, add.max_digits, kMinAddDigits,
                 kMaxAddDigits);
  validate_fraction("add.subtract_fraction", add.subtract_fraction);
  validate_range("sort", "min_len", "max_len", sort.min_len, sort.max_len, kMinSortLen,
                 kMaxSortLen);
  validate_range("reverse", "min_len", "max_len", reverse.min_len, reverse.max_len, kMinReverseLen,
                 kMaxReverseLen);
  validate_range("count", "min_len", "max_len", count.min_len, count.max_len, kMinCountLen,
                 kMaxCountLen);
}

TaskSuiteConfig TaskSuiteConfig::read(YamlSection& section) {
  TaskSuiteConfig config;
  config.seed = section.get<uint64_t>("seed", config.seed);
  config.families = section.get<std::vector<std::string>>("families", config.families);
  config.flawed_fraction = section.get<double>("flawed_fraction", config.flawed_fraction);
  {
    YamlSection add = section.section("add");
    config.add.min_digits = add.get<int>("min_digits", config.add.min_digits);
    config.add.max_digits = add.get<int>("max_digits", config.add.max_digits);
    config.add.subtract_fraction =
        add.get<double>("subtract_fraction", config.add.subtract_fraction);
    add.finish();
  }
  for (auto [name, range] : {std::pair{"sort", &config.sort}, std::pair{"reverse", &config.reverse},
                             std::pair{"count", &config.count}}) {
    YamlSection list = section.section(name);
    range->min_len = list.get<int>("min_len", range->min_len);
    range->max_len = list.get<int>("max_len", range->max_len);
    list.finish();
  }
  section.finish();
  config.validate();
  return config;
}

std::string TaskSuiteConfig::to_yaml() const {
  // fmt prints doubles in their shortest round-trip form, so read(to_yaml()) is exact.
  return fmt::format(
      "seed: {}\n"
      "families: [{}]\n"
      "flawed_fraction: {}\n"
      "add: {{min_digits: {}, max_digits: {}, subtract_fraction: {}}}\n"
      "sort: {{min_len: {}, max_len: {}}}\n"
      "reverse: {{min_len: {}, max_len: {}}}\n"
      "count: {{min_len: {}, max_len: {}}}\n",
      seed, fmt::join(families, ", "), flawed_fraction, add.min_digits, add.max_digits,
      add.subtract_fraction, sort.min_len, sort.max_len, reverse.min_len, reverse.max_len,
      count.min_len, count.max_len);
}

TaskSuite::TaskSuite(TaskSuiteConfig config) : config_(std::move(config)) {
  config_.validate();
  for (const std::string& name : config_.families) families_.push_back(find_family(name));
}

TaskExample TaskSuite::example(Split split, uint64_t index) const {
  const TaskFamily& family = *families_[index % families_.size()];
  const bool held_out = split == Split::kHeldOut;
  Rng rng(mix_seed(config_.seed, held_out ? kHeldOutStream : kTrainStream, index));
  for (int draw = 0; draw < kMaxDrawsPerExample; ++draw) {
    std::string prompt = family.generate(config_, rng);
    if (prompt_is_held_out(prompt) != held_out) continue;
    std::string reference = family.reference(prompt);
    return TaskExample{family.name, std::move(prompt), std::move(reference)};
  }
  RLHF_CHECK(false, "no {} prompt of task '{}' after {} draws", split_name(split), family.name,
             kMaxDrawsPerExample);
  return {};
}

Demonstration TaskSuite::demonstration(uint64_t index) const {
  Demonstration demo;
  demo.example = example(Split::kTrain, index);
  Rng rng(mix_seed(config_.seed, kFlawStream, index));
  demo.flawed = rng.uniform() < config_.flawed_fraction;
  demo.response =
      demo.flawed ? corrupt_response(demo.example, rng, &demo.flaw) : demo.example.reference;
  return demo;
}

Grade TaskSuite::grade(const TaskExample& example, std::string_view response) const {
  const TaskFamily& family = checked_family(example);
  return family.grade(example.prompt, example.reference, task_detail::trim_space(response));
}

void TaskSuite::check(const TaskExample& example) const { checked_family(example); }

std::string corrupt_response(const TaskExample& example, Rng& rng, std::string* flaw_name) {
  const TaskFamily& family = checked_family(example);
  std::string flaw;
  std::string response = family.corrupt(example.prompt, example.reference, rng, &flaw);
  RLHF_CHECK(response != example.reference, "flaw '{}' left the answer to '{}' unchanged", flaw,
             example.prompt);
  if (flaw_name) *flaw_name = std::move(flaw);
  return response;
}

}  // namespace rlhf
