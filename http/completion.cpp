// run_completion: one generation request from engine submission to the last byte on the socket.
#include <poll.h>
#include <sys/socket.h>

#include <chrono>
#include <ctime>

#include <boost/asio/write.hpp>
#include <boost/beast/http.hpp>
#include <fmt/format.h>

#include "engine/tokenizer/detokenizer.hpp"
#include "http/http_server.hpp"
#include "http/request_channel.hpp"

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

// A request the serving side refused: busy (503) or not valid for the engine (400).
int status_of(errc code) {
  const bool busy = code == errc::resource_exhausted || code == errc::cancelled ||
                    code == errc::unavailable; // no replica serving (restarting)
  return busy ? 503 : 400;
}

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

// One request's state from submission to the last byte; each step is a method.
class completion_run {
 public:
  completion_run(serve_context& ctx, boost::asio::ip::tcp::socket& sock,
                 const completion_request& req, bool& keep_alive, unsigned http_version)
    : ctx_(ctx), sock_(sock), req_(req), keep_alive_(keep_alive), version_(http_version),
      detok_(ctx.model.text->text, req.stop, req.skip_special_tokens), out_{sock},
      sent_prompt_ids_(!req.return_token_ids) {}

  int run() {
    auto channel = std::make_shared<request_channel>();
    auto submitted = ctx_.serving->submit(make_engine_request(req_, ctx_.model), channel);
    if (!submitted)
      return reply_error(
          {status_of(submitted.error().code()), submitted.error().message(), {}, {}});
    const seq_id id = *submitted;
    // The replica refuses a request (invalid, queue full) through the channel: the response
    // starts with the first output, so that a refusal still gets its own HTTP status.
    std::vector<engine::request_output> outs;
    while (outs.empty())
      if (!channel->wait(outs, 50) && peer_gone(sock_)) {
        ctx_.serving->cancel(id);
        keep_alive_ = false;
        return 499;
      }
    if (channel->failed() && !outs.front().has_token)
      return reply_error({status_of(channel->failure_code()), channel->failure(), {}, {}});
    ctx_.metrics->prompt_tokens += req_.prompt.size();
    open();
    for (bool got = true; finish_ == engine::finish_reason::none;) {
      for (const auto& o : outs)
        consume(o);
      if (finish_ == engine::finish_reason::none && (!out_.ok || (!got && peer_gone(sock_)))) {
        ctx_.serving->cancel(id); // frees its KV blocks
        keep_alive_ = false;
        return 499; // the client closed the request
      }
      outs.clear();
      if (finish_ == engine::finish_reason::none)
        got = channel->wait(outs, 50);
    }
    ctx_.metrics->e2e.observe(std::chrono::duration<double>(clock_type::now() - arrival_).count());
    if (channel->failed()) {
      const auto why = channel->failure();
      const api_error e{500,
                        why.empty() ? "the engine failed; see the server log"
                                    : "the engine failed: " + why,
                        {},
                        {}};
      if (!req_.stream)
        return reply_error(e);
      out_.event(json::parse(error_body(e)));
      return 500;
    }
    return req_.stream ? end_stream() : reply_body();
  }

 private:
  json base(bool chunk) const {
    const char* object =
        req_.chat ? (chunk ? "chat.completion.chunk" : "chat.completion") : "text_completion";
    return {{"id", id_}, {"object", object}, {"created", created_}, {"model", ctx_.model.name}};
  }

  json usage() const {
    const auto n_prompt = static_cast<int64_t>(req_.prompt.size());
    const auto n_out = static_cast<int64_t>(ids_.size());
    return {{"prompt_tokens", n_prompt},
            {"completion_tokens", n_out},
            {"total_tokens", n_prompt + n_out}};
  }

  void send_chunk(json choice) {
    json c = base(true);
    c["choices"] = json::array({std::move(choice)});
    if (!sent_prompt_ids_)
      c["prompt_token_ids"] = req_.prompt; // streams carry them in their first chunk
    sent_prompt_ids_ = true;
    out_.event(c);
  }

  // Streams: the SSE header, and for chat the assistant role chunk.
  void open() {
    if (!req_.stream)
      return;
    keep_alive_ = false; // the stream ends with the connection
    out_.raw("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
             "Connection: close\r\n\r\n");
    if (req_.chat)
      send_chunk({{"index", 0},
                  {"delta", {{"role", "assistant"}, {"content", ""}}},
                  {"logprobs", nullptr},
                  {"finish_reason", nullptr}});
  }

  // One engine output: metrics, detokenized text, logprobs, and a stream chunk.
  void consume(const engine::request_output& o) {
    std::string delta;
    json lp_delta = req_.chat ? json{{"content", json::array()}} : json::object();
    if (o.has_token) {
      const auto now = clock_type::now();
      (ids_.empty() ? ctx_.metrics->ttft : ctx_.metrics->itl)
          .observe(std::chrono::duration<double>(now - last_).count());
      last_ = now;
      ++ctx_.metrics->generation_tokens;
      ids_.push_back(o.token);
      delta = detok_.push(o.token);
      if (req_.top_logprobs >= 0) {
        add_logprobs(logprobs_, o, *ctx_.model.text->text, req_.chat);
        add_logprobs(lp_delta, o, *ctx_.model.text->text, req_.chat);
      }
    }
    const bool ends = o.finish != engine::finish_reason::none;
    if (ends) {
      finish_ = o.finish;
      delta += detok_.finish();
    }
    text_ += delta;
    // A token whose text is held back (part of a UTF-8 character or of a possible stop string)
    // still gets its chunk when the client asked for token ids (as vLLM), or its id is lost.
    const bool ids_chunk = req_.return_token_ids && o.has_token;
    if (!req_.stream || (delta.empty() && !ends && !ids_chunk))
      return;
    json choice = {{"index", 0}};
    if (req_.chat)
      choice["delta"] = delta.empty() ? json::object() : json{{"content", delta}};
    else
      choice["text"] = delta;
    choice["logprobs"] = req_.top_logprobs >= 0 && o.has_token ? lp_delta : json();
    choice["finish_reason"] = ends ? json(finish_name(o.finish)) : json();
    if (req_.return_token_ids && o.has_token)
      choice["token_ids"] = json::array({o.token});
    send_chunk(std::move(choice));
  }

  int end_stream() {
    if (req_.include_usage) {
      json c = base(true);
      c["choices"] = json::array();
      c["usage"] = usage();
      out_.event(c);
    }
    out_.raw("data: [DONE]\n\n");
    return 200;
  }

  int reply_body() {
    json choice = {{"index", 0}};
    if (req_.chat)
      choice["message"] = {{"role", "assistant"}, {"content", text_}};
    else
      choice["text"] = text_;
    choice["logprobs"] = req_.top_logprobs >= 0 ? logprobs_ : json();
    choice["finish_reason"] = finish_name(finish_);
    if (!req_.stop.empty() && detok_.stop_string())
      choice["stop_reason"] = *detok_.stop_string();
    if (req_.return_token_ids)
      choice["token_ids"] = ids_;
    json body = base(false);
    body["choices"] = json::array({choice});
    body["usage"] = usage();
    if (req_.return_token_ids)
      body["prompt_token_ids"] = req_.prompt;
    return write(200, dump(body));
  }

  int reply_error(const api_error& e) { return write(e.status, error_body(e)); }

  int write(int status, std::string body) {
    http::response<http::string_body> res{static_cast<http::status>(status), version_};
    res.set(http::field::content_type, "application/json");
    res.keep_alive(keep_alive_);
    res.body() = std::move(body);
    res.prepare_payload();
    boost::system::error_code ec;
    http::write(sock_, res, ec);
    if (ec)
      keep_alive_ = false;
    return status;
  }

  serve_context& ctx_;
  boost::asio::ip::tcp::socket& sock_;
  const completion_request& req_;
  bool& keep_alive_;
  unsigned version_;
  engine::incremental_detokenizer detok_;
  stream_writer out_;
  bool sent_prompt_ids_;
  const clock_type::time_point arrival_ = clock_type::now();
  clock_type::time_point last_ = arrival_;
  const std::string id_ = fmt::format("{}-{}", req_.chat ? "chatcmpl" : "cmpl", ctx_.next_id++);
  const int64_t created_ = static_cast<int64_t>(std::time(nullptr));
  std::string text_;
  std::vector<token_id> ids_;
  json logprobs_ = req_.chat ? json{{"content", json::array()}} : json::object();
  engine::finish_reason finish_ = engine::finish_reason::none;
};

} // namespace

int run_completion(serve_context& ctx, boost::asio::ip::tcp::socket& sock,
                   const completion_request& req, bool& keep_alive, unsigned http_version) {
  return completion_run(ctx, sock, req, keep_alive, http_version).run();
}

} // namespace troupe::serve
