// valid_utf8 (common/utf8.h): well-formed text passes unchanged; each byte outside a
// well-formed sequence becomes U+FFFD, and the result always parses as a protobuf string.
#include <gtest/gtest.h>

#include <string>

#include "common/utf8.h"

namespace rlhf {
namespace {

const std::string kReplacement = "\xEF\xBF\xBD";

TEST(ValidUtf8, KeepsWellFormedText) {
  const std::string text = "sort 3 1 2 -> 1 2 3; caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80";
  EXPECT_EQ(valid_utf8(text), text);
  EXPECT_EQ(valid_utf8(""), "");
}

TEST(ValidUtf8, ReplacesEachBadByte) {
  EXPECT_EQ(valid_utf8("a\xFF" "b"), "a" + kReplacement + "b");
  // A two-byte character cut after its first byte (a token budget ending mid-character).
  EXPECT_EQ(valid_utf8("x\xC3"), "x" + kReplacement);
  // Overlong encoding of '/', a UTF-16 surrogate, and a code point above U+10FFFF.
  EXPECT_EQ(valid_utf8("\xC0\xAF"), kReplacement + kReplacement);
  EXPECT_EQ(valid_utf8("\xED\xA0\x80"), kReplacement + kReplacement + kReplacement);
  EXPECT_EQ(valid_utf8("\xF4\x90\x80\x80"), kReplacement + kReplacement + kReplacement + kReplacement);
  // A lone continuation byte between good characters.
  EXPECT_EQ(valid_utf8("\xC3\xA9\x80\xC3\xA9"), "\xC3\xA9" + kReplacement + "\xC3\xA9");
}

}  // namespace
}  // namespace rlhf
