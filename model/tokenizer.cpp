#include "model/tokenizer.h"

#include <algorithm>

#include <fmt/core.h>
#include <fmt/ranges.h>

#include "common/error.h"
#include "model/config.h"

namespace rlhf {

Tokenizer::~Tokenizer() = default;

std::string special_token_text(SpecialToken token) {
  switch (token) {
    case SpecialToken::kBos:
      return "<|bos|>";
    case SpecialToken::kEos:
      return "<|eos|>";
    case SpecialToken::kPad:
      return "<|pad|>";
    case SpecialToken::kPrompt:
      return "<|prompt|>";
    case SpecialToken::kResponse:
      return "<|response|>";
    case SpecialToken::kJudge:
      return "<|judge|>";
  }
  RLHF_CHECK(false, "unhandled SpecialToken {}", static_cast<int>(token));
  return {};
}

// ---- ByteTokenizer ---------------------------------------------------------------------------

std::vector<int32_t> ByteTokenizer::encode(std::string_view text) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size());
  // Through unsigned char: a plain char is signed here, and byte 0xff must become id 255.
  for (char c : text) ids.push_back(static_cast<unsigned char>(c));
  return ids;
}

std::string ByteTokenizer::decode(std::span<const int32_t> ids, bool render_special) const {
  std::string text;
  text.reserve(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    const int32_t id = ids[i];
    if (id < 0 || id >= kVocabSize) {
      fail("byte tokenizer: token id {} at position {} is outside the vocabulary [0, {})", id, i,
           kVocabSize);
    }
    if (id < kBos) {
      text.push_back(static_cast<char>(static_cast<unsigned char>(id)));
    } else if (render_special) {
      // The special ids are laid out in SpecialToken order starting at kBos.
      text += special_token_text(static_cast<SpecialToken>(id - kBos));
    }
  }
  return text;
}

int32_t ByteTokenizer::special(SpecialToken token) const {
  switch (token) {
    case SpecialToken::kBos:
      return kBos;
    case SpecialToken::kEos:
      return kEos;
    case SpecialToken::kPad:
      return kPad;
    case SpecialToken::kPrompt:
      return kPrompt;
    case SpecialToken::kResponse:
      return kResponse;
    case SpecialToken::kJudge:
      return kJudge;
  }
  RLHF_CHECK(false, "unhandled SpecialToken {}", static_cast<int>(token));
  return -1;
}

// decode() relies on the special ids following SpecialToken's order.
static_assert(ByteTokenizer::kEos - ByteTokenizer::kBos == static_cast<int>(SpecialToken::kEos));
static_assert(ByteTokenizer::kJudge - ByteTokenizer::kBos ==
              static_cast<int>(SpecialToken::kJudge));
static_assert(ByteTokenizer::kVocabSize == ByteTokenizer::kJudge + 1);

// ---- Factory ---------------------------------------------------------------------------------

const std::vector<std::string>& tokenizer_names() {
  static const std::vector<std::string> names = {"byte"};
  return names;
}

std::unique_ptr<Tokenizer> make_tokenizer(const std::string& name) {
  if (name == "byte") return std::make_unique<ByteTokenizer>();
  fail("unknown tokenizer '{}' (known: {})", name, fmt::join(tokenizer_names(), ", "));
}

void model_config_set_vocab(ModelConfig& config, const Tokenizer& tokenizer) {
  if (config.vocab_size != 0 && config.vocab_size != tokenizer.vocab_size()) {
    fail("model.vocab_size: the config says {} but tokenizer '{}' has {} tokens", config.vocab_size,
         tokenizer.name(), tokenizer.vocab_size());
  }
  config.vocab_size = tokenizer.vocab_size();
}

// ---- Sequence format -------------------------------------------------------------------------

std::vector<int32_t> format_prompt(const Tokenizer& tokenizer, std::string_view prompt,
                                   SpecialToken turn) {
  RLHF_CHECK(turn == SpecialToken::kPrompt || turn == SpecialToken::kJudge,
             "a prompt opens with the prompt-marker or the judge-marker");
  const std::vector<int32_t> body = tokenizer.encode(prompt);
  std::vector<int32_t> tokens;
  tokens.reserve(body.size() + 3);
  tokens.push_back(tokenizer.special(SpecialToken::kBos));
  tokens.push_back(tokenizer.special(turn));
  tokens.insert(tokens.end(), body.begin(), body.end());
  tokens.push_back(tokenizer.special(SpecialToken::kResponse));
  return tokens;
}

TrainingSequence format_example(const Tokenizer& tokenizer, std::string_view prompt,
                                std::string_view response, SpecialToken turn) {
  TrainingSequence seq;
  seq.tokens = format_prompt(tokenizer, prompt, turn);
  const size_t context_len = seq.tokens.size();
  const std::vector<int32_t> body = tokenizer.encode(response);
  seq.tokens.insert(seq.tokens.end(), body.begin(), body.end());
  seq.tokens.push_back(tokenizer.special(SpecialToken::kEos));
  // Context (through the response-marker) is given, not predicted; the response and its eos
  // are what the model must learn to produce, and the eos teaches it where to stop.
  seq.loss_mask.assign(seq.tokens.size(), 1);
  std::fill(seq.loss_mask.begin(), seq.loss_mask.begin() + static_cast<ptrdiff_t>(context_len), 0);
  return seq;
}

}  // namespace rlhf
