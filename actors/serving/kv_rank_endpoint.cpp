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

expected<std::unique_ptr<kv_rank_endpoint>>
kv_rank_endpoint::open(const std::string& role, const std::string& provider,
                       const std::string& host, const engine::kv_layout& layout, int32_t rank) {
  if (role != "decode" && role != "prefill")
    return make_error(errc::invalid_argument, "KV role '{}': expected decode or prefill", role);
  auto net = open_net_transport(provider, host);
  if (!net)
    return std::move(net).error();
  auto e = std::unique_ptr<kv_rank_endpoint>(new kv_rank_endpoint());
  e->net_ = std::move(*net);
  e->role_ = role;
  e->rank_ = rank;
  e->self_.layout = layout;
  for (auto& a : e->self_.layout.allocations) {
    auto id = e->net_.transport->register_memory(
        a.base, a.bytes, a.on_gpu ? tr::memory_kind::cuda : tr::memory_kind::host);
    if (!id)
      return std::move(id).error().context(fmt::format("registering {} bytes of KV cache with {}",
                                                       a.bytes, e->net_.transport->name()));
    e->locals_.push_back(*id);
    auto d = e->net_.transport->describe(*id);
    if (!d)
      return std::move(d).error();
    e->self_.regions.push_back(d->serialize());
    a.base = nullptr; // what travels has no addresses but the descriptors'
  }
  if (role == "decode") {
    auto at = e->net_.listen(0);
    if (!at)
      return std::move(at).error().context("listening for prefill ranks");
    e->self_.endpoint = tr::endpoint_address{e->net_.transport->name(), *at}.serialize();
    e->main_ = std::jthread([p = e.get()](std::stop_token s) { p->accept_loop(s); });
  } else {
    e->main_ = std::jthread([p = e.get()](std::stop_token s) { p->wait_loop(s); });
  }
  return e;
}

kv_rank_endpoint::~kv_rank_endpoint() {
  {
    std::lock_guard lock(mu_);
    for (auto& p : queue_)
      for (auto& [conn, t] : p.batches)
        conn->cancel(t);
  }
  main_.request_stop();
  cv_.notify_all();
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
  pending job{.answer = {.lease = p.lease, .rank = rank_}, .reply_to = std::move(reply_to)};
  auto fail = [&](const troupe::error& e) {
    std::lock_guard lock(mu_);
    for (auto& [conn, t] : job.batches) // posted before the failure: end them in order
      conn->cancel(t);
    job.answer.error = e.to_string();
    queue_.push_back(std::move(job));
    cv_.notify_all();
  };
  std::unique_lock lock(mu_);
  auto it = links_.find(p.decode);
  if (it == links_.end()) {
    lock.unlock();
    return fail(make_error(errc::unavailable, "not linked to decode replica {}", p.decode));
  }
  const auto link = it->second; // copies shared pointers: a re-link may replace it meanwhile
  lock.unlock();
  const auto deadline = tr::clock::now() + std::chrono::milliseconds(p.timeout_ms);
  for (const auto& pl : link.pairs) {
    tr::write_batch batch{.lease_id = p.lease,
                          .locals = locals_,
                          .remotes = pl.remote,
                          .ranges = {},
                          .deadline = deadline};
    if (auto ok = link.plan->ranges(pl.pair, p.prefill_blocks, p.decode_blocks, p.begin, p.end,
                                    batch.ranges);
        !ok)
      return fail(ok.error());
    auto posted = pl.conn->post(std::move(batch));
    if (!posted)
      return fail(posted.error());
    job.batches.emplace_back(pl.conn, *posted);
  }
  lock.lock();
  queue_.push_back(std::move(job));
  cv_.notify_all();
}

void kv_rank_endpoint::cancel(uint64_t lease) {
  std::lock_guard lock(mu_);
  for (auto& p : queue_)
    if (p.answer.lease == lease)
      for (auto& [conn, t] : p.batches)
        conn->cancel(t);
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
    lock.unlock();
    if (job.answer.error.empty() && first.code() != errc::ok) {
      job.answer.cancelled = first.code() == errc::cancelled;
      job.answer.error = first.to_string();
    }
    job.answer.bytes = bytes;
    job.answer.writes = writes;
    caf::anon_send(job.reply_to, msg::kv_pushed_atom::value, std::move(job.answer));
  }
}

} // namespace troupe::serve
