// Test helper: runs one function per rank in forked child processes (the CPU stand-ins for
// model-parallel workers), each with its own rendezvous folder path, and collects what each
// wrote. Blocks until every child exits or the deadline passes (then kills the rest).
#pragma once

#include <chrono>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

namespace troupe::test {

struct rank_outcome {
  int exit_code = -1;  // -1 when killed or timed out
  std::string message; // what the rank wrote to its result file
};

// Forks `ranks` children; child r runs body(r, folder) and exits with its return value; its
// result text (body writes it to folder/"rank<r>.txt") comes back in rank_outcome::message.
std::vector<rank_outcome>
run_ranks(int ranks, const std::function<int(int rank, const std::filesystem::path&)>& body,
          std::chrono::seconds deadline = std::chrono::seconds(90));

} // namespace troupe::test
