#pragma once
// Text for protobuf string fields. proto3 strings must be valid UTF-8 (a receiver refuses to
// parse the message otherwise, and gRPC then fails the call), but a byte-level model can emit
// any bytes: half of a multi-byte character cut off by the token budget, a stray 0xFF. Rollout
// texts (actor) and judge reasoning (reward service) go through valid_utf8 before they are put
// into a message; the token ids stay the exact record.
#include <string>

namespace rlhf {

// `text` with every byte that does not belong to a well-formed UTF-8 sequence (no overlong
// forms, no surrogates, nothing above U+10FFFF) replaced by U+FFFD.
std::string valid_utf8(const std::string& text);

}  // namespace rlhf
