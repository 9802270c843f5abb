// io/file: the temporary names of atomic writes, the atomic hard link, and
// the cleanup of temporary files that killed processes left behind.
#include "remat/io/file.h"

#include "temp_dir.h"
#include "testing.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include <sys/wait.h>
#include <unistd.h>

namespace {

namespace fs = std::filesystem;
using namespace remat;

std::string temp_dir(const std::string& name) {
  return remat_test::fresh_temp_dir("io_file_" + name, /*create=*/true);
}

void touch(const std::string& path, const std::string& text = "x") {
  std::ofstream(path) << text;
}

// The pid of a process that has exited and been reaped: no process has it
// (until the system hands it out again, which takes a full cycle of pids).
pid_t dead_pid() {
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::_exit(0);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  return pid;
}

TEST(IoFile, TempPathIsThePathAndThisProcesssPid) {
  EXPECT_EQ(io::temp_path("run/state.json"), "run/state.json.tmp." + std::to_string(::getpid()));
  io::AtomicFile f(temp_dir("name") + "/a.json");
  EXPECT_EQ(f.temp_path(), io::temp_path(f.path()));
}

TEST(IoFile, RemoveStaleTempFilesRemovesOnlyThoseOfDeadProcesses) {
  const auto dir = temp_dir("stale");
  const std::string dead = std::to_string(dead_pid());
  const std::string mine = std::to_string(::getpid());
  touch(dir + "/state.safetensors.tmp." + dead);
  touch(dir + "/config.json.tmp." + dead);
  touch(dir + "/state.safetensors.tmp." + mine); // a save going on
  touch(dir + "/state.safetensors");
  touch(dir + "/notes.tmp.txt");
  touch(dir + "/x.tmp.12ab");
  touch(dir + "/x.tmp.");
  touch(dir + "/.tmp." + dead); // no name before it: not an AtomicFile's
  fs::create_directory(dir + "/folder.tmp." + dead);
  fs::create_symlink(dir + "/state.safetensors", dir + "/link.tmp." + dead);

  const auto removed = io::remove_stale_temp_files(dir);
  EXPECT_EQ(removed, (std::vector<std::string>{dir + "/config.json.tmp." + dead,
                                               dir + "/state.safetensors.tmp." + dead}));
  EXPECT_FALSE(fs::exists(dir + "/state.safetensors.tmp." + dead));
  for (const auto& kept :
       {"/state.safetensors.tmp." + mine, std::string("/state.safetensors"),
        std::string("/notes.tmp.txt"), std::string("/x.tmp.12ab"), std::string("/x.tmp."),
        "/.tmp." + dead, "/folder.tmp." + dead, "/link.tmp." + dead}) {
    EXPECT_TRUE(fs::exists(fs::symlink_status(dir + kept))) << kept;
  }
  // Nothing left to remove, and a folder that does not exist has none.
  EXPECT_TRUE(io::remove_stale_temp_files(dir).empty());
  EXPECT_TRUE(io::remove_stale_temp_files(dir + "/absent").empty());
}

TEST(IoFile, LinkFileAtomicReplacesTheLinkAndLeavesNoTemporaryFile) {
  const auto dir = temp_dir("link");
  io::write_file_atomic(dir + "/a", "one");
  io::write_file_atomic(dir + "/b", "two");
  io::link_file_atomic(dir + "/a", dir + "/b");
  EXPECT_EQ(io::read_file(dir + "/b"), "one");
  EXPECT_TRUE(fs::equivalent(dir + "/a", dir + "/b"));
  EXPECT_FALSE(fs::exists(io::temp_path(dir + "/b")));
  EXPECT_THROW_WITH(
      io::link_file_atomic(dir + "/absent", dir + "/c"),
      "could not link '" + dir + "/absent' to '" + io::temp_path(dir + "/c") + "'");
  EXPECT_FALSE(fs::exists(dir + "/c"));
}

} // namespace
