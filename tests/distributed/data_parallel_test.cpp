// The process group and the gradient reducer with two ranks as two threads
// of this process (a FileStore for the rendezvous, Gloo on 127.0.0.1), and
// the hook count that makes remat's checkpoint safe for data parallelism.
#include "remat/checkpoint.h"
#include "remat/distributed/data_parallel.h"
#include "remat/distributed/process_group.h"
#include "remat/nn/bert.h"
#include "testing.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/variable.h>
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
using remat::dist::GradReducerStats;
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

  /// The device two_ranks' groups are on: cpu (Gloo), or CUDA (NCCL too).
  c10::Device device_ = c10::kCPU;

  // Runs `body(group)` as ranks 0 and 1 on two threads; rethrows the first
  // failure on the test's thread.
  void two_ranks(const std::function<void(ProcessGroup&)>& body, double timeout = 30) {
    // A store file of its own: one left by an earlier group could hand this
    // one that group's (closed) addresses.
    const std::string store = store_ + "_" + std::to_string(groups_++);
    std::remove(store.c_str());
    std::exception_ptr errors[2];
    std::vector<std::thread> threads;
    for (int r = 0; r < 2; ++r) {
      threads.emplace_back([&, r] {
        try {
          ProcessGroup group(DistOptions()
                                 .rank(r)
                                 .world_size(2)
                                 .store_path(store)
                                 .timeout_seconds(timeout)
                                 .device(device_));
          body(group);
        } catch (...) {
          errors[r] = std::current_exception();
        }
      });
    }
    for (auto& t : threads) {
      t.join();
    }
    std::remove(store.c_str());
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
  int groups_ = 0; ///< two_ranks calls so far
};

// What one rank holds after a reduced step.
struct RankResult {
  std::vector<torch::Tensor> grads; ///< clones; undefined where .grad is
  GradReducerStats stats;
  size_t buckets = 0;
};

using Results = std::map<int64_t, RankResult>;

// A step's backward passes on every rank: `backwards[r]` runs rank r's
// micro-batches, calling `before(i, n)` before the i-th of n backwards.
using Backwards = std::function<void(
    int64_t rank, const std::function<void(size_t, size_t)>& before)>;

// How a test announces the backwards to the reducer.
enum class Announce {
  kNone,     ///< never calls prepare_for_backward
  kLastOnly, ///< sync only for the last backward (the trainer's way)
  kEvery,    ///< sync for every backward (a misuse that must stay correct)
};

void expect_same(const Results& a, const Results& b, const std::string& what) {
  for (int64_t r : {0, 1}) {
    const auto& x = a.at(r).grads;
    const auto& y = b.at(r).grads;
    ASSERT_EQ(x.size(), y.size());
    for (size_t i = 0; i < x.size(); ++i) {
      ASSERT_EQ(x[i].defined(), y[i].defined()) << what << ": rank " << r << ", parameter " << i;
      if (x[i].defined()) {
        EXPECT_TRUE(torch::equal(x[i], y[i])) << what << ": rank " << r << ", parameter " << i;
      }
    }
  }
}

int64_t bytes_of(const std::vector<torch::Tensor>& params) {
  int64_t n = 0;
  for (const auto& p : params) {
    n += p.numel() * static_cast<int64_t>(p.element_size());
  }
  return n;
}

class GradReducerOverlapTest : public DataParallelTest {
 protected:
  // Runs one reduced step on two ranks: params[r] are rank r's parameters.
  Results step(
      const std::vector<std::vector<torch::Tensor>>& params,
      const Backwards& backwards,
      GradReducerOptions options,
      Announce announce) {
    Results out;
    std::mutex m;
    two_ranks([&](ProcessGroup& g) {
      auto group = std::shared_ptr<ProcessGroup>(&g, [](ProcessGroup*) {});
      const auto& mine = params[static_cast<size_t>(g.rank())];
      for (auto p : mine) {
        p.mutable_grad() = torch::Tensor();
      }
      GradReducer reducer(group, mine, options);
      backwards(g.rank(), [&](size_t i, size_t n) {
        if (announce != Announce::kNone) {
          reducer.prepare_for_backward(announce == Announce::kEvery || i + 1 == n);
        }
      });
      reducer.reduce();
      RankResult r;
      for (const auto& p : mine) {
        r.grads.push_back(p.grad().defined() ? p.grad().clone() : torch::Tensor());
      }
      r.stats = reducer.stats();
      r.buckets = reducer.buckets().size();
      std::lock_guard<std::mutex> lock(m);
      out[g.rank()] = std::move(r);
    });
    return out;
  }
};

// Two copies of a small Bert (dropout off: the rank threads share the CPU
// generator), built here on the test's thread with the same weights, and
// rank r's rows: 4 rows of 8 tokens.
struct TwoBerts {
  explicit TwoBerts(bool checkpoint) {
    for (int r = 0; r < 2; ++r) {
      torch::manual_seed(0);
      remat::nn::Bert bert(remat::nn::BertOptions()
                               .vocab_size(50)
                               .hidden_size(16)
                               .num_layers(3)
                               .num_heads(2)
                               .max_position_embeddings(16)
                               .hidden_dropout(0.0)
                               .attention_dropout(0.0));
      if (checkpoint) {
        bert->gradient_checkpointing_enable(remat::CheckpointPolicy::every_layer());
      }
      models.push_back(bert);
      params.push_back(bert->parameters());
    }
    torch::manual_seed(1);
    for (int r = 0; r < 2; ++r) {
      ids.push_back(torch::randint(50, {4, 8}));
    }
  }

  // Rank r's rows in `micros` micro-batches, one backward each. The loss is
  // a sum over rows, so micro-batches add up to the whole batch.
  Backwards backwards(int64_t micros) {
    return [this, micros](int64_t rank, const std::function<void(size_t, size_t)>& before) {
      auto& bert = models[static_cast<size_t>(rank)];
      auto chunks = ids[static_cast<size_t>(rank)].chunk(micros, 0);
      for (size_t i = 0; i < chunks.size(); ++i) {
        before(i, chunks.size());
        auto out = bert->forward(chunks[i], torch::ones_like(chunks[i]));
        (out.last_hidden_state.pow(2).sum() * 0.01 + out.pooler_output.sum()).backward();
      }
    };
  }

  std::vector<remat::nn::Bert> models;
  std::vector<std::vector<torch::Tensor>> params;
  std::vector<torch::Tensor> ids;
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

TEST_F(GradReducerOverlapTest, OverlapGivesThePostBackwardResultExactly) {
  for (bool checkpoint : {false, true}) {
    SCOPED_TRACE(checkpoint ? "every layer checkpointed" : "no checkpointing");
    TwoBerts b(checkpoint);
    const auto options = GradReducerOptions().bucket_bytes(4096);
    const int64_t recomputed = remat::recompute_count();
    auto after = step(b.params, b.backwards(1), GradReducerOptions(options).overlap(false),
                      Announce::kLastOnly);
    auto overlapped = step(b.params, b.backwards(1), options, Announce::kLastOnly);
    EXPECT_EQ(remat::recompute_count() > recomputed, checkpoint);
    expect_same(after, overlapped, "overlap");
    const int64_t total = bytes_of(b.params[0]);
    for (int64_t r : {0, 1}) {
      EXPECT_GT(overlapped[r].buckets, 3u);
      // Every parameter gets a gradient: all buckets start during backward.
      EXPECT_EQ(overlapped[r].stats.bytes_in_backward, total);
      EXPECT_EQ(overlapped[r].stats.bytes_in_reduce, 0);
      EXPECT_EQ(overlapped[r].stats.buckets_redone, 0);
      EXPECT_EQ(after[r].stats.bytes_in_backward, 0);
      EXPECT_EQ(after[r].stats.bytes_in_reduce, total);
    }
    // The same average on both ranks, and not either rank's own gradient.
    for (size_t i = 0; i < b.params[0].size(); ++i) {
      EXPECT_TRUE(torch::equal(overlapped[0].grads[i], overlapped[1].grads[i])) << i;
    }
  }
}

TEST_F(GradReducerOverlapTest, AccumulatingMicroBatchesEqualsOneBigBatch) {
  TwoBerts b(/*checkpoint=*/true);
  const auto options = GradReducerOptions().bucket_bytes(4096).average(false);
  auto after = step(b.params, b.backwards(2), GradReducerOptions(options).overlap(false),
                    Announce::kLastOnly);
  auto overlapped = step(b.params, b.backwards(2), options, Announce::kLastOnly);
  auto unannounced = step(b.params, b.backwards(2), options, Announce::kNone);
  auto every = step(b.params, b.backwards(2), options, Announce::kEvery);
  auto big = step(b.params, b.backwards(1), options, Announce::kLastOnly);
  expect_same(after, overlapped, "accumulated, overlapped");
  expect_same(after, unannounced, "accumulated, no prepare_for_backward");
  expect_same(after, every, "accumulated, every backward synced");
  for (int64_t r : {0, 1}) {
    EXPECT_GT(overlapped[r].stats.bytes_in_backward, 0);
    EXPECT_EQ(overlapped[r].stats.buckets_redone, 0);
    EXPECT_EQ(unannounced[r].stats.bytes_in_backward, 0);
    // The first backward started every bucket, the second changed them all.
    EXPECT_EQ(every[r].stats.buckets_redone, static_cast<int64_t>(every[r].buckets));
    for (size_t i = 0; i < b.params[0].size(); ++i) {
      EXPECT_TRUE(torch::allclose(overlapped[r].grads[i], big[r].grads[i], 1e-4, 1e-5)) << i;
    }
  }
}

// Python-style reentrant checkpoint: forward without grad, and in backward
// an inner backward() that accumulates into the weight's .grad itself (the
// weight is no input of the node: it is passed inside a struct).
struct Weight {
  torch::Tensor w;
};

struct ReentrantScale : torch::autograd::Function<ReentrantScale> {
  static torch::Tensor forward(
      torch::autograd::AutogradContext* ctx, const torch::Tensor& x, Weight weight) {
    ctx->save_for_backward({x});
    ctx->saved_data["w"] = weight.w;
    torch::NoGradGuard no_grad;
    return x * weight.w;
  }
  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grads) {
    auto x = ctx->get_saved_variables()[0].detach().requires_grad_(true);
    auto w = ctx->saved_data["w"].toTensor();
    torch::AutoGradMode on(true);
    torch::autograd::backward({x * w}, {grads[0]});
    return {x.grad(), torch::Tensor()};
  }
};

TEST_F(GradReducerOverlapTest, GradientArrivingTwiceIsReducedAgain) {
  // w reaches .grad twice in one backward: through the reentrant inner
  // backward and through the graph. t is tied: one weight read by two
  // remat::checkpoint segments, whose gradients autograd adds up before
  // accumulating once.
  std::vector<std::vector<torch::Tensor>> params;
  for (int r = 0; r < 2; ++r) {
    params.push_back({torch::linspace(0.5, 2, 6).requires_grad_(true),
                      torch::linspace(-1, 1, 6).requires_grad_(true)});
  }
  Backwards backwards = [&](int64_t rank, const std::function<void(size_t, size_t)>& before) {
    auto& t = params[static_cast<size_t>(rank)][0];
    auto& w = params[static_cast<size_t>(rank)][1];
    auto x = torch::arange(6).to(torch::kFloat).add(static_cast<double>(rank)).requires_grad_(true);
    before(0, 1);
    auto segment = [&](const std::vector<torch::Tensor>& in) {
      return std::vector<torch::Tensor>{(in[0] * t).tanh()};
    };
    auto h = remat::checkpoint(segment, {x}, remat::CheckpointOptions().parameters({t}))[0];
    h = remat::checkpoint(segment, {h}, remat::CheckpointOptions().parameters({t}))[0];
    auto y = ReentrantScale::apply(h, Weight{w});
    (y.pow(2).sum() + (w * x).sum()).backward();
  };
  // One bucket each, w's first (buckets go in reverse order): it starts
  // when w's first gradient arrives.
  const auto options = GradReducerOptions().bucket_bytes(24);
  auto after = step(params, backwards, GradReducerOptions(options).overlap(false),
                    Announce::kLastOnly);
  auto overlapped = step(params, backwards, options, Announce::kLastOnly);
  expect_same(after, overlapped, "twice");
  for (int64_t r : {0, 1}) {
    ASSERT_EQ(overlapped[r].buckets, 2u);
    EXPECT_EQ(overlapped[r].stats.buckets_redone, 1); // w's, not t's
    EXPECT_EQ(overlapped[r].stats.bytes_in_backward, 48);
    EXPECT_EQ(overlapped[r].stats.bytes_in_reduce, 24);
  }
}

TEST_F(GradReducerOverlapTest, UnusedParametersKeepNoGradient) {
  // a: used on both ranks; b: on rank 1 only; c: by no rank; u: declared
  // to a checkpointed segment that does not read it, so its accumulator
  // runs (its hook fires) with no gradient.
  std::vector<std::vector<torch::Tensor>> params;
  for (int r = 0; r < 2; ++r) {
    std::vector<torch::Tensor> p;
    for (int i = 0; i < 4; ++i) {
      p.push_back(torch::full({3}, 1.0 + i).requires_grad_(true));
    }
    params.push_back(p);
  }
  Backwards backwards = [&](int64_t rank, const std::function<void(size_t, size_t)>& before) {
    const auto& p = params[static_cast<size_t>(rank)];
    auto x = torch::full({3}, 2.0 + static_cast<double>(rank));
    before(0, 1);
    auto y = remat::checkpoint(
        [&](const std::vector<torch::Tensor>& in) {
          return std::vector<torch::Tensor>{in[0] * p[0]};
        },
        {x},
        // The reentrant checkpoint: its Function gives every declared
        // parameter an edge, so u's accumulator runs with no gradient.
        remat::CheckpointOptions()
            .implementation(remat::CheckpointImpl::kReentrant)
            .parameters({p[0], p[3]}))[0];
    auto loss = y.sum();
    if (rank == 1) {
      loss = loss + (p[1] * x).sum();
    }
    loss.backward();
  };
  for (int64_t bucket : {12, 1 << 20}) {
    SCOPED_TRACE("bucket_bytes " + std::to_string(bucket));
    const auto options = GradReducerOptions().bucket_bytes(bucket);
    auto after = step(params, backwards, GradReducerOptions(options).overlap(false),
                      Announce::kLastOnly);
    auto overlapped = step(params, backwards, options, Announce::kLastOnly);
    expect_same(after, overlapped, "unused");
    for (int64_t r : {0, 1}) {
      const auto& g = overlapped[r].grads;
      ASSERT_TRUE(g[0].defined());
      EXPECT_TRUE(torch::equal(g[0], torch::full({3}, 2.5))); // (2 + 3) / 2
      ASSERT_TRUE(g[1].defined());
      EXPECT_TRUE(torch::equal(g[1], torch::full({3}, 1.5))); // (0 + 3) / 2
      EXPECT_FALSE(g[2].defined());
      EXPECT_FALSE(g[3].defined());
      if (bucket == 12) {
        // One parameter a bucket, u's first: its hook ran, with no gradient,
        // and started it; c's never runs, so the rest start in reduce().
        EXPECT_EQ(overlapped[r].stats.bytes_in_backward, 12);
        EXPECT_EQ(overlapped[r].stats.bytes_in_reduce, 36);
      }
    }
  }
}

TEST_F(GradReducerOverlapTest, HookFailureIsRethrownByReduce) {
  // A sparse gradient cannot be packed: the hook records the error instead
  // of throwing on autograd's thread, and reduce() reports it.
  std::map<int64_t, std::string> overlapped, after;
  std::mutex m;
  for (bool overlap : {true, false}) {
    two_ranks([&](ProcessGroup& g) {
      auto group = std::shared_ptr<ProcessGroup>(&g, [](ProcessGroup*) {});
      auto weight = torch::ones({10, 4}).requires_grad_(true);
      GradReducer reducer(group, {weight}, GradReducerOptions().overlap(overlap));
      reducer.prepare_for_backward(true);
      torch::embedding(weight, torch::tensor({1, 2}), -1, false, /*sparse=*/true).sum().backward();
      auto message = remat_test::thrown_message([&] { reducer.reduce(); });
      // No collective ran: neither rank may leave while the other is still
      // connecting to it.
      g.barrier();
      std::lock_guard<std::mutex> lock(m);
      (overlap ? overlapped : after)[g.rank()] = message;
    });
  }
  for (int64_t r : {0, 1}) {
    EXPECT_THAT(overlapped[r], HasSubstr("GradReducer: a gradient hook failed during backward: "
                                         "GradReducer: expected dense gradients, but parameter 0 "
                                         "has a Sparse one"));
    EXPECT_THAT(after[r], HasSubstr("GradReducer: expected dense gradients, but parameter 0 "
                                    "has a Sparse one"));
  }
}

TEST_F(GradReducerOverlapTest, ReducerRemovesItsHooks) {
  // The hooks live on the parameter's gradient accumulator, which outlives
  // a reducer: each reducer takes its own off again.
  auto group = std::make_shared<ProcessGroup>(DistOptions().store_path(store_));
  auto p = torch::ones({4}).requires_grad_(true);
  auto accumulator = torch::autograd::impl::grad_accumulator(p);
  const size_t before = accumulator->post_hooks().size();
  for (int i = 0; i < 2; ++i) {
    GradReducer reducer(group, {p});
    EXPECT_EQ(accumulator->post_hooks().size(), before + 1);
    p.mutable_grad() = torch::Tensor();
    reducer.prepare_for_backward(true);
    (p * 3).sum().backward();
    reducer.reduce();
    EXPECT_EQ(reducer.stats().bytes_in_backward, 16);
    EXPECT_TRUE(torch::equal(p.grad(), torch::full({4}, 3.0)));
  }
  EXPECT_EQ(accumulator->post_hooks().size(), before);
  // With no reducer left, backward still works.
  p.mutable_grad() = torch::Tensor();
  (p * 2).sum().backward();
  EXPECT_TRUE(torch::equal(p.grad(), torch::full({4}, 2.0)));
}

TEST_F(GradReducerOverlapTest, OptionsDefaultToOverlap) {
  EXPECT_TRUE(GradReducerOptions().overlap());
  EXPECT_FALSE(GradReducerOptions().overlap(false).overlap());
}



// ---------------------------------------------------------------- NCCL
// A group on a CUDA device sums CUDA tensors through NCCL (rank r on
// cuda:(r % GPUs)) and CPU tensors through Gloo, as before.

TEST_F(DataParallelTest, CudaGroupNeedsNccl) {
  const auto options = DistOptions().store_path(store_).device(c10::Device(c10::kCUDA));
  if (remat::dist::nccl_available()) {
    EXPECT_NO_THROW(options.validate());
  } else {
    EXPECT_THROW_WITH(options.validate(), "needs NCCL");
  }
  EXPECT_THROW_WITH(
      DistOptions().device(c10::Device(c10::kMeta)).validate(),
      "device: expected cpu or a CUDA device");
}

TEST_F(DataParallelTest, NcclAllReduceWithOneRank) {
  REMAT_REQUIRE_CUDA();
  if (!remat::dist::nccl_available()) {
    GTEST_SKIP() << "needs NCCL: this CUDA build found no nccl.h when it was configured";
  }
  ProcessGroup g(DistOptions().store_path(store_).device(c10::Device(c10::kCUDA)));
  const c10::Device cuda0(c10::kCUDA, 0);
  EXPECT_EQ(g.device(), cuda0);
  std::vector<torch::Tensor> t{torch::full({3}, 2.0f, torch::TensorOptions().device(cuda0)),
                               torch::full({2, 2}, 5.0f, torch::TensorOptions().device(cuda0))};
  g.all_reduce_sum(t);
  EXPECT_TRUE(t[0].is_cuda());
  EXPECT_TRUE(torch::equal(t[0].cpu(), torch::full({3}, 2.0f)));
  EXPECT_TRUE(torch::equal(t[1].cpu(), torch::full({2, 2}, 5.0f)));
  std::vector<torch::Tensor> b{torch::arange(4, torch::TensorOptions().device(cuda0))};
  g.broadcast(b, 0);
  EXPECT_TRUE(torch::equal(b[0].cpu(), torch::arange(4)));
  // CPU tensors still go through Gloo; mixing the two in one call is refused.
  std::vector<torch::Tensor> c{torch::ones({2})};
  g.all_reduce_sum(c);
  EXPECT_TRUE(torch::equal(c[0], torch::ones({2})));
  g.barrier();
  std::vector<torch::Tensor> mixed{torch::ones({2}), torch::ones({2}, torch::TensorOptions().device(cuda0))};
  EXPECT_THROW_WITH(g.all_reduce_sum(mixed), "all on the CPU or all on the group's device");
}

TEST_F(DataParallelTest, NcclAllReduceAndReducerWithTwoRanks) {
  REMAT_REQUIRE_CUDA();
  if (!remat::dist::nccl_available()) {
    GTEST_SKIP() << "needs NCCL: this CUDA build found no nccl.h when it was configured";
  }
  if (remat_test::cuda_device_count() < 2) {
    GTEST_SKIP() << "needs 2 GPUs for 2 NCCL ranks (NCCL refuses two ranks on one GPU), but "
                 << remat_test::cuda_device_count() << " is visible";
  }
  device_ = c10::Device(c10::kCUDA);
  std::map<int64_t, std::vector<float>> sums, grads;
  std::map<int64_t, std::string> devices;
  std::mutex m;
  two_ranks([&](ProcessGroup& g) {
    const auto dev = g.device();
    const float r = static_cast<float>(g.rank());
    std::vector<torch::Tensor> t{torch::full({3}, r + 1, torch::TensorOptions().device(dev))};
    g.all_reduce_sum(t);
    // The reducer over a layer on this rank's GPU: the sum of both ranks'.
    torch::manual_seed(0);
    torch::nn::Linear layer(4, 2);
    layer->to(dev);
    auto group = std::shared_ptr<ProcessGroup>(&g, [](ProcessGroup*) {});
    remat::dist::broadcast_parameters(g, *layer);
    GradReducer reducer(group, layer->parameters(), GradReducerOptions().average(false));
    reducer.prepare_for_backward(true);
    layer->forward(torch::full({1, 4}, r + 1, torch::TensorOptions().device(dev))).sum().backward();
    reducer.reduce();
    std::lock_guard<std::mutex> lock(m);
    sums[g.rank()] = {t[0][0].item<float>()};
    grads[g.rank()] = {layer->weight.grad()[0][0].item<float>()};
    devices[g.rank()] = dev.str();
  });
  for (int64_t r : {0, 1}) {
    EXPECT_EQ(sums[r], (std::vector<float>{3}));
    // d(sum)/dW[0][0] = input, 1 on rank 0 and 2 on rank 1: summed, 3.
    EXPECT_EQ(grads[r], (std::vector<float>{3}));
  }
  EXPECT_EQ(devices[0], "cuda:0");
  EXPECT_EQ(devices[1], "cuda:1");
}

} // namespace
