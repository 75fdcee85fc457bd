#include "actors/serving/layer_pusher.hpp"

#include <algorithm>

#include <caf/send.hpp>

namespace troupe::serve {

namespace tr = cluster::transfer;

layer_pusher::layer_pusher(engine::kv_layout kv, std::vector<tr::region_id> locals, int32_t rank,
                           std::optional<staging_area> staged)
  : kv_(std::move(kv)), locals_(std::move(locals)), rank_(rank), staging_(std::move(staged)) {
  for (const auto& a : kv_.allocations)
    on_gpu_ = on_gpu_ || a.on_gpu;
  if (staging_) {
    locals_ = {staging_->region};
    ring_.emplace(staging_->buffer.size());
  }
  waiter_ = std::jthread([this](std::stop_token s) { wait_loop(s); });
  poster_ = std::jthread([this](std::stop_token s) { post_loop(s); });
}

layer_pusher::~layer_pusher() {
  {
    std::lock_guard lock(mu_);
    for (auto& o : posting_) // the posting thread stops between chunks
      o->cancelled = true;
    for (auto& p : queue_)
      for (auto& [conn, t] : p.batches)
        conn->cancel(t);
  }
  poster_.request_stop();
  waiter_.request_stop();
  cv_.notify_all();
  if (poster_.joinable()) // it may still post: stopped before the waiting thread
    poster_.join();
  if (waiter_.joinable())
    waiter_.join();
}

void layer_pusher::link(uint32_t decode, decode_link link) {
  std::lock_guard lock(mu_);
  links_[decode] = std::move(link);
}

void layer_pusher::push(const msg::kv_push& p, caf::actor reply_to) {
  auto o = std::make_shared<outgoing>();
  o->spec = p;
  o->reply_to = std::move(reply_to);
  o->deadline = tr::clock::now() + std::chrono::milliseconds(p.timeout_ms);
  std::lock_guard lock(mu_);
  armed_[p.seq] = std::move(o);
}

void layer_pusher::cancel(uint64_t lease) {
  std::lock_guard lock(mu_);
  for (auto it = armed_.begin(); it != armed_.end();) {
    if (it->second->spec.lease != lease) {
      ++it;
      continue;
    }
    caf::anon_send(it->second->reply_to, msg::kv_pushed_atom::value,
                   msg::kv_pushed{.lease = lease,
                                  .rank = rank_,
                                  .error = "cancelled before its prefill ended",
                                  .cancelled = true});
    it = armed_.erase(it);
  }
  for (auto& o : posting_)
    o->cancelled = o->cancelled || o->spec.lease == lease;
  for (auto& p : queue_)
    if (p.answer.lease == lease)
      for (auto& [conn, t] : p.batches)
        conn->cancel(t);
  cv_.notify_all();
}

bool layer_pusher::step_begins(const step_plan& plan) {
  std::lock_guard lock(mu_);
  in_step_.clear();
  for (const auto& s : plan.seqs) {
    auto it = armed_.find(s.id);
    if (it == armed_.end() ||
        s.start_pos + static_cast<int32_t>(s.tokens.size()) != it->second->spec.end)
      continue; // a chunk before the prompt's last
    auto o = std::move(it->second);
    armed_.erase(it);
    o->step = plan.step;
    o->prefill_blocks = s.block_table;
    in_step_.push_back(o);
    posting_.push_back(std::move(o));
  }
  cv_.notify_all();
  return !in_step_.empty();
}

void layer_pusher::layer_written(int32_t, std::function<expected<void>()> written) {
  std::lock_guard lock(mu_);
  for (auto& o : in_step_)
    o->written.push_back(written);
  cv_.notify_all();
}

void layer_pusher::step_ends(bool ok) {
  std::lock_guard lock(mu_);
  for (auto& o : in_step_) {
    o->step_over = true;
    o->step_failed = !ok;
  }
  in_step_.clear();
  cv_.notify_all();
}

// Posts the pushes whose step began, those of one step together, layer by layer; each ends in
// queue_, where the waiting thread answers it.
void layer_pusher::post_loop(std::stop_token stop) {
  for (;;) {
    std::vector<std::shared_ptr<outgoing>> group;
    std::vector<pending> jobs;
    {
      std::unique_lock lock(mu_);
      if (!cv_.wait(lock, stop, [&] { return !posting_.empty(); }))
        return;
      // The step's pushes, as many as the staging ring has room for now (the others go next,
      // once it has room: their layers are all written by then).
      const uint64_t step = posting_.front()->step;
      while (!posting_.empty() && posting_.front()->step == step) {
        auto o = posting_.front();
        pending job{.answer = {.lease = o->spec.lease, .rank = rank_},
                    .reply_to = o->reply_to,
                    .started = tr::clock::now()};
        troupe::error failure;
        auto link = links_.find(o->spec.decode);
        if (link == links_.end())
          failure =
              make_error(errc::unavailable, "not linked to decode replica {}", o->spec.decode);
        if (ring_ && !failure) {
          const uint64_t bytes = link->second.plan->bytes_per_token(static_cast<uint32_t>(rank_)) *
                                 static_cast<uint64_t>(o->spec.end - o->spec.begin);
          if (bytes > ring_->size())
            failure = make_error(errc::resource_exhausted,
                                 "{} bytes of KV to stage, the staging ring holds {} "
                                 "(disaggregation.staging_tokens)",
                                 bytes, ring_->size());
          else if (bytes > 0 && !group.empty() && !(job.staged_at = ring_->allocate(bytes)))
            break; // next time round
          else if (bytes > 0 && group.empty() && !cv_.wait_until(lock, stop, o->deadline, [&] {
                     return o->cancelled || (job.staged_at = ring_->allocate(bytes)).has_value();
                   })) {
            if (stop.stop_requested())
              return;
            failure =
                make_error(errc::timeout, "no room in the KV staging ring before the deadline");
          }
        }
        if (!failure && o->cancelled)
          failure = make_error(errc::cancelled, "cancelled before it was sent");
        posting_.pop_front();
        if (failure) {
          if (job.staged_at)
            ring_->release(*job.staged_at);
          job.staged_at.reset();
          job.answer.cancelled = failure.code() == errc::cancelled;
          job.answer.error = failure.to_string();
          queue_.push_back(std::move(job));
          cv_.notify_all();
          continue;
        }
        job.link = link->second; // copies shared pointers: a re-link may replace it meanwhile
        group.push_back(std::move(o));
        jobs.push_back(std::move(job));
      }
    }
    if (!group.empty())
      post_layers(group, jobs);
    std::lock_guard lock(mu_);
    for (auto& job : jobs)
      queue_.push_back(std::move(job)); // the waiting thread answers and frees its room
    cv_.notify_all();
  }
}

// One step's pushes: each (push, decode rank) transfer gets each layer as soon as the backend
// wrote it (staged when the KV is); its last part carries the notice. A push that fails (its
// error in its answer) has its transfers aborted; the others go on.
void layer_pusher::post_layers(const std::vector<std::shared_ptr<outgoing>>& group,
                               std::vector<pending>& jobs) {
  constexpr uint64_t chunk_bytes = 16ull << 20;
  const int32_t layers = kv_.layer_end - kv_.layer_begin;
  struct transfer {
    size_t push = 0;
    conn_ptr conn;
    std::unique_ptr<tr::parted_transfer> parts;
    std::vector<std::vector<tr::write_range>> by_layer; // [stage layer]
    int32_t last = 0; // its last layer with anything to move (the stage's last when none has)
  };
  std::vector<transfer> transfers;
  auto fail = [&](size_t push, const troupe::error& e) {
    for (auto& t : transfers)
      if (t.push == push && t.parts) {
        t.parts->abort();
        t.parts.reset();
      }
    auto& answer = jobs[push].answer;
    if (answer.error.empty()) {
      answer.cancelled = e.code() == errc::cancelled;
      answer.error = e.to_string();
    }
  };
  for (size_t i = 0; i < group.size(); ++i) {
    const auto& o = *group[i];
    uint64_t at = jobs[i].staged_at.value_or(0);
    for (const auto& pl : jobs[i].link.pairs) {
      transfer t{.push = i, .conn = pl.conn, .parts = {}, .by_layer = {}, .last = layers - 1};
      uint64_t bytes = 0;
      for (int32_t l = 0; l < layers && jobs[i].answer.error.empty(); ++l) {
        auto& ranges = t.by_layer.emplace_back();
        if (auto ok =
                jobs[i].link.plan->ranges(pl.pair, o.prefill_blocks, o.spec.decode_blocks,
                                          o.spec.begin, o.spec.end, ranges, kv_.layer_begin + l);
            !ok)
          fail(i, ok.error());
        for (const auto& r : ranges)
          bytes += r.length;
        if (!ranges.empty())
          t.last = l;
      }
      if (!jobs[i].answer.error.empty())
        break;
      std::optional<tr::stage_area> area;
      if (staging_)
        area = tr::stage_area{.at = staging_->buffer.data() + at,
                              .staged = locals_.front(),
                              .offset = at,
                              .sources = kv_.allocations,
                              .device = on_gpu_};
      at += bytes;
      t.parts = std::make_unique<tr::parted_transfer>(*pl.conn,
                                                      tr::write_batch{.lease_id = o.spec.lease,
                                                                      .locals = locals_,
                                                                      .remotes = pl.remote,
                                                                      .ranges = {},
                                                                      .deadline = o.deadline},
                                                      chunk_bytes, area);
      transfers.push_back(std::move(t));
    }
  }
  auto deadline = group.front()->deadline;
  for (const auto& o : group)
    deadline = std::max(deadline, o->deadline);
  const auto& first = *group.front(); // every push of the group hears of the same layers
  for (int32_t l = 0; l < layers; ++l) {
    std::function<expected<void>()> written;
    troupe::error failure;
    {
      std::unique_lock lock(mu_);
      if (!cv_.wait_until(lock, deadline, [&] {
            return static_cast<int32_t>(first.written.size()) > l || first.step_over;
          }))
        failure = make_error(errc::timeout,
                             "the prefill did not write layer {} before the "
                             "deadline",
                             kv_.layer_begin + l);
      else if (static_cast<int32_t>(first.written.size()) <= l)
        failure = make_error(errc::unavailable, "the prefill step {} before layer {}",
                             first.step_failed ? "failed" : "ended", kv_.layer_begin + l);
      else
        written = first.written[static_cast<size_t>(l)];
    }
    if (!failure)
      if (auto ok = written(); !ok)
        failure = std::move(ok).error().context("waiting for the prefill's KV");
    if (failure) {
      for (size_t i = 0; i < group.size(); ++i)
        fail(i, failure);
      return;
    }
    for (auto& t : transfers) {
      if (!t.parts || l > t.last)
        continue;
      const auto& o = *group[t.push];
      auto ok = t.parts->post(t.by_layer[static_cast<size_t>(l)], l == t.last, [&] {
        std::lock_guard lock(mu_);
        return o.cancelled;
      });
      if (!ok) {
        t.parts.reset(); // it aborted itself
        fail(t.push, ok.error());
      }
    }
  }
  for (auto& t : transfers) {
    if (!t.parts)
      continue;
    auto& job = jobs[t.push];
    const auto& r = t.parts->result();
    job.batches.emplace_back(t.conn, r.last);
    job.answer.bytes += r.silent.bytes; // the last parts' the waiting thread counts
    job.answer.writes += r.silent.posted_writes;
  }
}

void layer_pusher::wait_loop(std::stop_token stop) {
  for (;;) {
    std::unique_lock lock(mu_);
    if (!cv_.wait(lock, stop, [&] { return !queue_.empty(); }))
      return;
    auto batches = queue_.front().batches; // stays queued (cancel() finds it) while waited on
    lock.unlock();
    troupe::error first;
    uint64_t bytes = 0, writes = 0;
    for (auto& [conn, t] : batches) {
      auto r = conn->wait(t);
      if (r) {
        bytes += r->bytes;
        writes += r->posted_writes;
      } else if (first.code() == errc::ok) {
        first = std::move(r).error();
      }
    }
    lock.lock();
    auto job = std::move(queue_.front());
    queue_.pop_front();
    if (job.staged_at) { // the provider no longer reads it
      ring_->release(*job.staged_at);
      cv_.notify_all();
    }
    lock.unlock();
    if (job.answer.error.empty() && first.code() != errc::ok) {
      job.answer.cancelled = first.code() == errc::cancelled;
      job.answer.error = first.to_string();
    }
    job.answer.bytes += bytes; // the silent parts' are counted already
    job.answer.writes += writes;
    job.answer.seconds = std::chrono::duration<double>(tr::clock::now() - job.started).count();
    caf::anon_send(job.reply_to, msg::kv_pushed_atom::value, std::move(job.answer));
  }
}

} // namespace troupe::serve
