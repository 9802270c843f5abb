// The process group and the gradient reducer with two ranks as two threads
// of this process (a FileStore for the rendezvous, Gloo on 127.0.0.1), and
// the hook count that makes remat's checkpoint safe for data parallelism.
#include "remat/dist/data_parallel.h"
#include "remat/dist/process_group.h"
#include "remat/nn/bert.h"
#include "testing.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <atomic>
#include <cstdio>
#include <exception>
#include <functional>
#include <map>
#include <thread>
#include <unistd.h>

namespace {

using remat::dist::DistOptions;
using remat::dist::GradReducer;
using remat::dist::GradReducerOptions;
using remat::dist::ProcessGroup;
using ::testing::HasSubstr;

class DataParallelTest : public ::testing::Test {
 protected:
  DataParallelTest() {
    torch::manual_seed(0);
    static int counter = 0;
    store_ = ::testing::TempDir() + "/remat_dp_store_" + std::to_string(::getpid()) + "_" +
        std::to_string(counter++);
    std::remove(store_.c_str());
  }
  ~DataParallelTest() override {
    std::remove(store_.c_str());
  }

  // Runs `body(group)` as ranks 0 and 1 on two threads; rethrows the first
  // failure on the test's thread.
  void two_ranks(const std::function<void(ProcessGroup&)>& body, double timeout = 30) {
    std::exception_ptr errors[2];
    std::vector<std::thread> threads;
    for (int r = 0; r < 2; ++r) {
      threads.emplace_back([&, r] {
        try {
          ProcessGroup group(
              DistOptions().rank(r).world_size(2).store_path(store_).timeout_seconds(timeout));
          body(group);
        } catch (...) {
          errors[r] = std::current_exception();
        }
      });
    }
    for (auto& t : threads) {
      t.join();
    }
    std::string what;
    for (int r = 0; r < 2; ++r) {
      if (errors[r]) {
        what += "rank " + std::to_string(r) + ": " +
            remat_test::thrown_message([&] { std::rethrow_exception(errors[r]); }) + "\n";
      }
    }
    if (!what.empty()) {
      throw std::runtime_error(what);
    }
  }

  std::string store_;
};

TEST_F(DataParallelTest, AllReduceSumsAndBroadcastCopiesRankZero) {
  std::map<int64_t, std::vector<float>> sums, copies;
  std::map<int64_t, std::string> texts;
  std::mutex m;
  two_ranks([&](ProcessGroup& g) {
    const float r = static_cast<float>(g.rank());
    std::vector<torch::Tensor> t{torch::full({3}, r + 1), torch::full({2, 2}, 10 * (r + 1))};
    g.all_reduce_sum(t);
    std::vector<torch::Tensor> b{torch::full({4}, r + 5)};
    g.broadcast(b, 0);
    auto text = g.broadcast_string("from rank " + std::to_string(g.rank()));
    g.barrier();
    std::lock_guard<std::mutex> lock(m);
    sums[g.rank()] = {t[0][0].item<float>(), t[1][1][1].item<float>()};
    copies[g.rank()] = {b[0][3].item<float>()};
    texts[g.rank()] = text;
  });
  for (int64_t r : {0, 1}) {
    EXPECT_EQ(sums[r], (std::vector<float>{3, 30}));
    EXPECT_EQ(copies[r], (std::vector<float>{5}));
    EXPECT_EQ(texts[r], "from rank 0");
  }
}

TEST_F(DataParallelTest, ReducerSumsOrAveragesEveryBucket) {
  // Five parameters of 16..80 bytes in buckets of at most 64 bytes: several
  // buckets, one parameter larger than a bucket, one without a gradient on
  // either rank (3), one with a gradient on rank 1 only (4).
  std::vector<std::vector<int64_t>> shapes{{4}, {2, 3}, {20}, {5}, {3}};
  for (bool average : {true, false}) {
    std::map<int64_t, std::vector<torch::Tensor>> grads;
    std::map<int64_t, size_t> buckets;
    std::mutex m;
    two_ranks([&](ProcessGroup& g) {
      std::vector<torch::Tensor> params;
      for (size_t i = 0; i < shapes.size(); ++i) {
        auto p = torch::zeros(shapes[i]).requires_grad_(true);
        if (i != 3 && (i != 4 || g.rank() == 1)) {
          p.mutable_grad() =
              torch::arange(p.numel()).to(torch::kFloat).view(shapes[i]) * (g.rank() + 1) + static_cast<double>(i);
        }
        params.push_back(p);
      }
      auto group = std::shared_ptr<ProcessGroup>(&g, [](ProcessGroup*) {});
      GradReducer reducer(group, params, GradReducerOptions().bucket_bytes(64).average(average));
      reducer.reduce();
      std::lock_guard<std::mutex> lock(m);
      buckets[g.rank()] = reducer.buckets().size();
      for (auto& p : params) {
        grads[g.rank()].push_back(p.grad().defined() ? p.grad().clone() : torch::Tensor());
      }
    });
    // In reverse order, 64 bytes at most: [4, 3] (12 + 20), [2] (80), [1, 0].
    EXPECT_EQ(buckets[0], 3u);
    for (size_t i = 0; i < shapes.size(); ++i) {
      auto base = torch::arange(torch::zeros(shapes[i]).numel()).to(torch::kFloat).view(shapes[i]);
      // Ranks 0 and 1 hold base * 1 + i and base * 2 + i.
      if (i == 3) {
        EXPECT_FALSE(grads[0][i].defined());
        EXPECT_FALSE(grads[1][i].defined());
        continue;
      }
      torch::Tensor want = i == 4 ? base * 2 + static_cast<double>(i)
                                  : base * 3 + 2.0 * static_cast<double>(i);
      if (average) {
        want = want / 2;
      }
      EXPECT_TRUE(torch::equal(grads[0][i], want)) << "parameter " << i;
      EXPECT_TRUE(torch::equal(grads[1][i], want)) << "parameter " << i;
    }
  }
}

TEST_F(DataParallelTest, MissingPeerFailsWithinTheTimeout) {
  // Rank 1 joins but never takes part in the all-reduce: rank 0 gives up
  // after the timeout with an error that says so.
  std::string message;
  std::atomic<bool> done{false};
  two_ranks(
      [&](ProcessGroup& g) {
        if (g.rank() == 0) {
          message = remat_test::thrown_message([&] {
            std::vector<torch::Tensor> t{torch::ones({8})};
            g.all_reduce_sum(t);
          });
          done = true;
        } else {
          while (!done) {
            std::this_thread::sleep_for(std::chrono::milliseconds(10));
          }
        }
      },
      /*timeout=*/1);
  EXPECT_THAT(message, HasSubstr("data parallel: all-reduce failed on rank 0 of 2"));
  EXPECT_THAT(message, HasSubstr("did not answer within 1 s"));
}

TEST_F(DataParallelTest, BadOptionsAreRefused) {
  EXPECT_THROW_WITH(DistOptions().rank(2).world_size(2).validate(),
                    "rank: expected a value in [0, 2), but got 2");
  EXPECT_THROW_WITH(DistOptions().world_size(0).validate(),
                    "world_size: expected a value >= 1, but got 0");
  EXPECT_THROW_WITH(DistOptions().master_port(70000).validate(),
                    "master_port: expected a port in [1, 65535], but got 70000");
  EXPECT_THROW_WITH(DistOptions().timeout_seconds(0).validate(),
                    "timeout_seconds: expected a value > 0, but got 0");
}

TEST_F(DataParallelTest, EnvironmentGivesTheRank) {
  ::setenv("WORLD_SIZE", "4", 1);
  ::setenv("RANK", "3", 1);
  ::setenv("MASTER_ADDR", "10.0.0.7", 1);
  ::setenv("MASTER_PORT", "29533", 1);
  auto o = DistOptions::from_env();
  ::setenv("MASTER_PORT", "x1", 1);
  auto bad = remat_test::thrown_message([] { DistOptions::from_env(); });
  ::unsetenv("WORLD_SIZE");
  ::unsetenv("RANK");
  ::unsetenv("MASTER_ADDR");
  ::unsetenv("MASTER_PORT");
  ASSERT_TRUE(o.has_value());
  EXPECT_EQ(o->rank(), 3);
  EXPECT_EQ(o->world_size(), 4);
  EXPECT_EQ(o->master_addr(), "10.0.0.7");
  EXPECT_EQ(o->master_port(), 29533);
  EXPECT_THAT(bad, HasSubstr("MASTER_PORT: expected an integer in the environment, but got 'x1'"));
  EXPECT_FALSE(DistOptions::from_env().has_value());
}

// What DDP-style reducers rely on: under every-layer checkpointing each
// parameter's gradient hook fires exactly once per backward, although every
// layer runs its forward twice (Python's reentrant checkpoint does not
// give this: "marked ready twice").
TEST_F(DataParallelTest, GradientHooksFireOncePerParameterUnderCheckpointing) {
  remat::nn::Bert bert(remat::nn::BertOptions()
                           .vocab_size(50)
                           .hidden_size(16)
                           .num_layers(3)
                           .num_heads(2)
                           .max_position_embeddings(16)
                           .hidden_dropout(0.1)
                           .attention_dropout(0.1));
  bert->gradient_checkpointing_enable(remat::CheckpointPolicy::every_layer());
  auto named = bert->named_parameters();
  std::vector<int> fired(named.size(), 0);
  size_t i = 0;
  for (auto& kv : named) {
    auto* count = &fired[i++];
    kv.value().register_hook([count](torch::Tensor g) {
      ++*count;
      return g;
    });
  }
  auto ids = torch::randint(50, {2, 8});
  for (int step = 1; step <= 2; ++step) {
    auto out = bert->forward(ids, torch::ones({2, 8}, torch::kLong));
    (out.last_hidden_state.pow(2).mean() + out.pooler_output.sum()).backward();
    i = 0;
    for (auto& kv : named) {
      EXPECT_EQ(fired[i++], step) << kv.key();
    }
  }
}

} // namespace
