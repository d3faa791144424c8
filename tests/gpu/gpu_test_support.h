#pragma once
// What every GPU test needs: skipping cleanly without a device, checked CUDA calls, and a
// device buffer that frees itself.
#include <cstddef>

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

namespace rlhf {

#define CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr

inline bool have_cuda_device() {
  int count = 0;
  // No driver or no device both mean: nothing to test here.
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

#define SKIP_WITHOUT_GPU() \
  if (!have_cuda_device()) GTEST_SKIP() << "no CUDA device"

template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  explicit DeviceBuffer(size_t n) {
    const size_t bytes = (n > 0 ? n : 1) * sizeof(T);
    if (cudaMalloc(reinterpret_cast<void**>(&ptr), bytes) != cudaSuccess) ptr = nullptr;
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

}  // namespace rlhf
