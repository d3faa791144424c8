#include "common/crc32c.h"

#include <array>

namespace rlhf {
namespace {

// Reflected polynomial of CRC-32C (iSCSI, RFC 3720).
constexpr uint32_t kPolynomial = 0x82F63B78u;

constexpr std::array<uint32_t, 256> make_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t value = i;
    for (int bit = 0; bit < 8; ++bit) value = (value & 1u) ? (value >> 1) ^ kPolynomial : value >> 1;
    table[i] = value;
  }
  return table;
}

constexpr std::array<uint32_t, 256> kTable = make_table();

}  // namespace

uint32_t crc32c_extend(uint32_t crc, std::span<const std::byte> bytes) {
  // The register holds the complement between calls' views of it, as the standard defines.
  uint32_t reg = ~crc;
  for (std::byte b : bytes) reg = kTable[(reg ^ static_cast<uint32_t>(b)) & 0xFFu] ^ (reg >> 8);
  return ~reg;
}

}  // namespace rlhf
