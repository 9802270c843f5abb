// The figures of the 13B fine-tune worked in the project's source documents
// next to remat's estimates for the same run, printed by `remat estimate
// --preset llama-13b-lora-8k` (docs/estimate.md).
#pragma once

#include <string>
#include <vector>

namespace remat {
namespace cli {

/// One quantity of the seed's worked example and remat's estimate of it.
struct WorkedExampleRow {
  std::string quantity; ///< "activations at peak, none"
  std::string unit;     ///< "GiB", "%" or "billion"
  double seed = -1;     ///< the seed's figure in `unit`; < 0: it gives none
  double remat = 0;     ///< remat's estimate in `unit`
};
/// Rows for the preset, and for variants that show which assumptions move
/// the figures (LM head instead of a classifier, eager attention).
std::vector<WorkedExampleRow> worked_example_comparison();
/// The rows as a Markdown table.
std::string worked_example_table();

} // namespace cli
} // namespace remat
