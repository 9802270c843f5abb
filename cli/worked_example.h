// The seeds' Harbor 13B figures next to remat's estimates for the same run,
// printed by `remat estimate --preset harbor-13b` (docs/estimate.md).
#pragma once

#include <string>
#include <vector>

namespace remat {
namespace cli {

/// One quantity of the seed's worked example and remat's estimate of it.
struct HarborRow {
  std::string quantity; ///< "activations at peak, none"
  std::string unit;     ///< "GiB", "%" or "billion"
  double seed = -1;     ///< the seed's figure in `unit`; < 0: it gives none
  double remat = 0;     ///< remat's estimate in `unit`
};
/// Rows for the preset, and for variants that show which assumptions move
/// the figures (LM head instead of a classifier, eager attention).
std::vector<HarborRow> harbor_comparison();
/// The rows as a Markdown table.
std::string harbor_comparison_table();

} // namespace cli
} // namespace remat
