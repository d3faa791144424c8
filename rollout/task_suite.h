#pragma once
// The built-in task suite: small, exactly gradable tasks (addition, sorting, reversal, letter
// counting) that the embedded default config trains on. Everything is deterministic by
// (seed, split, index), every task has a ground-truth grader with partial credit, and a fraction
// of the supervised demonstrations carries a realistic flaw so that a model trained on them is
// good but imperfect (leaving room for RL to improve it).
//
// Prompts stay under 24 bytes and answers under 18: the default run trains a tiny byte-level
// model on 2 CPU cores. Prompt and answer syntax, grading rules and config keys: docs/tasks.md.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/rng.h"

namespace rlhf {

class YamlSection;

// One task instance. `task` is the family name ("add", "sort", "reverse", "count"); `reference`
// is the one exactly right answer, which always follows from the prompt.
struct TaskExample {
  std::string task;
  std::string prompt;
  std::string reference;
};

struct Grade {
  double score = 0.0;  // 0..10; 10 exactly when the (whitespace-trimmed) response is the reference
  bool correct = false;  // score == 10
  std::string reason;    // one line, e.g. "expected 122; 2 of 3 digits right, sign right"
};

// Held-out examples come from their own seed stream AND from a part of the prompt space that
// training never draws from (a fixed hash partition of prompt strings), so held-out accuracy
// measures generalization rather than memorization.
enum class Split { kTrain, kHeldOut };
const char* split_name(Split split);

struct AddTaskConfig {
  int min_digits = 1;              // digits per operand, drawn uniformly in [min, max]
  int max_digits = 2;              // at most 9, so a prompt is at most 20 bytes
  double subtract_fraction = 0.5;  // share of "a-b=" prompts (results may be negative)
};

struct ListTaskConfig {  // sort: number of digits; reverse and count: letters in the word
  int min_len = 0;
  int max_len = 0;
};

struct TaskSuiteConfig {
  uint64_t seed = 1;
  std::vector<std::string> families = {"add", "sort", "reverse", "count"};  // round-robin order
  double flawed_fraction = 0.1;  // share of demonstrations whose response carries a flaw
  AddTaskConfig add;
  ListTaskConfig sort = {3, 5};     // at most 9 digits
  ListTaskConfig reverse = {3, 6};  // at most 16 letters
  ListTaskConfig count = {4, 8};    // at most 14 letters

  // Throws rlhf::Error naming the first invalid value ("tasks.add.max_digits: ...").
  void validate() const;
  // Reads the `tasks:` section strictly (unknown keys are errors) and validates it.
  static TaskSuiteConfig read(YamlSection& section);
  // The body of a `tasks:` section that `read` accepts and that reproduces this config exactly.
  std::string to_yaml() const;
};

// A supervised example: the prompt, and the response the model is trained to produce. When
// `flawed`, the response differs from the reference (it grades below 10) and `flaw` names the
// kind ("wrong_digit", "off_by_one", "sign_error", "swap", "drop", "duplicate").
struct Demonstration {
  TaskExample example;
  std::string response;
  bool flawed = false;
  std::string flaw;
};

namespace task_detail {
struct TaskFamily;
}

class TaskSuite {
 public:
  // Throws rlhf::Error if the config is invalid.
  explicit TaskSuite(TaskSuiteConfig config);

  // The example at `index` of a split. The family is chosen round-robin over config.families.
  TaskExample example(Split split, uint64_t index) const;
  // The training example at `index` with its response; flawed with probability flawed_fraction,
  // decided by a seed stream of its own (so the example equals example(kTrain, index)).
  Demonstration demonstration(uint64_t index) const;
  // Grades a response against the truth recomputed from the prompt. A malformed task record
  // (unknown task, prompt that does not parse, reference that disagrees with the prompt) is an
  // rlhf::Error; a bad response is just a low score. Any known family can be graded, enabled or
  // not (imported prompts may use families this suite does not generate).
  Grade grade(const TaskExample& example, std::string_view response) const;
  // Throws rlhf::Error naming the problem if the record is malformed (see grade()).
  void check(const TaskExample& example) const;

  const TaskSuiteConfig& config() const { return config_; }

 private:
  TaskSuiteConfig config_;
  std::vector<const task_detail::TaskFamily*> families_;  // config_.families, resolved
};

// Names of all task families, in their default order.
const std::vector<std::string>& task_family_names();

// A plausible wrong answer to `example`: the reference with one realistic mistake of a kind that
// fits the family (a wrong digit, an off-by-one, a flipped sign, a swapped, dropped or duplicated
// item). Always differs from the reference, so it grades below 10. The kind is written to
// `flaw_name` if not null. Throws rlhf::Error if the example is malformed.
std::string corrupt_response(const TaskExample& example, Rng& rng, std::string* flaw_name);

}  // namespace rlhf
