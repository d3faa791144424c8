// CRC-32C against the check values of RFC 3720 (B.4) and the standard "123456789" check.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "common/crc32c.h"

namespace rlhf {
namespace {

std::span<const std::byte> as_bytes(const std::string& s) {
  return std::as_bytes(std::span<const char>(s.data(), s.size()));
}

TEST(Crc32c, MatchesPublishedCheckValues) {
  EXPECT_EQ(crc32c(as_bytes("123456789")), 0xE3069283u);
  std::vector<std::byte> zeros(32, std::byte{0});
  EXPECT_EQ(crc32c(zeros), 0x8A9136AAu);
  std::vector<std::byte> ones(32, std::byte{0xFF});
  EXPECT_EQ(crc32c(ones), 0x62A8AB43u);
  std::vector<std::byte> ascending(32);
  for (int i = 0; i < 32; ++i) ascending[i] = std::byte(i);
  EXPECT_EQ(crc32c(ascending), 0x46DD794Eu);
}

TEST(Crc32c, ChunkedEqualsWhole) {
  std::string text;
  for (int i = 0; i < 1000; ++i) text += char('a' + (i * 7) % 26);
  const uint32_t whole = crc32c(as_bytes(text));
  uint32_t chunked = 0;
  for (size_t pos = 0; pos < text.size(); pos += 97)
    chunked = crc32c_extend(chunked, as_bytes(text.substr(pos, 97)));
  EXPECT_EQ(chunked, whole);
  text[500] ^= 1;
  EXPECT_NE(crc32c(as_bytes(text)), whole);
}

}  // namespace
}  // namespace rlhf
