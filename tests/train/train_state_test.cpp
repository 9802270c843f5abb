#include "remat/train/train_state.h"

#include "remat/io/file.h"
#include "remat/io/safetensors.h"
#include "testing.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdio>
#include <filesystem>

namespace {

namespace fs = std::filesystem;
using namespace remat::train;

class TrainStateTest : public ::testing::Test {
 protected:
  TrainStateTest() {
    torch::manual_seed(0);
    dir_ = ::testing::TempDir() + "/train_state_" +
        ::testing::UnitTest::GetInstance()->current_test_info()->name();
    fs::remove_all(dir_);
  }

  TrainState make(int64_t step) {
    TrainState s;
    s.tensors["model.w"] = torch::randn({3, 4});
    s.tensors["rng.cpu"] = torch::arange(10, torch::kUInt8);
    s.info = {{"step", step}, {"note", "hello"}};
    return s;
  }

  std::string dir_;
};

TEST_F(TrainStateTest, RoundTripsTensorsAndDocument) {
  auto s = make(7);
  save_train_state(dir_, s);
  auto back = load_train_state(state_path(dir_));
  EXPECT_TRUE(torch::equal(back.tensors.at("model.w"), s.tensors.at("model.w")));
  EXPECT_TRUE(torch::equal(back.tensors.at("rng.cpu"), s.tensors.at("rng.cpu")));
  EXPECT_EQ(back.info, s.info);
  EXPECT_EQ(peek_train_state_step(state_path(dir_)), 7);
  EXPECT_FALSE(fs::exists(previous_state_path(dir_)));
}

TEST_F(TrainStateTest, KeepsTheStateItReplacesAndLeavesNoTemporaryFiles) {
  save_train_state(dir_, make(1));
  save_train_state(dir_, make(2));
  save_train_state(dir_, make(3));
  EXPECT_EQ(load_train_state(state_path(dir_)).info["step"], 3);
  EXPECT_EQ(load_train_state(previous_state_path(dir_)).info["step"], 2);
  for (const auto& entry : fs::directory_iterator(dir_)) {
    EXPECT_EQ(entry.path().string().find(".tmp"), std::string::npos) << entry.path();
  }
}

TEST_F(TrainStateTest, RefusesATruncatedFileAndLeavesItAsItIs) {
  save_train_state(dir_, make(1));
  const auto path = state_path(dir_);
  auto bytes = remat::io::read_file(path);
  const auto cut = bytes.substr(0, bytes.size() - 20);
  remat::io::write_file_atomic(path, cut);
  EXPECT_THROW_WITH(load_train_state(path), "state.safetensors' is damaged");
  EXPECT_EQ(remat::io::read_file(path), cut);
}

TEST_F(TrainStateTest, RefusesAFlippedByteThroughItsChecksum) {
  save_train_state(dir_, make(1));
  const auto path = state_path(dir_);
  auto bytes = remat::io::read_file(path);
  bytes[bytes.size() - 3] ^= 0x40; // inside the last tensor's data
  remat::io::write_file_atomic(path, bytes);
  EXPECT_THROW_WITH(load_train_state(path), "is damaged (checksum");
}

TEST_F(TrainStateTest, RefusesFilesThatAreNotTrainingStates) {
  fs::create_directories(dir_);
  const auto path = dir_ + "/weights.safetensors";
  remat::io::save_safetensors(path, {{"w", torch::zeros({2})}});
  EXPECT_THROW_WITH(load_train_state(path), "is not a remat training state");
  EXPECT_THROW_WITH(load_train_state(dir_ + "/absent"), "no training state at");
  EXPECT_EQ(peek_train_state_step(dir_ + "/absent"), -1);
}

} // namespace
