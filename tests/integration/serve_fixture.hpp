// Helpers of the `cluster serve` integration tests: status queries, model.yaml files, serving
// through the head, streamed completions read as they arrive, and a head with two joined nodes.
#pragma once

#include <chrono>
#include <map>
#include <set>
#include <string>
#include <sys/socket.h>
#include <vector>

#include <nlohmann/json.hpp>

#include "process_harness.hpp"
#include "serve/http_client.hpp"

namespace troupe::test {

// `cluster status --json` through the fixture's head; null when it does not answer.
nlohmann::json status_json(cluster_fixture& fx);
// One deployment's JSON from the status; null when absent.
nlohmann::json deployment_of(cluster_fixture& fx, const std::string& name);
fs::path write_yaml(cluster_fixture& fx, const std::string& file, const std::string& text);
// expert: parallel.expert, left out when 0.
std::string yaml_for(const fs::path& model, const std::string& name, int tensor, int pipeline,
                     int replicas = 1, int expert = 0);
// A disaggregated deployment over tcp; `prefill` and `decode` are YAML flow maps
// ("{tensor: 2}").
fs::path disagg_yaml(cluster_fixture& fx, const fs::path& model, const std::string& name,
                     const std::string& prefill, const std::string& decode, int timeout_s);
// Replica index -> the nodes its ranks are on, from a deployment's status JSON.
std::map<int, std::set<std::string>> replica_nodes(const nlohmann::json& deployment);
run_result serve(cluster_fixture& fx, const fs::path& yaml);
run_result stop_serving(cluster_fixture& fx, const std::string& name);
// The load progress lines of deployment `name` in `cluster serve`'s output (not a terminal:
// plain log lines), per rank as "[ROLE ]rREPLICA/RANK": its node, every percent in order, and
// whether the last line said "loaded".
struct rank_load_lines {
  std::string node;
  int pp = -1, tp = -1;
  std::vector<int> percents;
  bool loaded = false;
};
std::map<std::string, rank_load_lines> load_lines(const std::string& output,
                                                  const std::string& name);
// What is wrong with one rank's lines ("" when fine): they start at 0%, never go back, and end
// with "loaded" at 100%.
std::string check_load_lines(const rank_load_lines& lines);
// The port of "... at http://host:PORT/v1" in `cluster serve`'s output; 0 when absent.
uint16_t port_of(const std::string& output);
// The token ids of a greedy completion (ignore_eos) of `ids` (comma-separated prompt ids) on
// `model`, or {-status} when the request failed.
std::vector<int> greedy_ids(uint16_t port, const std::string& model, const std::string& ids,
                            int max_tokens);
// A head (no devices) and two nodes ("w1", "w2") with two CPU stand-in devices each, all alive.
std::vector<pid_t> start_cluster(cluster_fixture& fx);
// The process of node `node_id` ("w1" or "w2"), given start_cluster's pids.
pid_t node_pid(cluster_fixture& fx, const std::vector<pid_t>& pids, const std::string& node_id);

// One streamed completion on its own connection, read as it arrives. A hang fails the test
// (30 s receive timeout) instead of blocking it.
class sse_stream {
 public:
  sse_stream(uint16_t port, const std::string& body) : sock_(ioc_) {
    sock_.connect({boost::asio::ip::make_address("127.0.0.1"), port});
    timeval tv{30, 0};
    setsockopt(sock_.native_handle(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    boost::asio::write(sock_,
                       boost::asio::buffer(http_request_text("POST", "/v1/completions", body, "")));
  }
  // Reads until `text` arrived or the stream ended; true when it arrived.
  bool read_until(const std::string& text) {
    while (raw_.find(text) == std::string::npos && !ec_)
      read_some();
    return raw_.find(text) != std::string::npos;
  }
  // Reads to the end; returns how long that took.
  std::chrono::milliseconds read_to_end() {
    const auto t0 = std::chrono::steady_clock::now();
    while (!ec_)
      read_some();
    return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() -
                                                                 t0);
  }
  bool ended_cleanly() const { return ec_ == boost::asio::error::eof; }
  const std::string& raw() const { return raw_; }
  std::string tail() const { return raw_.substr(raw_.size() > 600 ? raw_.size() - 600 : 0); }
  // The token ids of every chunk (return_token_ids), in order.
  std::vector<int> token_ids() const {
    std::vector<int> ids;
    auto events = sse_events(parse_reply(raw_).body);
    for (const auto& e : events)
      if (e.is_object() && e.contains("choices") && !e["choices"].empty() &&
          e["choices"][0].contains("token_ids"))
        for (const auto& id : e["choices"][0]["token_ids"])
          ids.push_back(id.get<int>());
    return ids;
  }

 private:
  void read_some() {
    char buf[4096];
    auto n = sock_.read_some(boost::asio::buffer(buf), ec_);
    raw_.append(buf, n);
  }
  boost::asio::io_context ioc_;
  boost::asio::ip::tcp::socket sock_;
  std::string raw_;
  boost::system::error_code ec_;
};

} // namespace troupe::test
