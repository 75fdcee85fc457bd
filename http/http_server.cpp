#include "http/http_server.hpp"

#include <sys/socket.h>

#include <boost/asio/ip/address.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>

#include "runtime/log.hpp"

namespace troupe::serve {

namespace {

namespace http = boost::beast::http;
using tcp = boost::asio::ip::tcp;
using request_t = http::request<http::string_body>;
using response_t = http::response<http::string_body>;

response_t reply(const request_t& req, int status, std::string body,
                 const char* type = "application/json") {
  response_t res{static_cast<http::status>(status), req.version()};
  res.set(http::field::server, "troupe");
  res.set(http::field::content_type, type);
  res.keep_alive(req.keep_alive());
  res.body() = std::move(body);
  res.prepare_payload();
  return res;
}

response_t reply_error(const request_t& req, const api_error& e) {
  auto res = reply(req, e.status, error_body(e));
  if (e.status == 401)
    res.set(http::field::www_authenticate, "Bearer");
  return res;
}

bool authorised(const request_t& req, const std::string& key) {
  if (key.empty())
    return true;
  auto it = req.find(http::field::authorization);
  return it != req.end() && it->value() == "Bearer " + key;
}

response_t models(const request_t& req, const serve_context& ctx) {
  json m = {{"id", ctx.model.name},   {"object", "model"},
            {"created", 0},           {"owned_by", "troupe"},
            {"root", ctx.model.name}, {"max_model_len", ctx.model.max_model_len}};
  return reply(req, 200, dump(json{{"object", "list"}, {"data", json::array({m})}}));
}

// A JSON route whose answer is a body or an error.
response_t json_route(const request_t& req, const std::variant<json, api_error>& r) {
  if (auto* e = std::get_if<api_error>(&r))
    return reply_error(req, *e);
  return reply(req, 200, dump(std::get<json>(r)));
}

} // namespace

expected<uint16_t> http_server::start() {
  boost::system::error_code ec;
  auto address = boost::asio::ip::make_address(ctx_.options.host, ec);
  if (ec)
    return make_error(errc::invalid_argument, "host '{}' is not an IP address: {}",
                      ctx_.options.host, ec.message());
  acceptor_ = std::make_unique<tcp::acceptor>(ioc_);
  tcp::endpoint ep{address, ctx_.options.port};
  if (acceptor_->open(ep.protocol(), ec) ||
      acceptor_->set_option(boost::asio::socket_base::reuse_address(true), ec) ||
      acceptor_->bind(ep, ec) ||
      acceptor_->listen(boost::asio::socket_base::max_listen_connections, ec))
    return make_error(errc::unavailable, "cannot listen on {}:{}: {}", ctx_.options.host,
                      ctx_.options.port, ec.message());
  const auto port = acceptor_->local_endpoint().port();
  acceptor_thread_ = std::thread([this] { accept_loop(); });
  return port;
}

void http_server::stop() {
  if (!acceptor_)
    return;
  {
    std::lock_guard lk(mu_);
    if (stopping_)
      return;
    stopping_ = true;
    for (auto* s : sessions_) // wakes reads and makes waits see a gone peer
      ::shutdown(s->native_handle(), SHUT_RDWR);
  }
  ::shutdown(acceptor_->native_handle(), SHUT_RDWR); // wakes accept()
  acceptor_thread_.join();
  std::unique_lock lk(mu_);
  cv_.wait(lk, [&] { return active_ == 0; });
}

void http_server::accept_loop() {
  for (;;) {
    boost::system::error_code ec;
    auto sock = std::make_unique<tcp::socket>(ioc_);
    acceptor_->accept(*sock, ec);
    std::lock_guard lk(mu_);
    if (stopping_)
      return;
    if (ec) {
      log::warn("http: accept failed: {}", ec.message());
      continue;
    }
    ++active_;
    std::thread([this, s = std::move(sock)]() mutable {
      session(*s);
      s.reset(); // before stop() may return and the io_context go away
      std::lock_guard lk2(mu_);
      --active_;
      cv_.notify_all();
    }).detach();
  }
}

void http_server::session(tcp::socket& sock) {
  {
    std::lock_guard lk(mu_);
    sessions_.insert(&sock);
    if (stopping_)
      ::shutdown(sock.native_handle(), SHUT_RDWR);
  }
  sock.set_option(tcp::no_delay(true));
  boost::beast::flat_buffer buffer;
  for (bool keep_alive = true; keep_alive;) {
    boost::system::error_code ec;
    http::request_parser<http::string_body> parser;
    parser.body_limit(64u << 20);
    http::read(sock, buffer, parser, ec);
    if (ec)
      break; // closed, or a request we cannot even parse
    const auto& req = parser.get();
    keep_alive = req.keep_alive();
    const std::string target(req.target().substr(0, req.target().find('?')));
    const bool get = req.method() == http::verb::get, post = req.method() == http::verb::post;
    int status = 0;
    std::optional<response_t> res;
    if (!authorised(req, ctx_.options.api_key)) {
      res = reply_error(req, {401, "missing or invalid API key (Authorization: Bearer <key>)"});
    } else if ((target == "/v1/chat/completions" || target == "/v1/completions") && post) {
      auto parsed = parse_completion(req.body(), target == "/v1/chat/completions", ctx_.model);
      if (auto* e = std::get_if<api_error>(&parsed))
        res = reply_error(req, *e);
      else
        status = run_completion(ctx_, sock, std::get<completion_request>(parsed), keep_alive,
                                req.version());
    } else if (target == "/tokenize" && post) {
      res = json_route(req, tokenize(req.body(), ctx_.model));
    } else if (target == "/detokenize" && post) {
      res = json_route(req, detokenize(req.body(), ctx_.model));
    } else if (target == "/v1/models" && get) {
      res = models(req, ctx_);
    } else if (target == "/health" && get) {
      res = reply(req, 200, "");
    } else if (target == "/version" && get) {
      res = reply(req, 200, dump(json{{"version", ctx_.options.version}}));
    } else if (target == "/metrics" && get) {
      res = reply(req, 200, ctx_.serving->metrics_text(*ctx_.metrics, ctx_.model.name),
                  "text/plain; version=0.0.4");
    } else {
      const bool known = target == "/v1/chat/completions" || target == "/v1/completions" ||
                         target == "/tokenize" || target == "/detokenize" ||
                         target == "/v1/models" || target == "/health" || target == "/version" ||
                         target == "/metrics";
      res = known ? reply_error(req, {405, fmt::format("method {} is not allowed on {}",
                                                       std::string(req.method_string()), target)})
                  : reply_error(req, {404, fmt::format("no route {}", target)});
    }
    if (res) {
      status = res->result_int();
      http::write(sock, *res, ec);
      if (ec)
        keep_alive = false;
    }
    ctx_.metrics->count_request(status);
  }
  boost::system::error_code ec;
  sock.shutdown(tcp::socket::shutdown_both, ec);
  std::lock_guard lk(mu_);
  sessions_.erase(&sock);
}

} // namespace troupe::serve
