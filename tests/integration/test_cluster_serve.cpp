// `cluster serve` through the head with real processes on loopback: a head and two joined nodes
// with `--num-gpus 2` CPU stand-ins; the golden tiny-qwen3 served with tensor=2 x pipeline=2
// (stages on different nodes) answers HTTP completions equal to `cluster generate`, and
// concurrent requests (two plans in flight, one per stage) equal each alone; status lists
// the deployment; duplicates and impossible layouts are refused with the reason; --stop frees the
// devices; a SIGKILLed node ends an in-flight stream with an error within seconds.
#include <doctest/doctest.h>

#include <csignal>
#include <fstream>
#include <regex>
#include <set>
#include <thread>
#include <sys/socket.h>

#include <fmt/format.h>

#include "golden.hpp"
#include "process_harness.hpp"
#include "serve/http_client.hpp"

using namespace troupe::test;
using namespace std::chrono_literals;

namespace {

nlohmann::json status_json(cluster_fixture& fx) {
  auto r = fx.cluster(
      {"status", "--json", "--address", fx.head_address(), "--token", fx.token(), "--timeout", "5"},
      20s);
  if (r.exit_code != 0)
    return {};
  return nlohmann::json::parse(r.output, nullptr, false);
}

nlohmann::json deployment_of(cluster_fixture& fx, const std::string& name) {
  auto s = status_json(fx);
  if (!s.is_object())
    return {};
  for (auto& d : s["deployments"])
    if (d["name"] == name)
      return d;
  return {};
}

fs::path write_yaml(cluster_fixture& fx, const std::string& file, const std::string& text) {
  auto path = fx.dir(file);
  std::ofstream(path) << text;
  return path;
}

std::string yaml_for(const fs::path& model, const std::string& name, int tensor, int pipeline) {
  return fmt::format("model: {}\nserved_model_name: {}\nmax_model_len: 256\nnum_kv_blocks: 64\n"
                     "port: 0\nparallel: {{tensor: {}, pipeline: {}}}\n",
                     model.string(), name, tensor, pipeline);
}

run_result serve(cluster_fixture& fx, const fs::path& yaml) {
  return fx.cluster(
      {"serve", yaml.string(), "--address", fx.head_address(), "--token", fx.token()}, 90s);
}

uint16_t port_of(const std::string& output) {
  std::smatch m;
  if (!std::regex_search(output, m, std::regex(R"(at http://[^:]+:(\d+)/v1)")))
    return 0;
  return static_cast<uint16_t>(std::stoi(m[1]));
}

// A head (no devices) and two nodes with two CPU stand-in devices each, all alive.
std::vector<pid_t> start_cluster(cluster_fixture& fx) {
  fx.start_head_blocking();
  std::vector<pid_t> nodes{fx.join_blocking("w1"), fx.join_blocking("w2")};
  REQUIRE(eventually(
      [&] {
        auto n = fx.nodes();
        if (n.size() != 3)
          return false;
        for (auto& [id, j] : n)
          if (j["state"] != "alive")
            return false;
        return true;
      },
      30s));
  return nodes;
}

} // namespace

TEST_CASE("cluster serve: tensor=2 x pipeline=2 over two nodes answers like cluster generate") {
  auto model = golden_model("tiny-qwen3");
  if (!model)
    return;
  cluster_fixture fx;
  start_cluster(fx);
  const std::string w1 = fx.node_id("w1"), w2 = fx.node_id("w2");

  auto yaml = write_yaml(fx, "tiny.yaml", yaml_for(*model, "tiny", 2, 2));
  auto served = serve(fx, yaml);
  REQUIRE_MESSAGE(served.exit_code == 0, served.output);
  const uint16_t port = port_of(served.output);
  REQUIRE_MESSAGE(port != 0, served.output);

  // Status: ready, four ranks, stage 0 and stage 1 on different nodes, devices in use.
  auto d = deployment_of(fx, "tiny");
  REQUIRE_MESSAGE(d.is_object(), status_json(fx).dump());
  CHECK(d["state"] == "ready");
  CHECK(d["endpoint"] == fmt::format("http://127.0.0.1:{}/v1", port));
  REQUIRE(d["ranks"].size() == 4);
  std::map<int, std::set<std::string>> stage_nodes;
  for (auto& r : d["ranks"])
    stage_nodes[r["pp_rank"].get<int>()].insert(r["node_id"].get<std::string>());
  CHECK(stage_nodes[0].size() == 1);
  CHECK(stage_nodes[1].size() == 1);
  CHECK(*stage_nodes[0].begin() != *stage_nodes[1].begin());
  auto nodes = fx.nodes();
  CHECK(nodes[w1]["gpus_used"] == 2);
  CHECK(nodes[w2]["gpus_used"] == 2);

  // Greedy completions through HTTP equal `cluster generate` on the same prompt ids.
  const std::string body = R"({"model": "tiny", "prompt": [9707, 11, 1879, 0, 5209], "max_tokens": 8,
    "temperature": 0, "ignore_eos": true, "return_token_ids": true})";
  auto reply = http_call(port, "POST", "/v1/completions", body);
  REQUIRE_MESSAGE(reply.status == 200, reply.body);
  auto ids = reply.json()["choices"][0]["token_ids"].get<std::vector<int>>();
  auto gen = fx.cluster({"generate", "--model", model->string(), "--max-tokens", "8",
                         "--ignore-eos", "--prompt-ids", "9707,11,1879,0,5209"},
                        60s);
  REQUIRE_MESSAGE(gen.exit_code == 0, gen.output);
  CHECK(gen.output.find(fmt::format("generated ids: {}", fmt::join(ids, ","))) !=
        std::string::npos);
  MESSAGE("HTTP over 4 ranks: ", fmt::format("{}", fmt::join(ids, ",")));

  // Pipelining: the two stages work on two lanes' plans at once. Concurrent requests must each
  // get what they get alone.
  auto complete = [&](int first) {
    auto r = http_call(port, "POST", "/v1/completions",
                       fmt::format(R"({{"model": "tiny", "prompt": [{}, 11, 1879, 0], "max_tokens": 10,
                                      "temperature": 0, "ignore_eos": true,
                                      "return_token_ids": true}})",
                                   first));
    return r.status == 200 ? r.json()["choices"][0]["token_ids"].get<std::vector<int>>()
                           : std::vector<int>{-r.status};
  };
  std::vector<std::vector<int>> alone, together(6);
  for (int i = 0; i < 6; ++i)
    alone.push_back(complete(100 + i));
  std::vector<std::thread> clients;
  for (int i = 0; i < 6; ++i)
    clients.emplace_back([&, i] { together[static_cast<size_t>(i)] = complete(100 + i); });
  for (auto& t : clients)
    t.join();
  for (int i = 0; i < 6; ++i) {
    CAPTURE(i);
    CHECK(alone[static_cast<size_t>(i)].size() == 10);
    CHECK(together[static_cast<size_t>(i)] == alone[static_cast<size_t>(i)]);
  }
  // Chat, streamed.
  auto chat = http_call(port, "POST", "/v1/chat/completions",
                        R"({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                            "max_tokens": 5, "temperature": 0, "stream": true})");
  CHECK(chat.status == 200);
  auto events = sse_events(chat.body);
  REQUIRE(!events.empty());
  CHECK(events.back() == "[DONE]");

  // A duplicate name and an impossible layout are refused with the reason; nothing is left.
  auto dup = serve(fx, yaml);
  CHECK(dup.exit_code != 0);
  CHECK_MESSAGE(dup.output.find("exists already") != std::string::npos, dup.output);
  auto bad = serve(fx, write_yaml(fx, "bad.yaml", yaml_for(*model, "bad", 3, 1)));
  CHECK(bad.exit_code != 0);
  CHECK_MESSAGE(bad.output.find("not divisible by tensor=3") != std::string::npos, bad.output);
  auto big = serve(fx, write_yaml(fx, "big.yaml", yaml_for(*model, "big", 2, 1)));
  CHECK(big.exit_code != 0); // all four stand-ins are held by "tiny"
  CHECK_MESSAGE(big.output.find("free") != std::string::npos, big.output);
  CHECK(status_json(fx)["deployments"].size() == 1);

  // --stop removes it and frees its devices; the endpoint goes away.
  auto stop = fx.cluster({"serve", "--stop", "tiny", "--address", fx.head_address(), "--token",
                          fx.token()});
  CHECK_MESSAGE(stop.exit_code == 0, stop.output);
  CHECK(status_json(fx)["deployments"].empty());
  nodes = fx.nodes();
  CHECK(nodes[w1]["gpus_used"] == 0);
  CHECK(nodes[w2]["gpus_used"] == 0);
  auto again = fx.cluster({"serve", "--stop", "tiny", "--address", fx.head_address(), "--token",
                           fx.token()});
  CHECK(again.exit_code != 0);
  // The freed devices serve the next deployment.
  auto next = serve(fx, write_yaml(fx, "big.yaml", yaml_for(*model, "big", 2, 1)));
  CHECK_MESSAGE(next.exit_code == 0, next.output);
}

TEST_CASE("cluster serve: SIGKILL of a rank's node ends the stream with an error within seconds") {
  auto model = golden_model("tiny-qwen3");
  if (!model)
    return;
  cluster_fixture fx;
  auto node_pids = start_cluster(fx);
  auto served = serve(fx, write_yaml(fx, "pp.yaml", yaml_for(*model, "pp", 1, 2)));
  REQUIRE_MESSAGE(served.exit_code == 0, served.output);
  const uint16_t port = port_of(served.output);
  auto d = deployment_of(fx, "pp");
  REQUIRE(d["ranks"].size() == 2);
  const std::string victim = d["ranks"][1]["node_id"]; // the last stage's node
  const pid_t victim_pid = victim == fx.node_id("w1") ? node_pids[0] : node_pids[1];

  boost::asio::io_context ioc;
  boost::asio::ip::tcp::socket sock(ioc);
  sock.connect({boost::asio::ip::make_address("127.0.0.1"), port});
  timeval tv{30, 0}; // a hang fails the test instead of blocking it
  setsockopt(sock.native_handle(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  boost::asio::write(
      sock, boost::asio::buffer(http_request_text(
                "POST", "/v1/completions",
                R"({"model": "pp", "prompt": "hello", "max_tokens": 240, "temperature": 0,
                    "ignore_eos": true, "stream": true})",
                "")));
  std::string raw;
  char buf[4096];
  boost::system::error_code ec;
  while (raw.find("data: ") == std::string::npos && !ec) {
    auto n = sock.read_some(boost::asio::buffer(buf), ec);
    raw.append(buf, n);
  }
  REQUIRE_MESSAGE(raw.find("data: ") != std::string::npos, raw);
  kill(victim_pid, SIGKILL);
  const auto t0 = std::chrono::steady_clock::now();
  while (!ec) {
    auto n = sock.read_some(boost::asio::buffer(buf), ec);
    raw.append(buf, n);
  }
  const auto took = std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::steady_clock::now() - t0);
  MESSAGE("SIGKILL -> stream ended in ", took.count(), " ms");
  CHECK(ec == boost::asio::error::eof);
  CHECK(took < 15s);
  const auto tail = raw.substr(raw.size() > 600 ? raw.size() - 600 : 0);
  CHECK_MESSAGE(raw.find("\"error\"") != std::string::npos, tail);
  CHECK_MESSAGE(raw.find("deployment worker failure") != std::string::npos,
                tail);
  // The head reports it.
  CHECK(eventually([&] { return deployment_of(fx, "pp")["state"] == "failed"; }, 10s));
  auto failed = deployment_of(fx, "pp");
  MESSAGE("status: ", failed.dump());
  // New requests fail at once with an OpenAI error, and --stop frees the survivor's devices.
  auto after = http_call(port, "POST", "/v1/completions",
                         R"({"model": "pp", "prompt": "hi", "max_tokens": 2})");
  CHECK(after.status >= 500);
  auto stop = fx.cluster({"serve", "--stop", "pp", "--address", fx.head_address(), "--token",
                          fx.token()});
  CHECK_MESSAGE(stop.exit_code == 0, stop.output);
  CHECK(status_json(fx)["deployments"].empty());
}
