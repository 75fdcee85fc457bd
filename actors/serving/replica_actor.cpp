#include "actors/serving/replica_actor.hpp"

#include <caf/event_based_actor.hpp>
#include <caf/system_messages.hpp>

#include "runtime/log.hpp"

namespace troupe::serve {

namespace {

using replica = caf::stateful_actor<replica_state>;

// Hands outputs to their sinks; a finished request is forgotten.
void deliver(replica_state& st, const std::vector<engine::request_output>& outs) {
  for (const auto& o : outs) {
    auto it = st.live.find(o.id);
    if (it == st.live.end())
      continue; // cancelled meanwhile
    it->second.sink->push(o);
    if (o.finish != engine::finish_reason::none) {
      st.local_of.erase(it->second.router_id);
      st.live.erase(it);
    }
  }
}

// Ends every live request with `why` (the replica failed or stops).
void fail_live(replica_state& st, const troupe::error& why) {
  if (st.loop)
    (void)st.loop->fail_all();
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

// Worker ranks: a plan for every idle lane with work goes to every rank.
void pump(replica* self) {
  auto& st = self->state;
  if (!st.broken.empty())
    return;
  std::vector<engine::request_output> out;
  auto lanes = st.loop->plan(out);
  if (!lanes)
    return fail_ranks(self, lanes.error().message());
  for (size_t lane : *lanes) {
    const auto& plan = st.loop->plan_of(lane);
    const uint64_t ticket = st.group->start(plan.step);
    st.lane_of[ticket] = lane;
    auto m = caf::make_message(msg::execute_atom::value, ticket, plan); // one copy for all ranks
    for (const auto& w : st.spec.ranks.workers)
      self->send(w, m);
    self->delayed_send(self, st.spec.ranks.timeout, msg::expire_atom::value, ticket);
  }
  deliver(st, out);
}

// In-process: one step, synchronously.
void step(replica* self) {
  auto& st = self->state;
  st.step_queued = false;
  auto out = st.loop->step();
  if (!out) {
    log::error("replica: engine step failed, ending every request: {}", out.error().to_string());
    fail_live(st, out.error());
  } else {
    deliver(st, *out);
  }
  st.spec.gauges->publish(*st.loop);
}

// More work may be there: in-process, queue a step behind the messages already waiting;
// worker ranks, plan the idle lanes now.
void kick(replica* self) {
  auto& st = self->state;
  if (!st.spec.exec)
    return pump(self);
  if (!st.step_queued && st.loop->has_unfinished()) {
    st.step_queued = true;
    self->send(self, msg::step_atom::value);
  }
}

void on_submit(replica* self, msg::replica_job& job) {
  auto& st = self->state;
  if (!st.broken.empty())
    return job.sink->fail(make_error(errc::unavailable, "{}", st.broken));
  auto id = st.loop->add_request(std::move(job.request));
  if (!id)
    return job.sink->fail(id.error());
  st.local_of[job.id] = *id;
  st.live[*id] = {job.id, std::move(job.sink)};
  kick(self);
  st.spec.gauges->publish(*st.loop); // waiting counts before any step
}

void on_cancel(replica* self, seq_id router_id) {
  auto& st = self->state;
  auto it = st.local_of.find(router_id);
  if (it == st.local_of.end())
    return; // finished already
  const seq_id id = it->second;
  st.local_of.erase(it);
  st.live.erase(id);
  (void)st.loop->cancel(id);
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
  deliver(st, out);
  st.spec.gauges->publish(*st.loop);
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
    st.loop = std::make_unique<engine::engine_loop>(st.spec.options, r.depth);
    st.group = std::make_unique<worker_group>(r.workers.size(), r.answer_rank);
    for (const auto& w : r.workers)
      self->monitor(w);
    self->set_down_handler([self](caf::down_msg& dm) { on_down(self, dm); });
  }
  if (!st.spec.gauges)
    st.spec.gauges = std::make_shared<replica_gauges>();
  st.spec.gauges->publish(*st.loop);
  return {
      [self](msg::submit_atom, msg::replica_job& job) { on_submit(self, job); },
      [self](msg::cancel_atom, seq_id id) { on_cancel(self, id); },
      [self](msg::step_atom) {
        step(self);
        kick(self);
      },
      [self](msg::worker_reply& r) { on_reply(self, r); },
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
