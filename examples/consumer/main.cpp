// A program outside remat's tree: its own torch::nn module, made to fit in
// less memory with remat::checkpoint, and checked against the plain module.
// Each block is checkpointed as a lambda that reads the block's weights: no
// parameter list, since the default checkpoint runs on saved-tensor hooks
// and autograd reaches the weights through the ordinary graph.
//
// Prints the bytes held after forward with and without checkpointing, and
// exits non-zero if the gradients differ or checkpointing kept more.
#include <remat/checkpoint.h>
#include <remat/memory.h>

#include <torch/torch.h>

#include <cstdio>
#include <vector>

// A residual MLP block: the kind of layer a user writes themselves.
struct BlockImpl : torch::nn::Module {
  BlockImpl(int64_t width)
      : up(register_module("up", torch::nn::Linear(width, 4 * width))),
        down(register_module("down", torch::nn::Linear(4 * width, width))),
        norm(register_module("norm", torch::nn::LayerNorm(
                                         torch::nn::LayerNormOptions({width})))) {}
  torch::Tensor forward(torch::Tensor x) {
    return x + down(torch::gelu(up(norm(x))));
  }
  torch::nn::Linear up;
  torch::nn::Linear down;
  torch::nn::LayerNorm norm;
};
TORCH_MODULE(Block);

struct Result {
  int64_t held_after_forward = 0; // bytes
  std::vector<torch::Tensor> grads;
};

Result step(std::vector<Block>& blocks, const torch::Tensor& x, bool checkpointed) {
  for (auto& b : blocks) {
    b->zero_grad();
  }
  const int64_t before = remat::memory::current_bytes();
  torch::Tensor h = x;
  for (auto& b : blocks) {
    if (!checkpointed) {
      h = b->forward(h);
      continue;
    }
    h = remat::checkpoint(
        [b](const std::vector<torch::Tensor>& in) mutable {
          const auto& t = in[0];
          return std::vector<torch::Tensor>{t + b->down(torch::gelu(b->up(b->norm(t))))};
        },
        {h})[0];
  }
  auto loss = h.pow(2).mean();
  Result r;
  r.held_after_forward = remat::memory::current_bytes() - before;
  loss.backward();
  for (auto& b : blocks) {
    for (const auto& p : b->parameters()) {
      r.grads.push_back(p.grad().clone());
    }
  }
  return r;
}

int main() {
  remat::memory::install();
  torch::manual_seed(0);
  std::vector<Block> blocks;
  for (int i = 0; i < 6; ++i) {
    blocks.emplace_back(128);
  }
  auto x = torch::randn({16, 256, 128});

  const Result plain = step(blocks, x, false);
  const Result ckpt = step(blocks, x, true);
  double max_diff = 0;
  for (size_t i = 0; i < plain.grads.size(); ++i) {
    max_diff = std::max(max_diff, (plain.grads[i] - ckpt.grads[i]).abs().max().item<double>());
  }
  std::printf("held after forward: %s plain, %s checkpointed; max grad diff %g\n",
              remat::memory::format_size(plain.held_after_forward).c_str(),
              remat::memory::format_size(ckpt.held_after_forward).c_str(), max_diff);
  if (max_diff != 0 || ckpt.held_after_forward >= plain.held_after_forward) {
    std::fprintf(stderr, "consumer: expected equal gradients and fewer bytes held\n");
    return 1;
  }
  return 0;
}
