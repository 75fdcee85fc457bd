// run_completion: one generation request from engine submission to the last byte on the socket.
#include <poll.h>
#include <sys/socket.h>

#include <chrono>
#include <ctime>

#include <boost/asio/write.hpp>
#include <boost/beast/http.hpp>
#include <fmt/format.h>

#include "cli/serve/http_server.hpp"
#include "engine/tokenizer/detokenizer.hpp"

namespace troupe::serve {

namespace {

namespace http = boost::beast::http;
using clock_type = std::chrono::steady_clock;

// True when the peer has closed (or reset) the connection.
bool peer_gone(boost::asio::ip::tcp::socket& sock) {
  pollfd p{.fd = sock.native_handle(), .events = POLLIN | POLLRDHUP, .revents = 0};
  if (::poll(&p, 1, 0) <= 0)
    return false;
  if (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL))
    return true;
  char c;
  return ::recv(p.fd, &c, 1, MSG_PEEK | MSG_DONTWAIT) == 0;
}

const char* finish_name(engine::finish_reason r) {
  switch (r) {
  case engine::finish_reason::stop:
    return "stop";
  case engine::finish_reason::length:
    return "length";
  default:
    return "abort";
  }
}

json bytes_of(std::string_view s) {
  json b = json::array();
  for (unsigned char c : s)
    b.push_back(c);
  return b;
}

// Logprobs of one token in the chat shape, or appended to the completions shape.
void add_logprobs(json& lp, const engine::request_output& o, const engine::tokenizer& tok,
                  bool chat) {
  const auto piece = std::string(tok.token_bytes(o.token));
  if (chat) {
    json top = json::array();
    for (size_t i = 0; i < o.top_ids.size(); ++i) {
      const auto t = std::string(tok.token_bytes(o.top_ids[i]));
      top.push_back({{"token", t}, {"logprob", o.top_logprobs[i]}, {"bytes", bytes_of(t)}});
    }
    lp["content"].push_back({{"token", piece},
                             {"logprob", o.logprob},
                             {"bytes", bytes_of(piece)},
                             {"top_logprobs", top}});
    return;
  }
  json top = json::object();
  for (size_t i = 0; i < o.top_ids.size(); ++i)
    top[std::string(tok.token_bytes(o.top_ids[i]))] = o.top_logprobs[i];
  lp["tokens"].push_back(piece);
  lp["token_logprobs"].push_back(o.logprob);
  lp["top_logprobs"].push_back(top);
}

struct stream_writer {
  boost::asio::ip::tcp::socket& sock;
  bool ok = true;
  void raw(const std::string& s) {
    boost::system::error_code ec;
    if (ok)
      boost::asio::write(sock, boost::asio::buffer(s), ec);
    ok = ok && !ec;
  }
  void event(const json& j) { raw("data: " + dump(j) + "\n\n"); }
};

// The engine request with its stop-string hook: a second detokenizer, fed on the engine thread.
engine::request make_engine_request(const completion_request& req, const model_info& m) {
  engine::request r{
      .prompt = req.prompt, .sampling = req.sampling, .stop_token_ids = req.stop_token_ids};
  if (!req.stop.empty()) {
    auto detok = std::make_shared<engine::incremental_detokenizer>(m.text->text, req.stop,
                                                                   req.skip_special_tokens);
    auto fed = std::make_shared<size_t>(0);
    r.stop_check = [detok, fed](seq_id, std::span<const token_id> generated) {
      for (; *fed < generated.size(); ++*fed)
        detok->push(generated[*fed]);
      return detok->stopped();
    };
  }
  return r;
}

} // namespace

int run_completion(serve_context& ctx, boost::asio::ip::tcp::socket& sock,
                   const completion_request& req, bool& keep_alive, unsigned http_version) {
  const auto arrival = clock_type::now();
  auto submitted = ctx.engine->submit(make_engine_request(req, ctx.model));
  auto reply_error = [&](const api_error& e) {
    http::response<http::string_body> res{static_cast<http::status>(e.status), http_version};
    res.set(http::field::content_type, "application/json");
    res.keep_alive(keep_alive);
    res.body() = error_body(e);
    res.prepare_payload();
    boost::system::error_code ec;
    http::write(sock, res, ec);
    return e.status;
  };
  if (!submitted) {
    const auto& err = submitted.error();
    const int status = err.code() == errc::resource_exhausted ? 503
                       : err.code() == errc::cancelled        ? 503
                                                              : 400;
    return reply_error({status, err.message(), {}, {}});
  }
  const auto [id, channel] = *submitted;
  ctx.metrics->prompt_tokens += req.prompt.size();

  const auto& tok = *ctx.model.text->text;
  engine::incremental_detokenizer detok(ctx.model.text->text, req.stop, req.skip_special_tokens);
  const std::string rid = fmt::format("{}-{}", req.chat ? "chatcmpl" : "cmpl", ctx.next_id++);
  const auto created = static_cast<int64_t>(std::time(nullptr));
  const char* object = req.chat ? "chat.completion" : "text_completion";
  json base = {
      {"id", rid},
      {"object", req.stream ? (req.chat ? "chat.completion.chunk" : "text_completion") : object},
      {"created", created},
      {"model", ctx.model.name}};
  stream_writer out{sock};
  bool sent_prompt_ids = !req.return_token_ids; // streams carry them in their first chunk
  if (req.stream) {
    keep_alive = false; // the stream ends with the connection
    out.raw("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            "Connection: close\r\n\r\n");
    if (req.chat) {
      json c = base;
      c["choices"] = json::array({{{"index", 0},
                                   {"delta", {{"role", "assistant"}, {"content", ""}}},
                                   {"logprobs", nullptr},
                                   {"finish_reason", nullptr}}});
      if (!sent_prompt_ids)
        c["prompt_token_ids"] = req.prompt;
      sent_prompt_ids = true;
      out.event(c);
    }
  }

  std::string text;
  std::vector<token_id> ids;
  json logprobs = req.chat ? json{{"content", json::array()}} : json::object();
  engine::finish_reason finish = engine::finish_reason::none;
  auto last = arrival;
  std::vector<engine::request_output> outs;
  while (finish == engine::finish_reason::none) {
    outs.clear();
    if (!channel->wait(outs, 50)) {
      if (!out.ok || peer_gone(sock)) {
        ctx.engine->cancel(id);
        keep_alive = false;
        return 499; // client closed the request
      }
      continue;
    }
    for (const auto& o : outs) {
      std::string delta;
      json lp_delta = req.chat ? json{{"content", json::array()}} : json::object();
      if (o.has_token) {
        const auto now = clock_type::now();
        (ids.empty() ? ctx.metrics->ttft : ctx.metrics->itl)
            .observe(std::chrono::duration<double>(now - last).count());
        last = now;
        ++ctx.metrics->generation_tokens;
        ids.push_back(o.token);
        delta = detok.push(o.token);
        if (req.top_logprobs >= 0) {
          add_logprobs(logprobs, o, tok, req.chat);
          add_logprobs(lp_delta, o, tok, req.chat);
        }
      }
      if (o.finish != engine::finish_reason::none) {
        finish = o.finish;
        delta += detok.finish();
      }
      text += delta;
      if (req.stream && (!delta.empty() || o.finish != engine::finish_reason::none)) {
        json c = base;
        json choice = {{"index", 0}};
        if (req.chat)
          choice["delta"] = delta.empty() ? json::object() : json{{"content", delta}};
        else
          choice["text"] = delta;
        choice["logprobs"] = req.top_logprobs >= 0 && o.has_token ? lp_delta : json();
        choice["finish_reason"] =
            o.finish != engine::finish_reason::none ? json(finish_name(o.finish)) : json();
        if (req.return_token_ids && o.has_token)
          choice["token_ids"] = json::array({o.token});
        c["choices"] = json::array({choice});
        if (!sent_prompt_ids)
          c["prompt_token_ids"] = req.prompt;
        sent_prompt_ids = true;
        out.event(c);
      }
    }
    if (!out.ok && finish == engine::finish_reason::none) {
      ctx.engine->cancel(id);
      return 499;
    }
  }
  ctx.metrics->e2e.observe(std::chrono::duration<double>(clock_type::now() - arrival).count());
  if (channel->failed()) {
    if (req.stream) {
      out.event(json::parse(error_body({500, "the engine failed; see the server log", {}, {}})));
      return 500;
    }
    return reply_error({500, "the engine failed; see the server log", {}, {}});
  }
  const auto n_prompt = static_cast<int64_t>(req.prompt.size());
  const auto n_out = static_cast<int64_t>(ids.size());
  json usage = {{"prompt_tokens", n_prompt},
                {"completion_tokens", n_out},
                {"total_tokens", n_prompt + n_out}};
  if (req.stream) {
    if (req.include_usage) {
      json c = base;
      c["choices"] = json::array();
      c["usage"] = usage;
      out.event(c);
    }
    out.raw("data: [DONE]\n\n");
    return 200;
  }
  json choice = {{"index", 0}};
  if (req.chat)
    choice["message"] = {{"role", "assistant"}, {"content", text}};
  else
    choice["text"] = text;
  choice["logprobs"] = req.top_logprobs >= 0 ? logprobs : json();
  choice["finish_reason"] = finish_name(finish);
  if (req.stop.size() && detok.stop_string())
    choice["stop_reason"] = *detok.stop_string();
  if (req.return_token_ids)
    choice["token_ids"] = ids;
  json body = base;
  body["object"] = object;
  body["choices"] = json::array({choice});
  body["usage"] = usage;
  if (req.return_token_ids)
    body["prompt_token_ids"] = req.prompt;
  http::response<http::string_body> res{http::status::ok, http_version};
  res.set(http::field::content_type, "application/json");
  res.keep_alive(keep_alive);
  res.body() = dump(body);
  res.prepare_payload();
  boost::system::error_code ec;
  http::write(sock, res, ec);
  if (ec)
    keep_alive = false;
  return 200;
}

} // namespace troupe::serve
