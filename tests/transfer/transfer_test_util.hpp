// Helpers for the transfer tests: a byte pattern to verify writes, and a child process (the
// transfer_peer tool) whose stdout lines the test reads. Test-only.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <sys/types.h>

namespace troupe::test {

inline uint8_t pattern_byte(uint64_t i, uint64_t seed) {
  return static_cast<uint8_t>((i * 131 + seed * 7 + 3) & 0xff);
}
void fill_pattern(uint8_t* p, uint64_t n, uint64_t seed, uint64_t start = 0);
bool has_pattern(const uint8_t* p, uint64_t n, uint64_t seed, uint64_t start = 0);

std::string to_hex(const std::vector<uint8_t>& bytes);
std::vector<uint8_t> from_hex(const std::string& hex);

// A running child process with its stdout on a pipe.
class child_process {
 public:
  explicit child_process(const std::vector<std::string>& argv);
  ~child_process(); // SIGKILLs and reaps a child still running
  // The next stdout line, or "" at EOF / after timeout_ms.
  std::string read_line(int timeout_ms);
  void kill_now();
  int wait_exit(); // exit status, or 128 + signal
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
  int out_fd_ = -1;
  std::string buffer_;
  bool reaped_ = false;
  int status_ = 0;
};

} // namespace troupe::test
