// The OpenAI-compatible HTTP front end on Boost.Beast: an acceptor thread and one thread per
// connection (synchronous Beast). Each session parses, validates and tokenizes its requests on its
// own thread, submits them to the serving side (serving_port.hpp) and
// streams SSE chunks (or one JSON body) back; a client that disconnects has its request
// cancelled. start() and stop() block.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include <boost/asio/ip/tcp.hpp>

#include "http/metrics.hpp"
#include "http/openai_api.hpp"
#include "http/serving_port.hpp"

namespace troupe::serve {

struct server_options {
  std::string host = "127.0.0.1";
  uint16_t port = 8000; // 0: any free port
  std::string api_key;  // non-empty: "Authorization: Bearer <key>" on every route
  std::string version;
};

// Everything a session needs, shared read-only (engine and metrics are thread-safe).
struct serve_context {
  server_options options;
  model_info model;
  serving_port* serving = nullptr; // the replicas behind this endpoint
  serve_metrics* metrics = nullptr;
  std::atomic<uint64_t> next_id{1};
};

class http_server {
 public:
  explicit http_server(serve_context& ctx) : ctx_(ctx) {}
  ~http_server() { stop(); }

  // Binds and listens; returns the bound port (useful with port 0). Starts accepting.
  expected<uint16_t> start();
  // Stops accepting, shuts every open connection (cancelling their requests), joins.
  void stop();

 private:
  void accept_loop();
  void session(boost::asio::ip::tcp::socket& sock);

  serve_context& ctx_;
  boost::asio::io_context ioc_;
  std::unique_ptr<boost::asio::ip::tcp::acceptor> acceptor_;
  std::thread acceptor_thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::set<boost::asio::ip::tcp::socket*> sessions_;
  int active_ = 0;
  bool stopping_ = false;
};

// One POST /v1/chat/completions or /v1/completions request, on the session's thread: submits
// to the engine, then writes either the JSON response or the SSE stream. Returns the HTTP status
// it answered with; `keep_alive` is false when the connection must close (streams, disconnects).
int run_completion(serve_context& ctx, boost::asio::ip::tcp::socket& sock,
                   const completion_request& req, bool& keep_alive, unsigned http_version);

} // namespace troupe::serve
