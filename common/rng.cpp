#include "common/rng.h"

#include <cstring>
#include <sstream>

#include "common/error.h"

namespace rlhf {

std::string Rng::serialize() const {
  uint64_t spare_bits = 0;
  std::memcpy(&spare_bits, &spare_normal_, sizeof spare_bits);
  std::ostringstream out;
  for (uint64_t word : state_) out << word << ' ';
  out << (has_spare_normal_ ? 1 : 0) << ' ' << spare_bits;
  return out.str();
}

void Rng::deserialize(const std::string& text) {
  std::istringstream in(text);
  std::array<uint64_t, 4> state{};
  int spare_flag = 0;
  uint64_t spare_bits = 0;
  for (auto& word : state) in >> word;
  in >> spare_flag >> spare_bits;
  if (in.fail() || (spare_flag != 0 && spare_flag != 1)) fail("malformed RNG state '{}'", text);
  state_ = state;
  has_spare_normal_ = spare_flag == 1;
  std::memcpy(&spare_normal_, &spare_bits, sizeof spare_bits);
}

}  // namespace rlhf
