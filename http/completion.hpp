// One /v1/chat/completions or /v1/completions request on its session's strand: submits it to the
// serving side (one engine request per choice: `n` per prompt) with a sink that posts outputs to
// the strand (no polling), turns them into the JSON body or SSE chunks (openai_response.hpp) and
// writes them through the session.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "http/http_session.hpp"
#include "http/openai_response.hpp"

namespace troupe::serve {

class strand_sink;

class completion_stream : public std::enable_shared_from_this<completion_stream> {
 public:
  // Holds the session alive until the session drops it (the response ended or it closed).
  // `reqs`: one per prompt (a completions body with a list of prompts), at least one.
  completion_stream(std::shared_ptr<http_session> session, std::vector<completion_request> reqs,
                    bool keep_alive);
  ~completion_stream();

  // Submits (never blocks); an error at once is answered with its HTTP status.
  void start();
  // The client is gone: cancels the request (its KV blocks are freed). Idempotent.
  void abort();
  // The server shuts down and the grace period is over: cancels the request and ends the
  // response with an error (503, or an `error` event on a stream).
  void shutdown();
  bool streaming() const { return req_.stream; }
  // On the strand: outputs of choice `choice` in order, then the failure that ended it, if any.
  void on_outputs(size_t choice, const std::vector<engine::request_output>& outs,
                  const std::optional<error>& failure);

 private:
  void open_stream();
  void observe(const engine::request_output& o);
  void cancel_running(); // every choice not yet finished
  size_t completion_tokens() const;
  void failed(const error& why);
  void event(const json& j);
  // The request ended (finish reason stop / length / abort): metrics and the access log line.
  void ended(const char* reason, int status);

  using clock_type = std::chrono::steady_clock;
  std::shared_ptr<http_session> session_;
  serve_context& ctx_;
  const std::vector<completion_request> reqs_; // one per prompt
  const completion_request& req_;              // the first: what all share (stream, n, ...)
  const int64_t prompt_tokens_;                // of every prompt
  const bool keep_alive_;
  const clock_type::time_point arrival_ = clock_type::now();
  clock_type::time_point last_ = arrival_;
  double ttft_ = -1, queue_ = -1;                       // seconds; -1 until known
  std::vector<std::unique_ptr<openai_response>> resps_; // one per choice
  openai_response& resp_;                               // choice 0: the id, the usage chunk
  std::vector<std::shared_ptr<strand_sink>> sinks_;
  std::vector<seq_id> ids_;
  std::vector<char> done_; // per choice: finished
  size_t num_done_ = 0;
  bool running_ = false, headers_sent_ = false, got_output_ = false;
};

} // namespace troupe::serve
