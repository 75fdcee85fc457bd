#include "http/completion.hpp"

#include <ctime>
#include <deque>
#include <mutex>

#include <boost/asio/post.hpp>
#include <fmt/format.h>

#include "runtime/log.hpp"

namespace troupe::serve {

// The request's sink: the serving side's thread queues outputs and posts one drain to the
// session's strand per batch (never blocks; nothing after detach() or once the gate closed).
class strand_sink final : public request_sink, public std::enable_shared_from_this<strand_sink> {
 public:
  strand_sink(std::shared_ptr<post_gate> gate, boost::asio::any_io_executor ex,
              std::weak_ptr<completion_stream> to, size_t choice)
    : gate_(std::move(gate)), ex_(std::move(ex)), to_(std::move(to)), choice_(choice) {}

  void push(const engine::request_output& o) override {
    deliver([&] { q_.push_back(o); });
  }
  void fail(const error& why) override {
    deliver([&] {
      if (!failure_)
        failure_ = why;
    });
  }
  // Also lets go of the strand: the serving side may hold this sink after the io_context is gone,
  // and a strand must not outlive it.
  void detach() {
    std::lock_guard lk(mu_);
    detached_ = true;
    ex_ = {};
  }

 private:
  template <class F>
  void deliver(F add) {
    std::lock_guard lk(mu_);
    if (detached_)
      return;
    add();
    if (scheduled_)
      return;
    std::lock_guard g(gate_->mu);
    if (!gate_->open)
      return;
    scheduled_ = true;
    boost::asio::post(ex_, [self = shared_from_this()] { self->drain(); });
  }

  void drain() { // on the strand
    std::vector<engine::request_output> outs;
    std::optional<error> failure;
    {
      std::lock_guard lk(mu_);
      outs.assign(q_.begin(), q_.end());
      q_.clear();
      failure = std::move(failure_);
      failure_.reset();
      scheduled_ = false;
    }
    if (auto c = to_.lock())
      c->on_outputs(choice_, outs, failure);
  }

  std::shared_ptr<post_gate> gate_;
  boost::asio::any_io_executor ex_;
  std::weak_ptr<completion_stream> to_;
  size_t choice_;
  std::mutex mu_;
  std::deque<engine::request_output> q_;
  std::optional<error> failure_;
  bool scheduled_ = false, detached_ = false;
};

namespace {

// Choice prompt * n + i answers reqs[prompt].
std::vector<std::unique_ptr<openai_response>>
make_choices(const std::vector<completion_request>& reqs, const model_info& m, std::string id) {
  std::vector<std::unique_ptr<openai_response>> out;
  const auto created = static_cast<int64_t>(std::time(nullptr));
  for (const auto& req : reqs)
    for (int32_t i = 0; i < std::max(1, req.n); ++i)
      out.push_back(
          std::make_unique<openai_response>(req, m, id, created, static_cast<int32_t>(out.size())));
  return out;
}

int64_t prompt_tokens_of(const std::vector<completion_request>& reqs) {
  int64_t n = 0;
  for (const auto& r : reqs)
    n += static_cast<int64_t>(r.prompt.size());
  return n;
}

} // namespace

completion_stream::completion_stream(std::shared_ptr<http_session> session,
                                     std::vector<completion_request> reqs, bool keep_alive)
  : session_(std::move(session)), ctx_(session_->context()), reqs_(std::move(reqs)),
    req_(reqs_.at(0)), prompt_tokens_(prompt_tokens_of(reqs_)), keep_alive_(keep_alive),
    resps_(make_choices(reqs_, ctx_.model,
                        fmt::format("{}-{}", req_.chat ? "chatcmpl" : "cmpl", ctx_.next_id++))),
    resp_(*resps_[0]), done_(resps_.size(), 0) {}

completion_stream::~completion_stream() {
  for (auto& s : sinks_)
    s->detach();
  abort();
}

void completion_stream::start() {
  running_ = true;
  // Never blocks: the requests go to a replica as a message; their outputs (or a refusal found
  // later) come back through their sinks, posted to this strand. The `n` choices of a prompt go
  // together and share the prompt's KV blocks.
  for (const auto& req : reqs_) {
    std::vector<engine::request> rs;
    std::vector<std::shared_ptr<request_sink>> sinks;
    for (int32_t i = 0; i < std::max(1, req.n); ++i) {
      auto r = make_engine_request(req);
      if (i > 0) {
        // Choice i: seed + i, so that a single request with that seed gives the same tokens; the
        // constraint (fresh: nothing accepted yet) copied.
        if (r.sampling.has_seed)
          r.sampling.seed += static_cast<uint64_t>(i);
        if (r.constraint)
          r.constraint = r.constraint->fork();
      }
      rs.push_back(std::move(r));
      sinks_.push_back(std::make_shared<strand_sink>(session_->gate(), session_->executor(),
                                                     weak_from_this(), sinks_.size()));
      sinks.push_back(sinks_.back());
    }
    auto ids = ctx_.serving->submit_choices(std::move(rs), std::move(sinks));
    if (!ids) { // the prompts before it are cancelled
      for (seq_id id : ids_)
        ctx_.serving->cancel(id);
      running_ = false;
      const auto status = http_status(ids.error().code());
      return session_->reply(status, error_body({status, ids.error().message(), {}, {}}),
                             keep_alive_);
    }
    ids_.insert(ids_.end(), ids->begin(), ids->end());
  }
  ++ctx_.in_flight;
  log::debug("request {} received: prompts={} prompt_tokens={} max_tokens={} stream={} "
             "temperature={} choices={}",
             resp_.id(), reqs_.size(), prompt_tokens_, req_.sampling.max_tokens, req_.stream,
             req_.sampling.temperature, resps_.size());
  ctx_.metrics->prompt_tokens += static_cast<uint64_t>(prompt_tokens_);
}

size_t completion_stream::completion_tokens() const {
  size_t n = 0;
  for (const auto& r : resps_)
    n += r->completion_tokens();
  return n;
}

void completion_stream::cancel_running() {
  for (size_t i = 0; i < ids_.size(); ++i)
    if (!done_[i])
      ctx_.serving->cancel(ids_[i]); // frees its KV blocks; what it still sends is dropped
}

// Streams: the SSE header and the opening chunk, once, with the first output, so that a refusal
// that comes through the sink before any output (a full queue) still gets its own HTTP status.
void completion_stream::open_stream() {
  if (!req_.stream || headers_sent_)
    return;
  headers_sent_ = true;
  session_->send("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                 "Connection: close\r\n\r\n"); // the stream ends with the connection
  for (auto& r : resps_)
    if (auto c = r->opening_chunk())
      event(*c);
}

void completion_stream::abort() {
  if (!running_)
    return;
  running_ = false;
  cancel_running();
  ended("abort", 499);
}

void completion_stream::shutdown() {
  if (!running_)
    return;
  cancel_running();
  failed(make_error(errc::cancelled, "the server is shutting down; the request did not finish "
                                     "within the grace period"));
}

void completion_stream::ended(const char* reason, int status) {
  --ctx_.in_flight;
  const double e2e = std::chrono::duration<double>(clock_type::now() - arrival_).count();
  const auto tokens = static_cast<int64_t>(completion_tokens());
  ctx_.metrics->record({.finish_reason = reason,
                        .prompt_tokens = prompt_tokens_,
                        .generation_tokens = tokens,
                        .max_tokens = req_.sampling.max_tokens,
                        .e2e = e2e,
                        .ttft = ttft_,
                        .queue = queue_});
  log::info("request {} {} status={} finish={} prompt_tokens={} tokens={} ttft={} duration={:.3f}s",
            resp_.id(), req_.chat ? "/v1/chat/completions" : "/v1/completions", status, reason,
            prompt_tokens_, tokens, ttft_ >= 0 ? fmt::format("{:.3f}s", ttft_) : "-", e2e);
}

void completion_stream::event(const json& j) {
  session_->send("data: " + dump(j) + "\n\n");
}

void completion_stream::observe(const engine::request_output& o) {
  if (!o.has_token)
    return;
  const auto now = clock_type::now();
  const double since = std::chrono::duration<double>(now - last_).count();
  if (completion_tokens() == 0) {
    ttft_ = since;
    queue_ = o.queue_s;
    ctx_.metrics->ttft.observe(since);
  } else {
    ctx_.metrics->itl.observe(since);
  }
  last_ = now;
  ++ctx_.metrics->generation_tokens;
}

void completion_stream::on_outputs(size_t choice, const std::vector<engine::request_output>& outs,
                                   const std::optional<error>& failure) {
  auto& resp = *resps_.at(choice);
  for (const auto& o : outs) {
    if (!running_ || done_[choice])
      return; // aborted, or finished: nothing comes after the end
    got_output_ = true;
    open_stream();
    observe(o);
    auto chunk = resp.add(o);
    if (chunk)
      event(*chunk);
    if (!resp.finished())
      continue;
    done_[choice] = 1;
    if (o.finish == engine::finish_reason::none)
      ctx_.serving->cancel(ids_[choice]); // a stop string: the engine would go on
    if (++num_done_ < resps_.size())
      return;
    running_ = false;
    ended(engine::to_string(resp_.finish()), 200);
    if (!req_.stream) {
      std::vector<const openai_response*> all;
      for (const auto& r : resps_)
        all.push_back(r.get());
      return session_->reply(200, dump(openai_response::merged_body(all)), keep_alive_);
    }
    if (req_.include_usage)
      event(resp_.usage_chunk(static_cast<int64_t>(completion_tokens()), prompt_tokens_));
    session_->send("data: [DONE]\n\n");
    return session_->finish(200, false);
  }
  if (failure && running_ && !done_[choice]) {
    done_[choice] = 1; // it ended; the other choices are cancelled with the request
    cancel_running();
    failed(*failure);
  }
}

// The request ended without finishing: an error response while no header went out, else an SSE
// error event that ends the stream.
void completion_stream::failed(const error& why) {
  running_ = false;
  const auto code = why.code();
  const bool admission =
      !got_output_ && (code == errc::resource_exhausted || code == errc::invalid_argument ||
                       code == errc::not_found);
  const auto status = http_status(code);
  ended("abort", status);
  if (status >= 500)
    log::warn("request {}: {}", resp_.id(), why.message());
  const api_error e{status,
                    admission || code == errc::cancelled ? why.message()
                    : why.message().empty()              ? "the engine failed; see the server log"
                                                         : "the engine failed: " + why.message(),
                    {},
                    {}};
  if (!headers_sent_)
    return session_->reply(status, error_body(e), keep_alive_);
  event(json::parse(error_body(e)));
  session_->finish(status, false);
}

} // namespace troupe::serve
