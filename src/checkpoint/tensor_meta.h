// What both checkpoint implementations compare between a segment's forward
// and its recompute when nothing more is asked: shape, dtype and device.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <torch/types.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace remat {
namespace detail {

/// Shape, dtype and device of a tensor, or "undefined": a segment may return
/// an undefined tensor (an optional output nobody asked for).
struct TensorMeta {
  bool defined = false;
  std::vector<int64_t> sizes;
  c10::ScalarType dtype = c10::ScalarType::Undefined;
  c10::Device device = c10::kCPU;

  TensorMeta() = default;
  explicit TensorMeta(const torch::Tensor& t) : defined(t.defined()) {
    if (defined) {
      sizes = t.sizes().vec();
      dtype = t.scalar_type();
      device = t.device();
    }
  }

  bool operator==(const TensorMeta& o) const {
    return defined == o.defined && sizes == o.sizes && dtype == o.dtype &&
        device == o.device;
  }
  bool operator!=(const TensorMeta& o) const {
    return !(*this == o);
  }
  std::string str() const {
    if (!defined) {
      return "an undefined tensor";
    }
    std::ostringstream s;
    s << c10::IntArrayRef(sizes) << " " << dtype << " on " << device;
    return s.str();
  }
};

/// Adds to early_stop_skipped_nodes().
void count_early_stop(int64_t skipped_nodes);
/// Adds one to op_policy_skipped_ops().
void count_op_skip();

} // namespace detail
} // namespace remat
