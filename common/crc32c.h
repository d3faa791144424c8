#pragma once
// CRC-32C (Castagnoli), the checksum of weight transfers (proto/rlhf/v1/weights.proto).
// A table-driven software implementation: weight payloads are a few MiB, sent once per policy
// version, so a hardware-accelerated one would not show up in any profile.
#include <cstddef>
#include <cstdint>
#include <span>

namespace rlhf {

// Extends `crc` (the value returned for the bytes before, 0 to start) over `bytes`, so a
// payload that arrives in chunks is checked without assembling it first.
uint32_t crc32c_extend(uint32_t crc, std::span<const std::byte> bytes);

inline uint32_t crc32c(std::span<const std::byte> bytes) { return crc32c_extend(0, bytes); }

}  // namespace rlhf
