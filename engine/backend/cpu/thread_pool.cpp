#include "engine/backend/cpu/thread_pool.hpp"

#include <algorithm>
#include <cstdlib>

#include <unistd.h>

namespace troupe::engine::cpu {

thread_pool::thread_pool(int threads) : owner_pid_(static_cast<int>(::getpid())) {
  for (int i = 1; i < threads; ++i)
    workers_.emplace_back([this] { work(); });
}

thread_pool::~thread_pool() {
  {
    std::lock_guard lock(m_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_)
    t.join();
}

thread_pool& thread_pool::shared() {
  // Never destroyed: idle workers end with the process, and a forked child (which has none of
  // them, only the condition variables they wait on) must not try to join or destroy them.
  static thread_pool* pool = new thread_pool([] {
    const char* env = std::getenv("TROUPE_CPU_THREADS");
    int n = env != nullptr ? std::atoi(env) : static_cast<int>(std::thread::hardware_concurrency());
    return std::clamp(n, 1, 256);
  }());
  return *pool;
}

void thread_pool::run_chunks() {
  for (;;) {
    int64_t begin = next_.fetch_add(chunk_);
    if (begin >= n_)
      return;
    (*job_)(begin, std::min(n_, begin + chunk_));
  }
}

void thread_pool::work() {
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock lock(m_);
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_)
        return;
      seen = generation_;
    }
    run_chunks();
    {
      std::lock_guard lock(m_);
      if (--active_ == 0)
        done_.notify_one();
    }
  }
}

void thread_pool::parallel_for(int64_t n, int64_t grain,
                               const std::function<void(int64_t, int64_t)>& f) {
  if (n <= 0)
    return;
  std::unique_lock busy(busy_, std::try_to_lock);
  grain = std::max<int64_t>(grain, 1);
  if (workers_.empty() || !busy.owns_lock() || n <= grain || ::getpid() != owner_pid_) {
    f(0, n);
    return;
  }
  // About four chunks per thread balances load when other processes share the cores.
  const int64_t per = (n + 4 * size() - 1) / (4 * size());
  {
    std::lock_guard lock(m_);
    job_ = &f;
    n_ = n;
    chunk_ = std::max(grain, (per + grain - 1) / grain * grain);
    next_.store(0);
    active_ = static_cast<int>(workers_.size());
    ++generation_;
  }
  wake_.notify_all();
  run_chunks();
  std::unique_lock lock(m_);
  done_.wait(lock, [&] { return active_ == 0; });
  job_ = nullptr;
}

} // namespace troupe::engine::cpu
