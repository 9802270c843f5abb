// `remat train` never loses a run: a run killed at any step and resumed with
// --resume follows the uninterrupted run's loss curve step for step, and a
// damaged state is refused without being touched.
#include "cli/cli_runner.h"
#include "remat/io/file.h"
#include "remat/train/train_state.h"
#include "temp_dir.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <functional>
#include <iostream>
#include <csignal>
#include <fcntl.h>
#include <filesystem>
#include <random>
#include <sstream>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

namespace {

namespace fs = std::filesystem;
using remat::test::run_cli;
using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;

// A tiny model on the bundled data: each run takes about a second.
const std::string kRun =
    "train --layers 1 --hidden 16 --heads 2 --seq 32 --batch 8 --valid-fraction 0.05 "
    "--threads 1 --seed 3 --dropout 0.1 --eval-every 5 ";

std::string temp_dir(const std::string& name) {
  return remat_test::fresh_temp_dir("resume_" + name, /*create=*/true);
}

std::vector<nlohmann::json> read_jsonl(const std::string& path, const std::string& type) {
  std::vector<nlohmann::json> out;
  std::istringstream in(remat::test::slurp(path));
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (j["type"] == type) {
      out.push_back(j);
    }
  }
  return out;
}

// What must be equal between two runs: everything but timings and memory.
std::vector<std::string> curve(const std::vector<nlohmann::json>& steps) {
  std::vector<std::string> out;
  for (const auto& s : steps) {
    out.push_back(nlohmann::json{{"step", s["step"]}, {"epoch", s["epoch"]},
                                 {"loss", s["loss"]}, {"lr", s["lr"]},
                                 {"grad_norm", s["grad_norm"]}, {"tokens", s["tokens"]}}
                      .dump());
  }
  return out;
}

std::vector<std::string> evals(const std::string& path) {
  std::vector<std::string> out;
  for (auto e : read_jsonl(path, "eval")) {
    out.push_back(e.dump());
  }
  return out;
}

TEST(TrainResume, KilledRunResumesOnTheSameLossCurve) {
  const auto dir = temp_dir("stop");
  const std::string steps = "--max-steps 12 ";
  auto whole = run_cli(kRun + steps + "--out " + dir + "/a --metrics " + dir + "/a.jsonl");
  ASSERT_EQ(whole.exit_code, 0) << whole.err;

  // Killed right after step 7; the last state saved is step 6's.
  auto killed = run_cli(kRun + steps + "--save-every 3 --stop-after-step 7 --out " + dir +
                        "/b --metrics " + dir + "/b.jsonl");
  ASSERT_EQ(killed.exit_code, 137) << killed.err;
  EXPECT_EQ(read_jsonl(dir + "/b.jsonl", "step").size(), 7u);
  // Only --out, --resume (and outputs) are needed: the state knows the rest.
  auto resumed = run_cli("train --resume --out " + dir + "/b --metrics " + dir + "/b.jsonl");
  ASSERT_EQ(resumed.exit_code, 0) << resumed.err;
  EXPECT_THAT(resumed.err, HasSubstr("resumed from " + dir + "/b/state.safetensors at step 6"));

  const auto a = read_jsonl(dir + "/a.jsonl", "step");
  const auto b = read_jsonl(dir + "/b.jsonl", "step");
  ASSERT_EQ(a.size(), 12u);
  // Every step, those before the kill and those after the resume, equal.
  EXPECT_EQ(curve(a), curve(b));
  EXPECT_EQ(evals(dir + "/a.jsonl"), evals(dir + "/b.jsonl"));
  EXPECT_EQ(a.back()["loss"].get<double>(), b.back()["loss"].get<double>());
}

// Starts the remat program with `args`, its output discarded.
pid_t spawn_cli(const std::string& args) {
  const pid_t pid = fork();
  if (pid == 0) {
    int null_fd = ::open("/dev/null", O_WRONLY);
    ::dup2(null_fd, STDOUT_FILENO);
    ::dup2(null_fd, STDERR_FILENO);
    ::execl("/bin/sh", "sh", "-c", (std::string("exec ") + REMAT_CLI_PATH + " " + args).c_str(),
            static_cast<char*>(nullptr));
    ::_exit(127);
  }
  return pid;
}

// Ten real SIGKILLs at random moments, each followed by --resume. The run
// saves after every step, so most kills land in or near a save. The final
// loss, and every step's, equals the uninterrupted run's.
TEST(TrainResume, TenSigkillsThenResumeReachTheSameFinalLoss) {
  const auto dir = temp_dir("sigkill");
  const std::string steps = "--max-steps 300 ";
  auto whole = run_cli(kRun + steps + "--metrics " + dir + "/a.jsonl");
  ASSERT_EQ(whole.exit_code, 0) << whole.err;

  const auto state = dir + "/b/state.safetensors";
  const std::string first = kRun + steps + "--save-every 1 --out " + dir + "/b --metrics " +
      dir + "/b.jsonl";
  const std::string again = "train --resume --out " + dir + "/b --metrics " + dir + "/b.jsonl";
  std::mt19937 rng(std::random_device{}());
  int kills = 0;
  for (int round = 0; round < 10; ++round) {
    const bool fresh = !fs::exists(state);
    const pid_t pid = spawn_cli(fresh ? first : again);
    ASSERT_GE(pid, 0);
    int status = 0;
    bool exited = false;
    // A fresh run is killed only once it has a state to resume from.
    for (int i = 0; fresh && i < 30000 && !fs::exists(state); ++i) {
      if (::waitpid(pid, &status, WNOHANG) == pid) {
        exited = true;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    ASSERT_TRUE(fs::exists(state)) << "no state was saved";
    if (!exited) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200 + rng() % 800));
      ::kill(pid, SIGKILL);
      ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    }
    if (WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) {
      ++kills;
    } else {
      ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "round " << round;
      break; // finished before the kill
    }
  }
  std::cerr << "note: " << kills << " of 10 rounds were killed before the run finished\n";
  EXPECT_GE(kills, 1);
  auto resumed = run_cli(again);
  ASSERT_EQ(resumed.exit_code, 0) << resumed.err;
  const auto a = read_jsonl(dir + "/a.jsonl", "step");
  const auto b = read_jsonl(dir + "/b.jsonl", "step");
  EXPECT_EQ(curve(a), curve(b)) << "after " << kills << " kills";
  ASSERT_FALSE(a.empty());
  ASSERT_FALSE(b.empty());
  EXPECT_EQ(a.back()["loss"].get<double>(), b.back()["loss"].get<double>());
}

TEST(TrainResume, DamagedStateIsRefusedAndLeftAsItIs) {
  const auto dir = temp_dir("damaged");
  auto r = run_cli(kRun + "--max-steps 4 --save-every 2 --out " + dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto state = dir + "/state.safetensors";
  const auto prev = dir + "/state.prev.safetensors";
  const auto prev_bytes = remat::io::read_file(prev);
  for (int damage = 0; damage < 2; ++damage) {
    auto bytes = remat::io::read_file(prev);
    if (damage == 0) {
      bytes.resize(bytes.size() / 2); // truncated
    } else {
      bytes[bytes.size() / 2] ^= 0x10; // one flipped bit
    }
    remat::io::write_file_atomic(state, bytes);
    auto resumed = run_cli("train --resume --out " + dir);
    EXPECT_EQ(resumed.exit_code, 1) << resumed.err;
    EXPECT_THAT(resumed.err, StartsWith("remat: error: '" + state + "' is damaged"));
    EXPECT_THAT(resumed.err, HasSubstr(prev + " (step 2), is readable"));
    EXPECT_EQ(std::count(resumed.err.begin(), resumed.err.end(), '\n'), 1) << resumed.err;
    EXPECT_EQ(remat::io::read_file(state), bytes) << "the damaged state was changed";
    EXPECT_EQ(remat::io::read_file(prev), prev_bytes);
  }
  // As the message says: the previous state resumes.
  fs::copy_file(prev, state, fs::copy_options::overwrite_existing);
  auto resumed = run_cli("train --resume --out " + dir);
  EXPECT_EQ(resumed.exit_code, 0) << resumed.err;
  EXPECT_THAT(resumed.err, HasSubstr("at step 2 of 4"));
}

// A state crafted by someone else carries a valid checksum, so every field
// and record is reached: each wrong one is refused in one line naming the
// file and the field, with none of LibTorch's or nlohmann's own text.
TEST(TrainResume, CraftedStateNamesTheFileAndField) {
  const auto dir = temp_dir("crafted");
  auto r = run_cli(kRun + "--max-steps 4 --save-every 1 --stop-after-step 2 --out " + dir);
  ASSERT_EQ(r.exit_code, 137) << r.err;
  const auto good = remat::train::load_train_state(dir + "/state.safetensors");
  struct Craft {
    std::string name;
    std::function<void(remat::train::TrainState&)> change;
    std::string expected;
  };
  const std::vector<Craft> crafts = {
      {"string step", [](auto& s) { s.info["step"] = "2"; },
       "is damaged: field \"step\": expected an integer, but got \"2\""},
      {"fractional step", [](auto& s) { s.info["step"] = 1.5; },
       "is damaged: field \"step\": expected an integer, but got 1.5"},
      {"loader of strings", [](auto& s) { s.info["loader"]["epoch"] = "0"; },
       "is damaged: field \"loader\": loader position: expected an integer field"},
      {"history not an object", [](auto& s) { s.info["history"] = 5; },
       "is damaged: field \"history\""},
      {"optimizer record garbage",
       [](auto& s) { s.tensors["optimizer"] = torch::randint(0, 255, {64}, torch::kByte); },
       "is damaged: its optimizer record (64 bytes) is not an AdamW state"},
      {"optimizer record of floats",
       [](auto& s) { s.tensors["optimizer"] = s.tensors["optimizer"].to(torch::kFloat); },
       "is damaged: the optimizer record must be a 1-D U8 tensor, but it is Float"},
      {"another LibTorch", [](auto& s) { s.info["libtorch"] = "0.9.1"; },
       "was saved with LibTorch 0.9.1, but this remat runs LibTorch"},
      {"RNG record short",
       [](auto& s) { s.tensors["rng.cpu"] = s.tensors["rng.cpu"].slice(0, 0, 100).clone(); },
       "is damaged: its RNG record holds 100 bytes, but a CPU generator state is"},
  };
  for (const auto& craft : crafts) {
    SCOPED_TRACE(craft.name);
    const auto run = temp_dir("crafted_run");
    auto state = good;
    state.tensors = {};
    for (const auto& kv : good.tensors) {
      state.tensors[kv.first] = kv.second.clone();
    }
    craft.change(state);
    remat::train::save_train_state(run, state);
    const auto path = run + "/state.safetensors";
    const auto bytes = remat::io::read_file(path);
    auto resumed = run_cli("train --resume --out " + run);
    EXPECT_EQ(resumed.exit_code, 1) << resumed.err;
    // The model's summary line comes first; the error is the last line.
    auto error = resumed.err.substr(0, resumed.err.size() - 1);
    error = error.substr(error.rfind('\n') + 1);
    EXPECT_THAT(error, StartsWith("remat: error: '" + path + "'"));
    EXPECT_THAT(error, HasSubstr(craft.expected));
    EXPECT_THAT(resumed.err, Not(HasSubstr("json.exception")));
    EXPECT_THAT(resumed.err, Not(HasSubstr("PytorchStreamReader")));
    EXPECT_THAT(resumed.err, Not(HasSubstr("CPUGeneratorImpl")));
    EXPECT_EQ(remat::io::read_file(path), bytes) << "the refused state was changed";
  }
}

TEST(TrainResume, NeverOverwritesAStateByMistake) {
  const auto dir = temp_dir("overwrite");
  auto r = run_cli(kRun + "--max-steps 2 --out " + dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto bytes = remat::io::read_file(dir + "/state.safetensors");
  // A new run into the same folder.
  auto again = run_cli(kRun + "--max-steps 2 --out " + dir);
  EXPECT_EQ(again.exit_code, 2);
  EXPECT_THAT(again.err, StartsWith("remat: error: --out: '" + dir +
                                    "' already holds a training state (step 2)"));
  // A resume that would change the loss curve.
  auto other = run_cli("train --resume --batch 4 --out " + dir);
  EXPECT_EQ(other.exit_code, 2);
  EXPECT_THAT(other.err, StartsWith("remat: error: --batch: the state in '"));
  // A resume with nothing to resume.
  auto none = run_cli("train --resume --out " + dir + "/nothing");
  EXPECT_EQ(none.exit_code, 2);
  EXPECT_THAT(none.err, HasSubstr("--resume: no training state in"));
  EXPECT_EQ(remat::io::read_file(dir + "/state.safetensors"), bytes);
}

} // namespace
