// Fuzz harness: raw HTTP/1.1 requests through Beast's request parser under the limits the
// server sets (http_session::read_header: max_header_bytes, max_body_bytes), then the parsed
// request's body through its route's parser, as http_session::route does.
#include <cstddef>
#include <cstdint>
#include <string>

#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/string_body.hpp>

#include "fuzz/openai_dispatch.hpp"
#include "runtime/config.hpp"

namespace http = boost::beast::http;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const troupe::http_limits limits; // model.yaml's defaults
  http::request_parser<http::string_body> parser;
  parser.header_limit(limits.max_header_bytes);
  parser.body_limit(limits.max_body_bytes);
  parser.eager(true);
  boost::system::error_code ec;
  // As http::read over a buffer holding the whole input: put() until done, an error, or a
  // message that needs bytes the input does not have.
  size_t off = 0;
  while (!parser.is_done()) {
    const size_t n = parser.put(boost::asio::buffer(data + off, size - off), ec);
    off += n;
    if (ec == http::error::need_more && n > 0 && off < size) {
      ec = {};
      continue;
    }
    if (ec || n == 0)
      break;
  }
  if (ec || !parser.is_done())
    return 0;
  auto req = parser.release();
  const std::string target(req.target().substr(0, req.target().find('?')));
  if (req.method() == http::verb::post)
    troupe::fuzz::dispatch_body(target, req.body());
  (void)req.keep_alive();
  (void)req[http::field::authorization];
  return 0;
}
