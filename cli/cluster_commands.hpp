// `cluster start --head`, `cluster join`, `cluster status`, `cluster stop`: option parsing and
// the client side of the control plane. Each add_* registers one subcommand (CLI11 callback that
// blocks until done and sets `exit_code`). Called from cli/main.cpp.
#pragma once

#include <CLI/CLI.hpp>

namespace troupe::cli {

void add_start_command(CLI::App& app, int& exit_code);
void add_join_command(CLI::App& app, int& exit_code);
void add_status_command(CLI::App& app, int& exit_code);
void add_stop_command(CLI::App& app, int& exit_code);

} // namespace troupe::cli
