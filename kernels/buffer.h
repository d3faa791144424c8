#pragma once
// An owning array in a backend's memory. The model keeps every tensor in one of these, so the
// same model code runs whether the backend's memory is host RAM or a GPU.
#include <cstdint>
#include <utility>
#include <vector>

#include "kernels/ops.h"

namespace rlhf {

template <typename U, typename OpsT>
class Buffer {
 public:
  Buffer() = default;
  Buffer(OpsT& ops, int64_t count) : ops_(&ops), count_(count) {
    data_ = static_cast<U*>(ops.alloc_bytes(sizeof(U) * size_t(count)));
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& other) noexcept { *this = std::move(other); }
  Buffer& operator=(Buffer&& other) noexcept {
    if (this != &other) {
      release();
      ops_ = std::exchange(other.ops_, nullptr);
      data_ = std::exchange(other.data_, nullptr);
      count_ = std::exchange(other.count_, 0);
    }
    return *this;
  }
  ~Buffer() { release(); }

  U* data() { return data_; }
  const U* data() const { return data_; }
  int64_t size() const { return count_; }

  std::vector<U> to_host() const {
    std::vector<U> host(static_cast<size_t>(count_));
    if (count_) ops_->copy_to_host(host.data(), data_, sizeof(U) * size_t(count_));
    return host;
  }
  void from_host(const U* host, int64_t count, int64_t offset = 0) {
    if (count) ops_->copy_from_host(data_ + offset, host, sizeof(U) * size_t(count));
  }

 private:
  void release() {
    if (data_) ops_->free_bytes(data_);
    data_ = nullptr;
  }
  OpsT* ops_ = nullptr;
  U* data_ = nullptr;
  int64_t count_ = 0;
};

}  // namespace rlhf
