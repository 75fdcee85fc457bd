// Real `cluster` processes on loopback and in network namespaces: join and status, SIGKILL and
// restart, link down and up, wrong token, head restart, `cluster stop` leaving nothing behind.
#include <doctest/doctest.h>

#include <fstream>

#include <csignal>
#include <fmt/format.h>
#include <unistd.h>

#include "process_harness.hpp"

using namespace troupe::test;
using namespace std::chrono_literals;

namespace {

bool all_alive(cluster_fixture& fx, const std::vector<std::string>& ids, size_t expected_nodes) {
  auto nodes = fx.nodes();
  if (nodes.size() != expected_nodes)
    return false;
  for (const auto& id : ids)
    if (!nodes.contains(id) || nodes[id]["state"] != "alive")
      return false;
  return true;
}

int pid_from(const fs::path& file) {
  return std::atoi(read_file(file).c_str());
}

} // namespace

TEST_CASE("cluster: head and two workers join, status shows them, stop leaves no process") {
  cluster_fixture fx;
  auto head = fx.cluster({"start", "--head", "--port", std::to_string(fx.port()), "--token",
                          fx.token(), "--num-gpus", "1", "--temp-dir", fx.dir("head").string()});
  REQUIRE_MESSAGE(head.exit_code == 0, head.output);
  CHECK(head.output.find("cluster join") != std::string::npos);
  CHECK(head.output.find("--token " + fx.token()) != std::string::npos);
  for (const char* w : {"w1", "w2"}) {
    auto j = fx.cluster({"join", fx.head_address(), "--token", fx.token(), "--ca-sha256",
                         fx.ca_sha256(), "--num-gpus", "2", "--temp-dir", fx.dir(w).string()});
    REQUIRE_MESSAGE(j.exit_code == 0, j.output);
  }
  const std::string h = fx.node_id("head", "head"), w1 = fx.node_id("w1"), w2 = fx.node_id("w2");
  REQUIRE(eventually([&] { return all_alive(fx, {h, w1, w2}, 3); }, 10s));
  auto nodes = fx.nodes();
  CHECK(nodes[h]["head_node"] == true);
  CHECK(nodes[h]["gpus"].size() == 1);
  CHECK(nodes[w1]["gpus"].size() == 2);
  CHECK(nodes[w1]["address"] == "127.0.0.1");
  CHECK(nodes[w1]["num_cpus"].get<int>() > 0);
  CHECK(nodes[w1]["memory_bytes"].get<uint64_t>() > 0);
  auto table = fx.cluster({"status", "--temp-dir", fx.dir("head").string()});
  CHECK_MESSAGE(table.exit_code == 0, table.output);
  CHECK(table.output.find(w2) != std::string::npos);

  // A second head on the same port is refused; so is a second head in the same temp dir.
  auto second = fx.cluster({"start", "--head", "--port", std::to_string(fx.port()), "--token", "x",
                            "--temp-dir", fx.dir("other").string()});
  CHECK(second.exit_code != 0);
  CHECK(second.output.find("cannot listen") != std::string::npos);
  auto again =
      fx.cluster({"start", "--head", "--port", "1", "--temp-dir", fx.dir("head").string()});
  CHECK(again.exit_code != 0);
  CHECK(again.output.find("already running") != std::string::npos);

  const int head_pid = pid_from(fx.dir("head") / "session_latest" / "head.pid");
  const int w1_pid = pid_from(fx.dir("w1") / "session_latest" / "node.pid");
  const int w2_pid = pid_from(fx.dir("w2") / "session_latest" / "node.pid");
  REQUIRE((alive(head_pid) && alive(w1_pid) && alive(w2_pid)));

  // Stopping a worker: it leaves gracefully.
  auto stop1 = fx.cluster({"stop", "--temp-dir", fx.dir("w1").string()});
  CHECK(stop1.exit_code == 0);
  CHECK_FALSE(alive(w1_pid));
  CHECK(eventually([&] { return fx.state_of(w1) == "left"; }, 5s));
  // Stopping the head tells the remaining worker, which exits on its own.
  auto stop_head = fx.cluster({"stop", "--temp-dir", fx.dir("head").string()});
  CHECK(stop_head.exit_code == 0);
  CHECK_FALSE(alive(head_pid));
  CHECK(eventually([&] { return !alive(w2_pid); }, 10s));
  auto none = fx.cluster({"stop", "--temp-dir", fx.dir("w2").string()});
  CHECK(none.output.find("no troupe daemon") != std::string::npos);
}

TEST_CASE("cluster: a SIGKILLed worker is dead within 5 s and rejoins under the same id") {
  cluster_fixture fx;
  fx.start_head_blocking();
  pid_t w = fx.join_blocking("w1");
  REQUIRE(eventually([&] { return !fx.node_id("w1").empty(); }, 20s));
  const std::string id = fx.node_id("w1");
  REQUIRE(eventually([&] { return fx.state_of(id) == "alive"; }, 20s));
  kill(w, SIGKILL);
  auto dead_after = eventually([&] { return fx.state_of(id) == "dead"; }, 10s);
  REQUIRE(dead_after);
  MESSAGE("SIGKILL -> dead in ", dead_after->count(), " ms");
  CHECK(*dead_after < 5000ms);
  fx.join_blocking("w1");
  REQUIRE(eventually([&] { return fx.state_of(id) == "alive"; }, 20s));
  auto nodes = fx.nodes();
  CHECK(nodes.size() == 2); // head's node + the same worker, not a second row
  CHECK(nodes[id]["incarnation"] == 2);
}

TEST_CASE("cluster: a wrong token is refused, with the reason logged on both sides") {
  cluster_fixture fx;
  fx.start_head_blocking();
  REQUIRE(eventually([&] { return fx.nodes().size() == 1; }, 20s));
  auto j = fx.cluster({"join", fx.head_address(), "--token", "wrong", "--ca-sha256", fx.ca_sha256(),
                       "--temp-dir", fx.dir("w1").string()});
  CHECK(j.exit_code == 3);
  CHECK(j.output.find("wrong cluster token") != std::string::npos);
  auto head_log = read_file(fx.dir("head") / "foreground.log");
  CHECK(head_log.find("refused join") != std::string::npos);
  auto node_log = read_file(fx.dir("w1") / "session_latest" / "logs" / "node.log");
  CHECK(node_log.find("refused") != std::string::npos);
  CHECK(fx.nodes().size() == 1);
  // Status with a wrong token, and with no head at all: clear message, non-zero exit.
  auto s = fx.cluster({"status", "--address", fx.head_address(), "--token", "wrong", "--ca-sha256",
                       fx.ca_sha256()});
  CHECK(s.exit_code != 0);
  CHECK(s.output.find("wrong cluster token") != std::string::npos);
  // The token from a file (kept out of `ps`): the right one is let in, a wrong one refused.
  const auto right = fx.dir("secrets") / "token", wrong = fx.dir("secrets") / "wrong";
  std::filesystem::create_directories(right.parent_path());
  std::ofstream(right) << fx.token() << "\n";
  std::ofstream(wrong) << "wrong\n";
  auto by_file = fx.cluster({"status", "--address", fx.head_address(), "--token-file",
                             right.string(), "--ca-sha256", fx.ca_sha256(), "--timeout", "5"});
  CHECK_MESSAGE(by_file.exit_code == 0, by_file.output);
  auto wrong_file = fx.cluster({"status", "--address", fx.head_address(), "--token-file",
                                wrong.string(), "--ca-sha256", fx.ca_sha256(), "--timeout", "5"});
  CHECK(wrong_file.exit_code != 0);
  CHECK(wrong_file.output.find("wrong cluster token") != std::string::npos);
  auto gone = fx.cluster({"status", "--address", fmt::format("127.0.0.1:{}", free_port()),
                          "--token", "x", "--ca-sha256", fx.ca_sha256(), "--timeout", "2"});
  CHECK(gone.exit_code == 1);
  CHECK(gone.output.find("cannot reach the head") != std::string::npos);
}

TEST_CASE("cluster: after a head restart the workers reconnect on their own") {
  cluster_fixture fx;
  pid_t head = fx.start_head_blocking();
  fx.join_blocking("w1");
  fx.join_blocking("w2");
  // The head's own node writes its id file after the head is up: wait for all three.
  REQUIRE(eventually(
      [&] {
        return !fx.node_id("w1").empty() && !fx.node_id("w2").empty() &&
               !fx.node_id("head", "head").empty();
      },
      20s));
  const std::string w1 = fx.node_id("w1"), w2 = fx.node_id("w2"), h = fx.node_id("head", "head");
  REQUIRE(eventually([&] { return all_alive(fx, {h, w1, w2}, 3); }, 20s));
  kill(head, SIGKILL);
  REQUIRE(wait_exit(head, 5s));
  fx.start_head_blocking();
  auto back = eventually([&] { return all_alive(fx, {h, w1, w2}, 3); }, 30s);
  REQUIRE(back);
  MESSAGE("head restart -> workers back in ", back->count(), " ms");
}

namespace {

// Two network namespaces, each joined to the root namespace by a veth pair with its own /24.
struct netns_pair {
  std::string prefix;
  int subnet;
  bool ok = false;
  std::string why;

  explicit netns_pair(int base) : prefix(fmt::format("trp{}", getpid() % 100000)), subnet(base) {
    if (geteuid() != 0) {
      why = "needs root to create network namespaces";
      return;
    }
    for (int i = 0; i < 2; ++i) {
      auto r = ip({"netns", "add", ns(i)});
      if (r.exit_code != 0) {
        why = "ip netns add failed: " + r.output;
        return;
      }
      for (auto args : std::vector<std::vector<std::string>>{
               {"link", "add", host_if(i), "type", "veth", "peer", "name", ns_if(i)},
               {"link", "set", ns_if(i), "netns", ns(i)},
               {"addr", "add", host_ip(i) + "/24", "dev", host_if(i)},
               {"link", "set", host_if(i), "up"},
               {"-n", ns(i), "addr", "add", ns_ip(i) + "/24", "dev", ns_if(i)},
               {"-n", ns(i), "link", "set", ns_if(i), "up"},
               {"-n", ns(i), "link", "set", "lo", "up"}}) {
        if (auto r2 = ip(args); r2.exit_code != 0) {
          why = "ip " + args[0] + " failed: " + r2.output;
          return;
        }
      }
    }
    ok = true;
  }
  ~netns_pair() {
    for (int i = 0; i < 2; ++i) {
      ip({"netns", "del", ns(i)}); // removes the veth pair too
      ip({"link", "del", host_if(i)});
    }
  }
  static run_result ip(std::vector<std::string> args) {
    args.insert(args.begin(), "ip");
    return run(args, 10s);
  }
  std::string ns(int i) const { return fmt::format("{}n{}", prefix, i); }
  std::string host_if(int i) const { return fmt::format("{}h{}", prefix, i); }
  std::string ns_if(int i) const { return fmt::format("{}p{}", prefix, i); }
  std::string host_ip(int i) const { return fmt::format("10.213.{}.1", subnet + i); }
  std::string ns_ip(int i) const { return fmt::format("10.213.{}.2", subnet + i); }
};

} // namespace

TEST_CASE("cluster: workers in network namespaces go dead on link down and alive on link up") {
  netns_pair net(static_cast<int>(2 * (getpid() % 100)));
  if (!net.ok) {
    MESSAGE("SKIP: network namespace test: ", net.why);
    return;
  }
  cluster_fixture fx;
  fx.start_head_blocking(); // listens on every interface, the veth ends included
  for (int i = 0; i < 2; ++i)
    fx.join_blocking(fmt::format("w{}", i), fmt::format("{}:{}", net.host_ip(i), fx.port()),
                     {"ip", "netns", "exec", net.ns(i)});
  REQUIRE(eventually([&] { return !fx.node_id("w0").empty() && !fx.node_id("w1").empty(); }, 20s));
  const std::string w0 = fx.node_id("w0"), w1 = fx.node_id("w1");
  REQUIRE(eventually([&] { return all_alive(fx, {w0, w1}, 3); }, 20s));
  auto nodes = fx.nodes();
  CHECK(nodes[w0]["address"] == net.ns_ip(0)); // the interface that routes to the head
  CHECK(nodes[w1]["address"] == net.ns_ip(1));

  REQUIRE(netns_pair::ip({"link", "set", net.host_if(0), "down"}).exit_code == 0);
  auto dead_after = eventually([&] { return fx.state_of(w0) == "dead"; }, 10s);
  REQUIRE(dead_after);
  MESSAGE("link down -> dead in ", dead_after->count(), " ms");
  CHECK(*dead_after < 5000ms);
  CHECK(fx.state_of(w1) == "alive");
  REQUIRE(netns_pair::ip({"link", "set", net.host_if(0), "up"}).exit_code == 0);
  auto back = eventually([&] { return fx.state_of(w0) == "alive"; }, 40s);
  REQUIRE(back);
  MESSAGE("link up -> alive again in ", back->count(), " ms");
  CHECK(fx.nodes()[w0]["incarnation"].get<int>() >= 2);
}
