// Faults around the head with real processes on loopback: a model file whose read hangs (a FIFO)
// stalls only its own deployment while the control plane answers and heartbeats go on; `cluster
// serve` notices a killed head within seconds instead of waiting out --timeout; a head killed
// with SIGKILL and started again (no --token: it reuses the token it kept) serves the same
// deployment at the same port with the same greedy output, and a deployment stopped before the
// crash stays stopped; a node hung with SIGSTOP mid-stream ends the stream with an error within
// seconds of the head's death verdict; SIGTERM to the head lets a stream in flight finish (no new
// requests meanwhile) before it exits.
#include <doctest/doctest.h>

#include <csignal>
#include <fcntl.h>
#include <sys/stat.h>
#include <thread>
#include <unistd.h>

#include <fmt/format.h>

#include "golden.hpp"
#include "process_harness.hpp"
#include "serve_fixture.hpp"

using namespace troupe::test;
using namespace std::chrono_literals;

namespace {

bool all_alive(cluster_fixture& fx, size_t count) {
  auto n = fx.nodes();
  if (n.size() != count)
    return false;
  for (auto& [id, j] : n)
    if (j["state"] != "alive")
      return false;
  return true;
}

pid_t serve_bg(cluster_fixture& fx, const std::string& name, const fs::path& yaml) {
  return fx.cluster_bg(name, {"serve", yaml.string(), "--address", fx.head_address(), "--token",
                              fx.token(), "--ca-sha256", fx.ca_sha256()});
}

pid_t head_pid(cluster_fixture& fx) {
  return std::stoi(read_file(fx.dir("head") / "session_latest" / "head.pid"));
}

pid_t restart_head(cluster_fixture& fx) { // without --token: the kept one
  return fx.cluster_bg("head", {"start", "--head", "--block", "--port", std::to_string(fx.port()),
                                "--temp-dir", fx.dir("head").string()});
}

} // namespace

TEST_CASE(
    "head: a model read that hangs stalls nothing else and cluster serve notices a dead head") {
  cluster_fixture fx;
  const pid_t head = fx.start_head_blocking();
  fx.join_blocking("w1");
  REQUIRE(eventually([&] { return all_alive(fx, 2); }, 30s));
  // A model folder whose config.json is a FIFO: opening it blocks until someone writes.
  fs::create_directories(fx.dir("fifo-model"));
  const auto fifo = fx.dir("fifo-model") / "config.json";
  REQUIRE(mkfifo(fifo.c_str(), 0600) == 0);
  const auto yaml =
      write_yaml(fx, "fifo.yaml",
                 fmt::format("model: {}\nserved_model_name: fifo\nport: 0\ndevice: cpu\n",
                             fx.dir("fifo-model").string()));
  const pid_t first = serve_bg(fx, "serve1", yaml);
  std::this_thread::sleep_for(1500ms);
  // The head answers and the node stays alive past the death bound (2.5 s) while the read hangs.
  for (int i = 0; i < 4; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    auto s = status_json(fx);
    REQUIRE(s.is_object());
    CHECK(std::chrono::steady_clock::now() - t0 < 3s);
    std::this_thread::sleep_for(500ms);
  }
  CHECK(fx.state_of(fx.node_id("w1")) == "alive");
  CHECK(alive(first));
  // The read completes (garbage): that deployment fails with the reason, the head serves on.
  {
    int fd = open(fifo.c_str(), O_WRONLY);
    REQUIRE(fd >= 0);
    const std::string junk = "{ not json";
    CHECK(write(fd, junk.data(), junk.size()) == static_cast<ssize_t>(junk.size()));
    close(fd);
  }
  int status = 0;
  REQUIRE(wait_exit(first, 15s, &status));
  CHECK(WEXITSTATUS(status) != 0);
  const auto out1 = read_file(fx.dir("serve1") / "foreground.log");
  MESSAGE(out1);
  CHECK(out1.find("config.json") != std::string::npos);
  CHECK(status_json(fx)["deployments"].empty());
  // Again, and the head is killed while it reads: `cluster serve` says so within seconds.
  const pid_t second = serve_bg(fx, "serve2", yaml);
  std::this_thread::sleep_for(1500ms);
  REQUIRE(alive(second));
  kill(head, SIGKILL);
  const auto t0 = std::chrono::steady_clock::now();
  REQUIRE(wait_exit(second, 15s, &status));
  const auto took = std::chrono::steady_clock::now() - t0;
  MESSAGE("head killed -> cluster serve exited in ",
          std::chrono::duration_cast<std::chrono::milliseconds>(took).count(), " ms");
  CHECK(took < 10s);
  CHECK(WEXITSTATUS(status) != 0);
  const auto out2 = read_file(fx.dir("serve2") / "foreground.log");
  CHECK_MESSAGE(out2.find("lost the head") != std::string::npos, out2);
}

TEST_CASE("head: killed and started again it serves the same deployment at the same port") {
  auto model = golden_model("tiny-qwen3");
  if (!model)
    return;
  cluster_fixture fx;
  start_cluster(fx);
  auto served = serve(fx, write_yaml(fx, "tiny.yaml", yaml_for(*model, "tiny", 2, 1)));
  REQUIRE_MESSAGE(served.exit_code == 0, served.output);
  const uint16_t port = port_of(served.output);
  auto gone = serve(fx, write_yaml(fx, "gone.yaml", yaml_for(*model, "gone", 1, 1)));
  REQUIRE_MESSAGE(gone.exit_code == 0, gone.output);
  REQUIRE(stop_serving(fx, "gone").exit_code == 0); // stopped before the crash: stays stopped
  const auto before = greedy_ids(port, "tiny", "100, 11, 1879, 0", 8);
  REQUIRE(before.size() == 8);

  kill(head_pid(fx), SIGKILL);
  REQUIRE(eventually([&] { return !alive(head_pid(fx)); }, 5s));
  int health = -1; // the endpoint went with the head: refused (-1), not 200
  try {
    health = http_call(port, "GET", "/health").status;
  } catch (const std::exception&) {
  }
  CHECK(health != 200);
  const auto t0 = std::chrono::steady_clock::now();
  restart_head(fx);
  REQUIRE(eventually(
      [&] {
        auto d = deployment_of(fx, "tiny");
        return d.is_object() && d["state"] == "ready";
      },
      90s));
  MESSAGE(
      "restart -> deployment ready in ",
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0)
          .count(),
      " ms");
  CHECK(all_alive(fx, 3)); // the nodes rejoined with the token the head kept
  CHECK(greedy_ids(port, "tiny", "100, 11, 1879, 0", 8) == before);
  auto status = status_json(fx);
  REQUIRE(status["deployments"].size() == 1);
  CHECK(status["deployments"][0]["tensor"] == 2);

  // Stopped, then a crash: nothing comes back.
  REQUIRE(stop_serving(fx, "tiny").exit_code == 0);
  kill(head_pid(fx), SIGKILL);
  REQUIRE(eventually([&] { return !alive(head_pid(fx)); }, 5s));
  restart_head(fx);
  REQUIRE(eventually([&] { return all_alive(fx, 3); }, 30s));
  std::this_thread::sleep_for(2s);
  CHECK(status_json(fx)["deployments"].empty());
}

TEST_CASE("head: a node hung mid-stream ends the stream within seconds of its death verdict") {
  auto model = golden_model("tiny-qwen3");
  if (!model)
    return;
  cluster_fixture fx;
  auto node_pids = start_cluster(fx);
  auto served = serve(fx, write_yaml(fx, "hang.yaml", yaml_for(*model, "hang", 2, 1)));
  REQUIRE_MESSAGE(served.exit_code == 0, served.output);
  const uint16_t port = port_of(served.output);
  auto d = deployment_of(fx, "hang");
  REQUIRE(d["ranks"].size() == 2);
  const std::string victim = d["ranks"][0]["node_id"];
  const pid_t victim_pid = node_pid(fx, node_pids, victim);

  sse_stream stream(port, R"({"model": "hang", "prompt": "hello", "max_tokens": 240,
                              "temperature": 0, "ignore_eos": true, "stream": true})");
  REQUIRE_MESSAGE(stream.read_until("data: "), stream.raw());
  kill(victim_pid, SIGSTOP);
  const auto took = stream.read_to_end();
  kill(victim_pid, SIGCONT);
  MESSAGE("SIGSTOP -> stream ended in ", took.count(), " ms");
  // The head's verdict comes after 2.5 s without heartbeats; the stream ends right after it.
  CHECK(took < 6s);
  CHECK(stream.ended_cleanly());
  CHECK_MESSAGE(stream.raw().find("\"error\"") != std::string::npos, stream.tail());
}

TEST_CASE("head: SIGTERM lets a stream in flight finish before the head exits") {
  auto model = golden_model("tiny-qwen3");
  if (!model)
    return;
  cluster_fixture fx;
  const pid_t head = fx.start_head_blocking();
  fx.join_blocking("w1");
  REQUIRE(eventually([&] { return all_alive(fx, 2); }, 30s));
  auto served = serve(fx, write_yaml(fx, "drain.yaml", yaml_for(*model, "drain", 1, 1)));
  REQUIRE_MESSAGE(served.exit_code == 0, served.output);
  const uint16_t port = port_of(served.output);
  sse_stream stream(port, R"({"model": "drain", "prompt": "hello", "max_tokens": 120,
                              "temperature": 0, "ignore_eos": true, "stream": true})");
  REQUIRE_MESSAGE(stream.read_until("data: "), stream.raw());
  kill(head, SIGTERM);
  std::this_thread::sleep_for(500ms);
  // No new requests while it drains: refused at connect, or 503.
  try {
    auto late = http_call(port, "POST", "/v1/completions",
                          R"({"model": "drain", "prompt": "hi", "max_tokens": 2})");
    CHECK_MESSAGE(late.status == 503, late.body);
  } catch (const std::exception& e) {
    MESSAGE("a new request during the drain: ", std::string(e.what()));
  }
  stream.read_to_end();
  CHECK(stream.ended_cleanly());
  CHECK_MESSAGE(stream.raw().find("[DONE]") != std::string::npos, stream.tail());
  CHECK_MESSAGE(stream.raw().find("\"error\"") == std::string::npos, stream.tail());
  CHECK_MESSAGE(stream.raw().find("\"finish_reason\":\"length\"") != std::string::npos,
                stream.tail());
  int status = 0;
  CHECK(wait_exit(head, 30s, &status));
}
