// The OpenAI-compatible HTTP front end on Boost.Beast: an acceptor and every connection run on a
// small io_context pool (http_limits::threads, no thread per connection), each connection on its
// own strand (http_session.hpp); serving_port::submit never blocks, so a strand never waits.
// start() and stop() are called by actors/serving/deployment.cpp.
//
// Disconnects vs half-close: while a response is produced the session keeps one read pending.
// A reset (RST) or read error cancels the request at once. End of stream (FIN) is ambiguous: the
// client may only have shut down its sending side (shutdown(SHUT_WR)) and still wait for the
// answer, so the request keeps running. A non-streaming answer is then written and the
// connection closed. A stream's next SSE write to a peer that really closed draws an RST, which
// a wait for a socket error (armed at the FIN) sees at once, and the request is cancelled. So a
// closed streaming client is noticed within one token, a closed non-streaming one at its answer.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>

#include "http/metrics.hpp"
#include "http/openai_api.hpp"
#include "http/serving_port.hpp"
#include "runtime/config.hpp"

namespace troupe::serve {

struct server_options {
  std::string host = "127.0.0.1";
  uint16_t port = 8000;             // 0: any free port
  std::string api_key;              // non-empty: "Authorization: Bearer <key>" on every route
  bool open_health_metrics = false; // ... but /health and /metrics
  double stats_interval_s = 10;     // the periodic stats line; 0: none
  std::string version;
  http_limits limits; // runtime/config.hpp: model.yaml `http:`
};

// Everything a session needs, shared read-only (serving and metrics are thread-safe).
struct serve_context {
  server_options options;
  model_info model;
  serving_port* serving = nullptr; // the replicas behind this endpoint
  serve_metrics* metrics = nullptr;
  std::atomic<uint64_t> next_id{1};
  std::atomic<int64_t> in_flight{0}; // completion requests submitted and not ended
};

class http_session;

// Outputs posted from the serving side to sessions go through the gate, which stop() closes
// before the io_context goes away (a sink may outlive the server).
struct post_gate {
  std::mutex mu;
  bool open = true;
};

class http_server {
 public:
  explicit http_server(serve_context& ctx);
  ~http_server();

  // Binds and listens; returns the bound port (useful with port 0), or an error (the address is
  // in use, the host is not an IP address) and nothing runs. Starts the io threads.
  expected<uint16_t> start();
  // Graceful shutdown: stops accepting and answers new completion requests 503, lets the
  // requests in flight finish for up to `grace`, then ends each one left with an error (503, or
  // an `error` event on a stream) and closes the connections. Blocks; stop() follows.
  void drain(std::chrono::duration<double> grace);
  bool draining() const { return draining_.load(); }
  // Stops accepting, closes every connection (cancelling their requests), joins the threads.
  void stop();

  // For sessions (any thread).
  serve_context& context() { return ctx_; }
  const std::shared_ptr<post_gate>& gate() const { return gate_; }
  void session_ended(http_session* s);

 private:
  void accept();
  void on_accept(boost::system::error_code ec, boost::asio::ip::tcp::socket sock);
  void reject(boost::asio::ip::tcp::socket sock);
  void retry_accept(std::chrono::milliseconds after);
  void run_thread();
  void arm_stats();
  void stats_line();
  std::vector<std::shared_ptr<http_session>> open_sessions();

  serve_context& ctx_;
  std::shared_ptr<post_gate> gate_ = std::make_shared<post_gate>();
  std::mutex mu_;
  std::condition_variable cv_;
  std::unordered_map<http_session*, std::weak_ptr<http_session>> sessions_;
  std::atomic<size_t> live_{0};     // sessions
  std::atomic<size_t> refusing_{0}; // connections being answered 503
  bool stopping_ = false;
  std::atomic<bool> draining_{false};
  struct stats_state {
    uint64_t prompt = 0, generation = 0, finished = 0;
    std::chrono::steady_clock::time_point at = std::chrono::steady_clock::now();
    bool was_active = false;
  } stats_;               // on the acceptor's strand
  bool fd_burst_ = false; // accept is out of descriptors (logged once per burst)
  std::vector<std::thread> threads_;
  boost::asio::io_context ioc_; // after what its handlers refer to: destroyed before them
  std::optional<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work_;
  std::unique_ptr<boost::asio::ip::tcp::acceptor> acceptor_; // on its own strand
  std::unique_ptr<boost::asio::steady_timer> backoff_, stats_timer_;
};

} // namespace troupe::serve
