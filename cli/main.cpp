// remat: activation checkpointing for LibTorch, from the command line.
#include "command.h"

#include "remat/memory.h"

#include <c10/util/Exception.h>

#include <iostream>
#include <map>

namespace {

// c10::Error messages can span lines (and carry a backtrace); a command line
// user gets the first line of the message only.
std::string first_line(const std::string& text) {
  return text.substr(0, text.find('\n'));
}

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
