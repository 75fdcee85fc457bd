#include "actors/serving/replica_actor.hpp"

#include <chrono>

#include <caf/event_based_actor.hpp>
#include <caf/system_messages.hpp>

#include "runtime/log.hpp"

namespace troupe::serve {

namespace {

using replica = caf::stateful_actor<replica_state>;

void on_exported(replica* self, seq_id id, const engine::request_output& o);

// Hands outputs to their sinks; a finished request is forgotten. A prefill replica's exported
// requests go to their decode replica instead.
void deliver(replica* self, const std::vector<engine::request_output>& outs) {
  auto& st = self->state;
  for (const auto& o : outs) {
    if (st.exports.count(o.id)) {
      on_exported(self, o.id, o);
      continue;
    }
    auto it = st.live.find(o.id);
    if (it == st.live.end())
      continue; // cancelled meanwhile
    if (o.finish == engine::finish_reason::none) {
      it->second.sink->push(o);
      continue;
    }
    // Forgotten before the last push, so the router sees it ended once its client has.
    auto sink = std::move(it->second.sink);
    st.local_of.erase(it->second.router_id);
    st.live.erase(it);
    sink->push(o);
  }
}

void answer(const replica_state::pending_export& ex, troupe::error failure, uint64_t bytes = 0) {
  caf::anon_send(ex.job.decode, handed_atom::value,
                 handoff_result{ex.job.lease, std::move(failure), ex.first, bytes});
}

// Worker ranks: stops the pushers' batches of `lease` (they answer as cancelled).
void cancel_pushes(const replica_state& st, uint64_t lease) {
  if (auto p = st.spec.prefill->pusher.lock())
    p->cancel(lease);
  for (size_t r : st.spec.prefill->pushers)
    caf::anon_send(st.spec.ranks.workers[r], msg::cancel_atom::value, lease);
}

// The import of `id` is over: its landing blocks are free again.
void forget_import(replica_state& st, seq_id id) {
  auto it = st.imports.find(id);
  for (int32_t b : it->second.landing)
    if (b >= 0) // the cached positions' entries hold none
      st.landing_free.push_back(b);
  st.import_of.erase(it->second.lease);
  st.imports.erase(it);
}

// Nothing writes an import's blocks any more: the prefill side is not writing (not asked yet, or
// it answered) and no decode rank is copying it into the cache.
bool import_idle(const replica_state::pending_import& im) {
  return (!im.sent || im.first) && im.unstaging == 0;
}

// Ends every live request with `why` (the replica failed or stops).
void fail_live(replica_state& st, const troupe::error& why) {
  if (st.loop)
    (void)st.loop->fail_all(); // importing requests' blocks stay held
  for (auto it = st.exports.begin(); it != st.exports.end();) {
    auto& ex = it->second;
    if (ex.awaiting) // told to stop
      cancel_pushes(st, ex.job.lease);
    if (ex.awaiting && st.spec.prefill->pushers.empty()) { // the pusher answers: that ends it
      ex.prefilled = true;
      if (ex.pushed.failure.code() == errc::ok)
        ex.pushed.failure = why;
      ++it;
      continue;
    }
    answer(ex, why); // failed worker ranks may never answer
    st.export_of.erase(it->second.job.lease);
    it = st.exports.erase(it);
  }
  for (auto it = st.imports.begin(); it != st.imports.end();) {
    if (!import_idle(it->second)) { // released when the prefill side (or the ranks) answer
      it->second.cancelled = true;
      ++it;
      continue;
    }
    if (st.loop)
      (void)st.loop->release_held(it->first);
    const seq_id id = (it++)->first;
    forget_import(st, id);
  }
  st.landing_wait.clear();
  auto live = std::move(st.live);
  st.live.clear();
  st.local_of.clear();
  for (auto& [id, l] : live)
    l.sink->fail(why);
}

// Worker ranks: the replica no longer serves (its KV state is unknown). Once.
void fail_ranks(replica* self, std::string why) {
  auto& st = self->state;
  if (!st.broken.empty())
    return;
  st.broken = "deployment worker failure: " + why;
  log::error("replica: {}", st.broken);
  if (st.spec.health)
    st.spec.health->fail(st.broken);
  if (st.spec.ranks.on_failure)
    st.spec.ranks.on_failure(st.broken);
  fail_live(st, make_error(errc::unavailable, "{}", st.broken));
  st.group->clear();
  st.lane_of.clear();
  st.spec.gauges->publish(*st.loop);
}

void send_exports(replica* self);

// Worker ranks: every plan the engine starts (one per idle lane, or one made ahead) goes to
// every rank.
void pump(replica* self) {
  auto& st = self->state;
  if (!st.broken.empty())
    return;
  std::vector<engine::request_output> out;
  auto started = st.loop->plan(out);
  if (!started)
    return fail_ranks(self, started.error().message());
  for (const auto& [lane, plan] : *started) {
    const uint64_t ticket = st.group->start(plan->step);
    st.lane_of[ticket] = lane;
    auto m = caf::make_message(msg::execute_atom::value, ticket, *plan); // one copy for all ranks
    for (const auto& w : st.spec.ranks.workers)
      self->send(w, m);
    self->delayed_send(self, st.spec.ranks.timeout, msg::expire_atom::value, ticket);
  }
  deliver(self, out);
  send_exports(self);
}

// In-process: one step, synchronously.
void step(replica* self) {
  auto& st = self->state;
  st.step_queued = false;
  const auto t0 = std::chrono::steady_clock::now();
  auto out = st.loop->step();
  if (!out) {
    log::error("replica: engine step failed, ending every request: {}", out.error().to_string());
    fail_live(st, out.error());
  } else {
    const auto t1 = std::chrono::steady_clock::now();
    deliver(self, *out);
    log::debug(
        "replica: step took {:.0f} us, delivering {} outputs {:.0f} us",
        std::chrono::duration<double, std::micro>(t1 - t0).count(), out->size(),
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t1).count());
  }
  send_exports(self);
  st.spec.gauges->publish(*st.loop);
}

// More work may be there: in-process, queue a step behind the messages already waiting;
// worker ranks, plan the idle lanes now.
void kick(replica* self) {
  auto& st = self->state;
  if (!st.spec.exec)
    return pump(self);
  if (!st.step_queued && st.loop->has_work()) {
    st.step_queued = true;
    self->send(self, msg::step_atom::value);
  }
}

// Queues one request on the engine; its outputs go to `sink` (its refusal too).
void admit(replica* self, seq_id router_id, engine::request r, std::shared_ptr<request_sink> sink) {
  auto& st = self->state;
  auto id = st.loop->add_request(std::move(r));
  if (!id)
    return sink->fail(id.error());
  st.local_of[router_id] = *id;
  st.live[*id] = {router_id, std::move(sink)};
  kick(self);
  st.spec.gauges->publish(*st.loop); // waiting counts before any step
}

void on_submit(replica* self, msg::replica_job& job) {
  auto& st = self->state;
  if (!st.broken.empty()) {
    for (auto& j : job.siblings)
      j.sink->fail(make_error(errc::unavailable, "{}", st.broken));
    return job.sink->fail(make_error(errc::unavailable, "{}", st.broken));
  }
  if (!job.siblings.empty()) { // the choices of one prompt, sharing its KV blocks
    std::vector<msg::replica_job> jobs = std::move(job.siblings);
    jobs.insert(jobs.begin(), std::move(job));
    std::vector<engine::request> rs;
    for (auto& j : jobs)
      rs.push_back(std::move(j.request));
    auto ids = st.loop->add_group(std::move(rs));
    if (!ids) {
      for (auto& j : jobs)
        j.sink->fail(ids.error());
      return;
    }
    for (size_t i = 0; i < jobs.size(); ++i) {
      st.local_of[jobs[i].id] = (*ids)[i];
      st.live[(*ids)[i]] = {jobs[i].id, std::move(jobs[i].sink)};
    }
    kick(self);
    st.spec.gauges->publish(*st.loop); // waiting counts before any step
  } else {
    admit(self, job.id, std::move(job.request), std::move(job.sink));
  }
}

void on_cancel(replica* self, seq_id router_id) {
  auto& st = self->state;
  auto it = st.local_of.find(router_id);
  if (it == st.local_of.end())
    return; // finished already
  const seq_id id = it->second;
  st.local_of.erase(it);
  st.live.erase(id);
  (void)st.loop->cancel(id); // an importing request's blocks stay held
  if (auto im = st.imports.find(id); im != st.imports.end()) {
    if (import_idle(im->second)) {
      (void)st.loop->release_held(id);
      forget_import(st, id);
    } else { // released when the prefill side (or the copying ranks) answer
      im->second.cancelled = true;
      if (!im->second.first)
        self->send(im->second.prefill, abort_atom::value, im->second.lease);
    }
  }
  kick(self); // the next plan tells the executor it finished
  st.spec.gauges->publish(*st.loop);
}

void on_reply(replica* self, msg::worker_reply& r) {
  auto& st = self->state;
  if (!st.broken.empty())
    return;
  auto done = st.group->on_reply(r.rank, r.ticket, r.error, std::move(r.result));
  if (!done)
    return;
  auto lane = st.lane_of.extract(done->ticket);
  if (!done->result)
    return fail_ranks(self, done->result.error().message());
  std::vector<engine::request_output> out;
  if (auto ok = st.loop->complete(lane.mapped(), *done->result, out); !ok)
    return fail_ranks(self, ok.error().message());
  pump(self); // the next plan goes out before the outputs
  deliver(self, out);
  st.spec.gauges->publish(*st.loop);
}

// ---- Decode side ----

void on_import(replica* self, handoff_job& job) {
  auto& st = self->state;
  if (!st.broken.empty())
    return job.sink->fail(make_error(errc::unavailable, "{}", st.broken));
  if (!st.spec.decode)
    return job.sink->fail(make_error(errc::internal, "a handoff reached a replica that does not "
                                                     "decode for prefill replicas"));
  if (job.request.sampling.prompt_logprobs >= 0) { // scored where it is computed: here
    ++st.spec.decode->stats->local_prefills;
    return admit(self, job.id, std::move(job.request), std::move(job.sink));
  }
  engine::request for_prefill;
  for_prefill.prompt = job.request.prompt;
  for_prefill.sampling = job.request.sampling;
  for_prefill.stop_token_ids = job.request.stop_token_ids;
  if (job.request.constraint) // the prefill side samples the first token under its own copy
    for_prefill.constraint = job.request.constraint->fork();
  for_prefill.handoff = engine::kv_handoff::export_kv;
  job.request.handoff = engine::kv_handoff::import_kv;
  auto id = st.loop->add_request(std::move(job.request));
  if (!id)
    return job.sink->fail(id.error());
  st.local_of[job.id] = *id;
  st.live[*id] = {job.id, std::move(job.sink)};
  const auto lease = lease_of(job.id, 0);
  st.imports[*id] = {.lease = lease,
                     .prefill = std::move(job.prefill),
                     .fallbacks = std::move(job.fallbacks),
                     .request = std::move(for_prefill)};
  st.import_of[lease] = *id;
  kick(self);
  st.spec.gauges->publish(*st.loop);
}

// The reservation goes to this attempt's prefill replica, under its lease and deadline.
void send_export(replica* self, replica_state::pending_import& im) {
  const auto& role = *self->state.spec.decode;
  export_job job{.lease = im.lease,
                 .request = im.request,
                 .blocks = im.landing.empty() ? im.blocks : im.landing,
                 .cached_tokens = im.cached_tokens,
                 .decode_index = role.index,
                 .decode = caf::actor_cast<caf::actor>(self),
                 .deadline = std::chrono::steady_clock::now() + role.timeout};
  self->send(im.prefill, prefill_atom::value, std::move(job));
  im.sent = true;
  im.sent_at = std::chrono::steady_clock::now();
  self->delayed_send(self, role.timeout, lease_atom::value, im.lease);
}

// Staged ranks: how many landing blocks the prompt positions from the cached ones on take.
int32_t landing_needed(const replica_state& st, const replica_state::pending_import& im) {
  const int32_t bs = st.spec.options.block_size;
  const auto prompt = static_cast<int32_t>(im.request.prompt.size());
  return st.spec.decode->landing_blocks == 0 ? 0 : (prompt + bs - 1) / bs - im.cached_tokens / bs;
}

// Staged ranks: landing blocks for those positions (by position / block_size; the cached
// positions' entries are never read). False while too few are free.
bool reserve_landing(replica_state& st, replica_state::pending_import& im) {
  const int32_t need = landing_needed(st, im);
  if (need == 0)
    return true;
  if (st.landing_free.size() < static_cast<size_t>(need))
    return false;
  const int32_t count = im.cached_tokens / st.spec.options.block_size + need;
  im.landing.assign(static_cast<size_t>(count), -1);
  for (int32_t b = count - need; b < count; ++b) {
    im.landing[static_cast<size_t>(b)] = st.landing_free.back();
    st.landing_free.pop_back();
  }
  return true;
}

// Reservations made by the last plan: each goes to its prefill replica, or (a short or mostly
// cached prompt, or one larger than the whole landing area) is prefilled here. Over staged ranks
// they go out in order as landing blocks come back.
void send_exports(replica* self) {
  auto& st = self->state;
  if (!st.spec.decode)
    return;
  const auto& role = *st.spec.decode;
  std::vector<engine::kv_reservation> reserved;
  st.loop->take_reservations(reserved);
  bool local = false;
  for (auto& r : reserved) {
    auto& im = st.imports.at(r.id);
    im.blocks = std::move(r.blocks);
    im.cached_tokens = r.cached_tokens;
    const auto missing = static_cast<int32_t>(im.request.prompt.size()) - r.cached_tokens;
    const bool too_big = landing_needed(st, im) > role.landing_blocks;
    if (missing < role.min_prefill_tokens || too_big) {
      if (too_big)
        log::debug("replica: request {} is prefilled here: its {} tokens need more than the "
                   "{} landing blocks (disaggregation.staging_tokens)",
                   r.id, missing, role.landing_blocks);
      (void)st.loop->prefill_locally(r.id);
      ++role.stats->local_prefills;
      forget_import(st, r.id);
      local = true;
      continue;
    }
    st.landing_wait.push_back(r.id);
  }
  while (!st.landing_wait.empty()) {
    auto it = st.imports.find(st.landing_wait.front());
    if (it != st.imports.end() && !reserve_landing(st, it->second))
      break; // until landing blocks come back
    st.landing_wait.pop_front();
    if (it != st.imports.end()) // else cancelled meanwhile
      send_export(self, it->second);
  }
  if (local)
    kick(self);
}

// Both halves are here (the first token, and the notice that the KV is in place): decode.
void try_decode(replica* self, seq_id id) {
  auto& st = self->state;
  auto& im = st.imports.at(id);
  if (!im.first || !im.landed)
    return;
  if (!im.landing.empty() && !im.unstaged) { // staged: the ranks copy it into the cache first
    if (im.unstaging == 0) {
      im.unstaging = st.spec.ranks.workers.size();
      for (const auto& w : st.spec.ranks.workers)
        self->send(w, msg::unstage_atom::value,
                   msg::kv_unstage{.lease = im.lease,
                                   .landing_blocks = im.landing,
                                   .blocks = im.blocks,
                                   .begin = im.cached_tokens,
                                   .end = static_cast<int32_t>(im.request.prompt.size())});
    }
    return;
  }
  const seq_output first = *im.first;
  log::debug(
      "handoff {}: {} prompt tokens ({} cached here), {} KV bytes; first token after "
      "{:.1f} ms of prefill and transfer",
      im.lease, im.request.prompt.size(), im.cached_tokens, im.bytes,
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - im.sent_at)
          .count());
  forget_import(st, id);
  std::vector<engine::request_output> out;
  if (auto ok = st.loop->finish_import(id, first, out); !ok) {
    log::error("replica: handoff of request {}: {}", id, ok.error().to_string());
    return;
  }
  deliver(self, out);
  kick(self);
  st.spec.gauges->publish(*st.loop);
}

// The prefill side or the transfer failed and nothing writes the blocks any more.
void import_failed(replica* self, seq_id id, const troupe::error& why) {
  auto& st = self->state;
  auto& role = *st.spec.decode;
  auto& im = st.imports.at(id);
  if (!im.cancelled && !im.fallbacks.empty() && im.attempt < max_attempts) {
    // Another prefill replica fills the same reserved blocks, under a new lease.
    ++role.stats->failed;
    ++role.stats->retried;
    log::warn("replica: handoff of request {} failed ({}); trying another prefill replica", id,
              why.message());
    st.import_of.erase(im.lease);
    im.lease = lease_of(im.lease >> 8, ++im.attempt);
    st.import_of[im.lease] = id;
    im.prefill = std::move(im.fallbacks.front());
    im.fallbacks.erase(im.fallbacks.begin());
    im.first.reset();
    im.landed = false;
    im.notices = 0;
    im.aborted = false;
    im.bytes = 0;
    im.unstage_failure = {};
    return send_export(self, im);
  }
  const bool cancelled = im.cancelled;
  forget_import(st, id);
  if (cancelled) { // the client left: only the blocks remain
    (void)st.loop->release_held(id);
    kick(self); // its landing blocks may let a waiting handoff go
    st.spec.gauges->publish(*st.loop);
    return;
  }
  ++role.stats->failed;
  if (role.prefill_on_failure) {
    log::warn("replica: handoff of request {} failed ({}); prefilling it here", id, why.message());
    ++role.stats->local_prefills;
    (void)st.loop->prefill_locally(id);
    kick(self);
    return;
  }
  if (auto l = st.live.find(id); l != st.live.end()) {
    l->second.sink->fail(troupe::error(why).context("prefill/decode handoff"));
    st.local_of.erase(l->second.router_id);
    st.live.erase(l);
  }
  (void)st.loop->cancel(id);
  (void)st.loop->release_held(id);
  kick(self);
  st.spec.gauges->publish(*st.loop);
}

void on_handed(replica* self, handoff_result& r) {
  auto& st = self->state;
  auto it = st.import_of.find(r.lease);
  if (it == st.import_of.end())
    return; // expired and settled already
  const seq_id id = it->second;
  auto& im = st.imports.at(id);
  if (im.cancelled || r.failure.code() != errc::ok)
    return import_failed(self, id, r.failure);
  im.first = std::move(r.first);
  im.bytes = r.bytes;
  try_decode(self, id);
}

void on_landed(replica* self, uint64_t lease, bool cancelled) {
  auto& st = self->state;
  auto it = st.import_of.find(lease);
  if (it == st.import_of.end() || cancelled)
    return; // a cancelled batch: the prefill side reports it
  auto& im = st.imports.at(it->second);
  im.landed = ++im.notices >= st.spec.decode->notices;
  try_decode(self, it->second);
}

// A decode rank copied (or failed to copy) a staged handoff into the cache.
void on_unstaged(replica* self, const msg::kv_pushed& r) {
  auto& st = self->state;
  auto it = st.import_of.find(r.lease);
  if (it == st.import_of.end())
    return;
  const seq_id id = it->second;
  auto& im = st.imports.at(id);
  if (im.unstaging == 0)
    return;
  if (!r.error.empty() && im.unstage_failure.code() == errc::ok)
    im.unstage_failure = make_error(errc::io_error, "decode rank {}: {}", r.rank, r.error);
  if (--im.unstaging > 0)
    return;
  if (im.cancelled || im.unstage_failure.code() != errc::ok)
    return import_failed(self, id, im.unstage_failure);
  im.unstaged = true;
  try_decode(self, id);
}

void on_lease_expired(replica* self, uint64_t lease) {
  auto& st = self->state;
  auto it = st.import_of.find(lease);
  if (it == st.import_of.end())
    return;
  auto& im = st.imports.at(it->second);
  if (im.unstaging > 0) // landed: the ranks' copies into the cache end it
    return;
  const auto timeout = st.spec.decode->timeout;
  if (!im.cancelled)
    ++st.spec.decode->stats->expired;
  // Pushed but no notice came (the writes finished on the sender, so nothing lands any more), or
  // aborted a deadline ago and the prefill replica never answered (it is gone).
  if (im.first || im.aborted)
    return import_failed(self, it->second,
                         make_error(errc::timeout,
                                    "the prefill replica did not hand over within {} ms",
                                    timeout.count()));
  im.aborted = true;
  self->send(im.prefill, abort_atom::value, lease); // it answers with the failure
  self->delayed_send(self, timeout, lease_atom::value, lease);
}

// ---- Prefill side ----

// The replica's pusher, or its worker ranks' (each its share), push the prompt's KV while the
// step that completes it runs; each answers (kv_pushed_atom, kv_pushed).
void arm_pushes(replica* self, seq_id id, replica_state::pending_export& ex) {
  auto& st = self->state;
  const auto& role = *st.spec.prefill;
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
      ex.job.deadline - std::chrono::steady_clock::now());
  const msg::kv_push push{.lease = ex.job.lease,
                          .decode = ex.job.decode_index,
                          .seq = id,
                          .decode_blocks = ex.job.blocks,
                          .begin = ex.job.cached_tokens,
                          .end = static_cast<int32_t>(ex.job.request.prompt.size()),
                          .timeout_ms = std::max<int64_t>(left.count(), 1)};
  auto me = caf::actor_cast<caf::actor>(self);
  if (role.pushers.empty()) {
    if (auto p = role.pusher.lock())
      p->push(push, me);
    else // its backend is gone
      self->send(me, msg::kv_pushed_atom::value,
                 msg::kv_pushed{.lease = push.lease, .rank = 0, .error = "the replica stopped"});
  }
  for (size_t r : role.pushers)
    self->send(st.spec.ranks.workers[r], msg::push_atom::value, push);
  ex.awaiting = role.pushing_ranks();
  ex.pushed = {.id = id};
}

void on_prefill(replica* self, export_job& job) {
  auto& st = self->state;
  replica_state::pending_export ex{.job = std::move(job)};
  ex.first.id = 0;
  if (!st.broken.empty())
    return answer(ex, make_error(errc::unavailable, "{}", st.broken));
  if (!st.spec.prefill)
    return answer(ex, make_error(errc::internal, "this replica does not prefill for others"));
  if (std::chrono::steady_clock::now() >= ex.job.deadline)
    return answer(ex, make_error(errc::timeout, "the handoff's deadline passed before prefill"));
  auto id = st.loop->add_request(ex.job.request);
  if (!id)
    return answer(ex, id.error());
  st.export_of[ex.job.lease] = *id;
  auto& added = st.exports.emplace(*id, std::move(ex)).first->second;
  arm_pushes(self, *id, added); // before any plan holds it
  kick(self);
  st.spec.gauges->publish(*st.loop);
}

void end_export(replica* self, seq_id id, troupe::error failure, uint64_t bytes = 0) {
  auto& st = self->state;
  auto it = st.exports.find(id);
  (void)st.loop->release_held(id);
  answer(it->second, std::move(failure), bytes);
  st.export_of.erase(it->second.job.lease);
  st.exports.erase(it);
  kick(self); // blocks were freed
  st.spec.gauges->publish(*st.loop);
}

void on_pushed(replica* self, push_result& r);

// The prefill of an exported request ended (its KV was pushed meanwhile): the export ends once
// every pushing rank answered too.
void on_exported(replica* self, seq_id id, const engine::request_output& o) {
  auto& st = self->state;
  auto& ex = st.exports.at(id);
  ex.prefilled = true;
  if (o.finish != engine::finish_reason::handoff) {
    auto why = make_error(errc::cancelled, "the prefill replica ended the request ({})",
                          engine::to_string(o.finish));
    if (!ex.awaiting)
      return end_export(self, id, ex.pushed.failure.code() != errc::ok ? ex.pushed.failure : why);
    if (ex.pushed.failure.code() == errc::ok)
      ex.pushed.failure = std::move(why);
    return cancel_pushes(st, ex.job.lease); // their answers end it
  }
  ex.first = {.id = 0,
              .token = o.token,
              .logprob = o.logprob,
              .top_ids = o.top_ids,
              .top_logprobs = o.top_logprobs};
  if (ex.awaiting == 0) {
    auto done = std::move(ex.pushed);
    on_pushed(self, done);
  }
}

void on_pushed(replica* self, push_result& r) {
  auto& st = self->state;
  if (!st.exports.count(r.id))
    return;
  auto& stats = *st.spec.prefill->stats;
  if (r.failure.code() == errc::ok) {
    ++stats.handoffs;
    stats.bytes += r.bytes;
    stats.writes += r.writes;
    stats.transfer_seconds.observe(r.seconds);
  }
  end_export(self, r.id, std::move(r.failure), r.bytes);
}

// One pushing rank's batches of an export are done: once every one answered and the prefill
// ended, the push is.
void on_rank_pushed(replica* self, const msg::kv_pushed& r) {
  auto& st = self->state;
  auto it = st.export_of.find(r.lease);
  if (it == st.export_of.end())
    return;
  const seq_id id = it->second;
  auto& ex = st.exports.at(id);
  if (!ex.awaiting)
    return;
  auto& p = ex.pushed;
  p.bytes += r.bytes;
  p.writes += r.writes;
  p.seconds = std::max(p.seconds, r.seconds);
  if (!r.error.empty() && p.failure.code() == errc::ok) {
    p.failure = make_error(r.cancelled ? errc::cancelled : errc::unavailable, "prefill rank {}: {}",
                           r.rank, r.error);
    cancel_pushes(st, r.lease); // the other ranks' batches are of no use now
    if (!ex.prefilled) {        // nor the prefill: its cancelled output ends it
      (void)st.loop->cancel(id);
      kick(self);
    }
  }
  if (--ex.awaiting > 0 || !ex.prefilled)
    return;
  auto done = std::move(p);
  on_pushed(self, done);
}

void on_abort(replica* self, uint64_t lease) {
  auto& st = self->state;
  auto it = st.export_of.find(lease);
  if (it == st.export_of.end())
    return;
  auto& ex = st.exports.at(it->second);
  if (ex.awaiting) // they answer as cancelled
    cancel_pushes(st, lease);
  if (!ex.prefilled) { // its cancelled output ends the export (once the ranks answered)
    (void)st.loop->cancel(it->second);
    kick(self);
  }
}

void on_down(replica* self, const caf::down_msg& dm) {
  const auto& ws = self->state.spec.ranks.workers;
  for (size_t i = 0; i < ws.size(); ++i)
    if (ws[i].address() == dm.source)
      return fail_ranks(self,
                        fmt::format("rank {} is gone ({})", i, self->system().render(dm.reason)));
}

} // namespace

replica_state::~replica_state() {
  if (spec.health && spec.health->failed()) // taken down for a failure: say which
    fail_live(*this, make_error(errc::unavailable, "{}", spec.health->why()));
  else
    fail_live(*this, make_error(errc::cancelled, "the replica stopped (the server is shutting "
                                                 "down or the replica was taken down)"));
}

caf::behavior replica_actor(replica* self, replica_spec spec) {
  auto& st = self->state;
  st.spec = std::move(spec);
  if (st.spec.exec) {
    st.loop = std::make_unique<engine::engine_loop>(st.spec.options, *st.spec.exec);
  } else {
    const auto& r = st.spec.ranks;
    st.loop = std::make_unique<engine::engine_loop>(st.spec.options, r.stages, true);
    st.group = std::make_unique<worker_group>(r.workers.size(), r.answer_rank);
    for (const auto& w : r.workers)
      self->monitor(w);
    self->set_down_handler([self](caf::down_msg& dm) { on_down(self, dm); });
  }
  if (!st.spec.gauges)
    st.spec.gauges = std::make_shared<replica_gauges>();
  auto me = caf::actor_cast<caf::actor>(self);
  if (st.spec.decode) {
    for (int32_t b = st.spec.decode->landing_blocks - 1; b >= 0; --b)
      st.landing_free.push_back(b); // handed out lowest first
    for (const auto& conn : st.spec.decode->inbound)
      st.listeners.push_back(std::make_unique<notice_listener>(conn, me));
    for (const auto& w : st.spec.ranks.workers) // over worker ranks: their notices come here
      self->send(w, msg::kv_notify_atom::value);
  }
  st.spec.gauges->publish(*st.loop);
  return {
      [self](msg::submit_atom, msg::replica_job& job) { on_submit(self, job); },
      [self](msg::cancel_atom, seq_id id) { on_cancel(self, id); },
      [self](msg::step_atom) {
        step(self);
        kick(self);
      },
      [self](msg::worker_reply& r) { on_reply(self, r); },
      [self](import_atom, handoff_job& job) { on_import(self, job); },
      [self](handed_atom, handoff_result& r) { on_handed(self, r); },
      [self](landed_atom, uint64_t lease, bool cancelled) { on_landed(self, lease, cancelled); },
      [self](lease_atom, uint64_t lease) { on_lease_expired(self, lease); },
      [self](prefill_atom, export_job& job) { on_prefill(self, job); },
      [self](msg::kv_pushed_atom, const msg::kv_pushed& r) { on_rank_pushed(self, r); },
      [self](msg::unstaged_atom, const msg::kv_pushed& r) { on_unstaged(self, r); },
      [self](abort_atom, uint64_t lease) { on_abort(self, lease); },
      [self](msg::expire_atom, uint64_t ticket) {
        auto& st = self->state;
        if (st.broken.empty() && st.group->pending(ticket))
          fail_ranks(self, fmt::format("{} within {} ms", st.group->missing(ticket),
                                       st.spec.ranks.timeout.count()));
      },
  };
}

caf::actor spawn_replica(caf::actor_system& sys, replica_spec spec) {
  if (spec.exec)
    return sys.spawn<caf::detached>(replica_actor, std::move(spec));
  return sys.spawn(replica_actor, std::move(spec));
}

} // namespace troupe::serve
