#include "remat/op_policy.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <sstream>

namespace remat {
namespace {

// The fused attention kernels of LibTorch 2.x (absent in 1.13, harmless).
const std::vector<std::string>& attention_kernels() {
  static const std::vector<std::string> ops{
      "aten::_scaled_dot_product_flash_attention",
      "aten::_scaled_dot_product_flash_attention_for_cpu",
      "aten::_scaled_dot_product_efficient_attention",
      "aten::_scaled_dot_product_cudnn_attention",
      "aten::_flash_attention_forward",
      "aten::_efficient_attention_forward",
  };
  return ops;
}

std::string qualified(const std::string& op) {
  return op.find("::") == std::string::npos ? "aten::" + op : op;
}

// What the dispatcher knows of an op by name, over all its overloads.
struct Known {
  bool exists = false;
  bool random = false;
};

Known lookup(const std::string& op) {
  Known k;
  auto& dispatcher = c10::Dispatcher::singleton();
  for (const auto& name : dispatcher.getAllOpNames()) {
    if (name.name != op) {
      continue;
    }
    k.exists = true;
    if (auto handle = dispatcher.findOp(name)) {
      k.random = k.random || handle->hasTag(at::Tag::nondeterministic_seeded);
    }
  }
  return k;
}

std::string joined(const std::vector<std::string>& ops) {
  std::ostringstream s;
  for (size_t i = 0; i < ops.size(); ++i) {
    s << (i ? "/" : "") << ops[i];
  }
  return s.str();
}

} // namespace

OpPolicy OpPolicy::make(const std::vector<std::string>& ops, std::string name, bool preset) {
  OpPolicy p;
  for (const auto& given : ops) {
    const std::string op = qualified(given);
    // A preset names ops some LibTorch versions lack (the fused kernels).
    if (!preset) {
      const Known k = lookup(op);
      TORCH_CHECK(
          k.exists, "remat::OpPolicy: expected ops the dispatcher knows (like "
          "aten::mm), but got '", given, "'");
      TORCH_CHECK(
          !k.random, "remat::OpPolicy: expected ops that draw no random numbers, "
          "but '", op, "' does; it is always recomputed (skipping it would shift "
          "the generator for the ops after it)");
    }
    p.ops_.push_back(op);
  }
  std::sort(p.ops_.begin(), p.ops_.end());
  p.ops_.erase(std::unique(p.ops_.begin(), p.ops_.end()), p.ops_.end());
  p.name_ = name.empty() ? joined(p.ops_) : std::move(name);
  return p;
}

OpPolicy OpPolicy::keep(const std::vector<std::string>& ops, std::string name) {
  return make(ops, std::move(name), /*preset=*/false);
}

OpPolicy OpPolicy::with_attention(std::vector<std::string> ops, std::string name) {
  const auto& fused = attention_kernels();
  ops.insert(ops.end(), fused.begin(), fused.end());
  return make(ops, std::move(name), /*preset=*/true);
}

OpPolicy OpPolicy::matmuls() {
  return with_attention(
      {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
       "aten::_addmm_activation", "aten::convolution"},
      "matmuls");
}

OpPolicy OpPolicy::projections() {
  return with_attention(
      {"aten::mm", "aten::addmm", "aten::_addmm_activation", "aten::convolution"},
      "projections");
}

std::string OpPolicy::names() {
  return "matmuls, projections, or ops separated by '/' (aten::mm/aten::bmm)";
}

OpPolicy OpPolicy::parse(const std::string& text) {
  if (text == "matmuls") {
    return matmuls();
  }
  if (text == "projections") {
    return projections();
  }
  std::vector<std::string> ops;
  std::string piece;
  std::istringstream in(text);
  while (std::getline(in, piece, '/')) {
    TORCH_CHECK(
        !piece.empty() && piece.find_first_of(" ,=+") == std::string::npos,
        "remat::OpPolicy: expected ", names(), ", but got '", text, "'");
    ops.push_back(piece);
  }
  TORCH_CHECK(
      !ops.empty() && text.back() != '/',
      "remat::OpPolicy: expected ", names(), ", but got '", text, "'");
  return keep(ops);
}

bool OpPolicy::keeps(const std::string& op) const {
  return std::binary_search(ops_.begin(), ops_.end(), op);
}

} // namespace remat
