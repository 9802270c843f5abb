// Eager against blockwise attention: bytes held after forward, and the time
// of forward + backward (median of --runs after --warmup).
//
//   ./build/attention_bench --seq 2048 --batch 1 --heads 8 --dim 64 \
//       --blocks 64,128,256 [--causal]
#include "remat/memory.h"
#include "remat/nn/attention.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
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

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    auto value = [&]() -> std::string {
      TORCH_CHECK(i + 1 < argc, "attention_bench: expected a value after ", flag);
      return argv[++i];
    };
    if (flag == "--seq") {
      a.seq = std::stoll(value());
    } else if (flag == "--batch") {
      a.batch = std::stoll(value());
    } else if (flag == "--heads") {
      a.heads = std::stoll(value());
    } else if (flag == "--dim") {
      a.dim = std::stoll(value());
    } else if (flag == "--runs") {
      a.runs = std::stoi(value());
    } else if (flag == "--warmup") {
      a.warmup = std::stoi(value());
    } else if (flag == "--causal") {
      a.causal = true;
    } else if (flag == "--blocks") {
      a.blocks.clear();
      std::stringstream list(value());
      for (std::string item; std::getline(list, item, ',');) {
        a.blocks.push_back(std::stoll(item));
      }
    } else {
      TORCH_CHECK(false, "attention_bench: unknown flag '", flag, "'");
    }
  }
  return a;
}

struct Figures {
  int64_t held_bytes = 0; ///< held after forward, output included
  int64_t peak_bytes = 0; ///< above the inputs, during forward + backward
  double seconds = 0;     ///< median forward + backward
};

Figures measure(const Args& a, const AttentionOptions& o) {
  torch::manual_seed(0);
  auto q = torch::randn({a.batch, a.heads, a.seq, a.dim}).requires_grad_();
  auto k = torch::randn({a.batch, a.heads, a.seq, a.dim}).requires_grad_();
  auto v = torch::randn({a.batch, a.heads, a.seq, a.dim}).requires_grad_();
  auto grad = torch::randn({a.batch, a.heads, a.seq, a.dim});
  Figures f;
  std::vector<double> times;
  for (int r = 0; r < a.warmup + a.runs; ++r) {
    q.mutable_grad() = torch::Tensor();
    k.mutable_grad() = torch::Tensor();
    v.mutable_grad() = torch::Tensor();
    const auto before = remat::memory::current_bytes();
    remat::memory::reset_peak();
    const auto t0 = std::chrono::steady_clock::now();
    auto out = remat::nn::attention(q, k, v, {}, o);
    const auto held = remat::memory::current_bytes() - before;
    out.backward(grad);
    const auto t1 = std::chrono::steady_clock::now();
    if (r >= a.warmup) {
      times.push_back(std::chrono::duration<double>(t1 - t0).count());
      f.held_bytes = held;
      f.peak_bytes = remat::memory::peak_bytes() - before;
    }
  }
  std::sort(times.begin(), times.end());
  f.seconds = times[times.size() / 2];
  return f;
}

} // namespace

int main(int argc, char** argv) {
  const Args a = parse(argc, argv);
  remat::memory::install();
  std::printf(
      "attention fwd+bwd: batch %lld, heads %lld, seq %lld, head_dim %lld, "
      "fp32, %s, %d threads, median of %d runs\n",
      static_cast<long long>(a.batch), static_cast<long long>(a.heads),
      static_cast<long long>(a.seq), static_cast<long long>(a.dim),
      a.causal ? "causal" : "no mask", at::get_num_threads(), a.runs);
  auto base = AttentionOptions().causal(a.causal);
  const auto eager = measure(a, base);
  std::printf(
      "%-16s held %10s  peak %10s  time %8.1f ms\n", "eager",
      remat::memory::format_size(eager.held_bytes).c_str(),
      remat::memory::format_size(eager.peak_bytes).c_str(), eager.seconds * 1e3);
  for (int64_t block : a.blocks) {
    const auto b = measure(
        a, AttentionOptions(base).kind(AttentionKind::kBlockwise).block_size(block));
    const std::string name = "blockwise/" + std::to_string(block);
    std::printf(
        "%-16s held %10s  peak %10s  time %8.1f ms   held %.4fx  time %.2fx eager\n",
        name.c_str(), remat::memory::format_size(b.held_bytes).c_str(),
        remat::memory::format_size(b.peak_bytes).c_str(), b.seconds * 1e3,
        static_cast<double>(b.held_bytes) / static_cast<double>(eager.held_bytes),
        b.seconds / eager.seconds);
  }
  return 0;
}
