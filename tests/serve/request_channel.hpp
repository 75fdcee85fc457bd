// A request_sink that queues outputs for a test thread that waits on them (the replica router's
// tests; HTTP sessions use completion.cpp's strand sink). push() and fail() never block; wait()
// blocks up to a timeout.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <string>
#include <vector>

#include "http/serving_port.hpp"

namespace troupe::serve {

class request_channel final : public request_sink {
 public:
  void push(const engine::request_output& o) override;
  // Queues an output that ends the request (finish `cancelled`) and remembers why.
  void fail(const error& why) override;
  // Waits up to `ms` for outputs; moves them into `out`. Returns false on timeout.
  bool wait(std::vector<engine::request_output>& out, int ms);
  bool failed() const { return failed_; }
  std::string failure() const;
  errc failure_code() const;

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<engine::request_output> q_;
  std::atomic<bool> failed_{false};
  std::string why_;
  errc code_ = errc::ok;
};

} // namespace troupe::serve
