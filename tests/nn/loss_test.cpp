// remat::nn::linear_cross_entropy: the same loss and gradients as linear +
// cross_entropy, chunking, ignored rows, frozen weights, autocast, the bytes
// it keeps, its errors; and Llama's forward_loss against loss(forward()).
#include "remat/nn/loss.h"

#include "remat/autocast.h"
#include "remat/checkpoint.h"
#include "remat/memory.h"
#include "remat/nn/llama.h"
#include "remat/nn/lora.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

namespace {

using remat::nn::linear_cross_entropy;
using remat::nn::LinearCrossEntropyOptions;

class LinearCrossEntropyTest : public ::testing::Test {
 protected:
  LinearCrossEntropyTest() {
    torch::manual_seed(0);
  }

  static std::string error_of(const std::function<void()>& f) {
    try {
      f();
    } catch (const c10::Error& e) {
      return e.what();
    }
    return "";
  }

  struct Result {
    torch::Tensor loss, grad_hidden, grad_weight;
  };

  // Loss and gradients of `loss_fn` on fresh leaves copied from the inputs.
  static Result run(
      const torch::Tensor& hidden,
      const torch::Tensor& weight,
      const std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&)>& loss_fn,
      bool weight_trains = true) {
    auto h = hidden.detach().clone().requires_grad_();
    auto w = weight.detach().clone().requires_grad_(weight_trains);
    auto loss = loss_fn(h, w);
    loss.backward();
    return {loss.detach(), h.grad(), w.grad()};
  }

  static torch::Tensor reference(
      const torch::Tensor& h,
      const torch::Tensor& w,
      const torch::Tensor& labels,
      int64_t ignore_index = -100) {
    return torch::nn::functional::cross_entropy(
        torch::nn::functional::linear(h, w).to(torch::kFloat), labels,
        torch::nn::functional::CrossEntropyFuncOptions().ignore_index(ignore_index));
  }

  static double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
    return (a.to(torch::kFloat) - b.to(torch::kFloat)).abs().max().item<double>();
  }
};

TEST_F(LinearCrossEntropyTest, MatchesLinearThenCrossEntropyForEveryChunking) {
  const int64_t n = 37, h = 16, vocab = 50;
  auto hidden = torch::randn({n, h});
  auto weight = torch::randn({vocab, h}) * 0.5;
  auto labels = torch::randint(0, vocab, {n});
  labels.index_put_({torch::arange(0, n, 5)}, -100);
  const auto expected = run(hidden, weight, [&](const torch::Tensor& x, const torch::Tensor& w) {
    return reference(x, w, labels);
  });
  // 1 row per chunk, 7 (does not divide 37), exactly 37, more than 37.
  for (int64_t rows : {1, 7, 37, 100}) {
    const auto got = run(hidden, weight, [&](const torch::Tensor& x, const torch::Tensor& w) {
      return linear_cross_entropy(
          x, w, labels, LinearCrossEntropyOptions().chunk_bytes(rows * vocab * 4));
    });
    EXPECT_EQ(got.loss.scalar_type(), torch::kFloat);
    EXPECT_EQ(got.loss.dim(), 0);
    EXPECT_LE(max_diff(got.loss, expected.loss), 1e-5) << rows << " rows";
    EXPECT_LE(max_diff(got.grad_hidden, expected.grad_hidden), 1e-5) << rows << " rows";
    EXPECT_LE(max_diff(got.grad_weight, expected.grad_weight), 1e-5) << rows << " rows";
  }
  // chunk_bytes below one row's logits still makes 1-row chunks.
  const auto tiny = run(hidden, weight, [&](const torch::Tensor& x, const torch::Tensor& w) {
    return linear_cross_entropy(x, w, labels, LinearCrossEntropyOptions().chunk_bytes(1));
  });
  EXPECT_LE(max_diff(tiny.grad_weight, expected.grad_weight), 1e-5);
}

TEST_F(LinearCrossEntropyTest, MatchesCausalLmLossOfTheLogits) {
  const int64_t b = 2, s = 9, h = 16, vocab = 40;
  auto hidden = torch::randn({b, s, h});
  auto weight = torch::randn({vocab, h}) * 0.3;
  auto labels = torch::randint(0, vocab, {b, s});
  labels.index_put_({1, torch::indexing::Slice(6)}, -100); // right padding
  const auto expected = run(hidden, weight, [&](const torch::Tensor& x, const torch::Tensor& w) {
    return remat::nn::causal_lm_loss(torch::nn::functional::linear(x, w), labels);
  });
  const auto got = run(hidden, weight, [&](const torch::Tensor& x, const torch::Tensor& w) {
    return linear_cross_entropy(
        x.narrow(1, 0, s - 1).reshape({-1, h}), w, labels.narrow(1, 1, s - 1).reshape({-1}),
        LinearCrossEntropyOptions().chunk_bytes(3 * vocab * 4));
  });
  EXPECT_LE(max_diff(got.loss, expected.loss), 1e-5);
  EXPECT_LE(max_diff(got.grad_hidden, expected.grad_hidden), 1e-5);
  EXPECT_LE(max_diff(got.grad_weight, expected.grad_weight), 1e-5);
}

TEST_F(LinearCrossEntropyTest, IgnoredRowsAddNothing) {
  const int64_t n = 12, h = 8, vocab = 20;
  auto hidden = torch::randn({n, h});
  auto weight = torch::randn({vocab, h});
  auto labels = torch::randint(0, vocab, {n});
  labels.index_put_({torch::indexing::Slice(0, 4)}, -1);
  const auto opts = LinearCrossEntropyOptions().ignore_index(-1).chunk_bytes(5 * vocab * 4);
  const auto got = run(hidden, weight, [&](const torch::Tensor& x, const torch::Tensor& w) {
    return linear_cross_entropy(x, w, labels, opts);
  });
  const auto expected = run(hidden, weight, [&](const torch::Tensor& x, const torch::Tensor& w) {
    return reference(x, w, labels, -1);
  });
  EXPECT_LE(max_diff(got.loss, expected.loss), 1e-5);
  EXPECT_LE(max_diff(got.grad_hidden, expected.grad_hidden), 1e-5);
  EXPECT_LE(max_diff(got.grad_weight, expected.grad_weight), 1e-5);
  EXPECT_EQ(got.grad_hidden.narrow(0, 0, 4).abs().max().item<float>(), 0.0f);
  // The mean is over the 8 counted rows only.
  const auto rest = run(hidden.narrow(0, 4, 8), weight,
                        [&](const torch::Tensor& x, const torch::Tensor& w) {
                          return linear_cross_entropy(x, w, labels.narrow(0, 4, 8), opts);
                        });
  EXPECT_LE(max_diff(got.loss, rest.loss), 1e-6);
}

TEST_F(LinearCrossEntropyTest, NoCountedRowGivesNanAndZeroGradientsAsTorch) {
  const int64_t h = 8, vocab = 20;
  auto weight = torch::randn({vocab, h});
  for (int64_t n : {0, 5}) {
    auto hidden = torch::randn({n, h});
    auto labels = torch::full({n}, -100, torch::kLong);
    const auto expected = run(hidden, weight, [&](const torch::Tensor& x, const torch::Tensor& w) {
      return reference(x, w, labels);
    });
    const auto got = run(hidden, weight, [&](const torch::Tensor& x, const torch::Tensor& w) {
      return linear_cross_entropy(x, w, labels);
    });
    EXPECT_TRUE(std::isnan(got.loss.item<float>())) << n << " rows";
    EXPECT_EQ(std::isnan(expected.loss.item<float>()), std::isnan(got.loss.item<float>()));
    EXPECT_EQ(got.grad_hidden.sizes(), hidden.sizes());
    EXPECT_TRUE(torch::equal(got.grad_weight, torch::zeros_like(weight))) << n << " rows";
    if (n > 0) {
      EXPECT_TRUE(torch::equal(got.grad_hidden, torch::zeros_like(hidden)));
      EXPECT_TRUE(torch::equal(got.grad_hidden, expected.grad_hidden));
    }
  }
}

TEST_F(LinearCrossEntropyTest, FrozenWeightGetsNoGradientAndNoWeightSizedBuffer) {
  ASSERT_TRUE(remat::memory::installed());
  const int64_t n = 64, h = 64, vocab = 4000;
  auto hidden = torch::randn({n, h}).requires_grad_();
  auto weight = torch::randn({vocab, h}) * 0.1; // frozen, as under LoRA
  auto labels = torch::randint(0, vocab, {n});
  const auto opts = LinearCrossEntropyOptions().chunk_bytes(8 * vocab * 4);
  auto loss = linear_cross_entropy(hidden, weight, labels, opts);
  const auto before = remat::memory::current_bytes();
  remat::memory::reset_peak();
  loss.backward();
  const auto backward_peak = remat::memory::peak_bytes() - before;
  EXPECT_FALSE(weight.grad().defined());
  // A weight gradient would be vocab * h * 4 bytes (1,024,000); the chunk's
  // logits are 128,000.
  EXPECT_LT(backward_peak, vocab * h * 4 / 2) << backward_peak << " bytes";

  auto h2 = hidden.detach().clone().requires_grad_();
  reference(h2, weight, labels).backward();
  EXPECT_LE(max_diff(hidden.grad(), h2.grad()), 1e-5);
}

TEST_F(LinearCrossEntropyTest, KeepsOnlyLogSumExpUntilBackward) {
  ASSERT_TRUE(remat::memory::installed());
  const int64_t n = 512, h = 64, vocab = 8000;
  const int64_t chunk_bytes = 1 << 20;
  auto hidden = torch::randn({n, h}).requires_grad_();
  auto weight = (torch::randn({vocab, h}) * 0.1).requires_grad_();
  auto labels = torch::randint(0, vocab, {n});
  const auto before = remat::memory::current_bytes();
  remat::memory::reset_peak();
  auto loss = linear_cross_entropy(
      hidden, weight, labels, LinearCrossEntropyOptions().chunk_bytes(chunk_bytes));
  const auto held = remat::memory::current_bytes() - before;
  const auto forward_peak = remat::memory::peak_bytes() - before;
  // lse (n * 4 bytes), the count and the loss; hidden, weight and labels are
  // the caller's. The logits would be n * vocab * 4 = 16,384,000.
  EXPECT_GE(held, n * 4);
  EXPECT_LE(held, n * 4 + 1024) << held << " bytes";
  EXPECT_LE(forward_peak, 2 * chunk_bytes + n * 64) << forward_peak << " bytes";
  loss.backward();
  EXPECT_TRUE(weight.grad().defined());
}

TEST_F(LinearCrossEntropyTest, Bf16AutocastComputesInBf16AndReturnsInputDtypes) {
  const int64_t n = 33, h = 32, vocab = 70;
  auto hidden = torch::randn({n, h});
  auto weight = torch::randn({vocab, h}) * 0.2;
  auto labels = torch::randint(0, vocab, {n});
  labels[3] = -100;
  remat::AutocastState bf16;
  bf16.cpu_enabled = true;
  bf16.cpu_dtype = torch::kBFloat16;
  Result got, expected;
  {
    remat::AutocastScope autocast(bf16);
    got = run(hidden, weight, [&](const torch::Tensor& x, const torch::Tensor& w) {
      return linear_cross_entropy(x, w, labels, LinearCrossEntropyOptions().chunk_bytes(4 * vocab * 4));
    });
    expected = run(hidden, weight, [&](const torch::Tensor& x, const torch::Tensor& w) {
      return reference(x, w, labels); // linear autocasts to bf16
    });
  }
  at::autocast::clear_cache();
  const auto fp32 = run(hidden, weight, [&](const torch::Tensor& x, const torch::Tensor& w) {
    return reference(x, w, labels);
  });
  EXPECT_EQ(got.loss.scalar_type(), torch::kFloat);
  EXPECT_EQ(got.grad_hidden.scalar_type(), torch::kFloat);
  EXPECT_EQ(got.grad_weight.scalar_type(), torch::kFloat);
  // Same bf16 logits as autocast's linear, so the loss agrees closely; the
  // gradients went through bf16 matmuls.
  EXPECT_LE(max_diff(got.loss, expected.loss), 1e-3);
  EXPECT_GT(max_diff(got.loss, fp32.loss), 0.0) << "the head ran in bf16";
  EXPECT_LE(max_diff(got.grad_hidden, expected.grad_hidden), 2e-2);
  EXPECT_LE(max_diff(got.grad_weight, expected.grad_weight), 2e-2);

  // Pure bf16 inputs without autocast: bf16 matmuls, bf16 gradients.
  const auto pure = run(
      hidden.to(torch::kBFloat16), weight.to(torch::kBFloat16),
      [&](const torch::Tensor& x, const torch::Tensor& w) {
        return linear_cross_entropy(x, w, labels);
      });
  EXPECT_EQ(pure.loss.scalar_type(), torch::kFloat);
  EXPECT_EQ(pure.grad_hidden.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(pure.grad_weight.scalar_type(), torch::kBFloat16);
  EXPECT_LE(max_diff(pure.loss, fp32.loss), 2e-2);
  EXPECT_LE(max_diff(pure.grad_weight, fp32.grad_weight), 2e-2);
}

TEST_F(LinearCrossEntropyTest, ErrorsNameTheArgument) {
  auto hidden = torch::randn({6, 4});
  auto weight = torch::randn({10, 4});
  auto labels = torch::randint(0, 10, {6});
  EXPECT_NE(error_of([&] { linear_cross_entropy(hidden.view({2, 3, 4}), weight, labels); })
                .find("expected hidden of shape [N, h], but got [2, 3, 4]"),
            std::string::npos);
  EXPECT_NE(error_of([&] { linear_cross_entropy(hidden, torch::randn({10, 5}), labels); })
                .find("expected weight of shape [vocab, h] with h = 4 (hidden's last size), "
                      "but got [10, 5]"),
            std::string::npos);
  EXPECT_NE(error_of([&] { linear_cross_entropy(hidden, weight, labels.narrow(0, 0, 5)); })
                .find("expected labels of shape [N] with N = 6 (hidden's rows), but got [5]"),
            std::string::npos);
  EXPECT_NE(error_of([&] { linear_cross_entropy(hidden, weight, labels.to(torch::kInt)); })
                .find("expected labels of dtype int64, but got Int"),
            std::string::npos);
  EXPECT_NE(error_of([&] { linear_cross_entropy(hidden, weight.to(torch::kDouble), labels); })
                .find("expected weight of hidden's dtype Float (or autocast on), but got Double"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              linear_cross_entropy(hidden.to(torch::kLong), weight.to(torch::kLong), labels);
            }).find("expected floating-point hidden and weight, but got Long and Long"),
            std::string::npos);
  auto out_of_range = labels.clone();
  out_of_range[2] = 10;
  EXPECT_NE(error_of([&] { linear_cross_entropy(hidden, weight, out_of_range); })
                .find("expected labels in [0, 10) or ignore_index -100, but got 10"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              linear_cross_entropy(
                  hidden, weight, labels, LinearCrossEntropyOptions().chunk_bytes(0));
            }).find("expected chunk_bytes > 0, but got 0"),
            std::string::npos);
}

// Llama's forward_loss against loss(forward()).

using remat::CheckpointPolicy;
using remat::nn::Llama;
using remat::nn::LlamaOptions;

LlamaOptions tiny_llama(bool tied) {
  return LlamaOptions()
      .vocab_size(50)
      .hidden_size(32)
      .intermediate_size(64)
      .num_layers(3)
      .num_heads(4)
      .num_kv_heads(2)
      .max_position_embeddings(64)
      .tie_word_embeddings(tied);
}

class LlamaForwardLossTest : public LinearCrossEntropyTest {
 protected:
  struct Step {
    torch::Tensor loss;
    std::vector<torch::Tensor> grads;
  };

  static Step step(Llama& model, const std::function<torch::Tensor()>& loss_fn) {
    model->zero_grad();
    torch::manual_seed(123);
    auto loss = loss_fn();
    loss.backward();
    Step s{loss.detach(), {}};
    for (const auto& p : model->parameters()) {
      s.grads.push_back(p.grad().defined() ? p.grad().clone() : torch::Tensor());
    }
    return s;
  }

  static void expect_same(const Step& a, const Step& b, const std::string& what) {
    EXPECT_LE(max_diff(a.loss, b.loss), 1e-5) << what;
    ASSERT_EQ(a.grads.size(), b.grads.size());
    for (size_t i = 0; i < a.grads.size(); ++i) {
      ASSERT_EQ(a.grads[i].defined(), b.grads[i].defined()) << what << " param " << i;
      if (a.grads[i].defined()) {
        EXPECT_LE(max_diff(a.grads[i], b.grads[i]), 1e-5) << what << " param " << i;
      }
    }
  }

  static void compare(Llama& model, const std::string& what) {
    auto ids = torch::randint(0, 50, {2, 12});
    auto labels = ids.clone();
    labels.index_put_({1, torch::indexing::Slice(9)}, -100);
    auto mask = torch::ones({2, 12}, torch::kLong);
    mask.index_put_({1, torch::indexing::Slice(9)}, 0);
    const auto logits_path = step(model, [&] {
      return model->loss(model->forward(ids, mask), labels);
    });
    const auto fused = step(model, [&] { return model->forward_loss(ids, labels, mask); });
    expect_same(logits_path, fused, what);
    const auto unmasked_logits = step(model, [&] { return model->loss(model->forward(ids), ids); });
    const auto unmasked = step(model, [&] { return model->forward_loss(ids, ids); });
    expect_same(unmasked_logits, unmasked, what + " (no mask)");
  }
};

TEST_F(LlamaForwardLossTest, EqualsLossOfForwardTiedAndUntiedUnderPolicies) {
  for (bool tied : {false, true}) {
    for (const auto& policy : {CheckpointPolicy::none(), CheckpointPolicy::every_layer()}) {
      torch::manual_seed(0);
      Llama model(tiny_llama(tied));
      model->gradient_checkpointing_enable(policy);
      compare(model, std::string(tied ? "tied" : "untied") + ", " + policy.name());
    }
  }
}

TEST_F(LlamaForwardLossTest, EqualsLossOfForwardWithLora) {
  {
    Llama model(tiny_llama(false));
    remat::nn::apply_lora(*model, remat::nn::LoraOptions().rank(4).targets({"q_proj", "v_proj"}));
    ASSERT_FALSE(model->lm_head_weight().requires_grad()); // frozen head
    model->gradient_checkpointing_enable(CheckpointPolicy::every_layer());
    compare(model, "LoRA on q, v");
  }
  {
    // An adapter on lm_head itself: forward_loss falls back to the logits.
    Llama model(tiny_llama(false));
    remat::nn::apply_lora(*model, remat::nn::LoraOptions().rank(4).targets({"lm_head", "q_proj"}));
    ASSERT_TRUE(model->lm_head->has_adapter());
    for (auto& p : model->named_parameters()) {
      if (p.key().find("lora_B") != std::string::npos) {
        torch::NoGradGuard no_grad;
        p.value().normal_(0, 0.1); // B starts at zero; make the adapter count
      }
    }
    compare(model, "LoRA on lm_head");
  }
}

TEST_F(LlamaForwardLossTest, KeepsNoLogitsUntilBackward) {
  ASSERT_TRUE(remat::memory::installed());
  torch::manual_seed(0);
  Llama model(tiny_llama(false).vocab_size(2000));
  model->gradient_checkpointing_enable(CheckpointPolicy::every_layer());
  auto ids = torch::randint(0, 2000, {2, 32});
  auto held = [&](const std::function<torch::Tensor()>& f) {
    model->zero_grad();
    const auto before = remat::memory::current_bytes();
    auto loss = f();
    const auto bytes = remat::memory::current_bytes() - before;
    loss.backward();
    return bytes;
  };
  const auto logits_path = held([&] { return model->loss(model->forward(ids), ids); });
  const auto fused = held([&] { return model->forward_loss(ids, ids); });
  // The logits path keeps at least the fp32 log-softmax, 2 * 31 * 2000 * 4
  // bytes; the fused one keeps the layers' inputs, the final hidden state
  // and a float per row: under a fifth of that here.
  constexpr int64_t log_softmax = 2 * 31 * 2000 * 4;
  EXPECT_GE(logits_path, log_softmax) << logits_path << " vs " << fused;
  EXPECT_LT(fused, log_softmax / 5) << logits_path << " vs " << fused;
}

} // namespace
