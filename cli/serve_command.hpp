// `cluster serve model.yaml`: sends the deployment to the head, which places it, has the nodes
// start its worker ranks and serves it from the head's process; prints the endpoint once ready.
// `cluster serve --stop NAME` removes one. `--block`: serves in this process (CPU backend, one
// rank) until SIGINT/SIGTERM. Registered by main.cpp.
#pragma once

#include <CLI/CLI.hpp>

namespace troupe::cli {

void add_serve_command(CLI::App& app, int& exit_code);

} // namespace troupe::cli
