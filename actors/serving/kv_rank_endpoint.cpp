#include "actors/serving/kv_rank_endpoint.hpp"

#include <caf/send.hpp>

#include "runtime/log.hpp"

namespace troupe::serve {

namespace tr = cluster::transfer;
using namespace std::chrono_literals;

namespace {

constexpr auto poll = 200ms; // how often the accepting and listening threads look at their stop

expected<std::vector<tr::region_descriptor>> parse_regions(const msg::kv_rank& r) {
  std::vector<tr::region_descriptor> out;
  for (const auto& bytes : r.regions) {
    auto d = tr::region_descriptor::parse(bytes);
    if (!d)
      return std::move(d).error();
    out.push_back(*d);
  }
  return out;
}

} // namespace

expected<std::unique_ptr<kv_rank_endpoint>> kv_rank_endpoint::open(const kv_endpoint_options& o,
                                                                   const engine::kv_layout& layout,
                                                                   int32_t rank) {
  if (o.role != "decode" && o.role != "prefill")
    return make_error(errc::invalid_argument, "KV role '{}': expected decode or prefill", o.role);
  if (o.cuda_ipc && o.staging == "always")
    return make_error(errc::invalid_argument,
                      "KV by CUDA IPC is never staged: disaggregation.staging is 'always'");
  auto net = open_net_transport(o.provider, o.host, o.cuda_ipc);
  if (!net)
    return std::move(net).error();
  auto e = std::unique_ptr<kv_rank_endpoint>(new kv_rank_endpoint());
  e->net_ = std::move(*net);
  e->role_ = o.role;
  e->rank_ = rank;
  e->kv_ = layout;
  for (const auto& a : layout.allocations)
    e->on_gpu_ = e->on_gpu_ || a.on_gpu;
  bool staged = o.staging == "always";
  if (!staged) {
    auto ok = e->register_kv();
    if (!ok && ok.error().code() == errc::unsupported && e->on_gpu_ && o.staging == "auto" &&
        !o.cuda_ipc) {
      staged = true;
      log::info("KV rank {}: {}; staging GPU KV through page-locked host memory", rank,
                ok.error().message());
    } else if (!ok) {
      return std::move(ok).error().context(o.cuda_ipc             ? "the KV cache by CUDA IPC"
                                           : o.staging == "never" ? "disaggregation.staging: never"
                                                                  : "the KV cache");
    }
  }
  if (staged)
    TROUPE_TRY_VOID(e->open_staging(o));
  if (o.role == "decode") {
    auto at = e->net_.listen(0);
    if (!at)
      return std::move(at).error().context("listening for prefill ranks");
    e->self_.endpoint = tr::endpoint_address{e->net_.transport->name(), *at}.serialize();
    e->main_ = std::jthread([p = e.get()](std::stop_token s) { p->accept_loop(s); });
    if (staged)
      e->copier_ = std::jthread([p = e.get()](std::stop_token s) { p->unstage_loop(s); });
  } else {
    e->main_ = std::jthread([p = e.get()](std::stop_token s) { p->wait_loop(s); });
    e->copier_ = std::jthread([p = e.get()](std::stop_token s) { p->post_loop(s); });
  }
  return e;
}

// Registers every KV allocation (none on failure) and publishes them.
expected<void> kv_rank_endpoint::register_kv() {
  auto& t = *net_.transport;
  for (const auto& a : kv_.allocations) {
    auto id = t.register_memory(a.base, a.bytes,
                                a.on_gpu ? tr::memory_kind::cuda : tr::memory_kind::host);
    if (!id) {
      for (auto done : locals_)
        (void)t.deregister(done);
      locals_.clear();
      return std::move(id).error().context(
          fmt::format("registering {} bytes of KV cache with {}", a.bytes, t.name()));
    }
    locals_.push_back(*id);
  }
  self_.layout = kv_;
  for (size_t i = 0; i < locals_.size(); ++i) {
    auto d = t.describe(locals_[i]);
    if (!d)
      return std::move(d).error();
    self_.regions.push_back(d->serialize());
    self_.layout.allocations[i].base = nullptr; // what travels has no addresses but the regions'
  }
  return {};
}

// The staging buffer, registered in place of the KV: a ring of `staging_tokens` tokens of this
// rank's KV (prefill), or that many tokens' landing blocks (decode).
expected<void> kv_rank_endpoint::open_staging(const kv_endpoint_options& o) {
  if (o.staging_tokens <= 0)
    return make_error(errc::invalid_argument, "staging KV needs room for some tokens, got {}",
                      o.staging_tokens);
  const uint64_t token =
      kv_.token_bytes() * 2 * static_cast<uint64_t>(kv_.layer_end - kv_.layer_begin);
  uint64_t bytes = token * static_cast<uint64_t>(o.staging_tokens);
  if (role_ == "decode") {
    landing_ = tr::landing_layout(kv_, (o.staging_tokens + kv_.block_size - 1) / kv_.block_size);
    bytes = landing_.allocations.front().bytes;
  }
  auto buffer = tr::staging_buffer::allocate(bytes, on_gpu_);
  if (!buffer)
    return std::move(buffer).error().context(fmt::format(
        "the KV staging buffer ({} tokens, disaggregation.staging_tokens)", o.staging_tokens));
  staging_ = std::move(*buffer);
  auto id = net_.transport->register_memory(staging_->data(), staging_->size(),
                                            staging_->pinned() ? tr::memory_kind::pinned_host
                                                               : tr::memory_kind::host);
  if (!id)
    return std::move(id).error().context("registering the KV staging buffer");
  locals_ = {*id};
  auto d = net_.transport->describe(*id);
  if (!d)
    return std::move(d).error();
  self_.regions = {d->serialize()};
  if (role_ == "decode") {
    self_.layout = landing_;
    self_.landing_blocks = landing_.num_blocks;
  } else {
    self_.layout = kv_;
    for (auto& a : self_.layout.allocations)
      a.base = nullptr;
    ring_.emplace(staging_->size());
  }
  return {};
}

std::string kv_rank_endpoint::staging() const {
  if (!staging_)
    return {};
  const double mib = static_cast<double>(staging_->size()) / (1 << 20);
  return fmt::format("staged through {} of {} host memory",
                     mib < 1024 ? fmt::format("{:.1f} MiB", mib)
                                : fmt::format("{:.2f} GiB", mib / 1024),
                     staging_->pinned() ? "page-locked" : "plain");
}

kv_rank_endpoint::~kv_rank_endpoint() {
  {
    std::lock_guard lock(mu_);
    for (auto& o : posting_) // the posting thread stops between chunks
      o->cancelled = true;
    for (auto& p : queue_)
      for (auto& [conn, t] : p.batches)
        conn->cancel(t);
  }
  copier_.request_stop();
  main_.request_stop();
  cv_.notify_all();
  if (copier_.joinable()) // it may still post: stopped before the waiting thread
    copier_.join();
  if (main_.joinable())
    main_.join();
  listeners_.clear(); // nothing adds to them any more: the accepting thread is done
  links_.clear();
  inbound_.clear();
  for (auto id : locals_)
    (void)net_.transport->deregister(id);
}

void kv_rank_endpoint::notify(caf::actor target) {
  std::lock_guard lock(mu_);
  target_ = std::move(target);
}

void kv_rank_endpoint::accept_loop(std::stop_token stop) {
  while (!stop.stop_requested()) {
    auto conn = net_.accept(tr::clock::now() + poll);
    if (!conn) {
      if (conn.error().code() != errc::timeout)
        log::warn("KV rank {}: accepting a prefill rank: {}", rank_, conn.error().message());
      continue;
    }
    conn_ptr c(std::move(*conn));
    std::lock_guard lock(mu_);
    inbound_.push_back(c);
    listeners_.emplace_back([this, c](std::stop_token s) { listen_loop(s, c); });
  }
}

void kv_rank_endpoint::listen_loop(std::stop_token stop, conn_ptr conn) {
  while (!stop.stop_requested()) {
    auto n = conn->wait_notice(tr::clock::now() + poll);
    if (!n) {
      if (n.error().code() == errc::timeout)
        continue;
      log::info("KV rank {}: a prefill rank's connection ended: {}", rank_, n.error().message());
      return;
    }
    caf::actor target;
    {
      std::lock_guard lock(mu_);
      target = target_;
    }
    if (target)
      caf::anon_send(target, msg::landed_atom::value, n->lease_id, n->cancelled);
  }
}

expected<void> kv_rank_endpoint::link(const msg::kv_link& l) {
  if (role_ != "prefill")
    return make_error(errc::internal, "a {} rank does not link to decode ranks", role_);
  std::vector<engine::kv_layout> p, d;
  for (const auto& r : l.prefill)
    p.push_back(r.layout);
  for (const auto& r : l.ranks)
    d.push_back(r.layout);
  auto plan = tr::kv_handoff_plan::make(std::move(p), std::move(d));
  if (!plan)
    return std::move(plan).error().context("prefill and decode groups");
  decode_link out{.plan = std::make_shared<const tr::kv_handoff_plan>(std::move(*plan)),
                  .pairs = {}};
  std::map<uint32_t, conn_ptr> conns; // one connection per decode rank
  const auto deadline = tr::clock::now() + 10s;
  for (size_t i = 0; i < out.plan->pairs().size(); ++i) {
    const auto [prank, drank] = out.plan->pairs()[i];
    if (prank != static_cast<uint32_t>(rank_))
      continue;
    const auto& target = l.ranks.at(drank);
    auto remote = parse_regions(target);
    if (!remote)
      return std::move(remote).error();
    if (!conns.count(drank)) {
      auto at = tr::endpoint_address::parse(target.endpoint);
      if (!at)
        return std::move(at).error();
      if (at->transport != net_.transport->name())
        return make_error(errc::invalid_argument,
                          "decode rank {} listens on {}, this prefill rank uses {}", drank,
                          at->transport, net_.transport->name());
      auto c = net_.connect(at->address, deadline);
      if (!c)
        return std::move(c).error().context(fmt::format(
            "connecting to decode replica {} rank {} at {}", l.decode, drank, at->address));
      conns[drank] = conn_ptr(std::move(*c));
    }
    out.pairs.push_back({.pair = i, .conn = conns[drank], .remote = std::move(*remote)});
  }
  std::lock_guard lock(mu_);
  links_[l.decode] = std::move(out);
  return {};
}

void kv_rank_endpoint::push(const msg::kv_push& p, caf::actor reply_to) {
  auto o = std::make_shared<outgoing>();
  o->spec = p;
  o->reply_to = std::move(reply_to);
  o->deadline = tr::clock::now() + std::chrono::milliseconds(p.timeout_ms);
  std::lock_guard lock(mu_);
  armed_[p.seq] = std::move(o);
}

void kv_rank_endpoint::cancel(uint64_t lease) {
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

bool kv_rank_endpoint::step_begins(const step_plan& plan) {
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

void kv_rank_endpoint::layer_written(int32_t, std::function<expected<void>()> written) {
  std::lock_guard lock(mu_);
  for (auto& o : in_step_)
    o->written.push_back(written);
  cv_.notify_all();
}

void kv_rank_endpoint::step_ends(bool ok) {
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
void kv_rank_endpoint::post_loop(std::stop_token stop) {
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
void kv_rank_endpoint::post_layers(const std::vector<std::shared_ptr<outgoing>>& group,
                                   std::vector<pending>& jobs) {
  constexpr uint64_t chunk_bytes = 16ull << 20;
  const int32_t layers = kv_.layer_end - kv_.layer_begin;
  struct transfer {
    size_t push = 0;
    conn_ptr conn;
    std::unique_ptr<tr::parted_transfer> parts;
    std::vector<std::vector<tr::write_range>> by_layer; // [stage layer]
    int32_t last = 0; // its last layer with anything to move (else the stage's last)
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
      bool any = false;
      for (int32_t l = 0; l < layers && jobs[i].answer.error.empty(); ++l) {
        auto& ranges = t.by_layer.emplace_back();
        if (auto ok =
                jobs[i].link.plan->ranges(pl.pair, o.prefill_blocks, o.spec.decode_blocks,
                                          o.spec.begin, o.spec.end, ranges, kv_.layer_begin + l);
            !ok)
          fail(i, ok.error());
        for (const auto& r : ranges)
          bytes += r.length;
        if (!ranges.empty()) {
          t.last = l;
          any = true;
        }
      }
      if (!jobs[i].answer.error.empty())
        break;
      if (!any)
        t.last = layers - 1; // nothing to move: its notice goes with the stage's last layer
      std::optional<tr::stage_area> area;
      if (staging_)
        area = tr::stage_area{.at = staging_->data() + at,
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

void kv_rank_endpoint::unstage(msg::kv_unstage job, caf::actor reply_to) {
  if (!staging_ || role_ != "decode") {
    caf::anon_send(
        reply_to, msg::unstaged_atom::value,
        msg::kv_pushed{.lease = job.lease, .rank = rank_, .error = "this rank's KV is not staged"});
    return;
  }
  std::lock_guard lock(mu_);
  unstage_queue_.emplace_back(std::move(job), std::move(reply_to));
  cv_.notify_all();
}

void kv_rank_endpoint::unstage_loop(std::stop_token stop) {
  for (;;) {
    std::unique_lock lock(mu_);
    if (!cv_.wait(lock, stop, [&] { return !unstage_queue_.empty(); }))
      return;
    auto [job, reply_to] = std::move(unstage_queue_.front());
    unstage_queue_.pop_front();
    lock.unlock();
    msg::kv_pushed answer{.lease = job.lease, .rank = rank_};
    std::vector<engine::copy_span> copies;
    auto ok = tr::unstage_copies(landing_, staging_->data(), kv_, job.landing_blocks, job.blocks,
                                 job.begin, job.end, copies);
    if (ok)
      ok = tr::copy_all(copies, on_gpu_);
    if (!ok)
      answer.error = "copying landed KV into the cache: " + ok.error().to_string();
    for (const auto& c : copies)
      answer.bytes += c.bytes;
    answer.writes = copies.size();
    caf::anon_send(reply_to, msg::unstaged_atom::value, std::move(answer));
  }
}

void kv_rank_endpoint::wait_loop(std::stop_token stop) {
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
