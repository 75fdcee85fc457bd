#include "http/http_server.hpp"

#include <boost/asio/ip/address.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/write.hpp>
#include <fmt/format.h>

#include "http/http_session.hpp"
#include "runtime/log.hpp"

namespace troupe::serve {

namespace {

using tcp = boost::asio::ip::tcp;
using error_code = boost::system::error_code;
using namespace std::chrono_literals;

// A connection beyond max_connections: answered 503 and closed without losing the answer (our
// FIN, then its bytes read and dropped for up to 2 s).
class refusal : public std::enable_shared_from_this<refusal> {
 public:
  refusal(tcp::socket sock, std::string text, std::atomic<size_t>& count)
    : sock_(std::move(sock)), timer_(sock_.get_executor()), text_(std::move(text)), count_(count) {}
  ~refusal() { --count_; }

  void start() {
    timer_.expires_after(2s);
    timer_.async_wait([self = shared_from_this()](error_code ec) {
      if (!ec)
        self->close();
    });
    boost::asio::async_write(sock_, boost::asio::buffer(text_),
                             [self = shared_from_this()](error_code ec, size_t) {
                               if (ec)
                                 return self->close();
                               self->sock_.shutdown(tcp::socket::shutdown_send, ec);
                               self->drain();
                             });
  }

 private:
  void drain() {
    sock_.async_read_some(boost::asio::buffer(buf_),
                          [self = shared_from_this()](error_code ec, size_t) {
                            if (ec)
                              return self->close();
                            self->drain();
                          });
  }
  void close() {
    error_code ec;
    timer_.cancel();
    sock_.close(ec);
  }

  tcp::socket sock_;
  boost::asio::steady_timer timer_;
  std::string text_;
  std::array<char, 4096> buf_{};
  std::atomic<size_t>& count_;
};

bool out_of_descriptors(const error_code& ec) {
  return ec == boost::asio::error::no_descriptors || // EMFILE
         ec == boost::system::errc::too_many_files_open_in_system ||
         ec == boost::asio::error::no_buffer_space || ec == boost::asio::error::no_memory;
}

constexpr size_t max_refusing = 256; // beyond: accept waits, the backlog holds the rest

} // namespace

http_server::http_server(serve_context& ctx) : ctx_(ctx) {}

http_server::~http_server() {
  stop();
}

expected<uint16_t> http_server::start() {
  const auto& o = ctx_.options;
  error_code ec;
  auto address = boost::asio::ip::make_address(o.host, ec);
  if (ec)
    return make_error(errc::invalid_argument, "host '{}' is not an IP address: {}", o.host,
                      ec.message());
  auto acceptor = std::make_unique<tcp::acceptor>(boost::asio::make_strand(ioc_));
  tcp::endpoint ep{address, o.port};
  if (acceptor->open(ep.protocol(), ec) ||
      acceptor->set_option(boost::asio::socket_base::reuse_address(true), ec) ||
      acceptor->bind(ep, ec) ||
      acceptor->listen(boost::asio::socket_base::max_listen_connections, ec)) {
    if (ec == boost::asio::error::address_in_use)
      return make_error(errc::unavailable,
                        "cannot listen on {}:{}: the port is already in use (another server?); "
                        "choose another port (model.yaml port: or --port)",
                        o.host, o.port);
    return make_error(errc::unavailable, "cannot listen on {}:{}: {}", o.host, o.port,
                      ec.message());
  }
  const auto port = acceptor->local_endpoint(ec).port();
  acceptor_ = std::move(acceptor);
  backoff_ = std::make_unique<boost::asio::steady_timer>(acceptor_->get_executor());
  stats_timer_ = std::make_unique<boost::asio::steady_timer>(acceptor_->get_executor());
  work_.emplace(ioc_.get_executor());
  for (int32_t i = 0; i < std::max(1, o.limits.threads); ++i)
    threads_.emplace_back([this] { run_thread(); });
  boost::asio::post(acceptor_->get_executor(), [this] {
    accept();
    arm_stats();
  });
  return port;
}

// On the acceptor's strand.
void http_server::arm_stats() {
  if (ctx_.options.stats_interval_s <= 0)
    return;
  stats_timer_->expires_after(std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      std::chrono::duration<double>(ctx_.options.stats_interval_s)));
  stats_timer_->async_wait([this](error_code ec) {
    if (ec || !acceptor_->is_open())
      return;
    stats_line();
    arm_stats();
  });
}

// Throughput since the last line, load now; quiet while idle (one line after activity ends).
void http_server::stats_line() {
  const auto g = ctx_.serving->gauges();
  const auto& m = *ctx_.metrics;
  const auto now = std::chrono::steady_clock::now();
  const uint64_t prompt = m.prompt_tokens.load(), generation = m.generation_tokens.load();
  uint64_t finished = 0;
  for (const auto& [reason, n] : m.finished())
    finished += n;
  const bool active = prompt != stats_.prompt || generation != stats_.generation ||
                      finished != stats_.finished || g.running > 0 || g.waiting > 0;
  const double dt = std::max(1e-9, std::chrono::duration<double>(now - stats_.at).count());
  if (active || stats_.was_active)
    log::info("stats: prompt {:.1f} tokens/s, generation {:.1f} tokens/s, running {}, waiting {}, "
              "KV cache {:.1f}% used, prefix cache hit rate {:.1f}%, {} requests ended (+{})",
              (prompt - stats_.prompt) / dt, (generation - stats_.generation) / dt, g.running,
              g.waiting, 100 * g.kv_usage(),
              g.prefix_lookups ? 100.0 * g.prefix_hits / g.prefix_lookups : 0.0, finished,
              finished - stats_.finished);
  stats_ = {prompt, generation, finished, now, active};
}

void http_server::run_thread() {
  for (;;) {
    try {
      ioc_.run();
      return;
    } catch (const std::exception& e) { // a handler's bug ends its connection, not the server
      log::error("http: a connection handler threw: {}", e.what());
    }
  }
}

void http_server::accept() {
  acceptor_->async_accept(boost::asio::make_strand(ioc_),
                          [this](error_code ec, tcp::socket s) { on_accept(ec, std::move(s)); });
}

void http_server::retry_accept(std::chrono::milliseconds after) {
  backoff_->expires_after(after);
  backoff_->async_wait([this](error_code ec) {
    if (!ec && acceptor_->is_open())
      accept();
  });
}

// On the acceptor's strand.
void http_server::on_accept(error_code ec, tcp::socket sock) {
  if (ec == boost::asio::error::operation_aborted || !acceptor_->is_open())
    return; // stopping
  if (ec) {
    if (!out_of_descriptors(ec)) {
      log::warn("http: accept failed: {}", ec.message());
      return accept();
    }
    if (!fd_burst_) // once per burst, not once per try
      log::warn("http: accept: {} with {} connections open; retrying every 100 ms (raise "
                "`ulimit -n` or lower http.max_connections)",
                ec.message(), live_.load());
    fd_burst_ = true;
    return retry_accept(100ms);
  }
  if (fd_burst_)
    log::info("http: accepting connections again");
  fd_burst_ = false;
  if (live_.load() >= static_cast<size_t>(ctx_.options.limits.max_connections)) {
    reject(std::move(sock));
    if (refusing_.load() >= max_refusing)
      return retry_accept(50ms);
    return accept();
  }
  auto s = std::make_shared<http_session>(*this, std::move(sock));
  {
    std::lock_guard lk(mu_);
    sessions_.emplace(s.get(), s);
    ++live_;
  }
  boost::asio::post(s->executor(), [s] { s->start(); });
  accept();
}

void http_server::reject(tcp::socket sock) {
  const auto max = ctx_.options.limits.max_connections;
  const auto body = error_body(
      {503,
       fmt::format("too many connections: the server holds {} (http.max_connections); retry "
                   "later",
                   max),
       {},
       {}});
  auto text = fmt::format("HTTP/1.1 503 Service Unavailable\r\nServer: troupe\r\nContent-Type: "
                          "application/json\r\nRetry-After: 1\r\nConnection: close\r\n"
                          "Content-Length: {}\r\n\r\n{}",
                          body.size(), body);
  ++refusing_;
  ctx_.metrics->count_request(503);
  std::make_shared<refusal>(std::move(sock), std::move(text), refusing_)->start();
}

void http_server::session_ended(http_session* s) {
  std::lock_guard lk(mu_);
  sessions_.erase(s);
  --live_;
  cv_.notify_all();
}

std::vector<std::shared_ptr<http_session>> http_server::open_sessions() {
  std::vector<std::shared_ptr<http_session>> open;
  std::lock_guard lk(mu_);
  for (auto& [p, w] : sessions_)
    if (auto s = w.lock())
      open.push_back(std::move(s));
  return open;
}

void http_server::drain(std::chrono::duration<double> grace) {
  if (!acceptor_ || draining_.exchange(true))
    return;
  boost::asio::post(acceptor_->get_executor(), [this] {
    error_code ec;
    acceptor_->close(ec);
    backoff_->cancel();
    stats_timer_->cancel();
  });
  log::info("http: shutting down: not accepting; {} requests in flight, waiting up to {:.0f} s",
            ctx_.in_flight.load(), grace.count());
  for (auto& s : open_sessions()) // idle connections close now, busy ones after their response
    boost::asio::post(s->executor(), [s] { s->drain(false); });
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(grace);
  while (ctx_.in_flight.load() > 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(20ms);
  if (const auto left = ctx_.in_flight.load(); left > 0) {
    log::warn("http: {} requests did not finish within {:.0f} s; ending them with an error", left,
              grace.count());
    for (auto& s : open_sessions())
      boost::asio::post(s->executor(), [s] { s->drain(true); });
  }
  std::unique_lock lk(mu_);
  if (!cv_.wait_for(lk, 5s, [&] { return live_.load() == 0; }))
    log::warn("http: {} connections still open after the grace period", live_.load());
}

void http_server::stop() {
  std::vector<std::shared_ptr<http_session>> open;
  {
    std::lock_guard lk(mu_);
    if (stopping_)
      return;
    stopping_ = true;
    for (auto& [p, w] : sessions_)
      if (auto s = w.lock())
        open.push_back(std::move(s));
  }
  if (!acceptor_)
    return; // never started
  boost::asio::post(acceptor_->get_executor(), [this] {
    error_code ec;
    acceptor_->close(ec);
    backoff_->cancel();
    stats_timer_->cancel();
  });
  for (auto& s : open) // each closes on its strand, cancelling its request
    boost::asio::post(s->executor(), [s] { s->close(); });
  open.clear();
  {
    std::unique_lock lk(mu_);
    if (!cv_.wait_for(lk, 10s, [&] { return live_.load() == 0; }))
      log::warn("http: {} connections still open after 10 s; stopping anyway", live_.load());
  }
  {
    std::lock_guard g(gate_->mu); // sinks that outlive the server post nothing more
    gate_->open = false;
  }
  work_.reset();
  ioc_.stop();
  for (auto& t : threads_)
    t.join();
  threads_.clear();
}

} // namespace troupe::serve
