// The `cluster` executable: every troupe subcommand behind one binary.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "cli/cluster_commands.hpp"
#include "cli/doctor_command.hpp"
#include "cli/generate_command.hpp"
#include "cli/serve_command.hpp"

#ifndef TROUPE_VERSION
#define TROUPE_VERSION "0.0.0"
#endif

int main(int argc, char** argv) {
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
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return exit_code;
}
