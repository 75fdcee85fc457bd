#include "engine/backend/cpu/moe.hpp"

#include <algorithm>
#include <numeric>

#include "engine/backend/cpu/ops.hpp"

namespace troupe::engine::cpu {

namespace {

// y[m, hidden] = down(silu(gate x) * up x) for x[m, hidden]; g and u are scratch.
void expert_forward(const moe_shape& s, const expert_view& e, const float* x, int64_t m, float* y,
                    std::vector<float>& g, std::vector<float>& u) {
  const int64_t H = s.hidden, I = s.intermediate;
  g.resize(static_cast<size_t>(m * I));
  u.resize(static_cast<size_t>(m * I));
  matmul_nt(x, m, H, e.gate, I, g.data());
  matmul_nt(x, m, H, e.up, I, u.data());
  silu_mul(g.data(), u.data(), m, I, g.data());
  matmul_nt(g.data(), m, I, e.down, H, y);
}

// Runs expert e (local index) on the rows `rows` of x[*, hidden] and writes its output rows to
// the same rows of y[*, hidden].
void expert_rows(const moe_shape& s, const expert_view& e, const std::vector<int64_t>& rows,
                 const float* x, float* y, std::vector<float>& xs, std::vector<float>& ys,
                 std::vector<float>& g, std::vector<float>& u) {
  const int64_t H = s.hidden, m = static_cast<int64_t>(rows.size());
  xs.resize(static_cast<size_t>(m * H));
  ys.resize(static_cast<size_t>(m * H));
  for (int64_t i = 0; i < m; ++i)
    std::copy_n(x + rows[static_cast<size_t>(i)] * H, H, xs.data() + i * H);
  expert_forward(s, e, xs.data(), m, ys.data(), g, u);
  for (int64_t i = 0; i < m; ++i)
    std::copy_n(ys.data() + i * H, H, y + rows[static_cast<size_t>(i)] * H);
}

} // namespace

void moe_route(const moe_shape& s, const float* router, const float* h, int64_t n,
               std::vector<int32_t>& ids, std::vector<float>& weights) {
  const int64_t E = s.experts, K = s.top_k;
  std::vector<float> probs(static_cast<size_t>(n * E));
  matmul_nt(h, n, s.hidden, router, E, probs.data());
  ids.resize(static_cast<size_t>(n * K));
  weights.resize(static_cast<size_t>(n * K));
  std::vector<int32_t> order(static_cast<size_t>(E));
  for (int64_t t = 0; t < n; ++t) {
    float* p = probs.data() + t * E;
    softmax(p, E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return p[a] > p[b]; });
    float sum = 0;
    for (int64_t k = 0; k < K; ++k)
      sum += p[order[static_cast<size_t>(k)]];
    for (int64_t k = 0; k < K; ++k) {
      const int32_t e = order[static_cast<size_t>(k)];
      ids[static_cast<size_t>(t * K + k)] = e;
      weights[static_cast<size_t>(t * K + k)] = s.norm_topk_prob ? p[e] / sum : p[e];
    }
  }
}

void moe_local(const moe_shape& s, const int32_t* ids, const float* weights, int64_t n,
               const float* h, int64_t first, std::span<const expert_view> local, float* out) {
  const int64_t H = s.hidden, K = s.top_k, L = static_cast<int64_t>(local.size());
  // Per local expert, its (token, weight) pairs in token order.
  std::vector<std::vector<std::pair<int64_t, float>>> routed(static_cast<size_t>(L));
  for (int64_t i = 0; i < n * K; ++i) {
    const int64_t e = ids[i] - first;
    if (e >= 0 && e < L)
      routed[static_cast<size_t>(e)].emplace_back(i / K, weights[i]);
  }
  std::fill_n(out, n * H, 0.0f);
  std::vector<float> xs, g, u, y;
  for (int64_t e = 0; e < L; ++e) {
    const auto& tokens = routed[static_cast<size_t>(e)];
    if (tokens.empty())
      continue;
    const auto m = static_cast<int64_t>(tokens.size());
    xs.resize(static_cast<size_t>(m * H));
    y.resize(static_cast<size_t>(m * H));
    for (int64_t i = 0; i < m; ++i)
      std::copy_n(h + tokens[static_cast<size_t>(i)].first * H, H, xs.data() + i * H);
    expert_forward(s, local[static_cast<size_t>(e)], xs.data(), m, y.data(), g, u);
    for (int64_t i = 0; i < m; ++i) {
      const auto [t, w] = tokens[static_cast<size_t>(i)];
      for (int64_t d = 0; d < H; ++d)
        out[t * H + d] += w * y[static_cast<size_t>(i * H + d)];
    }
  }
}

expected<void> moe_all_to_all(comm::communicator& group, const moe_shape& s, const float* router,
                              std::span<const expert_view> local, const float* h, int64_t n,
                              float* out) {
  const int P = group.size(), me = group.rank();
  const int64_t H = s.hidden, K = s.top_k, E = s.experts;
  if (E < P)
    return make_error(errc::invalid_argument,
                      "expert all-to-all: {} experts over {} ranks leaves a rank without one", E,
                      P);
  std::vector<int> owner(static_cast<size_t>(E));
  for (int r = 0; r < P; ++r) {
    const auto range = split_range(E, P, r);
    for (int64_t e = range.begin; e < range.end; ++e)
      owner[static_cast<size_t>(e)] = r;
  }
  const auto mine = split_range(E, P, me);
  if (static_cast<int64_t>(local.size()) != mine.size())
    return make_error(errc::invalid_argument,
                      "expert all-to-all: rank {} of {} holds experts [{}, {}) but was given {}",
                      me, P, mine.begin, mine.end, local.size());

  // Dispatch: this rank's (token, expert) pairs ordered by expert, then token: by owner rank too.
  std::vector<int32_t> ids;
  std::vector<float> weights;
  moe_route(s, router, h, n, ids, weights);
  std::vector<int64_t> pairs(static_cast<size_t>(n * K));
  std::iota(pairs.begin(), pairs.end(), 0);
  std::stable_sort(pairs.begin(), pairs.end(), [&](int64_t a, int64_t b) {
    return ids[static_cast<size_t>(a)] < ids[static_cast<size_t>(b)];
  });
  // A row: the token's hidden state and its expert id (exact as a float below 2^24).
  const int64_t W = H + 1;
  std::vector<float> send(pairs.size() * static_cast<size_t>(W));
  std::vector<float> send_rows(static_cast<size_t>(P), 0.0f), recv_rows(static_cast<size_t>(P));
  for (size_t j = 0; j < pairs.size(); ++j) {
    const int64_t i = pairs[j];
    const int32_t e = ids[static_cast<size_t>(i)];
    std::copy_n(h + (i / K) * H, H, send.data() + static_cast<int64_t>(j) * W);
    send[j * static_cast<size_t>(W) + static_cast<size_t>(H)] = static_cast<float>(e);
    send_rows[static_cast<size_t>(owner[static_cast<size_t>(e)])] += 1;
  }
  const std::vector<int64_t> ones(static_cast<size_t>(P), 1);
  TROUPE_TRY_VOID(group.all_to_all(send_rows, ones, recv_rows, ones));
  std::vector<int64_t> send_counts(static_cast<size_t>(P)), recv_counts(static_cast<size_t>(P));
  int64_t received = 0;
  for (size_t r = 0; r < static_cast<size_t>(P); ++r) {
    send_counts[r] = static_cast<int64_t>(send_rows[r]) * W;
    recv_counts[r] = static_cast<int64_t>(recv_rows[r]) * W;
    received += static_cast<int64_t>(recv_rows[r]);
  }
  std::vector<float> recv(static_cast<size_t>(received * W));
  TROUPE_TRY_VOID(group.all_to_all(send, send_counts, recv, recv_counts));

  // This rank's experts on the rows it received, the results in the same row order.
  std::vector<std::vector<int64_t>> rows_of(local.size());
  for (int64_t row = 0; row < received; ++row) {
    const auto e = static_cast<int64_t>(recv[static_cast<size_t>(row * W + H)]);
    if (!mine.contains(e))
      return make_error(errc::internal, "expert all-to-all: rank {} received a row for expert {}",
                        me, e);
    rows_of[static_cast<size_t>(e - mine.begin)].push_back(row);
  }
  std::vector<float> x(static_cast<size_t>(received * H)), y(static_cast<size_t>(received * H));
  for (int64_t row = 0; row < received; ++row)
    std::copy_n(recv.data() + row * W, H, x.data() + row * H);
  std::vector<float> xs, ys, g, u;
  for (size_t e = 0; e < local.size(); ++e)
    if (!rows_of[e].empty())
      expert_rows(s, local[e], rows_of[e], x.data(), y.data(), xs, ys, g, u);

  // Combine: the results travel back the way the rows came; each token sums its experts in id
  // order, as moe_local does.
  for (size_t r = 0; r < static_cast<size_t>(P); ++r) {
    std::swap(send_counts[r], recv_counts[r]);
    send_counts[r] = send_counts[r] / W * H;
    recv_counts[r] = recv_counts[r] / W * H;
  }
  std::vector<float> back(pairs.size() * static_cast<size_t>(H));
  TROUPE_TRY_VOID(group.all_to_all(y, send_counts, back, recv_counts));
  std::fill_n(out, n * H, 0.0f);
  for (size_t j = 0; j < pairs.size(); ++j) {
    const int64_t i = pairs[j], t = i / K;
    const float w = weights[static_cast<size_t>(i)];
    for (int64_t d = 0; d < H; ++d)
      out[t * H + d] += w * back[j * static_cast<size_t>(H) + static_cast<size_t>(d)];
  }
  return {};
}

} // namespace troupe::engine::cpu
