// A small fixed pool of worker threads for the CPU backend's matrix products (ops.cpp). Work is
// split into index ranges; each index is computed by exactly one thread in the same order as the
// serial code, so results are bit-identical for any thread count. parallel_for blocks the caller,
// which works too. If another thread is already using the pool, or this is a forked child (whose
// copy of the pool has no threads), the call runs serially inline.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace troupe::engine::cpu {

class thread_pool {
 public:
  explicit thread_pool(int threads); // total threads including the caller; <= 1: serial
  ~thread_pool();                    // joins the workers: only in the process that made the pool
  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }
  // Calls f(begin, end) on disjoint chunks covering [0, n), chunk length a multiple of `grain`
  // (except the last); returns when all are done.
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& f);

  // The pool ops.cpp uses: $TROUPE_CPU_THREADS threads, else the machine's hardware threads.
  // Made on first use and never destroyed.
  static thread_pool& shared();

 private:
  void work();
  void run_chunks();

  std::vector<std::thread> workers_;
  int owner_pid_ = 0; // the process whose threads these are
  std::mutex busy_;   // held by the caller of parallel_for for its whole duration
  std::mutex m_;
  std::condition_variable wake_, done_;
  uint64_t generation_ = 0;
  bool stop_ = false;
  int active_ = 0; // workers still inside the current job
  const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  int64_t n_ = 0, chunk_ = 0;
  std::atomic<int64_t> next_{0};
};

} // namespace troupe::engine::cpu
