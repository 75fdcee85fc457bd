#include "serve/request_channel.hpp"

namespace troupe::serve {

void request_channel::push(const engine::request_output& o) {
  {
    std::lock_guard lk(mu_);
    q_.push_back(o);
  }
  cv_.notify_one();
}

void request_channel::fail(const error& why) {
  {
    std::lock_guard lk(mu_);
    if (!failed_) {
      why_ = why.message();
      code_ = why.code();
    }
    failed_ = true;
    q_.push_back({.finish = engine::finish_reason::cancelled});
  }
  cv_.notify_one();
}

std::string request_channel::failure() const {
  std::lock_guard lk(mu_);
  return why_;
}

errc request_channel::failure_code() const {
  std::lock_guard lk(mu_);
  return code_;
}

bool request_channel::wait(std::vector<engine::request_output>& out, int ms) {
  std::unique_lock lk(mu_);
  if (!cv_.wait_for(lk, std::chrono::milliseconds(ms), [&] { return !q_.empty(); }))
    return false;
  out.insert(out.end(), q_.begin(), q_.end());
  q_.clear();
  return true;
}

} // namespace troupe::serve
