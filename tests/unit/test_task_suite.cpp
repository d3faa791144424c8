// The built-in task suite: generators, graders, flawed demonstrations, config and JSONL prompts.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "common/error.h"
#include "common/yaml_reader.h"
#include "rollout/prompt_jsonl.h"
#include "rollout/task_suite.h"

namespace rlhf {
namespace {

TaskSuiteConfig config_with_seed(uint64_t seed) {
  TaskSuiteConfig config;
  config.seed = seed;
  return config;
}

// The smallest difficulty ranges validate() allows: the hardest case for splitting prompts into
// train and held-out.
TaskSuiteConfig smallest_config() {
  TaskSuiteConfig config;
  config.add = {1, 1, 0.5};
  config.sort = {2, 2};
  config.reverse = {2, 2};
  config.count = {1, 1};
  return config;
}

// The largest ranges: the longest prompts.
TaskSuiteConfig largest_config() {
  TaskSuiteConfig config;
  config.add = {9, 9, 0.5};
  config.sort = {9, 9};
  config.reverse = {16, 16};
  config.count = {14, 14};
  return config;
}

TaskSuiteConfig read_config(const std::string& yaml) {
  YamlSection section(yaml_load_string(yaml, "test config"), "tasks");
  return TaskSuiteConfig::read(section);
}

// The message of the rlhf::Error that `action` throws; fails the test if it throws none.
template <typename Action>
std::string error_message(Action action) {
  try {
    action();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an rlhf::Error";
  return "";
}

double score(const TaskSuite& suite, const TaskExample& example, std::string_view response) {
  return suite.grade(example, response).score;
}

// ---------------------------------------------------------------------------------- generators

TEST(TaskSuiteGenerate, SameSeedAndIndexGiveTheSameExample) {
  const TaskSuite a(config_with_seed(7));
  const TaskSuite b(config_with_seed(7));
  for (uint64_t i = 0; i < 200; ++i) {
    for (Split split : {Split::kTrain, Split::kHeldOut}) {
      const TaskExample x = a.example(split, i);
      const TaskExample y = b.example(split, i);
      EXPECT_EQ(x.task, y.task);
      EXPECT_EQ(x.prompt, y.prompt);
      EXPECT_EQ(x.reference, y.reference);
    }
  }
}

// The default run's training data must not change silently: trained checkpoints and reported
// accuracies refer to it. If a generator change is intended, update these strings.
TEST(TaskSuiteGenerate, DefaultPromptsArePinned) {
  const TaskSuite suite{TaskSuiteConfig{}};
  std::vector<std::string> train;
  std::vector<std::string> held_out;
  for (uint64_t i = 0; i < 8; ++i) {
    train.push_back(suite.example(Split::kTrain, i).prompt);
    held_out.push_back(suite.example(Split::kHeldOut, i).prompt);
  }
  EXPECT_EQ(train,
            (std::vector<std::string>{"9-3=", "sort 9 6 5 5", "rev zozz", "count p ptlwupoy",
                                      "0+53=", "sort 6 5 6 7", "rev blbv", "count c corccwcs"}));
  EXPECT_EQ(held_out,
            (std::vector<std::string>{"60+3=", "sort 8 9 9 9", "rev rlmo", "count h rhjkhhvh",
                                      "4-3=", "sort 9 0 9 3", "rev ozxco", "count n oxsnnbn"}));
}

TEST(TaskSuiteGenerate, FamiliesAreRoundRobinInConfigOrder) {
  TaskSuiteConfig config;
  config.families = {"count", "add"};
  const TaskSuite suite(config);
  for (uint64_t i = 0; i < 20; ++i) {
    EXPECT_EQ(suite.example(Split::kTrain, i).task, i % 2 == 0 ? "count" : "add");
    EXPECT_EQ(suite.example(Split::kHeldOut, i).task, i % 2 == 0 ? "count" : "add");
  }
}

TEST(TaskSuiteGenerate, DifferentSeedsGiveDifferentPrompts) {
  const TaskSuite a(config_with_seed(1));
  const TaskSuite b(config_with_seed(2));
  int differing = 0;
  for (uint64_t i = 0; i < 400; ++i) {
    differing += a.example(Split::kTrain, i).prompt != b.example(Split::kTrain, i).prompt;
  }
  // Short additions can coincide by chance (1-digit pairs are ~1/200 of each other); 90% is a
  // loose floor for independent streams and far above what a seed-ignoring generator gives (0).
  EXPECT_GT(differing, 360);
}

TEST(TaskSuiteGenerate, HeldOutPromptsNeverAppearInTraining) {
  for (const TaskSuiteConfig& config : {TaskSuiteConfig{}, smallest_config()}) {
    const TaskSuite suite(config);
    std::set<std::string> train;
    for (uint64_t i = 0; i < 8000; ++i) train.insert(suite.example(Split::kTrain, i).prompt);
    int same_index_equal = 0;
    for (uint64_t i = 0; i < 1000; ++i) {
      const TaskExample held_out = suite.example(Split::kHeldOut, i);
      EXPECT_EQ(train.count(held_out.prompt), 0u) << held_out.prompt;
      same_index_equal += held_out.prompt == suite.example(Split::kTrain, i).prompt;
    }
    EXPECT_EQ(same_index_equal, 0);
  }
}

TEST(TaskSuiteGenerate, PromptsRespectTheConfiguredRanges) {
  TaskSuiteConfig config;
  config.add = {3, 4, 0.0};
  config.sort = {6, 7};
  config.reverse = {9, 10};
  config.count = {2, 3};
  const TaskSuite suite(config);
  for (uint64_t i = 0; i < 800; ++i) {
    const TaskExample x = suite.example(i % 3 == 0 ? Split::kHeldOut : Split::kTrain, i);
    if (x.task == "add") {
      const size_t plus = x.prompt.find('+');
      ASSERT_NE(plus, std::string::npos) << "subtract_fraction 0 gave " << x.prompt;
      const size_t a_digits = plus;
      const size_t b_digits = x.prompt.size() - plus - 2;
      EXPECT_TRUE(a_digits >= 3 && a_digits <= 4 && b_digits >= 3 && b_digits <= 4) << x.prompt;
      EXPECT_NE(x.prompt[0], '0') << x.prompt;
    } else if (x.task == "sort") {
      const size_t items = (x.prompt.size() - 4) / 2;  // "sort" then " d" per item
      EXPECT_TRUE(items >= 6 && items <= 7) << x.prompt;
    } else if (x.task == "reverse") {
      const size_t letters = x.prompt.size() - 4;  // "rev "
      EXPECT_TRUE(letters >= 9 && letters <= 10) << x.prompt;
    } else {
      const size_t letters = x.prompt.size() - 8;  // "count a "
      EXPECT_TRUE(letters >= 2 && letters <= 3) << x.prompt;
    }
  }
}

TEST(TaskSuiteGenerate, SubtractFractionOneGivesOnlySubtractions) {
  TaskSuiteConfig config;
  config.families = {"add"};
  config.add.subtract_fraction = 1.0;
  const TaskSuite suite(config);
  int negative = 0;
  for (uint64_t i = 0; i < 300; ++i) {
    const TaskExample x = suite.example(Split::kTrain, i);
    EXPECT_NE(x.prompt.find('-'), std::string::npos) << x.prompt;
    negative += x.reference[0] == '-';
  }
  EXPECT_GT(negative, 50);  // about half of a-b with a, b of equal length are negative
}

TEST(TaskSuiteGenerate, PromptsAndAnswersStayShort) {
  for (const TaskSuiteConfig& config : {TaskSuiteConfig{}, largest_config()}) {
    const TaskSuite suite(config);
    for (uint64_t i = 0; i < 2000; ++i) {
      const TaskExample x = suite.example(i % 2 ? Split::kTrain : Split::kHeldOut, i);
      EXPECT_LT(x.prompt.size(), 24u) << x.prompt;
      EXPECT_LT(x.reference.size(), 18u) << x.reference;
    }
  }
}

TEST(TaskSuiteGenerate, CountAnswersAreSpreadOut) {
  TaskSuiteConfig config;
  config.families = {"count"};
  const TaskSuite suite(config);
  std::map<std::string, int> answers;
  for (uint64_t i = 0; i < 1000; ++i) ++answers[suite.example(Split::kTrain, i).reference];
  // Without planting the asked letter, "0" would be the answer ~79% of the time.
  EXPECT_LT(answers["0"], 300);
  EXPECT_GT(answers["2"], 100);
}

// ------------------------------------------------------------------------------------- grading

TEST(TaskSuiteGrade, ReferenceAlwaysScoresTen) {
  for (const TaskSuiteConfig& config : {TaskSuiteConfig{}, smallest_config(), largest_config()}) {
    const TaskSuite suite(config);
    std::set<std::string> families_seen;
    for (uint64_t i = 0; i < 2000; ++i) {
      const TaskExample x = suite.example(i % 5 == 0 ? Split::kHeldOut : Split::kTrain, i);
      const Grade grade = suite.grade(x, x.reference);
      EXPECT_EQ(grade.score, 10.0) << x.prompt << " -> " << x.reference << ": " << grade.reason;
      EXPECT_TRUE(grade.correct);
      families_seen.insert(x.task);
    }
    EXPECT_EQ(families_seen.size(), 4u);
  }
}

TEST(TaskSuiteGrade, SurroundingWhitespaceIsIgnored) {
  const TaskSuite suite{TaskSuiteConfig{}};
  EXPECT_EQ(score(suite, {"add", "37+85=", "122"}, " 122\n"), 10.0);
  EXPECT_EQ(score(suite, {"sort", "sort 5 2 9 1", "1 2 5 9"}, "1 2 5 9\n"), 10.0);
}

TEST(TaskSuiteGrade, AddPartialCreditOrder) {
  const TaskSuite suite{TaskSuiteConfig{}};
  const TaskExample x{"add", "37+85=", "122"};
  const double exact = score(suite, x, "122");
  const double sign_wrong = score(suite, x, "-122");
  const double one_digit_wrong = score(suite, x, "132");
  const double digit_dropped = score(suite, x, "22");
  const double all_wrong = score(suite, x, "999");
  EXPECT_EQ(exact, 10.0);
  EXPECT_DOUBLE_EQ(sign_wrong, 9.0);             // 9 for 3/3 digits, sign lost
  EXPECT_DOUBLE_EQ(one_digit_wrong, 7.0);        // 9 * 2/3 + 1
  EXPECT_DOUBLE_EQ(digit_dropped, 7.0);          // right-aligned: "22" matches the last two
  EXPECT_DOUBLE_EQ(score(suite, x, "12"), 4.0);  // right-aligned, only the units match
  EXPECT_EQ(all_wrong, 0.0);
  EXPECT_GT(sign_wrong, one_digit_wrong);
  EXPECT_GT(one_digit_wrong, all_wrong);
  // Negative results: the sign is part of the answer.
  const TaskExample negative{"add", "14-91=", "-77"};
  EXPECT_EQ(score(suite, negative, "-77"), 10.0);
  EXPECT_DOUBLE_EQ(score(suite, negative, "77"), 9.0);
  EXPECT_FALSE(suite.grade(negative, "77").correct);
}

TEST(TaskSuiteGrade, SortPartialCreditOrder) {
  const TaskSuite suite{TaskSuiteConfig{}};
  const TaskExample x{"sort", "sort 5 2 9 1", "1 2 5 9"};
  const double one_swap = score(suite, x, "1 2 9 5");  // 2 of 4 in place, same items
  const double invented = score(suite, x, "1 2 7 7");  // 2 of 4 in place, other items
  const double reversed = score(suite, x, "9 5 2 1");  // 0 in place, same items
  const double unspaced = score(suite, x, "1259");     // right digits, wrong spacing
  EXPECT_DOUBLE_EQ(one_swap, 6.0);
  EXPECT_DOUBLE_EQ(invented, 4.0);
  EXPECT_DOUBLE_EQ(reversed, 2.0);
  EXPECT_DOUBLE_EQ(unspaced, 9.0);
  // A dropped first item: 3 of 4 in place counted from the right end, items lost.
  EXPECT_DOUBLE_EQ(score(suite, x, "2 5 9"), 6.0);
  EXPECT_FALSE(suite.grade(x, "1259").correct);
  EXPECT_EQ(score(suite, x, "8 8 8 8"), 0.0);
  EXPECT_GT(one_swap, invented);  // not the input's multiset costs
}

TEST(TaskSuiteGrade, ReversePartialCreditOrder) {
  const TaskSuite suite{TaskSuiteConfig{}};
  const TaskExample x{"reverse", "rev hello", "olleh"};
  const double one_wrong = score(suite, x, "olleb");
  const double doubled = score(suite, x, "ollehh");  // 5 of 6 in place from the left
  const double dropped = score(suite, x, "oleh");    // 3 of 5 from the right
  const double echoed = score(suite, x, "hello");    // only the middle 'l' lines up
  EXPECT_DOUBLE_EQ(one_wrong, 8.0);
  EXPECT_NEAR(doubled, 10.0 * 5 / 6, 1e-12);
  EXPECT_DOUBLE_EQ(dropped, 6.0);
  EXPECT_DOUBLE_EQ(echoed, 2.0);
  EXPECT_EQ(score(suite, x, "xyzzy"), 0.0);
  EXPECT_GT(one_wrong, dropped);
  EXPECT_GT(dropped, echoed);
  // A length mismatch always costs, even with every letter of the reference in place.
  EXPECT_LT(score(suite, x, "ollehx"), 10.0);
}

TEST(TaskSuiteGrade, CountExactOffByOneOrNothing) {
  const TaskSuite suite{TaskSuiteConfig{}};
  const TaskExample x{"count", "count a banana", "3"};
  EXPECT_EQ(score(suite, x, "3"), 10.0);
  EXPECT_EQ(score(suite, x, "2"), 4.0);
  EXPECT_EQ(score(suite, x, "4"), 4.0);
  EXPECT_EQ(score(suite, x, "5"), 0.0);
  EXPECT_EQ(score(suite, {"count", "count z banana", "0"}, "0"), 10.0);
}

TEST(TaskSuiteGrade, GarbageScoresZeroWithAReason) {
  const TaskSuite suite{TaskSuiteConfig{}};
  const std::vector<std::pair<TaskExample, std::vector<std::string>>> cases = {
      {{"add", "37+85=", "122"}, {"", "  \n", "abc", "12a", "--122", "-", "1 22", "+122"}},
      {{"sort", "sort 5 2 9 1", "1 2 5 9"}, {"", "a b c", "1,2,5,9", "sort 1 2 5 9"}},
      {{"reverse", "rev hello", "olleh"}, {"", "OLLEH", "ol leh", "0lleh"}},
      {{"count", "count a banana", "3"}, {"", "-3", "3.0", "three", "03", "3 3"}},
  };
  for (const auto& [example, responses] : cases) {
    for (const std::string& response : responses) {
      const Grade grade = suite.grade(example, response);
      EXPECT_EQ(grade.score, 0.0) << example.task << " '" << response << "'";
      EXPECT_FALSE(grade.correct);
      EXPECT_NE(grade.reason.find("expected " + example.reference), std::string::npos)
          << grade.reason;
    }
  }
}

TEST(TaskSuiteGrade, MalformedRecordsAreErrorsNamingTheProblem) {
  const TaskSuite suite{TaskSuiteConfig{}};
  const std::vector<std::pair<TaskExample, std::string>> cases = {
      {{"mul", "3*4=", "12"}, "unknown task 'mul'"},
      {{"add", "37*85=", "122"}, "prompt '37*85=' does not parse"},
      {{"add", "37+85", "122"}, "does not parse"},
      {{"add", "-3+5=", "2"}, "does not parse"},
      {{"sort", "sort 5 12", "5 12"}, "prompt 'sort 5 12' does not parse"},
      {{"sort", "sort", ""}, "does not parse"},
      {{"sort", "rev abc", "cba"}, "task 'sort': prompt 'rev abc' does not parse"},
      {{"reverse", "rev Hello", "olleH"}, "does not parse"},
      {{"reverse", "rev ", ""}, "does not parse"},
      {{"count", "count ab banana", "3"}, "does not parse"},
      {{"add", "37+85=", "121"}, "reference '121' disagrees with prompt '37+85=' (expected '122')"},
      {{"sort", "sort 5 2 9 1", "1 2 9 5"}, "expected '1 2 5 9'"},
      {{"reverse", "rev hello", "hello"}, "expected 'olleh'"},
      {{"count", "count a banana", " 3"}, "expected '3'"},
  };
  for (const auto& [example, problem] : cases) {
    const std::string message = error_message([&] { suite.grade(example, "x"); });
    EXPECT_NE(message.find(problem), std::string::npos) << message;
    EXPECT_EQ(error_message([&] { suite.check(example); }), message);
    Rng rng(1);
    EXPECT_EQ(error_message([&] { corrupt_response(example, rng, nullptr); }), message);
  }
}

// ------------------------------------------------------------------------------ demonstrations

TEST(TaskSuiteDemonstration, FlawedFractionAndFlawsGradeBelowTen) {
  const TaskSuite suite{TaskSuiteConfig{}};  // flawed_fraction 0.1
  int flawed = 0;
  const int n = 2000;
  for (uint64_t i = 0; i < n; ++i) {
    const Demonstration demo = suite.demonstration(i);
    const TaskExample train = suite.example(Split::kTrain, i);
    EXPECT_EQ(demo.example.prompt, train.prompt);
    const Grade grade = suite.grade(demo.example, demo.response);
    if (demo.flawed) {
      ++flawed;
      EXPECT_NE(demo.response, demo.example.reference);
      EXPECT_LT(grade.score, 10.0) << demo.example.prompt << " -> " << demo.response;
      EXPECT_FALSE(demo.flaw.empty());
    } else {
      EXPECT_EQ(demo.response, demo.example.reference);
      EXPECT_TRUE(demo.flaw.empty());
    }
  }
  // Binomial(2000, 0.1): mean 200, sd 13.4; +-60 is 4.5 sd.
  EXPECT_NEAR(flawed, 200, 60);
}

TEST(TaskSuiteDemonstration, EveryFamilyGetsItsFlawKinds) {
  TaskSuiteConfig config;
  config.flawed_fraction = 1.0;
  const TaskSuite suite(config);
  std::map<std::string, std::set<std::string>> kinds;
  for (uint64_t i = 0; i < 800; ++i) {
    const Demonstration demo = suite.demonstration(i);
    ASSERT_TRUE(demo.flawed);
    EXPECT_LT(suite.grade(demo.example, demo.response).score, 10.0);
    kinds[demo.example.task].insert(demo.flaw);
  }
  using Kinds = std::set<std::string>;
  EXPECT_EQ(kinds["add"], (Kinds{"wrong_digit", "off_by_one", "sign_error"}));
  EXPECT_EQ(kinds["sort"], (Kinds{"swap", "drop", "duplicate"}));
  EXPECT_EQ(kinds["reverse"], (Kinds{"swap", "drop", "duplicate"}));
  EXPECT_EQ(kinds["count"], (Kinds{"off_by_one"}));
}

TEST(TaskSuiteDemonstration, ZeroFlawedFractionGivesOnlyReferences) {
  TaskSuiteConfig config;
  config.flawed_fraction = 0.0;
  const TaskSuite suite(config);
  for (uint64_t i = 0; i < 500; ++i) {
    const Demonstration demo = suite.demonstration(i);
    EXPECT_FALSE(demo.flawed);
    EXPECT_EQ(demo.response, demo.example.reference);
  }
}

TEST(TaskSuiteDemonstration, CorruptionAlwaysChangesEvenDegenerateAnswers) {
  // Answers where most flaws would be no-ops: all items equal, a single letter, a zero result.
  const TaskSuite suite{TaskSuiteConfig{}};
  const std::vector<TaskExample> examples = {
      {"sort", "sort 3 3 3", "3 3 3"}, {"sort", "sort 7", "7"}, {"reverse", "rev aaaa", "aaaa"},
      {"reverse", "rev q", "q"},       {"add", "5-5=", "0"},    {"add", "0+0=", "0"},
      {"count", "count z abc", "0"}};
  for (const TaskExample& x : examples) {
    Rng rng(42);
    for (int trial = 0; trial < 50; ++trial) {
      std::string flaw;
      const std::string response = corrupt_response(x, rng, &flaw);
      EXPECT_NE(response, x.reference) << x.prompt << " flaw " << flaw;
      EXPECT_LT(score(suite, x, response), 10.0) << x.prompt << " -> " << response;
    }
  }
}

// -------------------------------------------------------------------------------------- config

TEST(TaskSuiteConfigRead, EmptySectionGivesDefaults) {
  const TaskSuiteConfig config = read_config("{}");
  EXPECT_EQ(config.to_yaml(), TaskSuiteConfig{}.to_yaml());
  EXPECT_EQ(config.families, (std::vector<std::string>{"add", "sort", "reverse", "count"}));
  EXPECT_EQ(config.flawed_fraction, 0.1);
  EXPECT_EQ(config.add.min_digits, 1);
  EXPECT_EQ(config.add.max_digits, 2);
  EXPECT_EQ(config.sort.max_len, 5);
  EXPECT_EQ(config.reverse.max_len, 6);
  EXPECT_EQ(config.count.min_len, 4);
}

TEST(TaskSuiteConfigRead, ReadsValuesAndRoundTripsThroughYaml) {
  const TaskSuiteConfig config = read_config(
      "seed: 18446744073709551615\n"
      "families: [reverse, add]\n"
      "flawed_fraction: 0.37\n"
      "add: {min_digits: 2, max_digits: 5, subtract_fraction: 0.123456789}\n"
      "sort: {max_len: 8}\n"
      "count: {min_len: 2, max_len: 14}\n");
  EXPECT_EQ(config.seed, 18446744073709551615ull);
  EXPECT_EQ(config.families, (std::vector<std::string>{"reverse", "add"}));
  EXPECT_EQ(config.flawed_fraction, 0.37);
  EXPECT_EQ(config.add.max_digits, 5);
  EXPECT_EQ(config.add.subtract_fraction, 0.123456789);
  EXPECT_EQ(config.sort.min_len, 3);  // default kept
  EXPECT_EQ(config.sort.max_len, 8);
  EXPECT_EQ(config.count.max_len, 14);
  const TaskSuiteConfig again = read_config(config.to_yaml());
  EXPECT_EQ(again.to_yaml(), config.to_yaml());
  EXPECT_EQ(again.seed, config.seed);
  EXPECT_EQ(again.add.subtract_fraction, config.add.subtract_fraction);
}

TEST(TaskSuiteConfigRead, BadValuesAreErrorsNamingTheKey) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"add: {max_digits: 0}", "tasks.add.max_digits: must be >= min_digits (1), got 0"},
      {"add: {min_digits: 0, max_digits: 0}", "tasks.add.min_digits: must be in [1, 9], got 0"},
      {"add: {max_digits: 10}", "tasks.add.max_digits: must be at most 9"},
      {"add: {subtract_fraction: -0.5}",
       "tasks.add.subtract_fraction: must be in [0, 1], got -0.5"},
      {"sort: {min_len: 1}", "tasks.sort.min_len: must be in [2, 9], got 1"},
      {"sort: {max_len: 10}", "tasks.sort.max_len: must be at most 9"},
      {"reverse: {min_len: 7}", "tasks.reverse.max_len: must be >= min_len (7), got 6"},
      {"reverse: {max_len: 17}", "tasks.reverse.max_len: must be at most 16"},
      {"count: {min_len: 0}", "tasks.count.min_len: must be in [1, 14], got 0"},
      {"flawed_fraction: 1.5", "tasks.flawed_fraction: must be in [0, 1], got 1.5"},
      {"families: []", "tasks.families: must name at least one family"},
      {"families: [add, mul]", "tasks.families: unknown family 'mul'"},
      {"families: [add, sort, add]", "tasks.families: 'add' is listed twice"},
      {"families: add", "tasks.families: expected a list"},
      {"colour: blue", "tasks.colour: unknown key"},
      {"add: {max_digit: 3}", "tasks.add.max_digit: unknown key"},
      {"sort: 5", "tasks.sort: expected a mapping"},
      {"seed: abc", "tasks.seed: expected an integer"},
      {"seed: -1", "tasks.seed: expected an integer"},
      {"count: {max_len: 3.5}", "tasks.count.max_len: expected an integer"},
  };
  for (const auto& [yaml, problem] : cases) {
    const std::string message = error_message([&] { read_config(yaml); });
    EXPECT_NE(message.find(problem), std::string::npos) << yaml << " -> " << message;
  }
}

TEST(TaskSuiteConfigRead, SuiteRejectsAnInvalidConfig) {
  TaskSuiteConfig config;
  config.sort = {5, 3};
  const std::string message = error_message([&] { TaskSuite suite(config); });
  EXPECT_NE(message.find("tasks.sort.max_len"), std::string::npos) << message;
}

// --------------------------------------------------------------------------------------- JSONL

class PromptJsonlTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("rlhf_test_prompts_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string write_text(const std::string& name, const std::string& text) {
    const std::string path = (dir_ / name).string();
    std::ofstream(path, std::ios::binary) << text;
    return path;
  }

  std::filesystem::path dir_;
  const TaskSuite suite_{TaskSuiteConfig{}};
};

TEST_F(PromptJsonlTest, RoundTrip) {
  std::vector<TaskExample> examples;
  for (uint64_t i = 0; i < 40; ++i) {
    examples.push_back(suite_.example(i % 2 ? Split::kHeldOut : Split::kTrain, i));
  }
  const std::string path = (dir_ / "prompts.jsonl").string();
  write_prompts_jsonl(path, {{"add", "1+1=", "2"}});  // replaced by the next write
  write_prompts_jsonl(path, examples);
  const std::vector<TaskExample> back = read_prompts_jsonl(path, &suite_);
  ASSERT_EQ(back.size(), examples.size());
  for (size_t i = 0; i < back.size(); ++i) {
    EXPECT_EQ(back[i].task, examples[i].task);
    EXPECT_EQ(back[i].prompt, examples[i].prompt);
    EXPECT_EQ(back[i].reference, examples[i].reference);
  }
  // Documented key order, and no temporary file left beside it.
  std::ifstream in(path);
  std::string first_line;
  std::getline(in, first_line);
  EXPECT_EQ(first_line.rfind("{\"task\":\"add\",\"prompt\":", 0), 0u) << first_line;
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir_),
                          std::filesystem::directory_iterator()),
            1);
}

TEST_F(PromptJsonlTest, BlankLinesAreSkippedButCounted) {
  const std::string path =
      write_text("blank.jsonl",
                 "\n{\"task\":\"add\",\"prompt\":\"2+2=\",\"reference\":\"4\"}\n  \r\n"
                 "{\"task\":\"count\",\"prompt\":\"count a aa\",\"reference\":\"2\"}\n\n"
                 "{\"task\":\"add\",\"prompt\":\"2+2=\"}\n");
  const std::string message = error_message([&] { read_prompts_jsonl(path, nullptr); });
  EXPECT_NE(message.find(path + ":6: missing key 'reference'"), std::string::npos) << message;
  write_text("blank.jsonl",
             "\n{\"task\":\"add\",\"prompt\":\"2+2=\",\"reference\":\"4\"}\n  \r\n"
             "{\"task\":\"count\",\"prompt\":\"count a aa\",\"reference\":\"2\"}\r\n\n");
  const std::vector<TaskExample> examples = read_prompts_jsonl(path, &suite_);
  ASSERT_EQ(examples.size(), 2u);
  EXPECT_EQ(examples[1].prompt, "count a aa");
}

TEST_F(PromptJsonlTest, BadLinesAreErrorsWithFileAndLine) {
  const std::string good = "{\"task\":\"add\",\"prompt\":\"2+2=\",\"reference\":\"4\"}\n";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{\"task\":\"add\",", ":2: not valid JSON"},
      {"[1, 2]", ":2: expected a JSON object, got array"},
      {"{\"task\":\"add\",\"prompt\":\"2+2=\"}", ":2: missing key 'reference'"},
      {"{\"task\":\"add\",\"prompt\":22,\"reference\":\"4\"}",
       ":2: key 'prompt' must be a string, got number"},
      {"{\"task\":\"mul\",\"prompt\":\"2*2=\",\"reference\":\"4\"}", ":2: unknown task 'mul'"},
      {"{\"task\":\"add\",\"prompt\":\"2+2=\",\"reference\":\"4\",\"id\":1}",
       ":2: unknown key 'id'"},
      {"{\"task\":\"add\",\"prompt\":\"2+2=\",\"reference\":\"4\",\"prompt\":\"3+3=\"}",
       ":2: key 'prompt' is given twice"},
  };
  for (const auto& [bad_line, problem] : cases) {
    const std::string path = write_text("bad.jsonl", good + bad_line + "\n" + good);
    const std::string message = error_message([&] { read_prompts_jsonl(path, nullptr); });
    EXPECT_NE(message.find(path + problem), std::string::npos) << message;
  }
}

TEST_F(PromptJsonlTest, SuiteValidatesPromptAndReference) {
  const std::string path =
      write_text("wrong.jsonl", "{\"task\":\"add\",\"prompt\":\"2+2=\",\"reference\":\"5\"}\n");
  EXPECT_EQ(read_prompts_jsonl(path, nullptr).size(), 1u);  // only the shape is checked
  const std::string message = error_message([&] { read_prompts_jsonl(path, &suite_); });
  EXPECT_NE(message.find(path + ":1: task 'add': reference '5' disagrees"), std::string::npos)
      << message;
  write_text("wrong.jsonl", "{\"task\":\"sort\",\"prompt\":\"sort 1 x\",\"reference\":\"1 x\"}\n");
  EXPECT_NE(
      error_message([&] { read_prompts_jsonl(path, &suite_); }).find(":1: task 'sort': prompt"),
      std::string::npos);
}

TEST_F(PromptJsonlTest, MissingFileAndUnwritableTargetAreErrors) {
  const std::string missing = (dir_ / "nope.jsonl").string();
  EXPECT_NE(error_message([&] { read_prompts_jsonl(missing, nullptr); }).find(missing),
            std::string::npos);
  const std::string in_missing_dir = (dir_ / "no_such_dir" / "p.jsonl").string();
  EXPECT_NE(error_message([&] { write_prompts_jsonl(in_missing_dir, {}); }).find(in_missing_dir),
            std::string::npos);
}

}  // namespace
}  // namespace rlhf
