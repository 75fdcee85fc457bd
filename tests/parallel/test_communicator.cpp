// comm::communicator: single-rank semantics, the folder rendezvous store, and Gloo over loopback
// with ranks in separate processes (every collective checked against its definition).
#include <fstream>
#include <future>
#include <numeric>
#include <thread>

#include <doctest/doctest.h>

#include "engine/comm/communicator.hpp"
#include "engine/comm/device_communicator.hpp"
#include "parallel/rank_processes.hpp"

using namespace troupe;
using namespace troupe::engine::comm;
using namespace std::chrono_literals;

TEST_CASE("single-rank communicator: collectives are identities, point to point is refused") {
  auto c = make_single_rank_communicator();
  std::vector<float> x{1, 2, 3}, y(3);
  CHECK(c->all_reduce_sum(x).has_value());
  CHECK(x == std::vector<float>{1, 2, 3});
  CHECK(c->all_gather(x, y).has_value());
  CHECK(y == x);
  CHECK(c->broadcast(x, 0).has_value());
  CHECK_FALSE(c->broadcast(x, 1).has_value());
  std::vector<float> z(3);
  const std::vector<int64_t> three{3}, two{2};
  CHECK(c->all_to_all(x, three, z, three).has_value());
  CHECK(z == x);
  auto short_counts = c->all_to_all(x, two, z, two);
  REQUIRE_FALSE(short_counts.has_value());
  CHECK(short_counts.error().message() ==
        "all_to_all: buffers of 3 and 3 floats, the counts say 2 and 2");
  CHECK_FALSE(c->all_to_all(x, std::vector<int64_t>{3, 0}, z, three).has_value());
  CHECK_FALSE(c->send(x, 1, 0).has_value());
  CHECK(c->barrier().has_value());
}

TEST_CASE("folder rendezvous store: set, get, and a timeout that names the missing key") {
  auto dir = std::filesystem::temp_directory_path() / "troupe-store-test";
  std::filesystem::remove_all(dir);
  auto s = make_folder_store(dir.string());
  REQUIRE(s->set("group/rank0", {'a', 'b'}).has_value());
  auto v = s->get("group/rank0", 100ms);
  REQUIRE(v.has_value());
  CHECK(*v == std::vector<char>{'a', 'b'});
  auto missing = s->wait({"group/rank0", "group/rank1"}, 50ms);
  REQUIRE_FALSE(missing.has_value());
  CHECK(missing.error().code() == errc::timeout);
  CHECK(missing.error().message().find("group/rank1") != std::string::npos);
  std::filesystem::remove_all(dir);
}

namespace {

// Every collective on `n` ranks; returns "" or what went wrong.
std::string exercise(communicator& c) {
  const int r = c.rank(), n = c.size();
  std::vector<float> x(1000);
  std::iota(x.begin(), x.end(), static_cast<float>(r));
  if (!c.all_reduce_sum(x))
    return "all_reduce failed";
  for (size_t i = 0; i < x.size(); ++i) // sum over ranks of (i + rank)
    if (x[i] != static_cast<float>(n * static_cast<int>(i) + n * (n - 1) / 2))
      return "all_reduce value at " + std::to_string(i);
  std::vector<float> mine{static_cast<float>(r), static_cast<float>(10 * r)};
  std::vector<float> all(2 * static_cast<size_t>(n));
  if (!c.all_gather(mine, all))
    return "all_gather failed";
  for (int k = 0; k < n; ++k)
    if (all[2 * k] != k || all[2 * k + 1] != 10 * k)
      return "all_gather value";
  std::vector<float> b(7, static_cast<float>(r));
  if (!c.broadcast(b, n - 1) || b != std::vector<float>(7, static_cast<float>(n - 1)))
    return "broadcast";
  // All-to-all: rank r sends (r + 2k) % 3 values to rank k (none to some), each naming its
  // sender, receiver and position.
  std::vector<int64_t> sc(static_cast<size_t>(n)), rc(static_cast<size_t>(n));
  std::vector<float> to_send, want;
  for (int k = 0; k < n; ++k) {
    sc[static_cast<size_t>(k)] = (r + 2 * k) % 3;
    rc[static_cast<size_t>(k)] = (k + 2 * r) % 3;
    for (int j = 0; j < sc[static_cast<size_t>(k)]; ++j)
      to_send.push_back(static_cast<float>(100 * r + 10 * k + j));
    for (int j = 0; j < rc[static_cast<size_t>(k)]; ++j)
      want.push_back(static_cast<float>(100 * k + 10 * r + j));
  }
  std::vector<float> got(want.size(), -1.0f);
  if (!c.all_to_all(to_send, sc, got, rc) || got != want)
    return "all_to_all";
  // A ring of sends: each rank passes its id to the next.
  std::vector<float> out{static_cast<float>(r)}, in{-1};
  auto sent = std::async(std::launch::async, [&] { return c.send(out, (r + 1) % n, 7); });
  if (!c.recv(in, (r + n - 1) % n, 7) || !sent.get() || in[0] != (r + n - 1) % n)
    return "send/recv ring";
  if (!c.barrier())
    return "barrier";
  return "";
}

} // namespace

TEST_CASE("gloo over loopback: all-reduce, all-gather, broadcast, all-to-all, send/recv, barrier "
          "on 3 ranks") {
  auto outcomes = test::run_ranks(3, [](int rank, const std::filesystem::path& dir) {
    auto store = make_folder_store((dir / "store").string());
    auto c = make_gloo_communicator(*store, rank, 3, {.prefix = "t", .timeout = 20s});
    std::string verdict = c ? exercise(**c) : c.error().to_string();
    std::ofstream(dir / ("rank" + std::to_string(rank) + ".txt")) << verdict;
    return verdict.empty() ? 0 : 1;
  });
  for (size_t r = 0; r < outcomes.size(); ++r) {
    CAPTURE(r);
    CHECK(outcomes[r].message == "");
    CHECK(outcomes[r].exit_code == 0);
  }
}

TEST_CASE("gloo: a rank that dies fails its peer's all-reduce within the timeout, no hang") {
  auto outcomes = test::run_ranks(2, [](int rank, const std::filesystem::path& dir) {
    auto store = make_folder_store((dir / "store").string());
    auto c = make_gloo_communicator(*store, rank, 2, {.prefix = "d", .timeout = 3s});
    if (!c)
      return 3;
    const auto connected = dir / "rank0-connected";
    if (rank == 0)
      std::ofstream(connected) << "";
    if (rank == 1) { // once rank 0 has its communicator too, gone without a word, as a
                     // SIGKILLed worker would be
      for (int i = 0; i < 2000 && !std::filesystem::exists(connected); ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      ::_exit(0);
    }
    std::vector<float> x(16, 1.0f);
    auto start = std::chrono::steady_clock::now();
    auto r = (*c)->all_reduce_sum(x);
    auto took = std::chrono::steady_clock::now() - start;
    std::ofstream(dir / "rank0.txt")
        << (r ? "succeeded" : r.error().to_string()) << " after "
        << std::chrono::duration_cast<std::chrono::milliseconds>(took).count() << " ms";
    return r ? 1 : 0;
  });
  INFO(outcomes[0].message);
  CHECK(outcomes[0].exit_code == 0);
  CHECK(outcomes[0].message.find("gloo all_reduce on rank 0") != std::string::npos);
}

TEST_CASE("nccl communicator: a rank whose unique id never appears times out, touching no GPU") {
  // Rank 1 fetches rank 0's ncclUniqueId from the store before any CUDA call: without rank 0 it
  // must fail with a timeout that says what it waited for (or say NCCL is not built in).
  auto dir = std::filesystem::temp_directory_path() / "troupe-nccl-id-test";
  std::filesystem::remove_all(dir);
  auto s = make_folder_store(dir.string());
  auto start = std::chrono::steady_clock::now();
  auto c = make_nccl_communicator(*s, 1, 2, {.prefix = "group7", .timeout = 200ms});
  REQUIRE_FALSE(c.has_value());
  if (nccl_available()) {
    CHECK(c.error().code() == errc::timeout);
    CHECK(c.error().message().find("nccl rank 1 fetching the unique id") != std::string::npos);
    CHECK(c.error().message().find("group7/unique_id") != std::string::npos);
    CHECK(std::chrono::steady_clock::now() - start < 5s);
  } else {
    CHECK(c.error().code() == errc::unsupported);
  }
  auto bad = make_nccl_communicator(*s, 2, 2, {});
  REQUIRE_FALSE(bad.has_value());
  CHECK(bad.error().code() == (nccl_available() ? errc::invalid_argument : errc::unsupported));
  std::filesystem::remove_all(dir);
}
