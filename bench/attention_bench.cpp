// Eager against blockwise attention, and the selective-attention core
// (remat::checkpoint around eager against nn::checkpointed_attention): bytes
// held after forward, peak, and the time of forward + backward (median of
// --runs after --warmup, the variants interleaved run by run).
//
//   ./build/attention_bench --seq 2048 --batch 1 --heads 8 --dim 64 \
//       --blocks 64,128,256 [--causal]
#include "remat/checkpoint.h"
#include "remat/memory.h"
#include "remat/nn/attention.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

namespace {

using remat::nn::AttentionKind;
using remat::nn::AttentionOptions;

struct Args {
  int64_t seq = 2048;
  int64_t batch = 1;
  int64_t heads = 8;
  int64_t dim = 64;
  int runs = 5;
  int warmup = 1;
  bool causal = false;
  std::vector<int64_t> blocks{128};
};

const char* const kUsage =
    "usage: attention_bench [--seq N] [--batch N] [--heads N] [--dim N] [--runs N]\n"
    "                       [--warmup N] [--blocks N,N,...] [--causal]\n"
    "Eager against blockwise attention and the selective-attention core: bytes held\n"
    "after forward, peak, and forward + backward time (defaults: seq 2048, batch 1,\n"
    "heads 8, dim 64, runs 5, warmup 1, blocks 128).\n";

// A count for `flag`: digits only, at least `least`.
int64_t count(const std::string& flag, const std::string& text, int64_t least) {
  const bool digits = !text.empty() && text.size() < 10 &&
      text.find_first_not_of("0123456789") == std::string::npos;
  TORCH_CHECK(
      digits && std::stoll(text) >= least, flag, ": expected an integer >= ", least,
      ", but got '", text, "'");
  return std::stoll(text);
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    auto value = [&]() -> std::string {
      TORCH_CHECK(i + 1 < argc, flag, ": expected a value after it, but got none");
      return argv[++i];
    };
    if (flag == "--help" || flag == "-h") {
      std::printf("%s", kUsage);
      std::exit(0);
    } else if (flag == "--seq") {
      a.seq = count(flag, value(), 1);
    } else if (flag == "--batch") {
      a.batch = count(flag, value(), 1);
    } else if (flag == "--heads") {
      a.heads = count(flag, value(), 1);
    } else if (flag == "--dim") {
      a.dim = count(flag, value(), 1);
    } else if (flag == "--runs") {
      a.runs = static_cast<int>(count(flag, value(), 1));
    } else if (flag == "--warmup") {
      a.warmup = static_cast<int>(count(flag, value(), 0));
    } else if (flag == "--causal") {
      a.causal = true;
    } else if (flag == "--blocks") {
      a.blocks.clear();
      std::stringstream list(value());
      for (std::string item; std::getline(list, item, ',');) {
        a.blocks.push_back(count(flag, item, 1));
      }
    } else {
      TORCH_CHECK(false, flag, ": expected a flag of attention_bench (see --help), but got '",
                  flag, "'");
    }
  }
  return a;
}

struct Figures {
  int64_t held_bytes = 0; ///< held after forward, output included
  int64_t peak_bytes = 0; ///< above the inputs, during forward + backward
  double seconds = 0;     ///< median forward + backward
};

using Core = std::function<torch::Tensor(
    const torch::Tensor&, const torch::Tensor&, const torch::Tensor&)>;

struct Variant {
  std::string name;
  Core core;
  std::vector<double> times;
  Figures figures;
};

// Forward + backward of every variant, one run of each per round so that
// the machine's drift reaches them all alike.
void measure(const Args& a, std::vector<Variant>& variants) {
  torch::manual_seed(0);
  auto q = torch::randn({a.batch, a.heads, a.seq, a.dim}).requires_grad_();
  auto k = torch::randn({a.batch, a.heads, a.seq, a.dim}).requires_grad_();
  auto v = torch::randn({a.batch, a.heads, a.seq, a.dim}).requires_grad_();
  auto grad = torch::randn({a.batch, a.heads, a.seq, a.dim});
  for (int r = 0; r < a.warmup + a.runs; ++r) {
    for (auto& x : variants) {
      q.mutable_grad() = torch::Tensor();
      k.mutable_grad() = torch::Tensor();
      v.mutable_grad() = torch::Tensor();
      const auto before = remat::memory::current_bytes();
      remat::memory::reset_peak();
      const auto t0 = std::chrono::steady_clock::now();
      auto out = x.core(q, k, v);
      const auto held = remat::memory::current_bytes() - before;
      out.backward(grad);
      const auto t1 = std::chrono::steady_clock::now();
      if (r >= a.warmup) {
        x.times.push_back(std::chrono::duration<double>(t1 - t0).count());
        x.figures.held_bytes = held;
        x.figures.peak_bytes = remat::memory::peak_bytes() - before;
      }
    }
  }
  for (auto& x : variants) {
    std::sort(x.times.begin(), x.times.end());
    x.figures.seconds = x.times[x.times.size() / 2];
  }
}

} // namespace

int main(int argc, char** argv) {
  Args a;
  try {
    a = parse(argc, argv);
  } catch (const c10::Error& e) {
    const std::string what = e.what_without_backtrace();
    std::fprintf(stderr, "attention_bench: error: %s\n", what.substr(0, what.find('\n')).c_str());
    return 2;
  }
  remat::memory::install();
  std::printf(
      "attention fwd+bwd: batch %lld, heads %lld, seq %lld, head_dim %lld, "
      "fp32, %s, %d threads, median of %d runs\n",
      static_cast<long long>(a.batch), static_cast<long long>(a.heads),
      static_cast<long long>(a.seq), static_cast<long long>(a.dim),
      a.causal ? "causal" : "no mask", at::get_num_threads(), a.runs);
  auto base = AttentionOptions().causal(a.causal);
  std::vector<Variant> variants;
  variants.push_back({"eager", [base](const torch::Tensor& q, const torch::Tensor& k,
                                      const torch::Tensor& v) {
                        return remat::nn::attention(q, k, v, {}, base);
                      }});
  for (int64_t block : a.blocks) {
    const auto o = AttentionOptions(base).kind(AttentionKind::kBlockwise).block_size(block);
    variants.push_back({"blockwise/" + std::to_string(block),
                        [o](const torch::Tensor& q, const torch::Tensor& k,
                            const torch::Tensor& v) { return remat::nn::attention(q, k, v, {}, o); }});
  }
  // The selective-attention core two ways: remat::checkpoint around eager
  // (a second forward in backward), and checkpointed_attention (which
  // recomputes the probabilities only).
  variants.push_back({"checkpoint(eager)", [base](const torch::Tensor& q, const torch::Tensor& k,
                                                  const torch::Tensor& v) {
                        return remat::checkpoint(
                            [base](const std::vector<torch::Tensor>& t) {
                              return std::vector<torch::Tensor>{
                                  remat::nn::attention(t[0], t[1], t[2], {}, base)};
                            },
                            {q, k, v})[0];
                      }});
  variants.push_back({"checkpointed", [base](const torch::Tensor& q, const torch::Tensor& k,
                                             const torch::Tensor& v) {
                        return remat::nn::checkpointed_attention(q, k, v, {}, base);
                      }});
  measure(a, variants);
  const auto& eager = variants.front().figures;
  for (const auto& x : variants) {
    std::printf(
        "%-18s held %10s  peak %10s  time %8.1f ms   held %.4fx  time %.2fx eager\n",
        x.name.c_str(), remat::memory::format_size(x.figures.held_bytes).c_str(),
        remat::memory::format_size(x.figures.peak_bytes).c_str(), x.figures.seconds * 1e3,
        static_cast<double>(x.figures.held_bytes) / static_cast<double>(eager.held_bytes),
        x.figures.seconds / eager.seconds);
  }
  return 0;
}
