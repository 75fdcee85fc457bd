#include "http/http_session.hpp"

#include <sstream>

#include <boost/asio/post.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/string.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/write.hpp>
#include <fmt/format.h>

#include "http/completion.hpp"
#include "runtime/log.hpp"

namespace troupe::serve {

namespace {

namespace http = boost::beast::http;
using tcp = boost::asio::ip::tcp;
using error_code = boost::system::error_code;

constexpr size_t read_chunk = 4096;
constexpr double linger_s = 1.0; // reading what a refused client still sends, before closing

// Compares in time that depends on the lengths only, never on where the first difference is, so
// the key cannot be guessed byte by byte from response times.
bool same_secret(std::string_view a, std::string_view b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < a.size(); ++i)
    diff |= static_cast<unsigned char>(a[i] ^ (i < b.size() ? b[i] : 0));
  return diff == 0;
}

bool authorised(const http_session::request_t& req, const std::string& key) {
  if (key.empty())
    return true;
  auto it = req.find(http::field::authorization);
  return it != req.end() &&
         same_secret(std::string_view(it->value().data(), it->value().size()), "Bearer " + key);
}

// The client went away or sent nothing more: nobody to answer.
bool gone(const error_code& ec) {
  return ec == http::error::end_of_stream || ec == http::error::partial_message ||
         ec == boost::asio::error::eof || ec == boost::asio::error::connection_reset ||
         ec == boost::asio::error::operation_aborted || ec == boost::asio::error::broken_pipe;
}

std::chrono::steady_clock::duration seconds(double s) {
  return std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      std::chrono::duration<double>(s));
}

} // namespace

http_session::http_session(http_server& server, tcp::socket sock)
  : server_(server), sock_(std::move(sock)), read_timer_(sock_.get_executor()),
    write_timer_(sock_.get_executor()) {}

http_session::~http_session() {
  server_.session_ended(this);
}

const http_limits& http_session::limits() const {
  return server_.context().options.limits;
}

void http_session::start() {
  error_code ec;
  sock_.set_option(tcp::no_delay(true), ec);
  wait_request();
}

// Between requests: a keep-alive connection may stay idle up to idle_timeout_s.
void http_session::wait_request() {
  if (closed_)
    return;
  if (buffer_.size() > 0) // pipelined bytes already here
    return read_header();
  arm_read_timer(limits().idle_timeout_s);
  reading_ = true;
  sock_.async_read_some(buffer_.prepare(read_chunk),
                        [self = shared_from_this()](error_code ec, size_t n) {
                          self->reading_ = false;
                          self->buffer_.commit(n);
                          if (ec || n == 0)
                            return self->close(); // idle too long, or the client left
                          self->read_header();
                        });
}

void http_session::arm_read_timer(double s) {
  read_timed_out_ = false;
  read_timer_.expires_after(seconds(s));
  read_timer_.async_wait([self = shared_from_this()](error_code ec) {
    if (ec || self->closed_ || self->read_timer_.expiry() > std::chrono::steady_clock::now())
      return;
    self->read_timed_out_ = true;
    error_code ignored;
    self->sock_.cancel(ignored); // the pending read completes with operation_aborted
  });
}

// From a request's first byte to its last: read_timeout_s in all.
void http_session::read_header() {
  head_ = false;
  parser_.emplace();
  parser_->header_limit(limits().max_header_bytes);
  parser_->body_limit(limits().max_body_bytes);
  arm_read_timer(limits().read_timeout_s);
  http::async_read_header(
      sock_, buffer_, *parser_,
      [self = shared_from_this()](error_code ec, size_t) { self->on_header(ec); });
}

void http_session::on_header(error_code ec) {
  if (ec)
    return read_failed(ec);
  const auto& req = parser_->get();
  version_ = req.version();
  const bool expect = boost::beast::iequals(req[http::field::expect], "100-continue");
  if (!expect || req.version() < 11 || parser_->is_done())
    return read_body();
  static const std::string go_on = "HTTP/1.1 100 Continue\r\n\r\n";
  boost::asio::async_write(sock_, boost::asio::buffer(go_on),
                           [self = shared_from_this()](error_code ec, size_t) {
                             if (ec)
                               return self->close();
                             self->read_body();
                           });
}

void http_session::read_body() {
  if (parser_->is_done())
    return on_request({});
  http::async_read(sock_, buffer_, *parser_,
                   [self = shared_from_this()](error_code ec, size_t) { self->on_request(ec); });
}

// A request that could not be read: a clear status where the client can still hear it.
void http_session::read_failed(error_code ec) {
  read_timer_.cancel();
  const auto& l = limits();
  if (read_timed_out_)
    return refuse(408, fmt::format("the request was not received within {} s (read_timeout_s)",
                                   l.read_timeout_s));
  if (ec == http::error::header_limit)
    return refuse(431, fmt::format("the request line and headers exceed {} bytes "
                                   "(max_header_bytes)",
                                   l.max_header_bytes));
  if (ec == http::error::body_limit)
    return refuse(
        413, fmt::format("the request body exceeds {} bytes (max_body_bytes)", l.max_body_bytes));
  if (gone(ec))
    return close();
  refuse(400, "malformed HTTP request: " + ec.message());
}

void http_session::refuse(int status, std::string message) {
  keep_alive_ = false;
  reply(status, error_body({status, std::move(message), {}, {}}), false);
}

void http_session::on_request(error_code ec) {
  if (ec)
    return read_failed(ec);
  read_timer_.cancel();
  request_t req = parser_->release();
  parser_.reset();
  keep_alive_ = req.keep_alive();
  head_ = req.method() == http::verb::head;
  response_done_ = false;
  const std::string target(req.target().substr(0, req.target().find('?')));
  method_ = std::string(req.method_string());
  target_ = target;
  try {
    route(req, target);
  } catch (const std::exception& e) { // JSON or allocation: this request fails, not the server
    log::error("http: {} {}: {}", std::string(req.method_string()), target, e.what());
    if (!active_ && !response_done_)
      reply(500, error_body({500, "internal error; see the server log", {}, {}}), false);
  }
  if (active_ && !response_done_)
    watch_peer();
}

void http_session::route(request_t& req, const std::string& target) {
  auto& ctx = context();
  const bool get = req.method() == http::verb::get || head_;
  const bool post = req.method() == http::verb::post;
  const bool completions = target == "/v1/chat/completions" || target == "/v1/completions";
  const bool open =
      ctx.options.open_health_metrics && (target == "/health" || target == "/metrics");
  if (!open && !authorised(req, ctx.options.api_key))
    return reply(401, error_body({401, "missing or invalid API key (Authorization: Bearer <key>)"}),
                 keep_alive_);
  if (completions && post && server_.draining()) {
    keep_alive_ = false;
    return reply(503, error_body({503, "the server is shutting down"}), false);
  }
  if (completions && post) {
    auto parsed = parse_completions(req.body(), target == "/v1/chat/completions", ctx.model);
    if (auto* e = std::get_if<api_error>(&parsed))
      return reply(e->status, error_body(*e), keep_alive_);
    active_ = std::make_shared<completion_stream>(
        shared_from_this(), std::move(std::get<std::vector<completion_request>>(parsed)),
        keep_alive_);
    return active_->start();
  }
  auto json_route = [&](const std::variant<json, api_error>& r) {
    if (auto* e = std::get_if<api_error>(&r))
      return reply(e->status, error_body(*e), keep_alive_);
    reply(200, dump(std::get<json>(r)), keep_alive_);
  };
  if (target == "/tokenize" && post)
    return json_route(tokenize(req.body(), ctx.model));
  if (target == "/detokenize" && post)
    return json_route(detokenize(req.body(), ctx.model));
  if (target == "/v1/models" && get) {
    json m = {{"id", ctx.model.name},   {"object", "model"},
              {"created", 0},           {"owned_by", "troupe"},
              {"root", ctx.model.name}, {"max_model_len", ctx.model.max_model_len}};
    return reply(200, dump(json{{"object", "list"}, {"data", json::array({m})}}), keep_alive_);
  }
  if (target == "/health" && get)
    return reply(200, "", keep_alive_);
  if (target == "/version" && get)
    return reply(200, dump(json{{"version", ctx.options.version}}), keep_alive_);
  if (target == "/metrics" && get)
    return reply(200, ctx.serving->metrics_text(*ctx.metrics, ctx.model.name), keep_alive_,
                 "text/plain; version=0.0.4");
  const bool known = completions || target == "/tokenize" || target == "/detokenize" ||
                     target == "/v1/models" || target == "/health" || target == "/version" ||
                     target == "/metrics";
  if (!known)
    return reply(404, error_body({404, fmt::format("no route {}", target)}), keep_alive_);
  reply(405,
        error_body({405, fmt::format("method {} is not allowed on {}",
                                     std::string(req.method_string()), target)}),
        keep_alive_);
}

void http_session::reply(int status, std::string body, bool keep_alive, const char* type) {
  response_t res{static_cast<http::status>(status), version_};
  res.set(http::field::server, "troupe");
  res.set(http::field::content_type, type);
  if (status == 401)
    res.set(http::field::www_authenticate, "Bearer");
  res.keep_alive(keep_alive_ && keep_alive);
  res.body() = std::move(body);
  res.prepare_payload();
  if (head_) { // the GET's headers, Content-Length included, without the body
    const auto n = res.body().size();
    res.body().clear();
    res.content_length(n);
  }
  std::ostringstream wire;
  wire << res;
  send(std::move(wire).str());
  finish(status, keep_alive);
}

void http_session::send(std::string bytes) {
  if (closed_)
    return;
  pending_ += bytes;
  write_more();
}

void http_session::write_more() {
  if (writing_now_ || pending_.empty() || closed_)
    return;
  writing_.swap(pending_);
  pending_.clear();
  writing_now_ = true;
  write_timer_.expires_after(seconds(limits().write_timeout_s));
  write_timer_.async_wait([self = shared_from_this()](error_code ec) {
    if (!ec && !self->closed_ && self->writing_now_ &&
        self->write_timer_.expiry() <= std::chrono::steady_clock::now())
      self->client_gone(); // not reading: a stream would hold its KV blocks forever
  });
  boost::asio::async_write(
      sock_, boost::asio::buffer(writing_),
      [self = shared_from_this()](error_code ec, size_t) { self->on_written(ec); });
}

void http_session::on_written(error_code ec) {
  writing_now_ = false;
  write_timer_.cancel();
  writing_.clear();
  if (ec)
    return client_gone();
  if (!pending_.empty())
    return write_more();
  if (response_done_)
    after_response();
}

void http_session::finish(int status, bool keep_alive) {
  status_ = status;
  keep_alive_ = keep_alive_ && keep_alive;
  response_done_ = true;
  if (!writing_now_ && pending_.empty()) // never in the caller's frame: it may be active_
    boost::asio::post(sock_.get_executor(),
                      [self = shared_from_this()] { self->after_response(); });
}

void http_session::after_response() {
  if (closed_ || !response_done_)
    return;
  context().metrics->count_request(status_);
  log::debug("http {} {} {}", method_, target_, status_);
  response_done_ = false;
  active_.reset();
  if (!keep_alive_ || peer_eof_ || server_.draining())
    return linger_close();
  if (!reading_)
    return wait_request();
  resume_ = true; // the watch read ends, then the next request is read
  error_code ignored;
  sock_.cancel(ignored);
}

// While a completion runs: one read pending, to see a disconnect at once (http_server.hpp).
void http_session::watch_peer() {
  if (reading_ || peer_eof_ || closed_)
    return;
  if (buffer_.size() > limits().max_header_bytes + limits().max_body_bytes)
    return; // a pipelining client far ahead: read it after this response
  reading_ = true;
  sock_.async_read_some(buffer_.prepare(read_chunk),
                        [self = shared_from_this()](error_code ec, size_t n) {
                          self->reading_ = false;
                          self->buffer_.commit(n);
                          self->on_peer(ec);
                        });
}

void http_session::on_peer(error_code ec) {
  if (closed_)
    return;
  if (lingering_) // the response ended while this read was pending
    return ec ? close() : drain();
  if (resume_) {
    resume_ = false;
    return ec && ec != boost::asio::error::operation_aborted ? close() : wait_request();
  }
  if (!ec) // pipelined bytes of the next request
    return watch_peer();
  if (ec != boost::asio::error::eof)
    return client_gone(); // reset: cancel now
  peer_eof_ = true;       // maybe a half-close: keep answering
  if (!active_)
    return;
  // A whole-body answer writes nothing until it is done, so nothing would draw the RST of a
  // client that closed (most clients close, few half-close). An interim 100 response (which
  // every HTTP/1.1 client must skip, RFC 9110 §15.2) draws it now; a half-closed client skips
  // it and gets its answer.
  if (!active_->streaming()) {
    if (version_ < 11)
      return;
    send("HTTP/1.1 100 Continue\r\n\r\n");
  }
  sock_.async_wait(tcp::socket::wait_error, [self = shared_from_this()](error_code ec) {
    if (!ec && !self->closed_ && self->active_)
      self->client_gone(); // the RST our last write drew
  });
}

void http_session::client_gone() {
  if (closed_)
    return;
  if (active_ || response_done_)
    context().metrics->count_request(499); // the client closed the request
  close();
}

// Ends a connection without resetting what the client still sends: our FIN first, then read
// and drop its bytes for up to a second, so that it reads our last response.
void http_session::linger_close() {
  error_code ec;
  sock_.shutdown(tcp::socket::shutdown_send, ec);
  if (ec)
    return close();
  arm_read_timer(linger_s);
  lingering_ = true;
  if (!reading_) // else the pending watch read goes on draining (on_peer)
    drain();
}

void http_session::drain() {
  reading_ = true;
  sock_.async_read_some(buffer_.prepare(read_chunk),
                        [self = shared_from_this()](error_code ec, size_t n) {
                          self->reading_ = false;
                          self->buffer_.commit(n);
                          self->buffer_.clear();
                          if (ec || self->closed_)
                            return self->close();
                          self->drain();
                        });
}

void http_session::drain(bool now) {
  if (closed_ || lingering_)
    return;
  if (active_ && !response_done_) {
    if (now)
      active_->shutdown();
    return;
  }
  if (!response_done_ && !writing_now_) // between requests, or reading one: nothing is owed
    close();
}

void http_session::close() {
  if (closed_)
    return;
  closed_ = true;
  auto done = std::move(active_);
  if (done)
    done->abort(); // frees its KV blocks
  read_timer_.cancel();
  write_timer_.cancel();
  error_code ec;
  sock_.shutdown(tcp::socket::shutdown_both, ec);
  sock_.close(ec);
  if (done) // destroyed later, never inside one of its own calls
    boost::asio::post(sock_.get_executor(), [done] {});
}

} // namespace troupe::serve
