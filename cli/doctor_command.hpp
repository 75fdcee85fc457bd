// `cluster doctor`: what KV transfer can use on this host (libfabric providers, RDMA devices,
// hints) and a measured loopback WRITE bandwidth/latency over each usable provider. Blocking, CLI
// thread.
#pragma once

#include <CLI/CLI.hpp>

namespace troupe::cli {

void add_doctor_command(CLI::App& app, int& exit_code);

} // namespace troupe::cli
