#pragma once
// Tokenizers and the one definition of the chat sequence format.
//
// Every component that builds or reads token sequences (SFT data, the actor's prompts, the
// reward model's judge templates, the learner's loss masks) goes through format_prompt /
// format_example below, so the layout of a sequence is defined in exactly one place.
//
// Special tokens are never produced by encode(): text that happens to contain "<|eos|>" encodes
// to its bytes, so user text cannot forge a turn boundary. They enter a sequence only through
// special() and the format helpers.
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace rlhf {

struct ModelConfig;

enum class SpecialToken { kBos, kEos, kPad, kPrompt, kResponse, kJudge };

class Tokenizer {
 public:
  virtual ~Tokenizer();

  virtual std::string name() const = 0;
  virtual int vocab_size() const = 0;
  virtual std::vector<int32_t> encode(std::string_view text) const = 0;
  // Drops special tokens unless render_special, which renders each as "<|eos|>", "<|bos|>", ...
  // An id outside [0, vocab_size) is an rlhf::Error.
  virtual std::string decode(std::span<const int32_t> ids, bool render_special = false) const = 0;
  virtual int32_t special(SpecialToken token) const = 0;
  virtual bool is_special(int32_t id) const = 0;
};

// Ids 0..255 are the bytes themselves; the special tokens follow.
class ByteTokenizer final : public Tokenizer {
 public:
  static constexpr int32_t kBos = 256;
  static constexpr int32_t kEos = 257;
  static constexpr int32_t kPad = 258;
  static constexpr int32_t kPrompt = 259;
  static constexpr int32_t kResponse = 260;
  static constexpr int32_t kJudge = 261;
  static constexpr int kVocabSize = 262;

  std::string name() const override { return "byte"; }
  int vocab_size() const override { return kVocabSize; }
  std::vector<int32_t> encode(std::string_view text) const override;
  std::string decode(std::span<const int32_t> ids, bool render_special = false) const override;
  int32_t special(SpecialToken token) const override;
  bool is_special(int32_t id) const override { return id >= kBos && id < kVocabSize; }
};

// "byte" -> ByteTokenizer. An unknown name is an rlhf::Error listing the known names.
std::unique_ptr<Tokenizer> make_tokenizer(const std::string& name);
// The names make_tokenizer accepts, e.g. for config validation and error messages.
const std::vector<std::string>& tokenizer_names();

// The text form of a special token, "<|eos|>" etc. (used by decode with render_special).
std::string special_token_text(SpecialToken token);

// Fills config.vocab_size from the tokenizer. A config that already states a vocab_size (> 0)
// must agree with the tokenizer; otherwise rlhf::Error naming model.vocab_size.
void model_config_set_vocab(ModelConfig& config, const Tokenizer& tokenizer);

// ---- The sequence format --------------------------------------------------------------------
//
//   prompt:   [bos, prompt-marker, prompt tokens..., response-marker]
//   example:  [bos, prompt-marker, prompt tokens..., response-marker, response tokens..., eos]
//   judging:  the same with the judge-marker in place of the prompt-marker
//
// The response-marker ends every prompt, so generation starts right after it and stops at eos.

// `turn` marks whose turn the prompt opens: kPrompt for a task (the policy answers), kJudge for
// a judge template (reward/judge_format.h; the model writes its reasoning and verdict).
std::vector<int32_t> format_prompt(const Tokenizer& tokenizer, std::string_view prompt,
                                   SpecialToken turn = SpecialToken::kPrompt);

struct TrainingSequence {
  std::vector<int32_t> tokens;
  // Same length as tokens. loss_mask[i] == 1 means tokens[i] is a target: the model is trained
  // to predict tokens[i] from tokens[0..i). The mask is 1 exactly on the response tokens and the
  // final eos; everything up to and including the response-marker is context (mask 0), so
  // loss_mask[0] is always 0. A trainer computing logits at position i-1 for target i uses
  // loss_mask[i] as the weight of that prediction.
  std::vector<uint8_t> loss_mask;
};

TrainingSequence format_example(const Tokenizer& tokenizer, std::string_view prompt,
                                std::string_view response,
                                SpecialToken turn = SpecialToken::kPrompt);

}  // namespace rlhf
