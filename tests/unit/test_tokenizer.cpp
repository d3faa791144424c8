#include <gtest/gtest.h>

#include <set>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/rng.h"
#include "model/config.h"
#include "model/tokenizer.h"

namespace rlhf {
namespace {

// Runs f, which must throw rlhf::Error; returns its message ("" and a test failure otherwise).
template <typename F>
std::string error_message(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an rlhf::Error";
  return "";
}

constexpr SpecialToken kAllSpecials[] = {SpecialToken::kBos,      SpecialToken::kEos,
                                         SpecialToken::kPad,      SpecialToken::kPrompt,
                                         SpecialToken::kResponse, SpecialToken::kJudge};

TEST(ByteTokenizer, RoundTripsEveryByteValue) {
  ByteTokenizer tok;
  std::string all;
  for (int b = 0; b < 256; ++b) all.push_back(static_cast<char>(b));
  const std::vector<int32_t> ids = tok.encode(all);
  ASSERT_EQ(ids.size(), 256u);
  // Byte b is id b, in particular 0x00 -> 0 and 0xff -> 255 (not -1 through a signed char).
  for (int b = 0; b < 256; ++b) EXPECT_EQ(ids[b], b);
  EXPECT_EQ(tok.decode(ids), all);
}

TEST(ByteTokenizer, RoundTripsUtf8AndRandomBytes) {
  ByteTokenizer tok;
  const std::string utf8 = "h\xc3\xa9llo \xe2\x86\x92 \xe4\xb8\x96\xe7\x95\x8c \xf0\x9f\x8e\x89";
  const std::vector<int32_t> utf8_ids = tok.encode(utf8);
  EXPECT_EQ(utf8_ids.size(), utf8.size());  // one id per byte, not per code point
  EXPECT_EQ(tok.decode(utf8_ids), utf8);

  Rng rng(1234);
  for (int trial = 0; trial < 50; ++trial) {
    std::string text(static_cast<size_t>(rng.next_u64() % 300), '\0');
    for (char& c : text) c = static_cast<char>(rng.next_u64() & 0xff);
    EXPECT_EQ(tok.decode(tok.encode(text)), text) << "trial " << trial;
  }
  EXPECT_TRUE(tok.encode("").empty());
  EXPECT_EQ(tok.decode(std::vector<int32_t>{}), "");
}

TEST(ByteTokenizer, SpecialIdsAreDistinctAndAfterTheBytes) {
  ByteTokenizer tok;
  EXPECT_EQ(tok.vocab_size(), 262);
  std::set<int32_t> ids;
  for (SpecialToken s : kAllSpecials) {
    const int32_t id = tok.special(s);
    EXPECT_GE(id, 256);
    EXPECT_LT(id, tok.vocab_size());
    EXPECT_TRUE(tok.is_special(id));
    ids.insert(id);
  }
  EXPECT_EQ(ids.size(), std::size(kAllSpecials));
  for (int32_t b = 0; b < 256; ++b) EXPECT_FALSE(tok.is_special(b)) << b;
  EXPECT_FALSE(tok.is_special(-1));
  EXPECT_FALSE(tok.is_special(262));
  EXPECT_EQ(tok.special(SpecialToken::kBos), 256);
  EXPECT_EQ(tok.special(SpecialToken::kJudge), 261);
}

TEST(ByteTokenizer, EncodeNeverProducesSpecialTokens) {
  ByteTokenizer tok;
  // Text that spells a special token stays text: users cannot forge a turn boundary.
  for (int32_t id : tok.encode("<|eos|><|bos|><|response|>")) EXPECT_LT(id, 256);
}

TEST(ByteTokenizer, DecodeDropsSpecialsUnlessAskedToRenderThem) {
  ByteTokenizer tok;
  std::vector<int32_t> ids;
  for (SpecialToken s : kAllSpecials) {
    ids.push_back(tok.special(s));
    ids.push_back('x');
  }
  EXPECT_EQ(tok.decode(ids), "xxxxxx");
  EXPECT_EQ(tok.decode(ids, /*render_special=*/true),
            "<|bos|>x<|eos|>x<|pad|>x<|prompt|>x<|response|>x<|judge|>x");
}

TEST(ByteTokenizer, DecodeRejectsIdsOutsideTheVocabulary) {
  ByteTokenizer tok;
  const std::vector<int32_t> too_big = {'a', 262};
  std::string msg = error_message([&] { tok.decode(too_big); });
  EXPECT_NE(msg.find("262"), std::string::npos) << msg;
  EXPECT_NE(msg.find("position 1"), std::string::npos) << msg;
  const std::vector<int32_t> negative = {-1};
  msg = error_message([&] { tok.decode(negative, true); });
  EXPECT_NE(msg.find("-1"), std::string::npos) << msg;
}

TEST(MakeTokenizer, KnowsByteAndRejectsOthersListingTheKnownNames) {
  const std::unique_ptr<Tokenizer> tok = make_tokenizer("byte");
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->name(), "byte");
  EXPECT_EQ(tok->vocab_size(), 262);
  const std::string msg = error_message([] { make_tokenizer("gpt2-bpe"); });
  EXPECT_NE(msg.find("'gpt2-bpe'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("byte"), std::string::npos) << msg;
}

TEST(ModelConfigSetVocab, FillsInAndChecksAStatedSize) {
  ByteTokenizer tok;
  ModelConfig config;
  model_config_set_vocab(config, tok);
  EXPECT_EQ(config.vocab_size, 262);
  model_config_set_vocab(config, tok);  // stating the right size is fine
  EXPECT_EQ(config.vocab_size, 262);
  config.vocab_size = 300;
  const std::string msg = error_message([&] { model_config_set_vocab(config, tok); });
  EXPECT_NE(msg.find("model.vocab_size"), std::string::npos) << msg;
  EXPECT_NE(msg.find("300"), std::string::npos) << msg;
}

TEST(SequenceFormat, PromptIsBosMarkerBytesResponseMarker) {
  ByteTokenizer tok;
  const std::vector<int32_t> expected = {256, 259, 'h', 'i', 260};
  EXPECT_EQ(format_prompt(tok, "hi"), expected);
  const std::vector<int32_t> empty = {256, 259, 260};
  EXPECT_EQ(format_prompt(tok, ""), empty);
}

TEST(SequenceFormat, ExampleMasksExactlyTheResponseAndEos) {
  ByteTokenizer tok;
  const TrainingSequence seq = format_example(tok, "hi", "ok!");
  const std::vector<int32_t> tokens = {256, 259, 'h', 'i', 260, 'o', 'k', '!', 257};
  const std::vector<uint8_t> mask = {0, 0, 0, 0, 0, 1, 1, 1, 1};
  EXPECT_EQ(seq.tokens, tokens);
  EXPECT_EQ(seq.loss_mask, mask);
}

TEST(SequenceFormat, ExampleStartsWithThePromptAndMaskFollowsTheContract) {
  ByteTokenizer tok;
  Rng rng(7);
  for (int trial = 0; trial < 20; ++trial) {
    std::string prompt(static_cast<size_t>(rng.next_u64() % 40), '\0');
    std::string response(static_cast<size_t>(rng.next_u64() % 40), '\0');
    for (char& c : prompt) c = static_cast<char>(rng.next_u64() & 0xff);
    for (char& c : response) c = static_cast<char>(rng.next_u64() & 0xff);
    const std::vector<int32_t> p = format_prompt(tok, prompt);
    const TrainingSequence seq = format_example(tok, prompt, response);
    ASSERT_EQ(seq.tokens.size(), p.size() + response.size() + 1);
    ASSERT_EQ(seq.loss_mask.size(), seq.tokens.size());
    // The prompt is a prefix, so generation from format_prompt continues the training format.
    EXPECT_TRUE(std::equal(p.begin(), p.end(), seq.tokens.begin()));
    EXPECT_EQ(seq.tokens.back(), tok.special(SpecialToken::kEos));
    for (size_t i = 0; i < seq.tokens.size(); ++i) {
      EXPECT_EQ(seq.loss_mask[i], i >= p.size() ? 1 : 0) << "position " << i;
    }
    EXPECT_EQ(tok.decode(seq.tokens), prompt + response);
  }
}

TEST(SequenceFormat, EmptyResponseStillTeachesEos) {
  ByteTokenizer tok;
  const TrainingSequence seq = format_example(tok, "q", "");
  const std::vector<uint8_t> mask = {0, 0, 0, 0, 1};
  EXPECT_EQ(seq.loss_mask, mask);
  EXPECT_EQ(seq.tokens.back(), 257);
}

}  // namespace
}  // namespace rlhf
