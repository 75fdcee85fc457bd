// The `cluster` executable: every troupe subcommand behind one binary. Exit codes come from one
// mapping (cli/exit_codes.hpp); a mistyped command or option is answered with the closest valid
// one.
#include <csignal>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "cli/cluster_commands.hpp"
#include "cli/doctor_command.hpp"
#include "cli/exit_codes.hpp"
#include "cli/generate_command.hpp"
#include "cli/serve_command.hpp"
#include "runtime/config.hpp"
#include "runtime/log.hpp"

#ifndef TROUPE_VERSION
#define TROUPE_VERSION "0.0.0"
#endif

namespace {

// The closest of `names` to `word`, or "" when none is close enough to be a typo.
std::string closest(const std::string& word, const std::vector<std::string>& names) {
  std::string best;
  size_t best_d = 0;
  for (const auto& n : names) {
    const size_t d = troupe::edit_distance(word, n);
    if (best.empty() || d < best_d) {
      best = n;
      best_d = d;
    }
  }
  return best_d <= std::max<size_t>(2, word.size() / 3) ? best : "";
}

// Unknown words after a subcommand: name each, with the closest option where one is near.
int unexpected(CLI::App& app, const CLI::ExtrasError& e) {
  auto subs = app.get_subcommands();
  CLI::App* cmd = subs.empty() ? &app : subs.back();
  std::vector<std::string> flags;
  for (const auto* opt : cmd->get_options()) {
    for (const auto& n : opt->get_lnames())
      flags.push_back("--" + n);
    for (const auto& n : opt->get_snames())
      flags.push_back("-" + n);
  }
  const std::string where = cmd == &app ? "cluster" : "cluster " + cmd->get_name();
  bool any = false;
  for (const auto& arg : app.remaining(true)) {
    if (arg.empty() || arg[0] != '-')
      continue;
    const std::string name = arg.substr(0, arg.find('='));
    const auto hint = closest(name, flags);
    fmt::print(stderr, "error: unknown option '{}' for `{}`{}\n", name, where,
               hint.empty() ? "" : fmt::format(" (did you mean '{}'?)", hint));
    any = true;
  }
  if (!any)
    fmt::print(stderr, "error: {}\n", e.what());
  fmt::print(stderr, "Run `{} --help` for its options.\n", where);
  return troupe::cli::exit_usage;
}

} // namespace

int main(int argc, char** argv) {
  // A peer that goes away is an EPIPE error on that socket, never the end of the process: Gloo
  // writes to its sockets with writev, so one dead rank would otherwise take down every rank
  // (of every deployment) in the daemon that talked to it.
  std::signal(SIGPIPE, SIG_IGN);
  CLI::App app{"troupe: actor-based distributed runtime for model-parallel LLM serving", "cluster"};
  app.require_subcommand(1);
  app.set_version_flag("--version", TROUPE_VERSION);
  int exit_code = 0;
  troupe::cli::add_generate_command(app, exit_code);
  troupe::cli::add_start_command(app, exit_code);
  troupe::cli::add_join_command(app, exit_code);
  troupe::cli::add_status_command(app, exit_code);
  troupe::cli::add_stop_command(app, exit_code);
  troupe::cli::add_serve_command(app, exit_code);
  troupe::cli::add_doctor_command(app, exit_code);
  std::vector<std::string> commands;
  for (auto* sub : app.get_subcommands({})) {
    commands.push_back(sub->get_name());
    // Every command: its log lines (and its daemons', through the environment) as text or JSON.
    sub->add_option_function<std::string>(
           "--log-format",
           [](const std::string& f) {
             troupe::log::set_format(f);
             setenv("TROUPE_LOG_FORMAT", f.c_str(), 1);
           },
           "Log lines as text (default) or json (one object per line); also $TROUPE_LOG_FORMAT")
        ->check(CLI::IsMember({"text", "json"}));
  }
  if (argc > 1 && argv[1][0] != '-' &&
      std::find(commands.begin(), commands.end(), argv[1]) == commands.end()) {
    const auto hint = closest(argv[1], commands);
    fmt::print(stderr, "error: unknown command '{}'{}; commands: {}\n", argv[1],
               hint.empty() ? "" : fmt::format(" (did you mean '{}'?)", hint),
               fmt::join(commands, ", "));
    return troupe::cli::exit_usage;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ExtrasError& e) {
    return unexpected(app, e);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) // --help, --version
      return app.exit(e);
    app.exit(e); // prints the message
    return troupe::cli::exit_usage;
  }
  return exit_code;
}
