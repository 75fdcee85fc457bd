// A minimal blocking HTTP/1.1 client for the serving tests: one connection per request
// ("Connection: close"), read to EOF, plus SSE parsing. Real sockets on 127.0.0.1.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>
#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

namespace troupe::test {

struct http_reply {
  int status = 0;
  std::string head, body;
  nlohmann::json json() const { return nlohmann::json::parse(body); }
};

inline std::string http_request_text(const std::string& method, const std::string& target,
                                     const std::string& body, const std::string& extra_headers) {
  return method + " " + target + " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" +
         "Content-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) +
         "\r\n" + extra_headers + "\r\n" + body;
}

inline http_reply parse_reply(std::string raw) {
  // Interim 1xx responses may come before the final one (RFC 9110 §15.2): skipped, as clients do.
  while (raw.rfind("HTTP/1.1 1", 0) == 0 && raw.find("\r\n\r\n") != std::string::npos)
    raw.erase(0, raw.find("\r\n\r\n") + 4);
  http_reply r;
  const auto split = raw.find("\r\n\r\n");
  r.head = raw.substr(0, split);
  r.body = split == std::string::npos ? "" : raw.substr(split + 4);
  if (r.head.size() > 12)
    r.status = std::stoi(r.head.substr(9, 3));
  return r;
}

inline http_reply http_call(uint16_t port, const std::string& method, const std::string& target,
                            const std::string& body = "", const std::string& extra_headers = "") {
  boost::asio::io_context ioc;
  boost::asio::ip::tcp::socket sock(ioc);
  sock.connect({boost::asio::ip::make_address("127.0.0.1"), port});
  boost::asio::write(sock,
                     boost::asio::buffer(http_request_text(method, target, body, extra_headers)));
  std::string raw;
  boost::system::error_code ec;
  boost::asio::read(sock, boost::asio::dynamic_buffer(raw), ec); // to EOF
  return parse_reply(raw);
}

// The JSON payloads of an SSE body's `data:` lines; "[DONE]" is returned as the string "[DONE]".
inline std::vector<nlohmann::json> sse_events(const std::string& body) {
  std::vector<nlohmann::json> out;
  size_t pos = 0;
  while ((pos = body.find("data: ", pos)) != std::string::npos) {
    const auto end = body.find("\n\n", pos);
    const auto payload = body.substr(pos + 6, end - pos - 6);
    out.push_back(payload == "[DONE]" ? nlohmann::json("[DONE]") : nlohmann::json::parse(payload));
    pos = end;
  }
  return out;
}

// The value of the first sample of metric `name` (any labels) on the server's /metrics.
inline double metric_value(uint16_t port, const std::string& name) {
  auto r = http_call(port, "GET", "/metrics");
  REQUIRE(r.status == 200);
  const auto at = r.body.find("\n" + name + "{");
  REQUIRE_MESSAGE(at != std::string::npos, name);
  const auto value = r.body.find("} ", at) + 2;
  return std::stod(r.body.substr(value, r.body.find('\n', value) - value));
}

} // namespace troupe::test
