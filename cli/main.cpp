// remat: activation checkpointing for LibTorch, from the command line.
#include "command.h"

#include "remat/memory.h"
#include "remat/field_error.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <iostream>
#include <map>
#include <sstream>
#include <vector>

namespace {

// c10::Error messages can span lines (and carry a backtrace); a command line
// user gets the first line of the message only.
using remat::first_line;

// CLI11 says "Could not convert: --layers = abc"; the user gets what the
// flag expects, from the flag's own type.
std::string conversion_message(const CLI::App& app, const std::string& what) {
  const std::string head = "Could not convert: ";
  const auto eq = what.find(" = ");
  if (what.compare(0, head.size(), head) != 0 || eq == std::string::npos) {
    return what;
  }
  const std::string flag = what.substr(head.size(), eq - head.size());
  const std::string value = what.substr(eq + 3);
  std::string type;
  for (const auto* sub : app.get_subcommands()) {
    if (const auto* option = sub->get_option_no_throw(flag)) {
      type = option->get_type_name();
    }
  }
  const std::string expected = type == "INT" ? "an integer"
      : type == "UINT"                       ? "an integer >= 0"
      : type == "FLOAT"                      ? "a number"
                                             : "a value of its type";
  return flag + ": expected " + expected + ", but got '" + value + "'";
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) {
    row[j] = j;
  }
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] != b[j - 1])});
      diagonal = up;
    }
  }
  return row[b.size()];
}

// The command the user named, or null.
const CLI::App* chosen(const CLI::App& app) {
  for (const auto* sub : app.get_subcommands()) {
    return sub;
  }
  return nullptr;
}

// CLI11 says "The following arguments were not expected: 4 --layer"; the
// user gets the flag it did not know and the nearest one it does.
std::string extras_message(const CLI::App& app, const std::string& what) {
  const auto colon = what.find(" not expected: ");
  if (what.rfind("The following argument", 0) != 0 || colon == std::string::npos) {
    return what;
  }
  std::istringstream words(what.substr(colon + std::string(" not expected: ").size()));
  std::vector<std::string> extras;
  for (std::string w; words >> w;) {
    extras.push_back(w);
  }
  const CLI::App* sub = chosen(app);
  const std::string command = sub ? "remat " + sub->get_name() : std::string("remat");
  for (const auto& word : extras) {
    if (word.rfind("-", 0) != 0) {
      continue;
    }
    const std::string flag = word.substr(0, word.find('='));
    std::string best;
    size_t best_distance = 3; // suggest only near misses
    if (sub) {
      for (const auto* option : sub->get_options()) {
        for (const auto& name : option->get_lnames()) {
          const size_t d = edit_distance(flag, "--" + name);
          if (d < best_distance && option->get_group() != "") {
            best_distance = d;
            best = "--" + name;
          }
        }
      }
    }
    return flag + ": expected a flag of " + command + ", but got '" + flag + "'" +
        (best.empty() ? "; see " + command + " --help" : "; did you mean " + best + "?");
  }
  return "expected flags of " + command + ", but got the value '" + extras.front() +
      "' after no flag; see " + command + " --help";
}

// "--layers: At Most 1 required but received 2" is a flag given twice.
std::string mismatch_message(const std::string& what) {
  const auto at = what.find(": At Most 1 required but received ");
  if (at == std::string::npos) {
    return what;
  }
  return what.substr(0, at) + ": expected the flag once, but it was given " +
      what.substr(at + std::string(": At Most 1 required but received ").size()) + " times";
}

} // namespace

int main(int argc, char** argv) {
  CLI::App app{"remat: activation checkpointing for LibTorch"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "remat 0.1.0");
  std::map<std::string, remat::cli::Run> commands;
  commands["bench"] = remat::cli::add_bench(app);
  commands["train"] = remat::cli::add_train(app);
  commands["plan"] = remat::cli::add_plan(app);
  commands["estimate"] = remat::cli::add_estimate(app);

  const std::string command_names = "bench, train, plan, estimate";
  const auto top_level_flag = [](const std::string& a) {
    return a == "--help" || a == "-h" || a == "--help-all" || a == "--version";
  };
  if (argc < 2 || (commands.count(argv[1]) == 0 && !top_level_flag(argv[1]))) {
    std::cerr << "remat: error: expected a command (" << command_names << "), but got "
              << (argc < 2 ? std::string("none") : "'" + std::string(argv[1]) + "'")
              << "; see remat --help\n";
    return 2;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ConversionError& e) {
    std::cerr << "remat: error: " << conversion_message(app, first_line(e.what())) << "\n";
    return 2;
  } catch (const CLI::ExtrasError& e) {
    std::cerr << "remat: error: " << extras_message(app, first_line(e.what())) << "\n";
    return 2;
  } catch (const CLI::ArgumentMismatch& e) {
    std::cerr << "remat: error: " << mismatch_message(first_line(e.what())) << "\n";
    return 2;
  } catch (const CLI::RequiredError& e) {
    const std::string what = first_line(e.what());
    std::cerr << "remat: error: "
              << (what == "A subcommand is required"
                      ? "expected a command (" + command_names + "), but got none; see remat --help"
                      : what)
              << "\n";
    return 2;
  } catch (const CLI::ParseError& e) {
    std::cerr << "remat: error: " << first_line(e.what()) << "\n";
    return 2;
  }

  remat::memory::install();
  try {
    for (auto* sub : app.get_subcommands()) {
      return commands.at(sub->get_name())();
    }
  } catch (const remat::cli::UsageError& e) {
    std::cerr << "remat: error: " << first_line(e.what()) << "\n";
    return 2;
  } catch (const c10::Error& e) {
    std::cerr << "remat: error: " << first_line(e.what_without_backtrace()) << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "remat: error: " << first_line(e.what()) << "\n";
    return 1;
  }
  return 1;
}
