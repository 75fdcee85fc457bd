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
    std::optional<layer_pusher::staging_area> area;
    if (e->staging_)
      area = layer_pusher::staging_area{.buffer = std::move(*e->staging_),
                                        .region = e->locals_.front()};
    e->staging_.reset();
    e->pusher_ = std::make_shared<layer_pusher>(layout, e->locals_, rank, std::move(area));
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
  const double mib = static_cast<double>(staging_->size()) / (1 << 20);
  staging_text_ = fmt::format("staged through {} of {} host memory",
                              mib < 1024 ? fmt::format("{:.1f} MiB", mib)
                                         : fmt::format("{:.2f} GiB", mib / 1024),
                              staging_->pinned() ? "page-locked" : "plain");
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
  }
  return {};
}

kv_rank_endpoint::~kv_rank_endpoint() {
  pusher_.reset(); // its threads stop (unless the backend still holds it: then its posts fail)
  copier_.request_stop();
  main_.request_stop();
  cv_.notify_all();
  if (copier_.joinable())
    copier_.join();
  if (main_.joinable())
    main_.join();
  listeners_.clear(); // nothing adds to them any more: the accepting thread is done
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
  layer_pusher::decode_link out{.plan =
                                    std::make_shared<const tr::kv_handoff_plan>(std::move(*plan)),
                                .pairs = {},
                                .keepalive = {}};
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
  pusher_->link(l.decode, std::move(out));
  return {};
}

void kv_rank_endpoint::push(const msg::kv_push& p, caf::actor reply_to) {
  if (pusher_)
    return pusher_->push(p, std::move(reply_to));
  caf::anon_send(reply_to, msg::kv_pushed_atom::value,
                 msg::kv_pushed{.lease = p.lease, .rank = rank_, .error = "not a prefill rank"});
}

void kv_rank_endpoint::cancel(uint64_t lease) {
  if (pusher_)
    pusher_->cancel(lease);
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

} // namespace troupe::serve
