// A training run's state on disk, written so that a crash at any moment
// leaves a readable state behind, and read so that a damaged file is refused
// rather than trained on.
//
// A state is one safetensors file, DIR/state.safetensors: the tensors (model
// weights, the optimizer's serialized state, the RNG state) and, in its
// metadata, a JSON document with everything else (step, epoch, data loader
// position, schedule, options, metrics so far) and a checksum over both.
// save_train_state writes a temporary file, fsyncs it and renames it over the
// old state; the state it replaces is kept as DIR/state.prev.safetensors.
//
// Example:
//   // given: torch::Tensor w = torch::randn({4, 4});
//   remat::train::TrainState s;
//   s.tensors["model.weight"] = w;
//   s.info = {{"step", 100}};
//   remat::train::save_train_state("run", s);      // run/state.safetensors
//   auto back =
//       remat::train::load_train_state(remat::train::state_path("run"));
#pragma once

#include <nlohmann/json.hpp>
#include <torch/types.h>

#include <map>
#include <string>

namespace remat {
namespace train {

/// Tensors and a JSON document, saved and loaded together.
struct TrainState {
  std::map<std::string, torch::Tensor> tensors;
  nlohmann::json info = nlohmann::json::object();
};

/// DIR/state.safetensors
std::string state_path(const std::string& dir);
/// DIR/state.prev.safetensors: the state before the current one.
std::string previous_state_path(const std::string& dir);

/// Writes `state` to state_path(dir) atomically (temporary file, fsync,
/// rename, fsync of the folder), first keeping the state it replaces as
/// previous_state_path(dir). At every moment state_path(dir) is either
/// absent (before the first save) or a complete state. Creates `dir` if
/// needed. Throws c10::Error naming the file on an I/O error.
void save_train_state(const std::string& dir, const TrainState& state);

/// Reads and verifies a state file. Throws c10::Error naming the file and
/// what is wrong when it is missing, truncated, not a remat training state,
/// or fails its checksum. Never modifies the file.
TrainState load_train_state(const std::string& path);

/// The "step" of a state file's document, or -1 when the file is missing or
/// unreadable (for messages; does not verify the checksum).
int64_t peek_train_state_step(const std::string& path);

} // namespace train
} // namespace remat
