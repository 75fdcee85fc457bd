#include "serve_fixture.hpp"

#include <fstream>
#include <regex>
#include <sstream>

#include <doctest/doctest.h>
#include <fmt/format.h>

namespace troupe::test {

using namespace std::chrono_literals;

nlohmann::json status_json(cluster_fixture& fx) {
  auto r = fx.cluster({"status", "--json", "--address", fx.head_address(), "--token", fx.token(),
                       "--ca-sha256", fx.ca_sha256(), "--timeout", "5"},
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

std::string yaml_for(const fs::path& model, const std::string& name, int tensor, int pipeline,
                     int replicas, int expert) {
  return fmt::format("model: {}\nserved_model_name: {}\nmax_model_len: 256\nnum_kv_blocks: 64\n"
                     "port: 0\nparallel: {{tensor: {}, pipeline: {}, replicas: {}{}}}\n",
                     model.string(), name, tensor, pipeline, replicas,
                     expert != 0 ? fmt::format(", expert: {}", expert) : "");
}

fs::path disagg_yaml(cluster_fixture& fx, const fs::path& model, const std::string& name,
                     const std::string& prefill, const std::string& decode, int timeout_s) {
  return write_yaml(fx, name + ".yaml",
                    fmt::format("model: {}\nserved_model_name: {}\nmax_model_len: 256\n"
                                "num_kv_blocks: 64\nport: 0\ndisaggregation:\n"
                                "  prefill: {}\n  decode: {}\n  provider: tcp\n"
                                "  timeout_s: {}\n",
                                model.string(), name, prefill, decode, timeout_s));
}

std::map<int, std::set<std::string>> replica_nodes(const nlohmann::json& deployment) {
  std::map<int, std::set<std::string>> out;
  for (const auto& r : deployment["ranks"])
    out[r["replica"].get<int>()].insert(r["node_id"].get<std::string>());
  return out;
}

run_result serve(cluster_fixture& fx, const fs::path& yaml) {
  return fx.cluster({"serve", yaml.string(), "--address", fx.head_address(), "--token", fx.token(),
                     "--ca-sha256", fx.ca_sha256()},
                    90s);
}

run_result stop_serving(cluster_fixture& fx, const std::string& name) {
  return fx.cluster({"serve", "--stop", name, "--address", fx.head_address(), "--token", fx.token(),
                     "--ca-sha256", fx.ca_sha256()});
}

std::map<std::string, rank_load_lines> load_lines(const std::string& output,
                                                  const std::string& name) {
  static const std::regex line(
      R"((loading|loaded) '([^']+)' (?:(prefill|decode) )?replica (\d+) rank (\d+) \(pp (\d+), )"
      R"(tp (\d+)\)(?: on node (\S+))?: (\d+)%)");
  std::map<std::string, rank_load_lines> out;
  std::istringstream in(output);
  for (std::string text; std::getline(in, text);) {
    std::smatch m;
    if (!std::regex_search(text, m, line) || m[2] != name)
      continue;
    const std::string key =
        (m[3].matched ? m[3].str() + " " : std::string()) + "r" + m[4].str() + "/" + m[5].str();
    auto& r = out[key];
    r.node = m[8].matched ? m[8].str() : "";
    r.pp = std::stoi(m[6]);
    r.tp = std::stoi(m[7]);
    r.percents.push_back(std::stoi(m[9]));
    r.loaded = m[1] == "loaded";
  }
  return out;
}

std::string check_load_lines(const rank_load_lines& r) {
  if (r.percents.empty())
    return "no lines";
  if (r.percents.front() != 0)
    return fmt::format("the first line is at {}%, not 0%", r.percents.front());
  for (size_t i = 1; i < r.percents.size(); ++i)
    if (r.percents[i] < r.percents[i - 1])
      return fmt::format("went back from {}% to {}%", r.percents[i - 1], r.percents[i]);
  if (!r.loaded || r.percents.back() != 100)
    return fmt::format("the last line is at {}%{}", r.percents.back(),
                       r.loaded ? "" : " and not 'loaded'");
  return "";
}

uint16_t port_of(const std::string& output) {
  std::smatch m;
  if (!std::regex_search(output, m, std::regex(R"(at http://[^:]+:(\d+)/v1)")))
    return 0;
  return static_cast<uint16_t>(std::stoi(m[1]));
}

std::vector<int> greedy_ids(uint16_t port, const std::string& model, const std::string& ids,
                            int max_tokens) {
  auto r = http_call(port, "POST", "/v1/completions",
                     fmt::format(R"({{"model": "{}", "prompt": [{}], "max_tokens": {},
                                     "temperature": 0, "ignore_eos": true,
                                     "return_token_ids": true}})",
                                 model, ids, max_tokens));
  return r.status == 200 ? r.json()["choices"][0]["token_ids"].get<std::vector<int>>()
                         : std::vector<int>{-r.status};
}

std::vector<pid_t> start_cluster(cluster_fixture& fx) {
  fx.start_head_blocking();
  std::vector<pid_t> nodes{fx.join_blocking("w1"), fx.join_blocking("w2")};
  std::map<std::string, nlohmann::json> last;
  const bool up = eventually(
                      [&] {
                        last = fx.nodes();
                        if (last.size() != 3)
                          return false;
                        for (auto& [id, j] : last)
                          if (j["state"] != "alive")
                            return false;
                        return true;
                      },
                      30s)
                      .has_value();
  REQUIRE_MESSAGE(up, "nodes: ", nlohmann::json(last).dump(), "\n", fx.logs());
  return nodes;
}

pid_t node_pid(cluster_fixture& fx, const std::vector<pid_t>& pids, const std::string& node_id) {
  return node_id == fx.node_id("w1") ? pids[0] : pids[1];
}

} // namespace troupe::test
