// Test helper: runs one function per rank in forked child processes (the CPU stand-ins for
// model-parallel workers), each with its own rendezvous folder path, and collects what each
// wrote. Blocks until every child exits or the deadline passes (then kills the rest).
#pragma once

#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace troupe::test {

struct rank_outcome {
  int exit_code = -1;  // -1 when killed or timed out
  int signal = 0;      // the signal that ended it, if one did
  std::string message; // what the rank wrote to its result file (or which signal ended it)
};

// Forks `ranks` children; child r runs body(r, folder) and exits with its return value; its
// result text (body writes it to folder/"rank<r>.txt") comes back in rank_outcome::message.
std::vector<rank_outcome>
run_ranks(int ranks, const std::function<int(int rank, const std::filesystem::path&)>& body,
          std::chrono::seconds deadline = std::chrono::seconds(90));

// A rank's results travel as length-prefixed vectors of plain values in its result text.
template <typename T>
void put_vector(std::string& s, const std::vector<T>& v) {
  auto n = static_cast<uint32_t>(v.size());
  s.append(reinterpret_cast<const char*>(&n), sizeof n);
  s.append(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}
// Reads the vector at `at` and moves past it; throws if the text is cut short.
template <typename T>
std::vector<T> take_vector(const std::string& s, size_t& at) {
  uint32_t n = 0;
  if (at + sizeof n > s.size())
    throw std::out_of_range("rank result cut short");
  std::memcpy(&n, s.data() + at, sizeof n);
  if (at + sizeof n + n * sizeof(T) > s.size())
    throw std::out_of_range("rank result cut short");
  std::vector<T> v(n);
  if (n > 0) // an empty vector's data() may be null
    std::memcpy(v.data(), s.data() + at + sizeof n, n * sizeof(T));
  at += sizeof n + n * sizeof(T);
  return v;
}

} // namespace troupe::test
