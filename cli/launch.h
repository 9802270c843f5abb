// `--nproc N`: this program, started again as N local worker processes of a
// data-parallel group, with the environment that torchrun would give them.
#pragma once

#include <cstdint>
#include <string>

namespace remat {
namespace cli {

/// Re-executes this program (/proc/self/exe) `nproc` times with the same
/// arguments but `flag` and its value, and RANK, LOCAL_RANK, WORLD_SIZE,
/// LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1 and MASTER_PORT (a free port) set.
/// Returns 0 when every worker succeeded. When one fails, the others are
/// stopped (SIGTERM, then SIGKILL after 5 s), a line naming the rank goes
/// to stderr, and its exit code is returned (128 + signal when killed).
int launch_workers(int64_t nproc, const std::string& flag);

} // namespace cli
} // namespace remat
