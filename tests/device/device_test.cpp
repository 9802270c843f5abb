// remat/device.h: parsing --device, refusing a device that is not there
// (on every build), and on a GPU the index, synchronization and the CUDA
// generator's state.
#include "remat/device.h"
#include "testing.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

namespace {

TEST(DeviceTest, ParsesCpuCudaAndCudaN) {
  EXPECT_EQ(remat::parse_device("cpu"), c10::Device(c10::kCPU));
  EXPECT_EQ(remat::parse_device("cuda"), c10::Device(c10::kCUDA));
  EXPECT_EQ(remat::parse_device("cuda:3"), c10::Device(c10::kCUDA, 3));
  for (const char* bad : {"", "gpu", "CUDA", "cuda:", "cuda:x", "cuda:-1", "cpu:0", "cuda:1:2"}) {
    EXPECT_THROW_WITH(remat::parse_device(bad), "expected cpu, cuda or cuda:N");
  }
}

TEST(DeviceTest, CpuIsAlwaysThereAndCudaOnlyWithAGpu) {
  EXPECT_EQ(remat::device_unavailable_reason(c10::kCPU), "");
  EXPECT_EQ(remat::require_device(c10::kCPU), c10::Device(c10::kCPU));
  EXPECT_EQ(remat::describe_device(c10::kCPU), "cpu");
  EXPECT_NO_THROW(remat::synchronize(c10::kCPU));
  EXPECT_FALSE(remat::cuda_rng_state(c10::kCPU).defined());
  const std::string no_gpu = remat_test::no_cuda_reason();
  const c10::Device cuda(c10::kCUDA);
  if (!no_gpu.empty()) {
    // The reason names what is missing: the build's CUDA, or a GPU.
    EXPECT_THROW_WITH(
        remat::require_device(cuda),
        remat::built_with_cuda() ? "needs a GPU, but none is visible" : "needs a CUDA build");
  } else {
    EXPECT_EQ(remat::require_device(cuda), c10::Device(c10::kCUDA, 0));
    EXPECT_THROW_WITH(remat::require_device(c10::Device(c10::kCUDA, 99)), "is not there");
  }
#ifdef REMAT_WITH_CUDA
  EXPECT_TRUE(remat::built_with_cuda());
#else
  EXPECT_FALSE(remat::built_with_cuda());
#endif
}

TEST(DeviceCudaTest, GeneratorStateRoundTripsAndDescribeNamesTheGpu) {
  REMAT_REQUIRE_CUDA();
  const c10::Device cuda(c10::kCUDA, 0);
  EXPECT_EQ(remat::describe_device(cuda).rfind("cuda:0 (", 0), 0u) << remat::describe_device(cuda);
  remat::make_current(cuda);
  auto state = remat::cuda_rng_state(cuda);
  ASSERT_TRUE(state.defined());
  auto a = torch::rand({16}, torch::TensorOptions().device(cuda));
  remat::set_cuda_rng_state(cuda, state);
  auto b = torch::rand({16}, torch::TensorOptions().device(cuda));
  remat::synchronize(cuda);
  EXPECT_TRUE(torch::equal(a, b));
}

} // namespace
