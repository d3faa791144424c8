// Scored-data files and the judge-data builder (reward/scored_data.h), and the Spearman
// correlation of `rlhf eval grm`.
#include <cctype>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <utility>

#include <gtest/gtest.h>

#include "common/error.h"
#include "learner/grm.h"
#include "learner/run_config.h"
#include "reward/grm_eval.h"
#include "reward/scored_data.h"
#include "tests/test_support.h"

namespace rlhf {
namespace {

namespace fs = std::filesystem;

fs::path write_lines(const std::string& name, const std::string& text) {
  const fs::path path = fs::temp_directory_path() / (name + "_" + std::to_string(::getpid()) + ".jsonl");
  std::ofstream(path) << text;
  return path;
}

std::string error_of(const std::string& text) {
  const fs::path path = write_lines("bad", text);
  try {
    read_scored_jsonl(path.string());
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

TEST(ScoredData, RoundTripsBothRecordKinds) {
  ScoredData data;
  data.pointwise.push_back({"12+7=", "18", std::nullopt, "expected 19; 1 of 2 digits right", 5});
  data.pointwise.push_back({"rev abc", "cba\nScore: 1", std::string("cba"), "", 1});
  data.pairwise.push_back({"sort 3 1 2", "1 2 3", "3 2 1", std::nullopt,
                           "expected 1 2 3; A: exact; B: 1 of 3 in place", Verdict::kA});
  const fs::path path = fs::temp_directory_path() / ("rt_" + std::to_string(::getpid()) + ".jsonl");
  write_scored_jsonl(path.string(), data);
  const ScoredData back = read_scored_jsonl(path.string());
  ASSERT_EQ(back.pointwise.size(), 2u);
  ASSERT_EQ(back.pairwise.size(), 1u);
  EXPECT_EQ(back.pointwise[1].response, "cba\nScore: 1");
  EXPECT_EQ(back.pointwise[1].reference, std::optional<std::string>("cba"));
  EXPECT_EQ(back.pointwise[0].score, 5);
  EXPECT_EQ(back.pairwise[0].verdict, Verdict::kA);
  EXPECT_EQ(back.pairwise[0].reasoning, data.pairwise[0].reasoning);
}

TEST(ScoredData, BadLinesNameTheFileLineAndKey) {
  const std::string good = R"({"prompt":"1+1=","response":"2","reasoning":"expected 2; exact","score":10})";
  EXPECT_NE(error_of(good + "\n{not json\n").find(":2: not valid JSON"), std::string::npos);
  EXPECT_NE(error_of(R"({"prompt":"1+1=","response":"2","reasoning":"r","score":11})")
                .find(":1: key 'score' must be in 1..10"),
            std::string::npos);
  EXPECT_NE(error_of(R"({"prompt":"1+1=","response":"2","reasoning":"r","score":"7"})")
                .find("key 'score' must be an integer"),
            std::string::npos);
  EXPECT_NE(error_of(R"({"prompt":"","response":"2","reasoning":"r","score":7})")
                .find("key 'prompt' is empty"),
            std::string::npos);
  EXPECT_NE(error_of(R"({"prompt":"x","response":"2","score":7})").find("key 'reasoning' is missing"),
            std::string::npos);
  EXPECT_NE(error_of(R"({"prompt":"x","response":"2","reasoning":"r","score":7,"scroe":1})")
                .find("unknown key 'scroe'"),
            std::string::npos);
  EXPECT_NE(error_of(R"({"prompt":"x","response_a":"1","response_b":"2","reasoning":"r","verdict":"C"})")
                .find("key 'verdict' must be"),
            std::string::npos);
  EXPECT_NE(error_of(R"({"prompt":"x","response":"2","reasoning":"r\n","score":7})")
                .find("must not end with a newline"),
            std::string::npos);
  EXPECT_NE(error_of("[1,2]\n").find("must be a JSON object"), std::string::npos);
  EXPECT_NE(error_of("\n\n").find("has no records"), std::string::npos);
  // A key given twice: a JSON parser keeps one of the two values; the reader refuses the line.
  EXPECT_NE(error_of(R"({"prompt":"1+1=","response":"2","reasoning":"r","score":7,"score":3})")
                .find(":1: key 'score' is given twice"),
            std::string::npos);
}

TEST(JudgeData, BuilderGradesEveryResponseAndExplainsIt) {
  const TaskSuite suite(TaskSuiteConfig{});
  JudgeDataOptions options;
  options.prompts = 200;
  options.pairwise_fraction = 1.0;
  const ScoredData data = build_judge_data(suite, Split::kTrain, nullptr, options);
  // Without a policy: the reference and one corrupted reference per prompt.
  ASSERT_EQ(data.pointwise.size(), 400u);
  EXPECT_GT(data.pairwise.size(), 150u);
  int tens = 0, lower = 0;
  for (const ScoredExample& e : data.pointwise) {
    ASSERT_GE(e.score, 1);
    ASSERT_LE(e.score, 10);
    // The reasoning recomputes the reference and compares the response with it.
    const TaskExample ex{"", e.prompt, ""};
    EXPECT_EQ(e.reasoning.rfind("expected ", 0), 0u) << e.reasoning;
    EXPECT_NE(e.reasoning.find("; got " + e.response + "; "), std::string::npos) << e.reasoning;
    if (e.score == 10) {
      ++tens;
      EXPECT_NE(e.reasoning.find("; exact"), std::string::npos) << e.reasoning;
    } else {
      ++lower;
      EXPECT_EQ(e.reasoning.find("; exact"), std::string::npos) << e.reasoning;
    }
    (void)ex;
  }
  EXPECT_EQ(tens, 200);  // every reference, and no corrupted one, is exact
  EXPECT_EQ(lower, 200);
  for (const PairwiseExample& e : data.pairwise) {
    EXPECT_NE(e.response_a, e.response_b);
    // Here one side is always the reference: the verdict must name it.
    const bool a_exact = e.reasoning.find("A " + e.response_a + ": exact") != std::string::npos;
    const bool b_exact = e.reasoning.find("B " + e.response_b + ": exact") != std::string::npos;
    ASSERT_NE(a_exact, b_exact) << e.reasoning;
    EXPECT_EQ(e.verdict, a_exact ? Verdict::kA : Verdict::kB) << e.reasoning;
  }
  // The no-reasoning ablation keeps the scores and drops the reasoning.
  options.reasoning = false;
  const ScoredData bare = build_judge_data(suite, Split::kTrain, nullptr, options);
  ASSERT_EQ(bare.pointwise.size(), data.pointwise.size());
  for (size_t i = 0; i < bare.pointwise.size(); ++i) {
    EXPECT_EQ(bare.pointwise[i].reasoning, "");
    EXPECT_EQ(bare.pointwise[i].score, data.pointwise[i].score);
  }
}

TEST(JudgeData, MirroredPairsAndTiePairsAreOptInAndConsistent) {
  const TaskSuite suite{TaskSuiteConfig{}};
  JudgeDataOptions options;
  options.prompts = 100;
  options.pairwise_fraction = 1.0;
  const ScoredData plain = build_judge_data(suite, Split::kTrain, nullptr, options);
  options.mirror_pairs = true;
  options.tie_pair_fraction = 0.5;
  const ScoredData both = build_judge_data(suite, Split::kTrain, nullptr, options);
  // The pointwise records do not change, and every plain pair is still there, followed by its
  // mirror image: B first, the verdict swapped, the reasoning's A and B swapped.
  ASSERT_EQ(both.pointwise.size(), plain.pointwise.size());
  size_t at = 0, ties = 0;
  for (const PairwiseExample& p : plain.pairwise) {
    while (at < both.pairwise.size() && both.pairwise[at].response_a == both.pairwise[at].response_b) {
      ++ties;
      ++at;
    }
    ASSERT_LT(at + 1, both.pairwise.size());
    const PairwiseExample& same = both.pairwise[at];
    const PairwiseExample& mirror = both.pairwise[at + 1];
    EXPECT_EQ(same.response_a, p.response_a);
    EXPECT_EQ(same.verdict, p.verdict);
    EXPECT_EQ(mirror.response_a, p.response_b);
    EXPECT_EQ(mirror.response_b, p.response_a);
    const Verdict expected = p.verdict == Verdict::kA   ? Verdict::kB
                             : p.verdict == Verdict::kB ? Verdict::kA
                                                        : Verdict::kTie;
    EXPECT_EQ(mirror.verdict, expected);
    EXPECT_NE(mirror.reasoning.find("; A " + escape_judged_text(p.response_b) + ": "),
              std::string::npos)
        << mirror.reasoning;
    at += 2;
  }
  for (; at < both.pairwise.size(); ++at) ties += both.pairwise[at].response_a == both.pairwise[at].response_b;
  // Identical pairs, about half the prompts, always a tie.
  EXPECT_GT(ties, 30u);
  EXPECT_LT(ties, 70u);
  for (const PairwiseExample& p : both.pairwise) {
    if (p.response_a == p.response_b) {
      EXPECT_EQ(p.verdict, Verdict::kTie) << p.prompt;
    }
  }
}

TEST(JudgeData, MoreCorruptionsAndPairsPerPrompt) {
  const TaskSuite suite{TaskSuiteConfig{}};
  JudgeDataOptions options;
  options.prompts = 100;
  options.pairwise_fraction = 1.0;
  options.corrupted_per_prompt = 3;
  options.pairs_per_prompt = 3;
  const ScoredData data = build_judge_data(suite, Split::kTrain, nullptr, options);
  // Without a policy: the reference and three corrupted references per prompt, in that order.
  ASSERT_EQ(data.pointwise.size(), 400u);
  int flawed = 0;
  for (size_t i = 0; i < data.pointwise.size(); ++i) {
    if (i % 4 == 0) {
      EXPECT_EQ(data.pointwise[i].score, 10) << data.pointwise[i].reasoning;
    } else {
      flawed += data.pointwise[i].score < 10;
    }
  }
  EXPECT_EQ(flawed, 300);
  // Up to three pairs a prompt, never the same two responses twice for one prompt, and each
  // verdict names the response the grader scores higher.
  EXPECT_GT(data.pairwise.size(), 200u);
  EXPECT_LE(data.pairwise.size(), 300u);
  std::map<std::pair<std::string, std::string>, int> score;  // (prompt, response) -> score
  for (const ScoredExample& e : data.pointwise) score[{e.prompt, e.response}] = e.score;
  // A prompt's records are consecutive (a prompt text can recur for another example later).
  std::string run_prompt;
  std::set<std::pair<std::string, std::string>> run;
  for (const PairwiseExample& p : data.pairwise) {
    if (p.prompt != run_prompt) run_prompt = p.prompt, run.clear();
    EXPECT_NE(p.response_a, p.response_b);
    EXPECT_TRUE(run.insert(std::minmax(p.response_a, p.response_b)).second)
        << p.prompt << ": " << p.response_a << " / " << p.response_b << " twice";
    EXPECT_LE(run.size(), 3u) << p.prompt;
    // Scores on the 1..10 scale can tie where the grades differ, so only strict orders.
    const int a = score.at({p.prompt, p.response_a}), b = score.at({p.prompt, p.response_b});
    if (a > b) {
      EXPECT_EQ(p.verdict, Verdict::kA) << p.reasoning;
    } else if (a < b) {
      EXPECT_EQ(p.verdict, Verdict::kB) << p.reasoning;
    }
  }
}

TEST(JudgeData, PositionMarksCompareCharacterByCharacter) {
  EXPECT_EQ(position_marks("63", "63"), "==");
  EXPECT_EQ(position_marks("63", "65"), "=x");
  EXPECT_EQ(position_marks("63", "6"), "=x");     // a missing position is a mismatch
  EXPECT_EQ(position_marks("6", "-63"), "xxx");   // a sign shifts every position after it
  EXPECT_EQ(position_marks("1 7 9", "1 9 7"), "==x=x");
  EXPECT_EQ(position_marks("", ""), "");
  // In the built data the marks come right after each quoted response.
  const TaskSuite suite{TaskSuiteConfig{}};
  JudgeDataOptions options;
  options.prompts = 50;
  options.pairwise_fraction = 1.0;
  options.position_marks = true;
  const ScoredData data = build_judge_data(suite, Split::kTrain, nullptr, options);
  ASSERT_FALSE(data.pointwise.empty());
  for (const ScoredExample& e : data.pointwise) {
    const std::string expected = e.reasoning.substr(9, e.reasoning.find(';') - 9);
    const std::string quoted = "; got " + escape_judged_text(e.response) + "; " +
                               position_marks(expected, escape_judged_text(e.response)) + "; ";
    EXPECT_NE(e.reasoning.find(quoted), std::string::npos) << e.reasoning;
    // Here (no policy) a response is the reference or a corruption of it: all marks '='
    // exactly when the grader calls it right.
    const bool all_equal =
        position_marks(expected, escape_judged_text(e.response)).find('x') == std::string::npos;
    EXPECT_EQ(e.score == 10, all_equal) << e.reasoning;
  }
  for (const PairwiseExample& p : data.pairwise) {
    EXPECT_NE(p.reasoning.find("; A " + escape_judged_text(p.response_a) + ": "),
              std::string::npos)
        << p.reasoning;
  }
}

TEST(JudgeData, AlignedComparisonMarksEachPairOfCharacters) {
  EXPECT_EQ(aligned_comparison("63", "93"), "69x 33= 1");
  EXPECT_EQ(aligned_comparison("63", "63"), "66= 33= 0");
  // A shorter answer is padded with '.' where more characters line up; on a tie the numbers'
  // units line up, as the add grader counts them.
  EXPECT_EQ(aligned_comparison("63", "3"), "6.x 33= 1");
  EXPECT_EQ(aligned_comparison("63", "7"), "6.x 37x 2");
  EXPECT_EQ(aligned_comparison("-7", "7"), "-.x 77= 1");
  EXPECT_EQ(aligned_comparison("7", "-17"), ".-x .1x 77= 2");
  EXPECT_EQ(aligned_comparison("olleh", "ollh"), "oo= ll= ll= ehx h.x 2");
  EXPECT_EQ(aligned_comparison("olleh", "lleh"), "o.x ll= ll= ee= hh= 1");
  // Spaces on both sides are left out; a space against anything else shows as '_'.
  EXPECT_EQ(aligned_comparison("1 7 9", "1 9 7"), "11= 79x 97x 2");
  EXPECT_EQ(aligned_comparison("1 7 9", "1 79"), "11= 77= _9x 9.x 2");
  // Either way 2 characters line up; the tie goes to the right.
  EXPECT_EQ(aligned_comparison("1 2", "1  2"), ".1x 1_x 22= 2");
  // Padding is not a character: a '.' inside both answers is equal, padding never is.
  EXPECT_EQ(aligned_comparison("1.5", "1.5"), "11= ..= 55= 0");
  EXPECT_EQ(aligned_comparison("5", ".5"), "..x 55= 1");
  // The count is one digit.
  EXPECT_EQ(aligned_comparison("abcdefghij", "klmnopqrst"),
            "akx blx cmx dnx eox fpx gqx hrx isx jtx 9");
}

TEST(JudgeData, AlignedReasoningEndsWithEachSidesScore) {
  const TaskSuite suite{TaskSuiteConfig{}};
  const TaskExample add{"add", "60+3=", "63"};
  EXPECT_EQ(aligned_reasoning(add, "93", suite.grade(add, "93")), "expected 63; 69x 33= 1 6");
  EXPECT_EQ(aligned_reasoning(add, "63", suite.grade(add, "63")), "expected 63; 66= 33= 0 10");
  const TaskExample sort{"sort", "sort 9 1 7", "1 7 9"};
  EXPECT_EQ(aligned_reasoning(sort, "1 9 7", suite.grade(sort, "1 9 7")),
            "expected 1 7 9; 11= 79x 97x 2 5");  // 1 of 3 in place, same items: 8/3 + 2
  JudgeDataOptions options;
  options.prompts = 50;
  options.pairwise_fraction = 1.0;
  options.aligned_marks = true;
  const ScoredData data = build_judge_data(suite, Split::kTrain, nullptr, options);
  ASSERT_FALSE(data.pointwise.empty());
  ASSERT_FALSE(data.pairwise.empty());
  std::map<std::pair<std::string, std::string>, std::string> side;  // "<comparison> <score>"
  for (const ScoredExample& e : data.pointwise) {
    const std::string expected = e.reasoning.substr(9, e.reasoning.find(';') - 9);
    const std::string compared = aligned_comparison(expected, escape_judged_text(e.response));
    EXPECT_EQ(e.reasoning, "expected " + expected + "; " + compared + " " +
                               std::to_string(e.score));
    // Here (no policy) a response is the reference or a corruption of it: no mismatch exactly
    // when the grader calls it right.
    EXPECT_EQ(e.score == 10, compared.back() == '0') << e.reasoning;
    side[{e.prompt, e.response}] = compared + " " + std::to_string(e.score);
  }
  for (const PairwiseExample& p : data.pairwise) {
    const std::string expected = p.reasoning.substr(9, p.reasoning.find(';') - 9);
    EXPECT_EQ(p.reasoning, "expected " + expected + "; A " + side.at({p.prompt, p.response_a}) +
                               "; B " + side.at({p.prompt, p.response_b}));
  }
}

TEST(JudgeData, AlignedReasoningCanQuoteTheResponseFirst) {
  const TaskSuite suite{TaskSuiteConfig{}};
  const TaskExample add{"add", "60+3=", "63"};
  const Grade g93 = suite.grade(add, "93"), g63 = suite.grade(add, "63");
  EXPECT_EQ(aligned_reasoning(add, "93", g93, true), "expected 63; got 93; 69x 33= 1 6");
  EXPECT_EQ(aligned_pair_reasoning(add, "93", g93, "63", g63, true),
            "expected 63; A got 93; 69x 33= 1 6; B got 63; 66= 33= 0 10");
  EXPECT_EQ(aligned_pair_reasoning(add, "93", g93, "63", g63),
            "expected 63; A 69x 33= 1 6; B 66= 33= 0 10");  // without the quotes, as before
  const TaskExample sort{"sort", "sort 9 1 7", "1 7 9"};
  EXPECT_EQ(aligned_reasoning(sort, "1 9 7", suite.grade(sort, "1 9 7"), true),
            "expected 1 7 9; got 1 9 7; 11= 79x 97x 2 5");
  // Quote and triples show the response as the judge sees it: a newline as the two characters
  // backslash and n.
  const TaskExample reverse{"reverse", "rev abc", "cba"};
  const Grade split = suite.grade(reverse, "cb\na");
  EXPECT_EQ(aligned_reasoning(reverse, "cb\na", split, true),
            "expected cba; got cb\\na; " + aligned_comparison("cba", "cb\\na") + " " +
                std::to_string(judge_score_from_grade(split.score)));

  // The builder: the same records as without the option, each side led by its quote.
  JudgeDataOptions options;
  options.prompts = 50;
  options.pairwise_fraction = 1.0;
  options.aligned_marks = true;
  const ScoredData plain = build_judge_data(suite, Split::kTrain, nullptr, options);
  options.quote_response = true;
  const ScoredData quoted = build_judge_data(suite, Split::kTrain, nullptr, options);
  ASSERT_EQ(quoted.pointwise.size(), plain.pointwise.size());
  ASSERT_EQ(quoted.pairwise.size(), plain.pairwise.size());
  ASSERT_FALSE(quoted.pairwise.empty());
  for (size_t i = 0; i < quoted.pointwise.size(); ++i) {
    const ScoredExample& e = quoted.pointwise[i];
    const std::string& before = plain.pointwise[i].reasoning;
    const size_t cut = before.find("; ") + 2;  // after "expected <reference>; "
    EXPECT_EQ(e.reasoning, before.substr(0, cut) + "got " + escape_judged_text(e.response) +
                               "; " + before.substr(cut));
  }
  for (size_t i = 0; i < quoted.pairwise.size(); ++i) {
    const PairwiseExample& p = quoted.pairwise[i];
    std::string with_quotes = plain.pairwise[i].reasoning;
    with_quotes.replace(with_quotes.find("; A "), 4,
                        "; A got " + escape_judged_text(p.response_a) + "; ");
    with_quotes.replace(with_quotes.find("; B "), 4,
                        "; B got " + escape_judged_text(p.response_b) + "; ");
    EXPECT_EQ(p.reasoning, with_quotes);
  }
}

TEST(JudgeData, QuotesCanTakeThePromptsLabels) {
  const TaskSuite suite{TaskSuiteConfig{}};
  const TaskExample add{"add", "60+3=", "63"};
  const Grade g93 = suite.grade(add, "93"), g63 = suite.grade(add, "63");
  EXPECT_EQ(aligned_reasoning(add, "93", g93, true, true),
            "reference: 63; response: 93; 69x 33= 1 6");
  EXPECT_EQ(aligned_pair_reasoning(add, "93", g93, "63", g63, true, true),
            "reference: 63; A: 93; 69x 33= 1 6; B: 63; 66= 33= 0 10");
  // Each quote repeats its source line of the judge prompt up to the response's end.
  const std::string prompt = pairwise_judge_prompt("60+3=", "93", "63", std::string("63"));
  EXPECT_NE(prompt.find("A: 93"), std::string::npos) << prompt;
  EXPECT_NE(prompt.find("B: 63"), std::string::npos) << prompt;
  EXPECT_NE(prompt.find("reference: 63"), std::string::npos) << prompt;
  EXPECT_NE(pointwise_judge_prompt("60+3=", "93", std::string("63")).find("response: 93"),
            std::string::npos);
}

TEST(JudgeData, ColumnReasoningCountsMismatchesAtBothEnds) {
  EXPECT_EQ(column_mismatches("63", "93", 4, true), 1);
  EXPECT_EQ(column_mismatches("63", "93", 4, false), 1);
  EXPECT_EQ(column_mismatches("63", "63", 4, true), 0);
  EXPECT_EQ(column_mismatches("63", "163", 4, true), 1);   // padding facing a character
  EXPECT_EQ(column_mismatches("63", "163", 4, false), 3);
  EXPECT_EQ(column_mismatches("maml", "aml", 6, true), 1);  // a dropped first letter
  EXPECT_EQ(column_mismatches("maml", "aml", 6, false), 4);
  EXPECT_EQ(column_mismatches("12", "123456", 4, true), 4);  // "<456" against "..12"
  // Padding is not a '.' of the answer: "...5" and "..5" as the judge sees them look alike,
  // but only one is padding.
  EXPECT_EQ(column_mismatches("5", ".5", 4, true), 1);

  const TaskSuite suite{TaskSuiteConfig{}};
  const TaskExample add{"add", "60+3=", "63"};
  const Grade g93 = suite.grade(add, "93"), g63 = suite.grade(add, "63");
  EXPECT_EQ(column_reasoning(add, "93", g93, 4), "1 1 6");
  EXPECT_EQ(column_pair_reasoning(add, "93", g93, "63", g63, 4), "A 1 1 6; B 0 0 10");

  // The builder with columns: every record's reasoning is the column reasoning of its answers.
  JudgeDataOptions options;
  options.prompts = 50;
  options.pairwise_fraction = 1.0;
  options.with_reference = true;
  options.layout = 10;
  const ScoredData data = build_judge_data(suite, Split::kTrain, nullptr, options);
  ASSERT_FALSE(data.pointwise.empty());
  ASSERT_FALSE(data.pairwise.empty());
  std::map<std::pair<std::string, std::string>, std::string> side;
  for (const ScoredExample& e : data.pointwise) {
    const int right = column_mismatches(*e.reference, e.response, 10, true);
    const int left = column_mismatches(*e.reference, e.response, 10, false);
    EXPECT_EQ(e.reasoning, std::to_string(std::min(right, 9)) + " " +
                               std::to_string(std::min(left, 9)) + " " + std::to_string(e.score));
    // Here (no policy) a response is the reference or a corruption of it: no mismatch exactly
    // when the grader calls it right.
    EXPECT_EQ(e.score == 10, right == 0) << e.reasoning;
    side[{e.prompt, e.response}] = e.reasoning;
  }
  for (const PairwiseExample& p : data.pairwise) {
    EXPECT_EQ(p.reasoning, "A " + side.at({p.prompt, p.response_a}) + "; B " +
                               side.at({p.prompt, p.response_b}));
  }
}

TEST(JudgeData, TaggedReasoningCopiesTheTaggedLineAndMarksEachPosition) {
  const TaskSuite suite{TaskSuiteConfig{}};
  const TaskExample add{"add", "60+3=", "63"};
  const Grade g93 = suite.grade(add, "93"), g63 = suite.grade(add, "63");
  EXPECT_EQ(tagged_reasoning(add, "93", g93, kFirstTagA), "C6I9x D3J3= 1 6");
  EXPECT_EQ(tagged_pair_reasoning(add, "93", g93, "63", g63),
            "A C6I9x D3J3= 1 6; B O6U6= P3V3= 0 10");
  // Lined up at the end where more characters agree: a dropped first letter is one mark.
  const TaskExample rev{"reverse", "rev lmam", "maml"};
  EXPECT_EQ(tagged_reasoning(rev, "aml", suite.grade(rev, "aml"), kFirstTagA).substr(0, 26),
            "CmI.x DaJa= EmKm= FlLl= 1 ");
  // An answer longer than the shown positions: the cut positions are counted, not marked.
  const TaskExample long_add{"add", "1+1=", "2"};
  const std::string long_reasoning =
      tagged_reasoning(long_add, "12345672", suite.grade(long_add, "12345672"), kFirstTagA);
  EXPECT_EQ(long_reasoning.substr(0, 6), "C.I3x ") << long_reasoning;  // the last 6 of 8
  EXPECT_NE(long_reasoning.find(" 7 "), std::string::npos) << long_reasoning;

  // The builder with the tagged layout: each record's reasoning copies its prompt's tagged line.
  JudgeDataOptions options;
  options.prompts = 50;
  options.pairwise_fraction = 1.0;
  options.with_reference = true;
  options.layout = kJudgeTaggedLayout;
  options.scrambled_per_prompt = 2;
  const ScoredData data = build_judge_data(suite, Split::kTrain, nullptr, options);
  ASSERT_FALSE(data.pointwise.empty());
  ASSERT_FALSE(data.pairwise.empty());
  for (const ScoredExample& e : data.pointwise) {
    // Remove the marks and the count and score: what is left is the prompt's line, spaced.
    const std::string line = tagged_line(*e.reference, e.response, kFirstTagA);
    std::string copied;
    for (char c : e.reasoning.substr(0, e.reasoning.rfind(' ', e.reasoning.rfind(' ') - 1))) {
      if (c != ' ' && c != '=' && c != 'x') copied += c;
    }
    std::string shown;
    for (char c : line) {
      if (c != '+' && c != 'x') shown += c;
    }
    EXPECT_EQ(copied, shown) << e.reasoning << " | " << line;
  }
}

// Separate sides (VotingParams::separate_sides) give the verdict turn each side's pointwise
// reasoning line, renamed by side_turn: that must be exactly what training wrote there. Every
// pairwise record of the builder, split into its turns, starts with its two sides' pointwise
// reasonings as side_turn makes them.
TEST(JudgeData, SeparateSidesGiveTheVerdictTurnWhatTrainingWroteThere) {
  const TaskSuite suite{TaskSuiteConfig{}};
  JudgeDataOptions options;
  options.prompts = 60;
  options.pairwise_fraction = 1.0;
  options.with_reference = true;
  options.layout = kJudgeSplitPairLayout;
  options.scrambled_per_prompt = 2;
  options.pairs_per_prompt = 3;
  const ScoredData data = build_judge_data(suite, Split::kTrain, nullptr, options);
  ASSERT_GT(data.pairwise.size(), 50u);
  std::map<std::pair<std::string, std::string>, std::string> pointwise;  // (prompt, response)
  for (const ScoredExample& e : data.pointwise) pointwise[{e.prompt, e.response}] = e.reasoning;
  size_t checked = 0;
  for (const PairwiseExample& p : data.pairwise) {
    const auto a = pointwise.find({p.prompt, p.response_a});
    const auto b = pointwise.find({p.prompt, p.response_b});
    if (a == pointwise.end() || b == pointwise.end()) continue;
    const std::optional<SplitPairOutput> turns = split_pair_output(p.reasoning, p.verdict);
    ASSERT_TRUE(turns.has_value()) << p.reasoning;
    EXPECT_EQ(side_turn(a->second + "\n", false), turns->a_turn) << p.reasoning;
    const std::optional<std::string> b_part = side_turn(b->second + "\n", true);
    ASSERT_TRUE(b_part.has_value()) << b->second;
    EXPECT_EQ(turns->b_turn.substr(0, b_part->size()), *b_part) << p.reasoning;
    EXPECT_EQ(turns->b_turn.substr(b_part->size(), 9), "Verdict: ") << p.reasoning;
    ++checked;
  }
  EXPECT_GT(checked, data.pairwise.size() / 2);
}

TEST(JudgeData, ScrambledResponsesKeepTheShapeAndChange) {
  Rng rng(5);
  for (const std::string reference : {"63", "4 5 8 9", "rxnj", "7"}) {
    for (int i = 0; i < 50; ++i) {
      const std::string s = scramble_response(reference, rng);
      ASSERT_EQ(s.size(), reference.size()) << s;
      EXPECT_NE(s, reference);
      for (size_t c = 0; c < s.size(); ++c) {
        // Same class of character at every position: spaces stay, digits stay digits.
        EXPECT_EQ(std::isdigit(static_cast<unsigned char>(s[c])) != 0,
                  std::isdigit(static_cast<unsigned char>(reference[c])) != 0) << s;
        EXPECT_EQ(s[c] == ' ', reference[c] == ' ') << s;
      }
    }
  }
  EXPECT_EQ(scramble_response("+-", rng), "+-0");  // nothing to redraw: still a different answer
}

TEST(JudgeData, SwappedResponsesExchangeTwoDifferentCharacters) {
  Rng rng(6);
  for (const std::string reference : {"63", "4 5 8 9", "rxnj", "1 1 2"}) {
    std::set<std::string> seen;
    for (int i = 0; i < 100; ++i) {
      const std::optional<std::string> s = swap_response(reference, rng);
      ASSERT_TRUE(s.has_value()) << reference;
      ASSERT_EQ(s->size(), reference.size()) << *s;
      std::vector<size_t> changed;
      for (size_t c = 0; c < s->size(); ++c) {
        if ((*s)[c] != reference[c]) changed.push_back(c);
      }
      ASSERT_EQ(changed.size(), 2u) << reference << " -> " << *s;
      EXPECT_EQ((*s)[changed[0]], reference[changed[1]]) << *s;
      EXPECT_EQ((*s)[changed[1]], reference[changed[0]]) << *s;
      seen.insert(*s);
    }
    // Every exchange of two different characters comes up, not only neighbours: "4 5 8 9" has
    // six, "1 1 2" two (either 1 with the 2).
    const size_t expected = reference == "63" ? 1 : reference == "1 1 2" ? 2 : 6;
    EXPECT_EQ(seen.size(), expected) << reference;
  }
  EXPECT_FALSE(swap_response("7", rng).has_value());
  EXPECT_FALSE(swap_response("5 5", rng).has_value());
  EXPECT_FALSE(swap_response("+-", rng).has_value());
}

TEST(GrmConfig, ReasoningStylesAreChecked) {
  auto config_error = [](const std::string& yaml) {
    return rlhf::error_of([&] { RunConfig::load_string(yaml, "test"); });  // test_support.h
  };
  const std::string both = config_error("grm: {aligned_marks: true, position_marks: true}");
  EXPECT_NE(both.find("grm.aligned_marks"), std::string::npos) << both;
  const std::string alone = config_error("grm: {quote_response: true}");
  EXPECT_NE(alone.find("grm.quote_response"), std::string::npos) << alone;
  EXPECT_NE(alone.find("grm.aligned_marks"), std::string::npos) << alone;
  EXPECT_EQ(config_error("grm: {aligned_marks: true, quote_response: true}"), "");
  const std::string labels = config_error("grm: {aligned_marks: true, prompt_labels: true}");
  EXPECT_NE(labels.find("grm.prompt_labels"), std::string::npos) << labels;
  EXPECT_NE(labels.find("grm.quote_response"), std::string::npos) << labels;
  EXPECT_EQ(
      config_error("grm: {aligned_marks: true, quote_response: true, prompt_labels: true}"), "");
  // Columns: a width in range, a reference to line the answers up with, no other style.
  EXPECT_EQ(config_error("grm: {columns: 10, with_reference: true}"), "");
  const std::string no_reference = config_error("grm: {columns: 10}");
  EXPECT_NE(no_reference.find("grm.with_reference"), std::string::npos) << no_reference;
  const std::string narrow = config_error("grm: {columns: 2, with_reference: true}");
  EXPECT_NE(narrow.find("grm.columns"), std::string::npos) << narrow;
  const std::string wide = config_error("grm: {columns: 65, with_reference: true}");
  EXPECT_NE(wide.find("grm.columns"), std::string::npos) << wide;
  const std::string styles =
      config_error("grm: {columns: 10, with_reference: true, aligned_marks: true}");
  EXPECT_NE(styles.find("grm.aligned_marks"), std::string::npos) << styles;
  // Tagged: a reference to line the answers up with, no other style.
  EXPECT_EQ(config_error("grm: {tagged: true, with_reference: true, scrambled_per_prompt: 2}"),
            "");
  const std::string tagged_alone = config_error("grm: {tagged: true}");
  EXPECT_NE(tagged_alone.find("grm.with_reference"), std::string::npos) << tagged_alone;
  const std::string tagged_columns =
      config_error("grm: {tagged: true, with_reference: true, columns: 10}");
  EXPECT_NE(tagged_columns.find("grm.tagged"), std::string::npos) << tagged_columns;
  // Split pairs: a form of the tagged layout, with reasoning.
  const RunConfig split =
      RunConfig::load_string("grm: {tagged: true, with_reference: true, split_pairs: true}", "t");
  EXPECT_EQ(split.grm.layout(), kJudgeSplitPairLayout);
  const std::string split_alone = config_error("grm: {split_pairs: true, with_reference: true}");
  EXPECT_NE(split_alone.find("grm.tagged"), std::string::npos) << split_alone;
  const std::string split_bare = config_error(
      "grm: {tagged: true, with_reference: true, split_pairs: true, reasoning: false}");
  EXPECT_NE(split_bare.find("grm.reasoning"), std::string::npos) << split_bare;
  const std::string scrambled = config_error("grm: {scrambled_per_prompt: 9}");
  EXPECT_NE(scrambled.find("grm.scrambled_per_prompt"), std::string::npos) << scrambled;
  const std::string swapped = config_error("grm: {swapped_per_prompt: -1}");
  EXPECT_NE(swapped.find("grm.swapped_per_prompt"), std::string::npos) << swapped;
}

// A split pair record trains the judge's two turns and eos, never the given text: the prompt
// with side A's line and side B's line.
TEST(JudgeData, SplitPairExampleTrainsTheJudgesTurnsOnly) {
  ByteTokenizer tokenizer;
  const PairwiseExample e{"60+3=", "93", "63", std::string("63"),
                          "A C6I9x D3J3= 1 6; B O6U6= P3V3= 0 10", Verdict::kB};
  const TrainingSequence seq = split_pair_example(tokenizer, e, 0);
  ASSERT_EQ(seq.tokens.size(), seq.loss_mask.size());
  std::string given, trained;
  for (size_t i = 0; i < seq.tokens.size(); ++i) {
    const std::string piece = tokenizer.decode(std::span(&seq.tokens[i], 1));
    (seq.loss_mask[i] ? trained : given) += piece;
  }
  EXPECT_EQ(given, "task: 60+3=\nA: C6I9D3J3B: O6U6P3V3\n");
  EXPECT_EQ(trained, "A C6I9x D3J3= 1 6\nB O6U6= P3V3= 0 10\nVerdict: B");
  // In order: the prompt (bos, judge-marker, text, response-marker), turn A, B's line, turn B,
  // eos.
  const std::vector<int32_t> prompt = format_prompt(tokenizer, "task: 60+3=\nA: C6I9D3J3",
                                                    SpecialToken::kJudge);
  EXPECT_TRUE(std::equal(prompt.begin(), prompt.end(), seq.tokens.begin()));
  EXPECT_EQ(seq.tokens.back(), tokenizer.special(SpecialToken::kEos));
  EXPECT_EQ(seq.loss_mask.back(), 1);
  const size_t b_line = prompt.size() + std::string("A C6I9x D3J3= 1 6\n").size();
  EXPECT_EQ(seq.loss_mask[b_line - 1], 1);  // the newline that ends turn A is trained
  EXPECT_EQ(seq.loss_mask[b_line], 0);      // 'B' of B's line is given

  // Reasoning that is not "A ...; B ..." is an error naming the record.
  PairwiseExample bad = e;
  bad.reasoning = "B is right";
  const std::string error = rlhf::error_of([&] { split_pair_example(tokenizer, bad, 7); });
  EXPECT_NE(error.find("pairwise record 7"), std::string::npos) << error;
  EXPECT_NE(error.find("grm.split_pairs"), std::string::npos) << error;
}

TEST(JudgeData, ScoreScale) {
  EXPECT_EQ(judge_score_from_grade(0.0), 1);
  EXPECT_EQ(judge_score_from_grade(0.4), 1);
  EXPECT_EQ(judge_score_from_grade(6.6), 7);
  EXPECT_EQ(judge_score_from_grade(10.0), 10);
}

TEST(GrmEval, SpearmanCorrelation) {
  EXPECT_NEAR(spearman_correlation({1, 2, 3, 4}, {10, 20, 30, 40}), 1.0, 1e-12);
  EXPECT_NEAR(spearman_correlation({1, 2, 3, 4}, {4, 3, 2, 1}), -1.0, 1e-12);
  // Monotone but not linear: still 1.
  EXPECT_NEAR(spearman_correlation({1, 2, 3, 4, 5}, {1, 4, 9, 16, 1000}), 1.0, 1e-12);
  // Ties get average ranks: x ranks (0.5, 0.5, 2), y ranks (0, 1, 2) -> 0.866.
  EXPECT_NEAR(spearman_correlation({1, 1, 2}, {1, 2, 3}), std::sqrt(3.0) / 2, 1e-12);
  EXPECT_EQ(spearman_correlation({1, 1, 1}, {1, 2, 3}), 0.0);
}

}  // namespace
}  // namespace rlhf
