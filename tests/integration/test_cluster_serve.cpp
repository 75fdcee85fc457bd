// `cluster serve` through the head with real processes on loopback: a head and two joined nodes
// with `--num-gpus 2` CPU stand-ins; the golden tiny-qwen3 served with tensor=2 x pipeline=2
// (stages on different nodes) answers HTTP completions equal to `cluster generate`, and
// concurrent requests (two plans in flight, one per stage) equal each alone; status lists
// the deployment; duplicates and impossible layouts are refused with the reason; --stop frees the
// devices; a SIGKILLed node ends an in-flight stream with an error within seconds, and with no
// devices left the deployment waits (degraded, HTTP 503 saying why) until --stop. Replicas: two
// tensor=2 replicas share the requests; SIGKILL of one replica's node fails only its stream,
// the other replica serves on, and the lost replica restarts on a node that joins later; an idle
// replica whose node leaves (`cluster stop`) restarts on the devices left. MoE: tiny-qwen3-moe
// with its experts sliced over the tensor ranks (parallel.expert) equals `cluster generate`.
#include <doctest/doctest.h>

#include <csignal>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>
#include <sys/socket.h>
#include <thread>

#include <fmt/format.h>

#include "golden.hpp"
#include "process_harness.hpp"
#include "serve/http_client.hpp"
#include "serve_fixture.hpp"

using namespace troupe::test;
using namespace std::chrono_literals;

namespace {

// The greedy ids `cluster generate` gives for `prompt_ids` (comma-separated).
std::vector<int> generate_ids(cluster_fixture& fx, const fs::path& model,
                              const std::string& prompt_ids, int max_tokens) {
  auto gen = fx.cluster({"generate", "--model", model.string(), "--max-tokens",
                         std::to_string(max_tokens), "--ignore-eos", "--prompt-ids", prompt_ids},
                        90s);
  REQUIRE_MESSAGE(gen.exit_code == 0, gen.output);
  std::smatch m;
  REQUIRE_MESSAGE(std::regex_search(gen.output, m, std::regex(R"(generated ids: ([0-9,]+))")),
                  gen.output);
  std::vector<int> ids;
  std::stringstream ss(m[1].str());
  for (std::string id; std::getline(ss, id, ',');)
    ids.push_back(std::stoi(id));
  return ids;
}

// A Prometheus sample's value; -1 when absent.
double metric(uint16_t port, const std::string& sample) {
  auto r = http_call(port, "GET", "/metrics");
  const auto at = r.body.find("\n" + sample + " ");
  if (r.status != 200 || at == std::string::npos)
    return -1;
  return std::stod(r.body.substr(at + sample.size() + 2));
}

std::string replica_sample(const std::string& name, const std::string& model, int replica) {
  return fmt::format("{}{{model_name=\"{}\",replica=\"{}\"}}", name, model, replica);
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

  // While it loaded, `cluster serve` (output not a terminal) printed each rank's progress as
  // plain lines, from 0% to "loaded ... 100%", naming the node the status shows for that rank.
  auto progress = load_lines(served.output, "tiny");
  CHECK_MESSAGE(progress.size() == 4, served.output);
  for (auto& r : d["ranks"]) {
    const int pp = r["pp_rank"].get<int>(), tp = r["tp_rank"].get<int>();
    const auto key = fmt::format("r0/{}", pp * 2 + tp);
    CAPTURE(key);
    REQUIRE_MESSAGE(progress.count(key), served.output);
    CHECK_MESSAGE(check_load_lines(progress[key]) == "", served.output);
    CHECK(progress[key].node == r["node_id"].get<std::string>());
    CHECK(progress[key].pp == pp);
    CHECK(progress[key].tp == tp);
  }

  // Greedy completions through HTTP equal `cluster generate` on the same prompt ids.
  const std::string body =
      R"({"model": "tiny", "prompt": [9707, 11, 1879, 0, 5209], "max_tokens": 8,
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
    return greedy_ids(port, "tiny", fmt::format("{}, 11, 1879, 0", first), 10);
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
  // Resolved on the head before placement: a dtype the device cannot compute in.
  auto f16 = serve(fx, write_yaml(fx, "f16.yaml",
                                  yaml_for(*model, "f16", 1, 1) + "device: cpu\ndtype: float16\n"));
  CHECK(f16.exit_code != 0);
  CHECK_MESSAGE(f16.output.find("the CPU backend computes in float32") != std::string::npos,
                f16.output);
  CHECK(status_json(fx)["deployments"].size() == 1);

  // --stop removes it and frees its devices; the endpoint goes away.
  auto stop = stop_serving(fx, "tiny");
  CHECK_MESSAGE(stop.exit_code == 0, stop.output);
  CHECK(status_json(fx)["deployments"].empty());
  nodes = fx.nodes();
  CHECK(nodes[w1]["gpus_used"] == 0);
  CHECK(nodes[w2]["gpus_used"] == 0);
  auto again = stop_serving(fx, "tiny");
  CHECK(again.exit_code != 0);
  // The freed devices serve the next deployment.
  auto next = serve(fx, write_yaml(fx, "big.yaml", yaml_for(*model, "big", 2, 1)));
  CHECK_MESSAGE(next.exit_code == 0, next.output);
}

TEST_CASE("cluster serve: MoE experts sliced over the tensor ranks (expert=1) answer like "
          "cluster generate") {
  auto golden = golden_model("tiny-qwen3-moe");
  auto dense = golden_model("tiny-qwen3");
  if (!golden || !dense)
    return;
  cluster_fixture fx;
  // The golden MoE model has no tokenizer: served with tiny-qwen3's (the prompts are ids).
  const auto model = std::optional<fs::path>(fx.dir("tiny-qwen3-moe"));
  fs::create_directories(*model);
  const auto qwen3 = golden->parent_path().parent_path() / "tokenizers" / "qwen3";
  for (auto [from, file] : {std::pair{*golden, "config.json"},
                            {*golden, "model.safetensors"},
                            {qwen3, "tokenizer.json"},
                            {qwen3, "tokenizer_config.json"}})
    fs::create_symlink(from / file, *model / file);
  start_cluster(fx);
  // Layouts the model or the ranks cannot take are refused with the reason before placing.
  auto uneven = serve(fx, write_yaml(fx, "uneven.yaml", yaml_for(*model, "uneven", 4, 1, 1, 3)));
  CHECK(uneven.exit_code != 0);
  CHECK_MESSAGE(uneven.output.find("expert=3 does not divide tensor=4") != std::string::npos,
                uneven.output);
  auto no_experts = serve(fx, write_yaml(fx, "dense.yaml", yaml_for(*dense, "dense", 2, 1, 1, 2)));
  CHECK(no_experts.exit_code != 0);
  CHECK_MESSAGE(no_experts.output.find("expert=2 needs a mixture-of-experts model") !=
                    std::string::npos,
                no_experts.output);
  CHECK(status_json(fx)["deployments"].empty());

  // tensor=2 x pipeline=2 over both nodes, every expert sliced over its stage's two ranks.
  auto served = serve(fx, write_yaml(fx, "moe.yaml", yaml_for(*model, "moe", 2, 2, 1, 1)));
  REQUIRE_MESSAGE(served.exit_code == 0, served.output);
  const uint16_t port = port_of(served.output);
  REQUIRE_MESSAGE(port != 0, served.output);
  CHECK(deployment_of(fx, "moe")["ranks"].size() == 4);
  for (const std::string prompt : {"970,11,1879,0,520", "17,300,4000,12"}) {
    CAPTURE(prompt);
    auto reply = http_call(port, "POST", "/v1/completions",
                           fmt::format(R"({{"model": "moe", "prompt": [{}], "max_tokens": 8,
                                            "temperature": 0, "ignore_eos": true,
                                            "return_token_ids": true}})",
                                       prompt));
    REQUIRE_MESSAGE(reply.status == 200, reply.body);
    CHECK(reply.json()["choices"][0]["token_ids"].get<std::vector<int>>() ==
          generate_ids(fx, *model, prompt, 8));
  }
  CHECK(stop_serving(fx, "moe").exit_code == 0);
}

TEST_CASE("cluster serve: SIGKILL of a rank's node fails the stream, without devices it waits") {
  auto model = golden_model("tiny-qwen3");
  if (!model)
    return;
  cluster_fixture fx;
  auto node_pids = start_cluster(fx);
  // tensor=2 x pipeline=2 takes all four devices: after the kill, 2 are left for 4 ranks.
  auto served = serve(fx, write_yaml(fx, "pp.yaml", yaml_for(*model, "pp", 2, 2)));
  REQUIRE_MESSAGE(served.exit_code == 0, served.output);
  const uint16_t port = port_of(served.output);
  auto d = deployment_of(fx, "pp");
  REQUIRE(d["ranks"].size() == 4);
  const std::string victim = d["ranks"][3]["node_id"]; // the last stage's node
  const std::string survivor = victim == fx.node_id("w1") ? fx.node_id("w2") : fx.node_id("w1");
  const pid_t victim_pid = node_pid(fx, node_pids, victim);

  sse_stream stream(port, R"({"model": "pp", "prompt": "hello", "max_tokens": 240,
                              "temperature": 0, "ignore_eos": true, "stream": true})");
  REQUIRE_MESSAGE(stream.read_until("data: "), stream.raw());
  kill(victim_pid, SIGKILL);
  const auto took = stream.read_to_end();
  MESSAGE("SIGKILL -> stream ended in ", took.count(), " ms");
  CHECK(stream.ended_cleanly());
  CHECK(took < 15s);
  CHECK_MESSAGE(stream.raw().find("\"error\"") != std::string::npos, stream.tail());
  CHECK_MESSAGE(stream.raw().find("the engine failed") != std::string::npos, stream.tail());
  // The head reports it degraded and waiting for devices (the failed replica released its own).
  CHECK(eventually(
      [&] {
        auto now = deployment_of(fx, "pp");
        return now["state"] == "degraded" &&
               now["reason"].get<std::string>().find("waiting for devices") != std::string::npos;
      },
      15s));
  auto waiting = deployment_of(fx, "pp");
  MESSAGE("status: ", waiting.dump());
  // 3 free: the survivor's 2 (released by the failed replica) and the head's one CPU rank. The
  // cause is whichever the head heard first: the node's death, or a survivor's failed step.
  const auto reason = waiting["reason"].get<std::string>();
  CHECK_MESSAGE(reason.find("replica 0 waiting for devices: needs 4 devices (tensor=2 x "
                            "pipeline=2 x replicas=1), cluster has 3 free (it failed: ") == 0,
                reason);
  CHECK_MESSAGE((reason.find("node " + victim + " holding a rank died: ") != std::string::npos ||
                 reason.find("deployment worker failure: rank ") != std::string::npos),
                reason);
  CHECK(waiting["ranks"].empty());
  CHECK(fx.nodes()[survivor]["gpus_used"] == 0);
  // New requests get 503 at once, saying that it restarts and why.
  auto after = http_call(port, "POST", "/v1/completions",
                         R"({"model": "pp", "prompt": "hi", "max_tokens": 2})");
  CHECK(after.status == 503);
  CHECK_MESSAGE(after.body.find("deployment 'pp' is restarting") != std::string::npos, after.body);
  // As for the reason above: when a failed step reaches the head before the node's death, the
  // head restarts the replica on the dead node first, and that restart fails.
  CHECK_MESSAGE((after.body.find("replica 0 failed") != std::string::npos ||
                 after.body.find("replica 0 restart failed") != std::string::npos),
                after.body);
  // --stop while it waits removes it; nothing stays held.
  auto stop = stop_serving(fx, "pp");
  CHECK_MESSAGE(stop.exit_code == 0, stop.output);
  CHECK(status_json(fx)["deployments"].empty());
  CHECK(fx.nodes()[survivor]["gpus_used"] == 0);
}

TEST_CASE("cluster serve: replicas share requests, a killed replica fails alone and restarts") {
  auto model = golden_model("tiny-qwen3");
  if (!model)
    return;
  cluster_fixture fx;
  auto node_pids = start_cluster(fx);
  const std::string prompt = "9707,11,1879,0,5209";
  const auto greedy = generate_ids(fx, *model, prompt, 120); // its first 8 answer short requests
  const std::vector<int> greedy8(greedy.begin(), greedy.begin() + 8);

  // Two replicas of tensor=2: one per node (each node has 2 devices).
  auto served = serve(fx, write_yaml(fx, "rep.yaml", yaml_for(*model, "rep", 2, 1, 2)));
  REQUIRE_MESSAGE(served.exit_code == 0, served.output);
  CHECK_MESSAGE(served.output.find("replicas=2") != std::string::npos, served.output);
  const uint16_t port = port_of(served.output);
  auto d = deployment_of(fx, "rep");
  REQUIRE_MESSAGE(d["ranks"].size() == 4, d.dump());
  CHECK(d["state"] == "ready");
  CHECK(d["replicas"] == 2);
  std::map<int, std::string> node_of; // replica -> its node
  for (auto& r : d["ranks"])
    node_of[r["replica"].get<int>()] = r["node_id"].get<std::string>();
  REQUIRE(node_of.size() == 2);
  CHECK(node_of[0] != node_of[1]);
  // Load progress names each replica's ranks.
  auto progress = load_lines(served.output, "rep");
  CHECK_MESSAGE(progress.size() == 4, served.output);
  for (const auto* key : {"r0/0", "r0/1", "r1/0", "r1/1"}) {
    CAPTURE(key);
    CHECK_MESSAGE(check_load_lines(progress[key]) == "", served.output);
    CHECK(progress[key].node == node_of[key[1] - '0']);
  }

  // Sequential requests alternate over the idle replicas; both answer the greedy tokens.
  const std::string short_body = R"({"model": "rep", "prompt": [9707, 11, 1879, 0, 5209],
    "max_tokens": 8, "temperature": 0, "ignore_eos": true, "return_token_ids": true})";
  auto ask = [&] {
    auto reply = http_call(port, "POST", "/v1/completions", short_body);
    REQUIRE_MESSAGE(reply.status == 200, reply.body);
    CHECK(reply.json()["choices"][0]["token_ids"].get<std::vector<int>>() == greedy8);
  };
  ask();
  ask();
  const auto requests = [&](int replica) {
    return metric(port, replica_sample("troupe_replica_requests_total", "rep", replica));
  };
  CHECK(requests(0) == 1);
  CHECK(requests(1) == 1);

  // Stream A, then stream B (on the other replica: A is unfinished); kill A's node.
  const double before0 = requests(0);
  sse_stream a(port, R"({"model": "rep", "prompt": [9707, 11, 1879, 0, 5209], "max_tokens": 240,
                         "temperature": 0, "ignore_eos": true, "stream": true})");
  REQUIRE_MESSAGE(a.read_until("data: "), a.raw());
  const int lost = requests(0) > before0 ? 0 : 1;
  sse_stream b(port, R"({"model": "rep", "prompt": [9707, 11, 1879, 0, 5209], "max_tokens": 120,
                         "temperature": 0, "ignore_eos": true, "stream": true,
                         "return_token_ids": true})");
  REQUIRE_MESSAGE(b.read_until("data: "), b.raw());
  CHECK(requests(1 - lost) == 2);
  const pid_t victim_pid = node_pid(fx, node_pids, node_of[lost]);
  kill(victim_pid, SIGKILL);
  const auto took = a.read_to_end();
  MESSAGE("SIGKILL of replica ", lost, "'s node -> its stream ended in ", took.count(), " ms");
  CHECK(took < 15s);
  CHECK_MESSAGE(a.raw().find("\"error\"") != std::string::npos, a.tail());
  b.read_to_end();
  CHECK_MESSAGE(b.raw().find("\"error\"") == std::string::npos, b.tail());
  CHECK_MESSAGE(b.raw().find("data: [DONE]") != std::string::npos, b.tail());
  CHECK_MESSAGE(b.token_ids() == greedy, // the other replica finished it, exactly
                fmt::format("{} vs {}", fmt::join(b.token_ids(), ","), fmt::join(greedy, ",")));

  // Degraded and waiting: the survivor's node has no free device. The other replica serves on.
  CHECK(eventually(
      [&] {
        auto now = deployment_of(fx, "rep");
        return now["state"] == "degraded" &&
               now["reason"].get<std::string>().find("waiting for devices") != std::string::npos;
      },
      15s));
  MESSAGE("status: ", deployment_of(fx, "rep").dump());
  CHECK(metric(port, replica_sample("troupe_replica_up", "rep", lost)) == 0);
  ask();

  // A spare node joins: the lost replica restarts there and the deployment is ready again.
  fx.join_blocking("w3");
  auto back = eventually([&] { return deployment_of(fx, "rep")["state"] == "ready"; }, 60s);
  REQUIRE_MESSAGE(back, deployment_of(fx, "rep").dump());
  MESSAGE("w3 started -> ready in ", back->count(), " ms");
  const std::string w3 = fx.node_id("w3"); // written once it joined
  d = deployment_of(fx, "rep");
  CHECK(d["restarts"] == 1);
  CHECK(d["reason"] == "");
  for (auto& r : d["ranks"])
    if (r["replica"] == lost)
      CHECK(r["node_id"] == w3);
  CHECK(fx.nodes()[w3]["gpus_used"] == 2);
  CHECK(metric(port, replica_sample("troupe_replica_up", "rep", lost)) == 1);
  const double restarted_before = requests(lost);
  ask();
  ask();
  CHECK(requests(lost) == restarted_before + 1); // the restarted replica answered one of them

  auto stop = stop_serving(fx, "rep");
  CHECK_MESSAGE(stop.exit_code == 0, stop.output);
  CHECK(fx.nodes()[w3]["gpus_used"] == 0);
}

TEST_CASE("cluster serve: an idle replica whose node leaves restarts on the free devices left") {
  auto model = golden_model("tiny-qwen3");
  if (!model)
    return;
  cluster_fixture fx;
  start_cluster(fx);
  auto served = serve(fx, write_yaml(fx, "two.yaml", yaml_for(*model, "two", 1, 1, 2)));
  REQUIRE_MESSAGE(served.exit_code == 0, served.output);
  const uint16_t port = port_of(served.output);
  auto d = deployment_of(fx, "two");
  REQUIRE(d["ranks"].size() == 2);
  CHECK(d["ranks"][0]["node_id"] != d["ranks"][1]["node_id"]); // one per node
  const int leaving = d["ranks"][1]["node_id"] == fx.node_id("w2") ? 1 : 0;
  const std::string gone = fx.node_id("w2");
  // No request is in flight: the head sees the node leave, the replica restarts on a free
  // device of another node (w1's second one, or the head's CPU rank).
  auto stop = fx.cluster({"stop", "--temp-dir", fx.dir("w2").string()});
  CHECK_MESSAGE(stop.exit_code == 0, stop.output);
  auto back = eventually(
      [&] {
        auto now = deployment_of(fx, "two");
        return now["state"] == "ready" && now["restarts"] == 1;
      },
      30s);
  REQUIRE_MESSAGE(back, deployment_of(fx, "two").dump());
  MESSAGE("node left -> replica restarted in ", back->count(), " ms");
  d = deployment_of(fx, "two");
  REQUIRE(d["ranks"].size() == 2);
  for (auto& r : d["ranks"])
    CHECK(r["node_id"] != gone);
  int used = 0;
  for (auto& [id, n] : fx.nodes())
    used += id == gone ? 0 : n["gpus_used"].get<int>();
  CHECK(used == 2);
  // Both replicas answer (idle replicas take requests in turn).
  for (int i = 0; i < 2; ++i) {
    auto reply = http_call(port, "POST", "/v1/completions",
                           R"({"model": "two", "prompt": [9707, 11], "max_tokens": 3})");
    CHECK_MESSAGE(reply.status == 200, reply.body);
  }
  CHECK(metric(port, replica_sample("troupe_replica_requests_total", "two", leaving)) == 1);
  CHECK(metric(port, replica_sample("troupe_replica_up", "two", leaving)) == 1);
}

// Prefill/decode disaggregation across processes: the head places both groups, the prefill
// ranks push the prompt's KV over the tcp provider into the decode rank, which decodes.
TEST_CASE("cluster serve: prefill tensor=2 -> decode tensor=1 over tcp answers like generate") {
  auto model = golden_model("tiny-qwen3");
  if (!model)
    return;
  cluster_fixture fx;
  auto node_pids = start_cluster(fx);
  auto yaml = [&](const std::string& name, const std::string& prefill, const std::string& decode) {
    return disagg_yaml(fx, *model, name, prefill, decode, 5);
  };
  auto served = serve(fx, yaml("pd", "{tensor: 2}", "{tensor: 1, block_size: 32}"));
  REQUIRE_MESSAGE(served.exit_code == 0, served.output);
  const uint16_t port = port_of(served.output);
  REQUIRE_MESSAGE(port != 0, served.output);

  // Status: both groups, their ranks, the provider and the layout contract.
  auto d = deployment_of(fx, "pd");
  REQUIRE_MESSAGE(d.is_object(), status_json(fx).dump());
  CHECK(d["state"] == "ready");
  REQUIRE(d["groups"].size() == 2);
  CHECK(d["groups"][0]["role"] == "decode");
  CHECK(d["groups"][0]["ready"] == 1);
  CHECK(d["groups"][1]["role"] == "prefill");
  CHECK(d["groups"][1]["tensor"] == 2);
  CHECK(d["ranks"].size() == 3);
  // Load progress names the group of each rank.
  auto progress = load_lines(served.output, "pd");
  CHECK_MESSAGE(progress.size() == 3, served.output);
  for (const auto* key : {"decode r0/0", "prefill r0/0", "prefill r0/1"}) {
    CAPTURE(key);
    CHECK_MESSAGE(check_load_lines(progress[key]) == "", served.output);
  }
  CHECK_MESSAGE(d["transfer"].get<std::string>().find("provider tcp: 2 prefill rank(s) -> 1 decode "
                                                      "rank(s)") == 0,
                d.dump());
  auto table = fx.cluster({"status", "--address", fx.head_address(), "--token", fx.token(),
                           "--ca-sha256", fx.ca_sha256()});
  CHECK_MESSAGE(table.output.find("prefill  group: tensor=2") != std::string::npos, table.output);

  // Greedy completions equal `cluster generate`, one at a time and all at once.
  auto complete = [&](int first) {
    return greedy_ids(port, "pd", fmt::format("{}, 11, 1879, 0, 5209, 13, 42", first), 10);
  };
  CHECK(complete(9707) == generate_ids(fx, *model, "9707,11,1879,0,5209,13,42", 10));
  std::vector<std::vector<int>> alone, together(5);
  for (int i = 0; i < 5; ++i)
    alone.push_back(complete(200 + i));
  std::vector<std::thread> clients;
  for (int i = 0; i < 5; ++i)
    clients.emplace_back([&, i] { together[static_cast<size_t>(i)] = complete(200 + i); });
  for (auto& t : clients)
    t.join();
  for (int i = 0; i < 5; ++i) {
    CAPTURE(i);
    CHECK(alone[static_cast<size_t>(i)].size() == 10);
    CHECK(together[static_cast<size_t>(i)] == alone[static_cast<size_t>(i)]);
  }
  if (troupe::test::metric_value(port, "troupe_kv_handoff_failures_total") > 0)
    MESSAGE(read_file(fx.dir("head") / "foreground.log"));
  CHECK(troupe::test::metric_value(port, "troupe_kv_handoffs_total") >= 11);
  CHECK(troupe::test::metric_value(port, "troupe_kv_handoff_failures_total") == 0);
  CHECK(troupe::test::metric_value(port, "troupe_kv_local_prefills_total") == 0);
  CHECK(troupe::test::metric_value(port, "troupe_kv_transfer_bytes_total") > 0);
  CHECK(troupe::test::metric_value(port, "troupe_kv_blocks_in_use") == 0);

  // SIGKILL of the prefill ranks' node: the decode replica prefills itself (on_prefill_failure
  // decode), within seconds, and the head reports the prefill replica down.
  const auto& ranks = d["ranks"];
  std::string prefill_node;
  for (const auto& r : ranks)
    if (r["replica"] == 1)
      prefill_node = r["node_id"];
  std::string decode_node = ranks[0]["node_id"];
  REQUIRE(prefill_node != decode_node);
  const pid_t victim = node_pid(fx, node_pids, prefill_node);
  kill(victim, SIGKILL);
  const auto t0 = std::chrono::steady_clock::now();
  auto after = complete(9707);
  MESSAGE(
      "first request after SIGKILL of the prefill node: ",
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0)
          .count(),
      " ms");
  CHECK(after == generate_ids(fx, *model, "9707,11,1879,0,5209,13,42", 10));
  CHECK(eventually([&] { return deployment_of(fx, "pd")["state"] == "degraded"; }, 15s));
  CHECK(troupe::test::metric_value(port, "troupe_kv_local_prefills_total") >= 1);
  CHECK(troupe::test::metric_value(port, "troupe_kv_blocks_in_use") == 0);

  // A node with two free devices joins: the prefill replica restarts there, is linked to the
  // decode replica before it serves, and handoffs resume.
  fx.join_blocking("w3");
  CHECK(eventually([&] { return deployment_of(fx, "pd")["state"] == "ready"; }, 60s));
  const auto handed = troupe::test::metric_value(port, "troupe_kv_handoffs_total");
  const auto local = troupe::test::metric_value(port, "troupe_kv_local_prefills_total");
  CHECK(complete(9707) == after);
  CHECK(troupe::test::metric_value(port, "troupe_kv_handoffs_total") == handed + 1);
  CHECK(troupe::test::metric_value(port, "troupe_kv_local_prefills_total") == local);
  auto stop = stop_serving(fx, "pd");
  CHECK_MESSAGE(stop.exit_code == 0, stop.output);

  // The other way round: prefill tensor=1 -> decode tensor=2 on the survivor's two devices and
  // the head's CPU rank; shared prefixes send only what the decode side lacks.
  auto served2 = serve(fx, yaml("pd2", "{tensor: 1}", "{tensor: 2}"));
  REQUIRE_MESSAGE(served2.exit_code == 0, served2.output);
  const uint16_t port2 = port_of(served2.output);
  auto d2 = deployment_of(fx, "pd2");
  CHECK_MESSAGE(d2["transfer"].get<std::string>().find("1 prefill rank(s) -> 2 decode rank(s)") !=
                    std::string::npos,
                d2.dump());
  auto complete2 = [&](const std::string& prompt) { return greedy_ids(port2, "pd2", prompt, 8); };
  std::string shared;
  for (int i = 0; i < 40; ++i)
    shared += fmt::format("{}{}", i ? "," : "", 300 + i);
  const auto bytes0 = troupe::test::metric_value(port2, "troupe_kv_transfer_bytes_total");
  CHECK(complete2(shared + ",7,8") == generate_ids(fx, *model, shared + ",7,8", 8));
  const auto bytes1 = troupe::test::metric_value(port2, "troupe_kv_transfer_bytes_total");
  CHECK(complete2(shared + ",9,10") == generate_ids(fx, *model, shared + ",9,10", 8));
  const auto bytes2 = troupe::test::metric_value(port2, "troupe_kv_transfer_bytes_total");
  MESSAGE("KV bytes moved: first prompt ", bytes1 - bytes0, ", same 40-token prefix ",
          bytes2 - bytes1);
  CHECK(bytes1 > bytes0);
  CHECK(bytes2 - bytes1 < (bytes1 - bytes0) / 2); // the cached prefix is not sent again
  CHECK(troupe::test::metric_value(port2, "troupe_kv_local_prefills_total") == 0);

  // A client that leaves mid-stream frees its blocks on both sides.
  {
    sse_stream stream(port2, R"({"model": "pd2", "prompt": "hello there", "max_tokens": 200,
                                 "temperature": 0, "ignore_eos": true, "stream": true})");
    REQUIRE_MESSAGE(stream.read_until("data: "), stream.raw());
  }
  CHECK(eventually(
      [&] { return troupe::test::metric_value(port2, "troupe_kv_blocks_in_use") == 0; }, 10s));
  CHECK(troupe::test::metric_value(port2, "troupe_kv_handoff_failures_total") == 0);
}

// KV staged through host memory between node processes (what GPU KV over tcp does; forced here
// on CPU KV with staging: always): prefill ranks write from a staging ring, the decode ranks'
// landing areas are copied into their caches. Handoffs wait for free landing blocks; prompts
// larger than the whole landing area are prefilled on the decode replica.
TEST_CASE("cluster serve: KV staged through host memory answers like generate") {
  auto model = golden_model("tiny-qwen3");
  if (!model)
    return;
  cluster_fixture fx;
  start_cluster(fx);
  // 32 tokens of staging: 2 landing blocks of 16 per decode rank, fewer than requests at once.
  auto yaml =
      write_yaml(fx, "staged.yaml",
                 read_file(disagg_yaml(fx, *model, "staged", "{tensor: 2}", "{tensor: 2}", 5)) +
                     "  staging: always\n  staging_tokens: 32\n");
  auto served = serve(fx, yaml);
  REQUIRE_MESSAGE(served.exit_code == 0, served.output);
  const uint16_t port = port_of(served.output);
  auto d = deployment_of(fx, "staged");
  CHECK_MESSAGE(d["transfer"].get<std::string>().find(
                    "KV staged through host memory (2 landing blocks per decode rank)") !=
                    std::string::npos,
                d.dump());
  auto complete = [&](const std::string& ids) { return greedy_ids(port, "staged", ids, 8); };
  CHECK(complete("9707,11,1879,0,5209,13,42") ==
        generate_ids(fx, *model, "9707,11,1879,0,5209,13,42", 8));
  // Five at once (one landing block each): as alone, every one handed off in turn.
  std::vector<std::string> prompts;
  for (int i = 0; i < 5; ++i)
    prompts.push_back(fmt::format("{},11,1879,0,5209,13,42", 200 + i));
  std::vector<std::vector<int>> together(5);
  std::vector<std::thread> clients;
  for (size_t i = 0; i < 5; ++i)
    clients.emplace_back([&, i] { together[i] = complete(prompts[i]); });
  for (auto& t : clients)
    t.join();
  for (size_t i = 0; i < 5; ++i) {
    CAPTURE(i);
    CHECK(together[i] == generate_ids(fx, *model, prompts[i], 8));
  }
  CHECK(troupe::test::metric_value(port, "troupe_kv_handoffs_total") == 6);
  CHECK(troupe::test::metric_value(port, "troupe_kv_local_prefills_total") == 0);
  // 150 tokens need 10 landing blocks, more than there are: prefilled on the decode replica.
  std::string long_prompt;
  for (int i = 0; i < 150; ++i)
    long_prompt += fmt::format("{}{}", i ? "," : "", 300 + i);
  CHECK(complete(long_prompt) == generate_ids(fx, *model, long_prompt, 8));
  CHECK(troupe::test::metric_value(port, "troupe_kv_local_prefills_total") == 1);
  // A client that leaves mid-stream frees its blocks; the landing blocks serve on.
  {
    sse_stream stream(port, R"({"model": "staged", "prompt": "hello there", "max_tokens": 200,
                                "temperature": 0, "ignore_eos": true, "stream": true})");
    REQUIRE_MESSAGE(stream.read_until("data: "), stream.raw());
  }
  CHECK(eventually([&] { return troupe::test::metric_value(port, "troupe_kv_blocks_in_use") == 0; },
                   10s));
  for (int round = 0; round < 3; ++round) // more handoffs than landing blocks: all given back
    CHECK(complete(prompts[0]) == together[0]);
  CHECK(troupe::test::metric_value(port, "troupe_kv_local_prefills_total") == 1);
  // A prompt whose first block the decode replica has cached takes one landing block (its
  // table's cached entry holds none, and none goes back to the free ones), then handoffs go on.
  std::string head;
  for (int i = 0; i < 16; ++i)
    head += fmt::format("{}{}", i ? "," : "", 500 + i);
  CHECK(complete(head + ",7,8,9") == generate_ids(fx, *model, head + ",7,8,9", 8));
  CHECK(complete(head + ",10,11") == generate_ids(fx, *model, head + ",10,11", 8));
  std::string two_blocks; // both landing blocks
  for (int i = 0; i < 20; ++i)
    two_blocks += fmt::format("{}{}", i ? "," : "", 600 + i);
  const auto want = generate_ids(fx, *model, two_blocks, 8);
  for (int round = 0; round < 2; ++round)
    CHECK(complete(two_blocks) == want);
  CHECK(troupe::test::metric_value(port, "troupe_kv_local_prefills_total") == 1);
  CHECK(troupe::test::metric_value(port, "troupe_kv_handoff_failures_total") == 0);
  CHECK(troupe::test::metric_value(port, "troupe_kv_blocks_in_use") == 0);
}

// A prefill replica whose node hangs (SIGSTOP): the handoff it had is tried again on the other
// prefill replica, into the same reserved blocks, and the request completes as if nothing
// happened.
TEST_CASE("cluster serve: a hung prefill node's handoff is retried on the other prefill replica") {
  auto model = golden_model("tiny-qwen3");
  if (!model)
    return;
  cluster_fixture fx;
  auto node_pids = start_cluster(fx);
  // Two prefill replicas of tensor=2 take one node each; the decode replica the head's CPU rank.
  auto yaml = disagg_yaml(fx, *model, "retry", "{tensor: 2, replicas: 2}", "{tensor: 1}", 3);
  auto served = serve(fx, yaml);
  REQUIRE_MESSAGE(served.exit_code == 0, served.output);
  const uint16_t port = port_of(served.output);
  auto nodes_of = replica_nodes(deployment_of(fx, "retry"));
  REQUIRE(nodes_of[1].size() == 1);
  REQUIRE(nodes_of[2].size() == 1);
  REQUIRE(*nodes_of[1].begin() != *nodes_of[2].begin());
  const std::string victim = *nodes_of[2].begin();
  const pid_t victim_pid = node_pid(fx, node_pids, victim);

  // Two requests at once: one to each prefill replica (ties in turn); one of them hangs.
  kill(victim_pid, SIGSTOP);
  auto complete = [&](const std::string& ids) { return greedy_ids(port, "retry", ids, 8); };
  const std::vector<std::string> prompts{"9707,11,1879,0", "400,401,402,403,404"};
  std::vector<std::vector<int>> got(2);
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> clients;
  for (size_t i = 0; i < 2; ++i)
    clients.emplace_back([&, i] { got[i] = complete(prompts[i]); });
  for (auto& t : clients)
    t.join();
  MESSAGE(
      "both requests answered in ",
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0)
          .count(),
      " ms");
  kill(victim_pid, SIGCONT);
  for (size_t i = 0; i < 2; ++i)
    CHECK(got[i] == generate_ids(fx, *model, prompts[i], 8));
  CHECK(troupe::test::metric_value(port, "troupe_kv_handoff_retries_total") >= 1);
  CHECK(troupe::test::metric_value(port, "troupe_kv_local_prefills_total") == 0);
  CHECK(troupe::test::metric_value(port, "troupe_kv_handoffs_total") == 2);
  CHECK(eventually([&] { return troupe::test::metric_value(port, "troupe_kv_blocks_in_use") == 0; },
                   15s));
}

TEST_CASE("cluster serve: SIGKILL of the decode node mid-stream ends the stream and the decode "
          "replica restarts") {
  auto model = golden_model("tiny-qwen3");
  if (!model)
    return;
  cluster_fixture fx;
  auto node_pids = start_cluster(fx);
  // prefill tensor=2 and decode tensor=2: one whole node each.
  auto yaml = disagg_yaml(fx, *model, "dk", "{tensor: 2}", "{tensor: 2}", 3);
  auto served = serve(fx, yaml);
  REQUIRE_MESSAGE(served.exit_code == 0, served.output);
  const uint16_t port = port_of(served.output);
  auto nodes_of = replica_nodes(deployment_of(fx, "dk"));
  REQUIRE(nodes_of[0].size() == 1);
  REQUIRE(nodes_of[1].size() == 1);
  const std::string decode_node = *nodes_of[0].begin();
  REQUIRE(decode_node != *nodes_of[1].begin());
  const pid_t victim = node_pid(fx, node_pids, decode_node);
  const auto expected = generate_ids(fx, *model, "9707,11,1879,0", 8);
  CHECK(greedy_ids(port, "dk", "9707,11,1879,0", 8) == expected);

  sse_stream stream(port, R"({"model": "dk", "prompt": "hello", "max_tokens": 240,
                              "temperature": 0, "ignore_eos": true, "stream": true})");
  REQUIRE_MESSAGE(stream.read_until("data: "), stream.raw());
  kill(victim, SIGKILL);
  const auto took = stream.read_to_end();
  MESSAGE("SIGKILL of the decode node -> stream ended in ", took.count(), " ms");
  CHECK(took < 10s);
  CHECK(stream.ended_cleanly());
  CHECK_MESSAGE(stream.raw().find("\"error\"") != std::string::npos, stream.tail());
  // No decode replica: new requests get 503 saying why; the prefill side holds nothing.
  CHECK(eventually([&] { return deployment_of(fx, "dk")["state"] == "degraded"; }, 15s));
  auto refused = http_call(port, "POST", "/v1/completions",
                           R"({"model": "dk", "prompt": "hi", "max_tokens": 2})");
  CHECK_MESSAGE(refused.status == 503, refused.body);
  CHECK(eventually([&] { return troupe::test::metric_value(port, "troupe_kv_blocks_in_use") == 0; },
                   10s));
  // A node with two devices joins: the decode replica restarts there, the prefill replica links
  // to it, and handoffs serve again.
  fx.join_blocking("w3");
  CHECK(eventually([&] { return deployment_of(fx, "dk")["state"] == "ready"; }, 60s));
  const auto handed = troupe::test::metric_value(port, "troupe_kv_handoffs_total");
  CHECK(greedy_ids(port, "dk", "9707,11,1879,0", 8) == expected);
  CHECK(troupe::test::metric_value(port, "troupe_kv_handoffs_total") == handed + 1);
}
