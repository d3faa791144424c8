#include "reward/scored_data.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <utility>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/json_record.h"
#include "common/rng.h"

namespace rlhf {

namespace {

using Json = nlohmann::json;

// Reads one record's fields strictly; errors carry "FILE:LINE: ".
class RecordReader {
 public:
  RecordReader(const Json& record, std::string where) : record_(record), where_(std::move(where)) {}

  std::string text(const char* key, bool required, bool allow_empty) {
    seen_.push_back(key);
    if (!record_.contains(key)) {
      if (required) fail("{}: key '{}' is missing", where_, key);
      return {};
    }
    const Json& v = record_[key];
    if (!v.is_string()) fail("{}: key '{}' must be a string", where_, key);
    std::string s = v.get<std::string>();
    if (!allow_empty && s.empty()) fail("{}: key '{}' is empty", where_, key);
    return s;
  }
  std::optional<std::string> optional_text(const char* key) {
    if (!record_.contains(key)) {
      seen_.push_back(key);
      return std::nullopt;
    }
    return text(key, true, false);
  }
  int integer(const char* key) {
    seen_.push_back(key);
    if (!record_.contains(key)) fail("{}: key '{}' is missing", where_, key);
    const Json& v = record_[key];
    if (!v.is_number_integer()) fail("{}: key '{}' must be an integer", where_, key);
    const int64_t x = v.get<int64_t>();
    if (x < 1 || x > 10) fail("{}: key '{}' must be in 1..10, got {}", where_, key, x);
    return int(x);
  }
  void finish() const {
    for (const auto& [key, value] : record_.items()) {
      if (std::find(seen_.begin(), seen_.end(), key) == seen_.end()) {
        fail("{}: unknown key '{}'", where_, key);
      }
    }
  }
  const std::string& where() const { return where_; }

 private:
  const Json& record_;
  std::string where_;
  std::vector<std::string> seen_;
};

void check_reasoning(const std::string& reasoning, const std::string& where) {
  if (!reasoning.empty() && reasoning.back() == '\n') {
    fail("{}: key 'reasoning' must not end with a newline", where);
  }
}

// The comparison part of a grader's reason ("2 of 3 digits right, ..."), without the
// "expected X; " prefix that every non-exact reason starts with.
std::string comparison_of(const TaskExample& example, const Grade& grade) {
  if (grade.correct) return "exact";
  const std::string prefix = "expected " + example.reference + "; ";
  return grade.reason.rfind(prefix, 0) == 0 ? grade.reason.substr(prefix.size()) : grade.reason;
}

}  // namespace

ScoredData read_scored_jsonl(const std::string& path) {
  std::ifstream in(path);
  if (!in) fail("scored data '{}' cannot be opened", path);
  ScoredData data;
  std::string line;
  int64_t number = 0;
  while (std::getline(in, line)) {
    ++number;
    const std::string where = path + ":" + std::to_string(number);
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;  // blank line
    std::string repeated_key;
    const Json record = parse_json_record(line, repeated_key, /*allow_exceptions=*/false);
    if (record.is_discarded()) fail("{}: not valid JSON", where);
    if (!record.is_object()) fail("{}: a record must be a JSON object", where);
    if (!repeated_key.empty()) fail("{}: key '{}' is given twice", where, repeated_key);
    RecordReader r(record, where);
    if (record.contains("response_a")) {
      PairwiseExample e;
      e.prompt = r.text("prompt", true, false);
      e.response_a = r.text("response_a", true, false);
      e.response_b = r.text("response_b", true, false);
      e.reference = r.optional_text("reference");
      e.reasoning = r.text("reasoning", true, true);
      const std::string verdict = r.text("verdict", true, false);
      if (verdict == "A") {
        e.verdict = Verdict::kA;
      } else if (verdict == "B") {
        e.verdict = Verdict::kB;
      } else if (verdict == "tie") {
        e.verdict = Verdict::kTie;
      } else {
        fail("{}: key 'verdict' must be \"A\", \"B\" or \"tie\", got \"{}\"", where, verdict);
      }
      r.finish();
      check_reasoning(e.reasoning, where);
      data.pairwise.push_back(std::move(e));
    } else {
      ScoredExample e;
      e.prompt = r.text("prompt", true, false);
      e.response = r.text("response", true, false);
      e.reference = r.optional_text("reference");
      e.reasoning = r.text("reasoning", true, true);
      e.score = r.integer("score");
      r.finish();
      check_reasoning(e.reasoning, where);
      data.pointwise.push_back(std::move(e));
    }
  }
  if (data.pointwise.empty() && data.pairwise.empty()) fail("scored data '{}' has no records", path);
  return data;
}

void write_scored_jsonl(const std::string& path, const ScoredData& data) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    if (!out) fail("cannot write '{}'", tmp);
    for (const ScoredExample& e : data.pointwise) {
      Json j = {{"prompt", e.prompt}, {"response", e.response}, {"reasoning", e.reasoning},
                {"score", e.score}};
      if (e.reference) j["reference"] = *e.reference;
      out << j.dump(-1, ' ', false, Json::error_handler_t::replace) << '\n';
    }
    for (const PairwiseExample& e : data.pairwise) {
      Json j = {{"prompt", e.prompt},         {"response_a", e.response_a},
                {"response_b", e.response_b}, {"reasoning", e.reasoning},
                {"verdict", verdict_name(e.verdict)}};
      if (e.reference) j["reference"] = *e.reference;
      out << j.dump(-1, ' ', false, Json::error_handler_t::replace) << '\n';
    }
    if (!out) fail("writing '{}' failed", tmp);
  }
  std::filesystem::rename(tmp, path);
}

int judge_score_from_grade(double grade_score) {
  return int(std::clamp<long>(std::lround(grade_score), 1, 10));
}

std::string position_marks(std::string_view expected, std::string_view got) {
  std::string marks(std::max(expected.size(), got.size()), 'x');
  for (size_t i = 0; i < std::min(expected.size(), got.size()); ++i) {
    if (expected[i] == got[i]) marks[i] = '=';
  }
  return marks;
}

std::string grade_reasoning(const TaskExample& example, std::string_view response,
                            const Grade& grade, bool position_marks_on) {
  // The response is quoted right after the expected answer: a small model compares two
  // strings it has just written far more easily than one it must fetch from the prompt.
  const std::string quoted = escape_judged_text(response);
  const std::string marks =
      position_marks_on ? position_marks(example.reference, quoted) + "; " : std::string();
  return "expected " + example.reference + "; got " + quoted + "; " + marks +
         comparison_of(example, grade);
}

std::string aligned_comparison(std::string_view expected, std::string_view got) {
  std::string out;
  int mismatches = 0;
  for (const auto& [e, g] : aligned_pairs(expected, got).pairs) {
    const bool equal = e != kMissingChar && e == g;
    mismatches += !equal;
    out += aligned_shown(e, false);
    out += aligned_shown(g, false);
    out += equal ? '=' : 'x';
    out += ' ';
  }
  return out + std::to_string(std::min(mismatches, 9));
}

std::string tagged_reasoning(const TaskExample& example, std::string_view response,
                             const Grade& grade, char first_tag) {
  // The positions as the judge's prompt shows them (judge_format.h, tagged_line).
  const TaggedPositions shown = tagged_positions(example.reference, response);
  std::string out;
  int mismatches = 0;
  for (size_t i = 0; i < shown.aligned.pairs.size(); ++i) {
    const auto [e, g] = shown.aligned.pairs[i];
    const bool equal = e != kMissingChar && e == g;
    mismatches += !equal;
    if (i < shown.first || i >= shown.end) continue;  // cut from the line: counted, not marked
    out += tagged_pair(first_tag, i - shown.first, e, g);
    out += equal ? '=' : 'x';
    out += ' ';
  }
  return out + std::to_string(std::min(mismatches, 9)) + " " +
         std::to_string(judge_score_from_grade(grade.score));
}

std::string tagged_pair_reasoning(const TaskExample& example, std::string_view response_a,
                                  const Grade& grade_a, std::string_view response_b,
                                  const Grade& grade_b) {
  return "A " + tagged_reasoning(example, response_a, grade_a, kFirstTagA) + "; B " +
         tagged_reasoning(example, response_b, grade_b, kFirstTagB);
}

namespace {

// "69x 33= 1 6": one side's aligned comparison and its score on the judge's scale, after
// `quote` + the response + "; " when `quote` is not null ("got 93; 69x 33= 1 6").
std::string aligned_side(const TaskExample& example, std::string_view response,
                         const Grade& grade, const char* quote) {
  // The response is quoted and aligned as the judge sees it in its prompt: escaped.
  const std::string escaped = escape_judged_text(response);
  const std::string quoted = quote ? quote + escaped + "; " : std::string();
  return quoted + aligned_comparison(example.reference, escaped) + " " +
         std::to_string(judge_score_from_grade(grade.score));
}

}  // namespace

std::string aligned_reasoning(const TaskExample& example, std::string_view response,
                              const Grade& grade, bool quote_response, bool prompt_labels) {
  if (prompt_labels) {
    return "reference: " + example.reference + "; " +
           aligned_side(example, response, grade, "response: ");
  }
  return "expected " + example.reference + "; " +
         aligned_side(example, response, grade, quote_response ? "got " : nullptr);
}

std::string aligned_pair_reasoning(const TaskExample& example, std::string_view response_a,
                                   const Grade& grade_a, std::string_view response_b,
                                   const Grade& grade_b, bool quote_response,
                                   bool prompt_labels) {
  if (prompt_labels) {
    return "reference: " + example.reference + "; " +
           aligned_side(example, response_a, grade_a, "A: ") + "; " +
           aligned_side(example, response_b, grade_b, "B: ");
  }
  const char* quote = quote_response ? "got " : nullptr;
  return "expected " + example.reference + "; A " +
         aligned_side(example, response_a, grade_a, quote) + "; B " +
         aligned_side(example, response_b, grade_b, quote);
}

int column_mismatches(std::string_view reference, std::string_view response, int width,
                      bool right_aligned) {
  const std::string ref = judge_column(reference, width, right_aligned);
  const std::string got = judge_column(response, width, right_aligned);
  // Where the padding is: left of a right-aligned answer, right of a left-aligned one.
  auto padding_test = [&](std::string_view text) {
    const int length = int(escape_judged_text(text).size());
    return [=](int i) {
      return length < width && (right_aligned ? i < width - length : i >= length);
    };
  };
  const auto ref_padding = padding_test(reference), got_padding = padding_test(response);
  int mismatches = 0;
  for (int i = 0; i < width; ++i) {
    const bool ref_pad = ref_padding(i), got_pad = got_padding(i);
    if (ref_pad && got_pad) continue;
    mismatches += ref_pad != got_pad || ref[size_t(i)] != got[size_t(i)];
  }
  return mismatches;
}

std::string column_reasoning(const TaskExample& example, std::string_view response,
                             const Grade& grade, int width) {
  const int right = column_mismatches(example.reference, response, width, true);
  const int left = column_mismatches(example.reference, response, width, false);
  return std::to_string(std::min(right, 9)) + " " + std::to_string(std::min(left, 9)) + " " +
         std::to_string(judge_score_from_grade(grade.score));
}

std::string column_pair_reasoning(const TaskExample& example, std::string_view response_a,
                                  const Grade& grade_a, std::string_view response_b,
                                  const Grade& grade_b, int width) {
  return "A " + column_reasoning(example, response_a, grade_a, width) + "; B " +
         column_reasoning(example, response_b, grade_b, width);
}

std::string scramble_response(std::string_view reference, Rng& rng) {
  std::string out(reference);
  std::vector<size_t> changeable;
  for (size_t i = 0; i < out.size(); ++i) {
    if (std::isdigit(static_cast<unsigned char>(out[i])) ||
        std::islower(static_cast<unsigned char>(out[i]))) {
      changeable.push_back(i);
    }
  }
  if (changeable.empty()) return out + "0";
  // The same class of character: a digit for a digit, a letter for a letter.
  auto redraw = [&](char c) {
    return std::isdigit(static_cast<unsigned char>(c)) ? char('0' + rng.uniform_int(0, 9))
                                                       : char('a' + rng.uniform_int(0, 25));
  };
  for (size_t i : changeable) {
    if (rng.uniform() < 0.5) out[i] = redraw(out[i]);
  }
  while (out == reference) {
    const size_t i = changeable[size_t(rng.uniform_int(0, int64_t(changeable.size()) - 1))];
    out[i] = redraw(out[i]);
  }
  return out;
}

std::optional<std::string> swap_response(std::string_view reference, Rng& rng) {
  auto swappable = [](char c) {
    return std::isdigit(static_cast<unsigned char>(c)) || std::islower(static_cast<unsigned char>(c));
  };
  std::vector<std::pair<size_t, size_t>> choices;
  for (size_t i = 0; i < reference.size(); ++i) {
    for (size_t j = i + 1; j < reference.size(); ++j) {
      if (swappable(reference[i]) && swappable(reference[j]) && reference[i] != reference[j]) {
        choices.push_back({i, j});
      }
    }
  }
  if (choices.empty()) return std::nullopt;
  const auto [i, j] = choices[size_t(rng.uniform_int(0, int64_t(choices.size()) - 1))];
  std::string out(reference);
  std::swap(out[i], out[j]);
  return out;
}

ScoredData build_judge_data(const TaskSuite& suite, Split split, Generator* policy,
                            const JudgeDataOptions& options) {
  RLHF_CHECK(options.prompts > 0, "build_judge_data needs prompts");
  std::vector<TaskExample> examples;
  std::vector<std::string> prompt_texts;
  for (int i = 0; i < options.prompts; ++i) {
    examples.push_back(suite.example(split, options.first_index + uint64_t(i)));
    prompt_texts.push_back(examples.back().prompt);
  }
  // The policy's own samples, the responses a judge will see in RL: good and flawed alike.
  std::vector<std::vector<std::string>> samples(examples.size());
  if (policy && options.policy_samples > 0) {
    for (int s = 0; s < options.policy_samples; ++s) {
      SamplingParams params;
      params.temperature = 1.0;
      params.max_new_tokens = 24;
      params.seed = mix_seed(options.seed, 0x5A3 + uint64_t(s));
      const std::vector<Generation> out = policy->generate_text(prompt_texts, params);
      for (size_t i = 0; i < out.size(); ++i) {
        // An empty or unfinished sample is still a response to judge (it grades low), but
        // the scored-data format wants non-empty text.
        if (!out[i].text.empty()) samples[i].push_back(out[i].text);
      }
    }
  }
  Rng rng(mix_seed(options.seed, 0xDA7A));
  Rng tie_rng(mix_seed(options.seed, 0x71E));
  Rng scramble_rng(mix_seed(options.seed, 0x5C4A));
  Rng swap_rng(mix_seed(options.seed, 0x5A9));
  ScoredData data;
  for (size_t i = 0; i < examples.size(); ++i) {
    const TaskExample& ex = examples[i];
    std::vector<std::string> candidates = {ex.reference};
    for (int c = 0; c < options.corrupted_per_prompt; ++c) {
      candidates.push_back(corrupt_response(ex, rng, nullptr));
    }
    for (int c = 0; c < options.scrambled_per_prompt; ++c) {
      candidates.push_back(scramble_response(ex.reference, scramble_rng));
    }
    for (int c = 0; c < options.swapped_per_prompt; ++c) {
      if (std::optional<std::string> swapped = swap_response(ex.reference, swap_rng)) {
        candidates.push_back(std::move(*swapped));
      }
    }
    candidates.insert(candidates.end(), samples[i].begin(), samples[i].end());
    const std::optional<std::string> reference =
        options.with_reference ? std::optional<std::string>(ex.reference) : std::nullopt;
    std::vector<Grade> grades;
    for (const std::string& c : candidates) {
      grades.push_back(suite.grade(ex, c));
      const std::string reasoning =
          !options.reasoning       ? ""
          : is_tagged_layout(options.layout)
              ? tagged_reasoning(ex, c, grades.back(), kFirstTagA)
          : options.layout > 0 ? column_reasoning(ex, c, grades.back(), options.layout)
          : options.aligned_marks ? aligned_reasoning(ex, c, grades.back(), options.quote_response,
                                                      options.prompt_labels)
                                  : grade_reasoning(ex, c, grades.back(), options.position_marks);
      data.pointwise.push_back(
          {ex.prompt, c, reference, reasoning, judge_score_from_grade(grades.back().score)});
    }
    // Each side's comparison up to its first comma keeps the sequence short enough for a
    // small context ("3 of 5 letters in place", without ", length 4 instead of 5").
    auto brief = [&](size_t c) {
      const std::string full = comparison_of(ex, grades[c]);
      return full.substr(0, full.find(','));
    };
    // "A 65: off by 2", or with marks "A 65: =x off by 2".
    auto side = [&](const char* name, size_t c) {
      const std::string quoted = escape_judged_text(candidates[c]);
      const std::string marks =
          options.position_marks ? position_marks(ex.reference, quoted) + " " : std::string();
      return std::string(name) + " " + quoted + ": " + marks + brief(c);
    };
    // Aligned, "A 69x 33= 1 6; B ...": each side as in its pointwise reasoning.
    auto pair_reasoning = [&](size_t a, size_t b) {
      if (!options.reasoning) return std::string();
      if (is_tagged_layout(options.layout)) {
        return tagged_pair_reasoning(ex, candidates[a], grades[a], candidates[b], grades[b]);
      }
      if (options.layout > 0) {
        return column_pair_reasoning(ex, candidates[a], grades[a], candidates[b], grades[b],
                                     options.layout);
      }
      if (options.aligned_marks) {
        return aligned_pair_reasoning(ex, candidates[a], grades[a], candidates[b], grades[b],
                                      options.quote_response, options.prompt_labels);
      }
      return "expected " + ex.reference + "; " + side("A", a) + "; " + side("B", b);
    };
    // Its own random stream, so turning this on leaves every other record as it was.
    if (options.tie_pair_fraction > 0 && tie_rng.uniform() < options.tie_pair_fraction) {
      const size_t c = size_t(tie_rng.uniform_int(0, int64_t(candidates.size()) - 1));
      data.pairwise.push_back({ex.prompt, candidates[c], candidates[c], reference,
                               pair_reasoning(c, c), Verdict::kTie});
    }
    if (rng.uniform() >= options.pairwise_fraction) continue;
    std::vector<std::pair<std::string, std::string>> paired;  // unordered, as (smaller, larger)
    for (int p = 0; p < options.pairs_per_prompt; ++p) {
      // Two different responses not paired yet (policy samples often equal the reference, so
      // a few draws); which one is A is a coin flip.
      size_t first = 0, second = 0;
      bool found = false;
      for (int attempt = 0; attempt < 4 && !found; ++attempt) {
        first = size_t(rng.uniform_int(0, int64_t(candidates.size()) - 1));
        second = size_t(rng.uniform_int(0, int64_t(candidates.size()) - 2));
        if (second >= first) ++second;
        const std::pair<std::string, std::string> key =
            std::minmax(candidates[first], candidates[second]);
        found = candidates[first] != candidates[second] &&
                std::find(paired.begin(), paired.end(), key) == paired.end();
      }
      if (!found) continue;
      paired.emplace_back(std::minmax(candidates[first], candidates[second]));
      const bool flip = rng.uniform() < 0.5;
      const size_t a = flip ? second : first, b = flip ? first : second;
      const double sa = grades[a].score, sb = grades[b].score;
      const Verdict verdict = sa > sb ? Verdict::kA : sa < sb ? Verdict::kB : Verdict::kTie;
      data.pairwise.push_back(
          {ex.prompt, candidates[a], candidates[b], reference, pair_reasoning(a, b), verdict});
      if (options.mirror_pairs) {
        const Verdict mirrored = verdict == Verdict::kA   ? Verdict::kB
                                 : verdict == Verdict::kB ? Verdict::kA
                                                          : Verdict::kTie;
        data.pairwise.push_back(
            {ex.prompt, candidates[b], candidates[a], reference, pair_reasoning(b, a), mirrored});
      }
    }
  }
  return data;
}

}  // namespace rlhf
