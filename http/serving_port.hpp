// The seam between the HTTP front end and the serving side: a session submits a request with a
// sink for its outputs, cancels it, and asks for the engines' gauges on /metrics.
// actors/serving implements serving_port (the replica router), so http/ never includes actors/.
#pragma once

#include <memory>
#include <string>

#include "engine/scheduler/scheduler.hpp"
#include "http/metrics.hpp"

namespace troupe::serve {

// One request's outputs, called by the serving side on its own thread: implementations never
// block. After a push() whose output has finish != none, or after fail(), nothing more comes.
class request_sink {
 public:
  virtual ~request_sink() = default;
  virtual void push(const engine::request_output& o) = 0;
  // The request ended without finishing, possibly before any push(): it was refused (invalid,
  // queue full), its replica failed (unavailable), or the server is shutting down (cancelled).
  virtual void fail(const error& why) = 0;
};

class serving_port {
 public:
  virtual ~serving_port() = default;
  // Queues a request whose outputs go to `sink`; returns the id to cancel it with. Never
  // blocks. Returns an error only when no replica serves (unavailable); what the replica finds
  // later comes through sink->fail(), typed: invalid_argument (the request is invalid for the
  // engine: HTTP 400), resource_exhausted (the queue is full or the prompt cannot fit: 503).
  virtual expected<seq_id> submit(engine::request r, std::shared_ptr<request_sink> sink) = 0;
  // The choices of one prompt (OpenAI `n`): request i's outputs go to sinks[i]; their ids, in
  // order. They are admitted together and share the prompt's KV blocks (engine
  // scheduler::add_group). Errors as submit(), for all of them.
  virtual expected<std::vector<seq_id>>
  submit_choices(std::vector<engine::request> rs,
                 std::vector<std::shared_ptr<request_sink>> sinks) = 0;
  // Cancels a live request and frees its KV blocks (no-op once it finished). Never blocks.
  virtual void cancel(seq_id id) = 0;
  // The Prometheus text of /metrics: `m`'s counters and histograms plus the engines' gauges.
  virtual std::string metrics_text(const serve_metrics& m, const std::string& model) const = 0;
  // The engines' gauges summed (the periodic stats line).
  virtual engine_gauges gauges() const = 0;
};

} // namespace troupe::serve
