// `cluster generate`: offline greedy generation on this host's CPU backend, for demos and checks.
#pragma once

#include <CLI/CLI.hpp>

namespace troupe::cli {

// Adds the subcommand to `app`; it runs when parsed (CLI11 callback) and sets `exit_code`.
void add_generate_command(CLI::App& app, int& exit_code);

} // namespace troupe::cli
