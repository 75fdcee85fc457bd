// One HTTP/1.1 connection on its own strand of the server's io_context: reads requests under the
// limits of http_limits (idle / read timeouts, header and body sizes, Expect: 100-continue),
// routes them, and writes responses in order. A completion (completion.hpp) writes through
// send() / finish(); every method runs on the strand. http_server.hpp says how a disconnect
// is told from a half-close.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/string_body.hpp>

#include "http/http_server.hpp"

namespace troupe::serve {

class completion_stream;

class http_session : public std::enable_shared_from_this<http_session> {
 public:
  using request_t = boost::beast::http::request<boost::beast::http::string_body>;
  using response_t = boost::beast::http::response<boost::beast::http::string_body>;

  http_session(http_server& server, boost::asio::ip::tcp::socket sock);
  ~http_session();
  http_session(const http_session&) = delete;
  http_session& operator=(const http_session&) = delete;

  void start();
  // Cancels the request in flight and closes the connection (the server's stop()).
  void close();
  // The server shuts down (on the strand): an idle connection closes now, a busy one after its
  // response; with `now`, the request in flight ends at once with an error.
  void drain(bool now);

  // For the completion in flight:
  serve_context& context() { return server_.context(); }
  boost::asio::any_io_executor executor() { return sock_.get_executor(); }
  std::shared_ptr<post_gate> gate() const { return server_.gate(); }
  // Queues bytes of the response; they are written in order.
  void send(std::string bytes);
  // The response is complete once the queued bytes are written: count `status`, then read the
  // next request (keep_alive) or close.
  void finish(int status, bool keep_alive);
  // A whole JSON response (an error or a completion body) that ends the response.
  void reply(int status, std::string body, bool keep_alive, const char* type = "application/json");
  // The peer sent EOF during the response (it may have half-closed).
  bool peer_eof() const { return peer_eof_; }

 private:
  const http_limits& limits() const;
  void wait_request();
  void arm_read_timer(double seconds);
  void read_header();
  void on_header(boost::system::error_code ec);
  void read_body();
  void read_failed(boost::system::error_code ec);
  void refuse(int status, std::string message);
  void on_request(boost::system::error_code ec);
  void route(request_t& req, const std::string& target);
  void write_more();
  void on_written(boost::system::error_code ec);
  void after_response();
  void watch_peer();
  void on_peer(boost::system::error_code ec);
  void client_gone();
  void linger_close();
  void drain();

  http_server& server_;
  boost::asio::ip::tcp::socket sock_;
  boost::asio::steady_timer read_timer_, write_timer_;
  boost::beast::flat_buffer buffer_;
  std::optional<boost::beast::http::request_parser<boost::beast::http::string_body>> parser_;
  std::shared_ptr<completion_stream> active_; // the completion producing the response
  std::string pending_, writing_;             // queued bytes, bytes being written
  std::string method_, target_;               // of the request being answered (debug log)
  unsigned version_ = 11;
  int status_ = 0;
  bool head_ = false, keep_alive_ = false, response_done_ = false, writing_now_ = false;
  bool reading_ = false, read_timed_out_ = false, resume_ = false, peer_eof_ = false;
  bool lingering_ = false, closed_ = false;
};

} // namespace troupe::serve
