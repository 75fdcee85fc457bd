// The CPU backend's thread pool: every index covered exactly once, in grain-sized chunks, from
// concurrent callers too; and matmul_nt bit-identical whether split across threads or not.
#include <atomic>
#include <cstring>
#include <random>
#include <thread>

#include <sys/wait.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include "engine/backend/cpu/ops.hpp"
#include "engine/backend/cpu/thread_pool.hpp"

using namespace troupe::engine::cpu;

TEST_CASE("thread_pool: parallel_for covers every index once, in grain multiples") {
  for (int threads : {1, 2, 3, 8}) {
    thread_pool pool(threads);
    CHECK(pool.size() == std::max(threads, 1));
    for (int64_t n : {0, 1, 15, 16, 17, 1000, 4099}) {
      for (int64_t grain : {1, 16, 100}) {
        std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
        std::atomic<bool> aligned{true};
        pool.parallel_for(n, grain, [&](int64_t b, int64_t e) {
          if (b % grain != 0 || (e != n && (e - b) % grain != 0))
            aligned = false;
          for (int64_t i = b; i < e; ++i)
            hits[static_cast<size_t>(i)]++;
        });
        INFO("threads " << threads << " n " << n << " grain " << grain);
        CHECK(aligned);
        int bad = 0;
        for (auto& h : hits)
          bad += h.load() != 1;
        CHECK(bad == 0);
      }
    }
  }
}

TEST_CASE("thread_pool: concurrent callers each get their whole range") {
  thread_pool pool(3);
  std::vector<std::thread> callers;
  std::atomic<int64_t> total{0};
  for (int c = 0; c < 4; ++c)
    callers.emplace_back([&] {
      for (int rep = 0; rep < 50; ++rep)
        pool.parallel_for(1000, 10, [&](int64_t b, int64_t e) { total += e - b; });
    });
  for (auto& t : callers)
    t.join();
  CHECK(total.load() == 4 * 50 * 1000);
}

TEST_CASE("matmul_nt: threaded result is bit-identical to one output row at a time") {
  std::mt19937 rng(8);
  std::normal_distribution<float> dist;
  const int64_t n = 3, in = 577, out = 4001; // large enough to be split; odd sizes: dot() tails
  std::vector<float> x(n * in), w(out * in), bias(out), y(n * out), one(n);
  for (auto* v : {&x, &w, &bias})
    for (auto& e : *v)
      e = dist(rng);
  matmul_nt(x.data(), n, in, w.data(), out, y.data(), bias.data());
  int bad = 0;
  for (int64_t o = 0; o < out; ++o) {
    matmul_nt(x.data(), n, in, w.data() + o * in, 1, one.data(), bias.data() + o);
    for (int64_t t = 0; t < n; ++t)
      bad += std::memcmp(&one[t], &y[t * out + o], sizeof(float)) != 0;
  }
  CHECK(bad == 0);
}

TEST_CASE("thread_pool: a forked child runs serially instead of waiting for the parent's threads") {
  auto* pool = new thread_pool(3);
  std::atomic<int64_t> total{0};
  pool->parallel_for(1000, 10, [&](int64_t b, int64_t e) { total += e - b; });
  REQUIRE(total.load() == 1000);
  pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    ::alarm(20); // a hang fails the test instead of blocking it
    total = 0;
    pool->parallel_for(1000, 10, [&](int64_t b, int64_t e) { total += e - b; });
    ::_exit(total.load() == 1000 ? 0 : 1);
  }
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  INFO("status " << status << " signal " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0));
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  delete pool;
}
