// `cluster serve model.yaml --block`: serves one model in this process (CPU backend) with the
// OpenAI-compatible HTTP API until SIGINT/SIGTERM. Registered by main.cpp.
#pragma once

#include <CLI/CLI.hpp>

namespace troupe::cli {

void add_serve_command(CLI::App& app, int& exit_code);

} // namespace troupe::cli
