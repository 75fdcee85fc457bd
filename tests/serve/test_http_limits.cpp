// The HTTP front end's connection handling over raw sockets on 127.0.0.1 (golden tiny-qwen3 on
// the CPU backend): 431 / 413 / 408 / 503 limits, slowloris and idle connections closed, HEAD,
// Expect: 100-continue, a half-closed client still answered, the request of a client that resets
// or closes cancelled, a port in use as an error, a constant thread count however many
// connections are open, and accept backing off when out of file descriptors.
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <thread>

#include <doctest/doctest.h>
#include <fmt/format.h>

#include "actors/serving/deployment.hpp"
#include "golden.hpp"
#include "http_client.hpp"

using namespace troupe;
using namespace std::chrono_literals;
using json = nlohmann::json;

namespace {

// One blocking client socket whose reads give up after `timeout`.
struct conn {
  int fd = -1;
  explicit conn(uint16_t port, std::chrono::milliseconds timeout = 10s) {
    fd = ::socket(AF_INET, SOCK_STREAM, 0);
    timeval tv{.tv_sec = timeout.count() / 1000, .tv_usec = (timeout.count() % 1000) * 1000};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  }
  ~conn() { close(); }
  void close() {
    if (fd >= 0)
      ::close(fd);
    fd = -1;
  }
  bool send(const std::string& s) { return ::send(fd, s.data(), s.size(), MSG_NOSIGNAL) > 0; }
  // Reads until EOF, a timeout or an error; `eof` says whether it ended with EOF.
  std::string read_all(bool* eof = nullptr) {
    std::string out;
    char buf[4096];
    for (;;) {
      const auto n = ::recv(fd, buf, sizeof buf, 0);
      if (n > 0) {
        out.append(buf, static_cast<size_t>(n));
        continue;
      }
      if (eof)
        *eof = n == 0;
      return out;
    }
  }
  // Reads until `what` appears (or EOF / timeout).
  std::string read_until(const std::string& what) {
    std::string out;
    char buf[4096];
    while (out.find(what) == std::string::npos) {
      const auto n = ::recv(fd, buf, sizeof buf, 0);
      if (n <= 0)
        break;
      out.append(buf, static_cast<size_t>(n));
    }
    return out;
  }
  void reset() { // close with RST
    linger l{.l_onoff = 1, .l_linger = 0};
    ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
    close();
  }
};

std::string post_text(const std::string& target, const std::string& body, bool keep = false) {
  return "POST " + target + " HTTP/1.1\r\nHost: x\r\n" + (keep ? "" : "Connection: close\r\n") +
         "Content-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) +
         "\r\n\r\n" + body;
}

std::unique_ptr<serve::deployment> start(const std::filesystem::path& dir, http_limits limits,
                                         int32_t port = 0) {
  deployment_config c;
  c.model = dir.string();
  c.served_model_name = "tiny-qwen3";
  c.max_model_len = 256;
  c.num_kv_blocks = 64;
  c.device = "cpu"; // the CPU backend on any machine
  c.port = port;
  c.http = limits;
  auto d = serve::deployment::start(c, "test");
  REQUIRE_MESSAGE(d.has_value(), (d ? "" : d.error().to_string()));
  return std::move(*d);
}

// Tight limits so that each is quick to hit.
http_limits tight() {
  return {.threads = 2,
          .max_connections = 64,
          .max_header_bytes = 2048,
          .max_body_bytes = 4096,
          .read_timeout_s = 1,
          .idle_timeout_s = 1,
          .write_timeout_s = 5};
}

struct fixture {
  std::optional<std::filesystem::path> dir = test::golden_model("tiny-qwen3");
  std::unique_ptr<serve::deployment> d = dir ? start(*dir, tight()) : nullptr;
  uint16_t port() const { return d->port(); }
};

fixture* served() {
  static fixture* f = [] {
    auto* made = new fixture;
    test::at_teardown([made] { delete made; });
    return made;
  }();
  return f->d ? f : nullptr;
}

// troupe_requests_total{status="<status>"}, 0 when absent.
double requests_with(uint16_t port, int status) {
  auto r = test::http_call(port, "GET", "/metrics");
  const auto key = fmt::format("status=\"{}\"}} ", status); // troupe_requests_total's only
  const auto at = r.body.find(key);
  return at == std::string::npos ? 0 : std::stod(r.body.substr(at + key.size()));
}

template <class F>
bool eventually(F done, std::chrono::milliseconds within) {
  const auto deadline = std::chrono::steady_clock::now() + within;
  while (!done()) {
    if (std::chrono::steady_clock::now() > deadline)
      return false;
    std::this_thread::sleep_for(10ms);
  }
  return true;
}

bool blocks_freed(uint16_t port, std::chrono::milliseconds within) {
  return eventually([&] { return test::metric_value(port, "troupe_kv_blocks_in_use") == 0; },
                    within);
}

size_t threads_of_this_process() {
  size_t n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/task"))
    ++n;
  return n;
}

const json long_stream = {
    {"prompt", "Once upon a time"}, {"max_tokens", 200}, {"ignore_eos", true}, {"stream", true}};

} // namespace

TEST_CASE("http limits: oversized headers 431, oversized body 413, each with a JSON error") {
  auto* s = served();
  if (!s)
    return;
  conn big(s->port());
  big.send("GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + std::string(3000, 'a') + "\r\n\r\n");
  auto r = test::parse_reply(big.read_all());
  CHECK(r.status == 431);
  CHECK(r.json()["error"]["message"].get<std::string>().find("max_header_bytes") !=
        std::string::npos);
  conn body(s->port());
  // Only the headers: the 413 comes before the body is read.
  body.send("POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n");
  auto b = test::parse_reply(body.read_all());
  CHECK(b.status == 413);
  CHECK(b.json()["error"]["message"].get<std::string>().find("max_body_bytes") !=
        std::string::npos);
  CHECK(test::http_call(s->port(), "GET", "/health").status == 200);
}

TEST_CASE("http limits: a slow request gets 408, a slowloris is closed, idle connections close") {
  auto* s = served();
  if (!s)
    return;
  const auto t0 = std::chrono::steady_clock::now();
  conn slow(s->port());
  slow.send("POST /v1/completions HTTP/1.1\r\nHost: x\r\n");
  auto r = test::parse_reply(slow.read_all());
  CHECK(r.status == 408);
  CHECK(std::chrono::steady_clock::now() - t0 < 4s);
  // One header byte every 200 ms never finishes the headers: closed after read_timeout_s all
  // the same (the timeout is for the whole request, not per byte).
  conn loris(s->port());
  const auto t1 = std::chrono::steady_clock::now();
  bool refused = false;
  const std::string line = "GET /health HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
  for (char c : line) {
    if (!loris.send(std::string(1, c))) {
      refused = true;
      break;
    }
    std::this_thread::sleep_for(200ms);
    if (std::chrono::steady_clock::now() - t1 > 5s)
      break;
  }
  bool eof = false;
  auto got = loris.read_all(&eof);
  CHECK((refused || eof || got.find(" 408 ") != std::string::npos));
  CHECK(std::chrono::steady_clock::now() - t1 < 6s);
  // An idle connection, and a keep-alive one after its answer, are closed after idle_timeout_s.
  conn idle(s->port());
  const auto t2 = std::chrono::steady_clock::now();
  CHECK(idle.read_all(&eof).empty());
  CHECK(eof);
  CHECK(std::chrono::steady_clock::now() - t2 < 4s);
  conn kept(s->port());
  kept.send("GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
  auto answered = kept.read_all(&eof);
  CHECK(answered.find("HTTP/1.1 200") == 0);
  CHECK(eof);
}

TEST_CASE("http limits: beyond max_connections a client gets 503 and the server recovers") {
  auto dir = test::golden_model("tiny-qwen3");
  if (!dir)
    return;
  auto limits = tight();
  limits.max_connections = 3;
  limits.idle_timeout_s = 30;
  auto d = start(*dir, limits);
  std::vector<std::unique_ptr<conn>> held;
  for (int i = 0; i < 3; ++i)
    held.push_back(std::make_unique<conn>(d->port()));
  conn extra(d->port());
  auto r = test::parse_reply(extra.read_all());
  CHECK(r.status == 503);
  CHECK(r.json()["error"]["message"].get<std::string>().find("max_connections") !=
        std::string::npos);
  held.front()->close();
  bool ok = false;
  for (int i = 0; i < 100 && !ok; ++i) { // the server sees the close, then has room again
    std::this_thread::sleep_for(20ms);
    ok = test::http_call(d->port(), "GET", "/health").status == 200;
  }
  CHECK(ok);
}

TEST_CASE("http: HEAD is answered without a body on every GET route, and 100-continue") {
  auto* s = served();
  if (!s)
    return;
  for (const char* route : {"/health", "/v1/models", "/version", "/metrics"}) {
    CAPTURE(route);
    auto get = test::http_call(s->port(), "GET", route);
    conn c(s->port());
    c.send(std::string("HEAD ") + route + " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    auto head = test::parse_reply(c.read_all());
    CHECK(head.status == 200);
    CHECK(head.body.empty());
    if (std::string(route) != "/metrics") // its counters move between the two calls
      CHECK(head.head.find("Content-Length: " + std::to_string(get.body.size())) !=
            std::string::npos);
  }
  CHECK(test::http_call(s->port(), "HEAD", "/v1/completions").status == 405);

  conn c(s->port());
  const std::string body = R"({"prompt": "Hello world"})";
  c.send("POST /tokenize HTTP/1.1\r\nHost: x\r\nConnection: close\r\nExpect: 100-continue\r\n"
         "Content-Length: " +
         std::to_string(body.size()) + "\r\n\r\n");
  CHECK(c.read_until("\r\n\r\n") == "HTTP/1.1 100 Continue\r\n\r\n");
  c.send(body);
  auto r = test::parse_reply(c.read_all());
  CHECK(r.status == 200);
  CHECK(r.json()["count"].get<int>() > 0);
}

TEST_CASE("http: a client that half-closes after its request still gets the answer") {
  auto* s = served();
  if (!s)
    return;
  for (bool stream : {false, true}) {
    CAPTURE(stream);
    conn c(s->port(), 60s);
    json body = {{"prompt", "The"}, {"max_tokens", 6}, {"ignore_eos", true}, {"stream", stream}};
    c.send(post_text("/v1/completions", body.dump()));
    ::shutdown(c.fd, SHUT_WR);
    auto r = test::parse_reply(c.read_all());
    REQUIRE(r.status == 200);
    if (stream) {
      auto events = test::sse_events(r.body);
      REQUIRE(!events.empty());
      CHECK(events.back() == "[DONE]");
    } else {
      CHECK(r.json()["usage"]["completion_tokens"] == 6);
    }
  }
}

TEST_CASE("http: a reset client's request is cancelled at once and its KV blocks freed") {
  auto* s = served();
  if (!s)
    return;
  // RST (reset) while streaming or while waiting for a body; then FIN (close) mid-stream, which
  // the RST drawn by the stream's next write gives away; then FIN while waiting for a whole
  // body, which the RST drawn by an interim 100 response gives away.
  for (int mode : {0, 1, 2, 3}) {
    CAPTURE(mode);
    conn c(s->port());
    json body = long_stream;
    body["stream"] = mode != 1 && mode != 3;
    c.send(post_text("/v1/completions", body.dump()));
    if (body["stream"])
      c.read_until("data: ");
    // The gauges are published after each step: wait until they show this request.
    REQUIRE(eventually([&] { return test::metric_value(s->port(), "troupe_kv_blocks_in_use") > 0; },
                       10s));
    const auto gone = requests_with(s->port(), 499);
    if (mode >= 2)
      c.close();
    else
      c.reset();
    CHECK(blocks_freed(s->port(), 1500ms));
    // Counted as closed by the client (499), not answered: it was cut short, not finished.
    CHECK(eventually([&] { return requests_with(s->port(), 499) == gone + 1; }, 1500ms));
    CHECK(eventually(
        [&] { return test::metric_value(s->port(), "troupe_num_requests_running") == 0; }, 1500ms));
  }
}

TEST_CASE("http: a port in use is an error for that deployment, not an exception") {
  auto* s = served();
  if (!s)
    return;
  deployment_config c;
  c.model = s->dir->string();
  c.max_model_len = 256;
  c.num_kv_blocks = 64;
  c.device = "cpu"; // the CPU backend on any machine
  c.port = s->port();
  auto d = serve::deployment::start(c, "test");
  REQUIRE_FALSE(d.has_value());
  CHECK(d.error().code() == errc::unavailable);
  CHECK_MESSAGE(d.error().message().find("already in use") != std::string::npos,
                d.error().message());
  CHECK(test::http_call(s->port(), "GET", "/health").status == 200); // the first one still serves
}

TEST_CASE("http: connections do not add threads") {
  auto* s = served();
  if (!s)
    return;
  CHECK(test::http_call(s->port(), "GET", "/health").status == 200);
  const auto before = threads_of_this_process();
  std::vector<std::unique_ptr<conn>> open;
  for (int i = 0; i < 40; ++i)
    open.push_back(std::make_unique<conn>(s->port()));
  for (int i = 0; i < 40; i += 2) // half of them mid-request
    open[static_cast<size_t>(i)]->send("GET /health HTTP/1.1\r\nHost: x\r\n");
  std::this_thread::sleep_for(200ms);
  CHECK(threads_of_this_process() == before);
  CHECK(test::http_call(s->port(), "GET", "/health").status == 200);
}

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_UNDEFINED__)
constexpr bool sanitized = true;
#else
constexpr bool sanitized = false;
#endif

TEST_CASE("http: out of file descriptors, accept backs off instead of spinning, then recovers") {
  // UBSan's vptr check needs a descriptor (a pipe) and reports a false error in any thread while
  // the process has none: this runs in the release build only.
  if (sanitized) {
    MESSAGE("SKIP under the sanitizers (they need file descriptors)");
    return;
  }
  auto* s = served();
  if (!s)
    return;
  rlimit old{};
  REQUIRE(::getrlimit(RLIMIT_NOFILE, &old) == 0);
  // The limit bounds descriptor numbers: room above the highest open one for our 4 clients
  // (free numbers below it too, which the fillers take): the server's accept() gets EMFILE.
  rlim_t highest = 0;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/fd"))
    highest = std::max<rlim_t>(highest, std::stoul(e.path().filename().string()));
  rlimit tight_fds = old;
  tight_fds.rlim_cur = highest + 1 + 4;
  REQUIRE(::setrlimit(RLIMIT_NOFILE, &tight_fds) == 0);
  std::vector<std::unique_ptr<conn>> clients;
  for (int i = 0; i < 4; ++i)
    clients.push_back(std::make_unique<conn>(s->port()));
  std::vector<int> fillers; // whatever is left, so that not one accept() succeeds
  for (int fd; (fd = ::socket(AF_INET, SOCK_STREAM, 0)) >= 0;)
    fillers.push_back(fd);
  rusage r0{}, r1{};
  ::getrusage(RUSAGE_SELF, &r0);
  std::this_thread::sleep_for(1s);
  ::getrusage(RUSAGE_SELF, &r1);
  REQUIRE(::setrlimit(RLIMIT_NOFILE, &old) == 0);
  for (int fd : fillers)
    ::close(fd);
  auto cpu_s = [](const rusage& r) {
    return static_cast<double>(r.ru_utime.tv_sec + r.ru_stime.tv_sec) +
           static_cast<double>(r.ru_utime.tv_usec + r.ru_stime.tv_usec) / 1e6;
  };
  // A spinning accept loop burns a core for that second; backing off 100 ms costs next to none.
  CHECK(cpu_s(r1) - cpu_s(r0) < 0.3);
  // Descriptors again: accepting resumes (the held clients may already have idled out).
  CHECK(test::http_call(s->port(), "GET", "/health").status == 200);
}
