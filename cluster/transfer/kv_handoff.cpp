#include "cluster/transfer/kv_handoff.hpp"

#include <algorithm>
#include <map>

#include <fmt/format.h>

namespace troupe::cluster::transfer {

namespace {

expected<void> check_rank(const engine::kv_layout& k, std::string_view side, size_t rank) {
  const bool ok = k.elem_bytes > 0 && k.head_dim > 0 && k.block_size > 0 && k.num_blocks > 0 &&
                  0 <= k.layer_begin && k.layer_begin < k.layer_end &&
                  k.layer_end <= k.num_layers && 0 <= k.head_begin && k.head_begin < k.head_end &&
                  k.head_end <= k.num_kv_heads &&
                  k.planes.size() == static_cast<size_t>(2 * (k.layer_end - k.layer_begin));
  if (!ok)
    return make_error(errc::invalid_argument, "{} rank {}: malformed KV layout", side, rank);
  const uint64_t plane = static_cast<uint64_t>(k.num_blocks) * k.block_size * k.token_bytes();
  for (const auto& p : k.planes)
    if (p.allocation >= k.allocations.size() ||
        p.offset + plane > k.allocations[p.allocation].bytes)
      return make_error(errc::invalid_argument,
                        "{} rank {}: a KV plane lies outside its allocation", side, rank);
  return {};
}

} // namespace

expected<kv_handoff_plan> kv_handoff_plan::make(std::vector<engine::kv_layout> prefill,
                                                std::vector<engine::kv_layout> decode) {
  if (prefill.empty() || decode.empty())
    return make_error(errc::invalid_argument, "a handoff needs prefill and decode ranks");
  for (size_t r = 0; r < prefill.size(); ++r)
    TROUPE_TRY_VOID(check_rank(prefill[r], "prefill", r));
  for (size_t r = 0; r < decode.size(); ++r)
    TROUPE_TRY_VOID(check_rank(decode[r], "decode", r));
  const auto& p0 = prefill.front();
  for (const auto& d : decode) {
    if (d.dtype != p0.dtype)
      return make_error(errc::invalid_argument,
                        "the prefill group keeps its KV cache in {}, the decode group in {}; "
                        "both groups need the same device and dtype",
                        p0.dtype, d.dtype);
    if (d.num_layers != p0.num_layers || d.num_kv_heads != p0.num_kv_heads ||
        d.head_dim != p0.head_dim)
      return make_error(errc::invalid_argument,
                        "the groups serve different models: prefill has {} layers of {} kv heads "
                        "x {}, decode {} layers of {} kv heads x {}",
                        p0.num_layers, p0.num_kv_heads, p0.head_dim, d.num_layers, d.num_kv_heads,
                        d.head_dim);
  }
  kv_handoff_plan plan;
  std::map<std::pair<uint32_t, uint32_t>, std::vector<handoff_route>> by_pair;
  for (uint32_t d = 0; d < decode.size(); ++d) {
    const auto& dl = decode[d];
    for (int32_t layer = dl.layer_begin; layer < dl.layer_end; ++layer) {
      // Each of the decode rank's heads from the first prefill rank that holds it.
      int32_t h = dl.head_begin;
      while (h < dl.head_end) {
        uint32_t from = 0;
        for (; from < prefill.size(); ++from) {
          const auto& pl = prefill[from];
          if (pl.layer_begin <= layer && layer < pl.layer_end && pl.head_begin <= h &&
              h < pl.head_end)
            break;
        }
        if (from == prefill.size())
          return make_error(errc::invalid_argument,
                            "no prefill rank holds layer {} kv head {} for decode rank {}", layer,
                            h, d);
        const int32_t end = std::min(dl.head_end, prefill[from].head_end);
        by_pair[{from, d}].push_back({from, d, layer, h, end});
        h = end;
      }
    }
  }
  for (auto& [pair, routes] : by_pair) {
    plan.pairs_.push_back(pair);
    plan.pair_begin_.push_back(plan.routes_.size());
    plan.routes_.insert(plan.routes_.end(), routes.begin(), routes.end());
  }
  plan.pair_begin_.push_back(plan.routes_.size());
  plan.prefill_ = std::move(prefill);
  plan.decode_ = std::move(decode);
  return plan;
}

expected<void> kv_handoff_plan::ranges(size_t pair, std::span<const int32_t> pb,
                                       std::span<const int32_t> db, int32_t begin, int32_t end,
                                       std::vector<write_range>& out, int32_t layer) const {
  if (pair >= pairs_.size())
    return make_error(errc::invalid_argument, "handoff pair {} of {}", pair, pairs_.size());
  const auto& P = prefill_[pairs_[pair].first];
  const auto& D = decode_[pairs_[pair].second];
  if (begin < 0 || end < begin)
    return make_error(errc::invalid_argument, "handoff positions [{}, {})", begin, end);
  auto need = [](int32_t n, int32_t bs) { return static_cast<size_t>((n + bs - 1) / bs); };
  if (pb.size() < need(end, P.block_size) || db.size() < need(end, D.block_size))
    return make_error(errc::out_of_range,
                      "handoff of {} positions: {} prefill blocks of {}, {} decode blocks of {}",
                      end, pb.size(), P.block_size, db.size(), D.block_size);
  for (size_t r = pair_begin_[pair]; r < pair_begin_[pair + 1]; ++r) {
    const auto& route = routes_[r];
    if (layer >= 0 && route.layer != layer)
      continue;
    const int32_t heads = route.head_end - route.head_begin;
    const uint64_t run = static_cast<uint64_t>(heads) * P.head_dim * P.elem_bytes;
    // Whole tokens are contiguous on a side only when the route covers all its local heads.
    const bool whole = heads == P.local_heads() && heads == D.local_heads();
    for (int kv = 0; kv < 2; ++kv) {
      const auto& pp = P.plane_of(route.layer, kv);
      const auto& dp = D.plane_of(route.layer, kv);
      for (int32_t t = begin; t < end;) {
        const int32_t pt = t % P.block_size, dt = t % D.block_size;
        const int32_t n = std::min({P.block_size - pt, D.block_size - dt, end - t});
        const int32_t pblock = pb[static_cast<size_t>(t / P.block_size)];
        const int32_t dblock = db[static_cast<size_t>(t / D.block_size)];
        if (pblock < 0 || pblock >= P.num_blocks || dblock < 0 || dblock >= D.num_blocks)
          return make_error(errc::out_of_range, "handoff block {} -> {} outside the pools", pblock,
                            dblock);
        const int32_t tokens = whole ? n : 1;
        for (int32_t i = 0; i < n; i += tokens)
          out.push_back(
              {.local = pp.allocation,
               .local_offset = pp.offset + P.at(pblock, pt + i, route.head_begin - P.head_begin),
               .remote = dp.allocation,
               .remote_offset = dp.offset + D.at(dblock, dt + i, route.head_begin - D.head_begin),
               .length = run * static_cast<uint64_t>(tokens)});
        t += n;
      }
    }
  }
  return {};
}

uint64_t kv_handoff_plan::bytes_per_token() const {
  const auto& k = prefill_.front();
  return 2ull * k.num_layers * k.num_kv_heads * k.head_dim * k.elem_bytes;
}

uint64_t kv_handoff_plan::bytes_per_token(uint32_t rank) const {
  uint64_t bytes = 0;
  for (const auto& r : routes_)
    if (r.prefill_rank == rank) {
      const auto& p = prefill_[rank];
      bytes += 2ull * static_cast<uint64_t>(r.head_end - r.head_begin) * p.head_dim * p.elem_bytes;
    }
  return bytes;
}

std::string kv_handoff_plan::describe() const {
  const auto& p = prefill_.front();
  const auto& d = decode_.front();
  return fmt::format("{} prefill rank(s) -> {} decode rank(s), {} layers, {} kv heads x {} {}, "
                     "blocks of {} -> {} tokens, {} batch(es) per request",
                     prefill_.size(), decode_.size(), p.num_layers, p.num_kv_heads, p.head_dim,
                     p.dtype, p.block_size, d.block_size, pairs_.size());
}

} // namespace troupe::cluster::transfer
