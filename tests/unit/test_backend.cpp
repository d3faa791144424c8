// runtime.device and the backend it picks (kernels/backend.h): clear errors for what cannot run.
#include <gtest/gtest.h>

#include <functional>

#include "common/error.h"
#include "kernels/backend.h"
#include "learner/run_config.h"
#include "tests/test_support.h"

namespace rlhf {
namespace {

TEST(Backend, CpuIsAlwaysThereAndAnUnknownNameIsAnError) {
  EXPECT_STREQ(make_float_ops("cpu")->name(), "cpu");
  const std::string error = error_of([] { make_float_ops("tpu"); });
  EXPECT_NE(error.find("runtime.device: 'tpu'"), std::string::npos) << error;
}

TEST(Backend, CudaIsTheCudaBackendOrAnErrorThatSaysWhyNot) {
  std::unique_ptr<Ops<float>> ops;
  const std::string error = error_of([&] { ops = make_float_ops("cuda"); });
  if (!cuda_backend_built()) {
    EXPECT_NE(error.find("built without the CUDA backend"), std::string::npos) << error;
  } else if (!error.empty()) {  // a CUDA build on a machine without a GPU (CI)
    EXPECT_NE(error.find("no CUDA device is visible"), std::string::npos) << error;
  } else {
    EXPECT_STREQ(ops->name(), "cuda");
  }
}

TEST(Backend, TheConfigKeyIsChecked) {
  const std::string unknown = error_of([] {
    RunConfig::load_string("runtime: {device: gpu0}\n", "test");
  });
  EXPECT_NE(unknown.find("runtime.device: 'gpu0'"), std::string::npos) << unknown;
  const RunConfig cuda = RunConfig::load_string("runtime: {device: cuda}\n", "test");
  EXPECT_EQ(cuda.runtime.device, "cuda");
}

}  // namespace
}  // namespace rlhf
