// The GPU sampler: one thread block per logits row does what sampler.cpp's sample_row does on the
// host, in the same order, so that both pick the same token for the same (seed, index):
//   1. logsumexp and the top-n logprobs of the raw row (ties: lower id),
//   2. penalties, then logit_bias, then banned tokens set to -inf, then (structured output) every
//      token the row's grammar bitmask does not allow set to -inf, written into the row in place,
//   3. greedy: argmax (lower id on ties); else the candidates of top-k, top-p and min-p, and a
//      draw u * total over them: in rank order (value desc, id asc) when top-k or top-p sorted
//      the host's candidates, else in id order.
// Rank order is a unique 64-bit key per element (ordered float bits of the value, or of w - top
// where the host sorts by probability, then the inverted id), so the
// k-th element, the top-p cut and the drawn token are found exactly by an 8-pass radix descent
// over the key with per-bucket counts or probability mass; probabilities are computed as the host
// does (exp in double of the float difference). Sums run in another order than the host's
// sequential ones (rounding differs in the last bits): a token can differ only when the draw falls
// within ~1e-15 of a boundary.
//
// Penalty state: built on the host per step. The host sampler already keeps each sequence's
// token counts (sampler::prepare, the same code the CPU path uses: first_step, preemption and
// finished sequences handled once), and a step sends only the distinct tokens a penalised
// sequence has seen (a few KB even for long prompts), against keeping [seqs, vocab] count tables
// on the device with their own lifetime. Rows without penalties send nothing.
#include "engine/backend/cuda/gpu_sampler.hpp"

#include <algorithm>
#include <cstring>
#include <limits>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "engine/backend/cuda/cuda_common.cuh"
#include "engine/backend/cuda/cuda_plugin.hpp"

namespace troupe::engine::cuda {

namespace {

constexpr int threads = 1024;
constexpr int max_top = 20; // sampler.cpp's max_logprobs
constexpr float greedy_below = 1e-5f;

// What a row needs; offsets index the step's penalty and banned arrays.
struct row_params {
  int32_t row;
  int32_t top_k;
  float temperature, top_p, min_p, repetition, presence, frequency;
  uint64_t seed, index;
  int32_t logprobs;
  int32_t pen_begin, pen_end, bias_begin, bias_end, ban_begin, ban_end;
  int32_t mask_begin, mask_words; // word range of the allowed-token bitmask; mask_begin -1: none
};

struct row_result {
  int32_t token;
  float logprob;
  int32_t top_ids[max_top];
  float top_logprobs[max_top];
};

__device__ uint64_t splitmix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

__device__ double uniform(uint64_t seed, uint64_t index) {
  uint64_t bits = splitmix(splitmix(seed) ^ splitmix(index + 0x5eed));
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

// Larger key = earlier in the host's order (higher value, then lower id); unique per element.
// -0 and +0 compare equal on the host, so both get +0's bits (else -0 would rank below +0
// whatever the ids).
__device__ uint64_t rank_key(float v, int32_t id) {
  uint32_t b = v == 0.0f ? 0u : __float_as_uint(v);
  b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return (static_cast<uint64_t>(b) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(id));
}
__device__ int32_t key_id(uint64_t key) {
  return static_cast<int32_t>(~static_cast<uint32_t>(key & 0xffffffffu));
}

struct max_op {
  __device__ uint64_t operator()(uint64_t a, uint64_t b) const { return a > b ? a : b; }
};

using reduce_u64 = cub::BlockReduce<uint64_t, threads>;
using reduce_f64 = cub::BlockReduce<double, threads>;
using scan_f64 = cub::BlockScan<double, threads>;

struct shared_state {
  union {
    typename reduce_u64::TempStorage u64;
    typename reduce_f64::TempStorage f64;
    typename scan_f64::TempStorage scan;
  } tmp;
  double hist[256];
  uint64_t broadcast_key;
  double broadcast_f64;
  int32_t found;
  bool fallback;
};

__device__ uint64_t block_max_key(uint64_t k, shared_state& sh) {
  uint64_t m = reduce_u64(sh.tmp.u64).Reduce(k, max_op{});
  if (threadIdx.x == 0)
    sh.broadcast_key = m;
  __syncthreads();
  m = sh.broadcast_key;
  __syncthreads();
  return m;
}

__device__ double block_sum(double v, shared_state& sh) {
  double s = reduce_f64(sh.tmp.f64).Sum(v);
  if (threadIdx.x == 0)
    sh.broadcast_f64 = s;
  __syncthreads();
  s = sh.broadcast_f64;
  __syncthreads();
  return s;
}

// The sampling view of a row after penalties: which elements are candidates and their weight.
struct row_view {
  const float* w;
  int V;
  float top; // largest value of the row
  double temperature;
  uint64_t k_min; // candidates have key >= k_min (top-k; 0 = off)
  uint64_t p_min; // and key >= p_min (top-p; 0 = off)
  float min_p;    // and prob >= min_p (0 = off)
  // The host's order: by value for top-k (and the top-p after it), by probability for top-p
  // alone. Probability ties exactly where w - top (float) ties, so that order is keyed on the
  // rounded difference, not on w: two values may round to one difference.
  bool by_diff;

  __device__ uint64_t key(int i) const {
    return rank_key(by_diff ? __fsub_rn(w[i], top) : w[i], i);
  }

  __device__ double prob(int i) const {
    return exp(static_cast<double>(__fsub_rn(w[i], top)) / temperature);
  }
  __device__ bool active(int i, uint64_t key, double p) const {
    return key >= k_min && key >= p_min && !(min_p > 0.0f && p < static_cast<double>(min_p));
  }
};

// In rank order over the active elements, the key of the element at which the running weight
// (1 per element when `count`, else its probability) first exceeds `target`; the last element
// with weight when the target is never exceeded (the host's rounding fallback).
__device__ uint64_t descend(const row_view& r, double target, bool count, shared_state& sh) {
  uint64_t prefix = 0;
  if (threadIdx.x == 0)
    sh.fallback = false;
  for (int shift = 56; shift >= 0; shift -= 8) {
    const uint64_t hi_mask = shift == 56 ? 0 : ~((uint64_t{1} << (shift + 8)) - 1);
    for (int b = threadIdx.x; b < 256; b += blockDim.x)
      sh.hist[b] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < r.V; i += blockDim.x) {
      const uint64_t key = r.key(i);
      if ((key & hi_mask) != prefix)
        continue;
      const double p = r.prob(i);
      if (!r.active(i, key, p))
        continue;
      atomicAdd(&sh.hist[(key >> shift) & 255], count ? 1.0 : p);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      // Buckets in rank order; once the target was never exceeded (rounding), the last bucket
      // with weight at this and every later level.
      double cum = 0, cum_last = 0;
      int pick = -1, last = -1;
      for (int b = 255; b >= 0; --b) {
        if (sh.hist[b] <= 0)
          continue;
        if (!sh.fallback && cum + sh.hist[b] > target) {
          pick = b;
          break;
        }
        last = b;
        cum_last = cum;
        cum += sh.hist[b];
      }
      if (pick < 0) {
        sh.fallback = true;
        pick = last < 0 ? 0 : last;
        cum = cum_last;
      }
      sh.broadcast_f64 = target - cum;
      sh.broadcast_key = prefix | (static_cast<uint64_t>(pick) << shift);
    }
    __syncthreads();
    target = sh.broadcast_f64;
    prefix = sh.broadcast_key;
    __syncthreads();
  }
  return prefix;
}

// Draw in id order (the host's candidates when neither top-k nor top-p sorted them).
// The probability mass of the tokens the current cuts (top-k, top-p, min-p) keep, summed over
// the block.
__device__ double active_mass(const row_view& r, shared_state& sh) {
  double total = 0;
  for (int i = threadIdx.x; i < r.V; i += blockDim.x) {
    const double q = r.prob(i);
    if (r.active(i, r.key(i), q))
      total += q;
  }
  return block_sum(total, sh);
}

__device__ int32_t draw_by_id(const row_view& r, double target, shared_state& sh) {
  const int chunk = (r.V + blockDim.x - 1) / blockDim.x;
  const int begin = min(r.V, static_cast<int>(threadIdx.x) * chunk), end = min(r.V, begin + chunk);
  double local = 0;
  int32_t last = -1;
  for (int i = begin; i < end; ++i) {
    const double p = r.prob(i);
    if (p != 0 && r.active(i, r.key(i), p)) {
      local += p;
      last = i;
    }
  }
  double before = 0;
  scan_f64(sh.tmp.scan).ExclusiveSum(local, before);
  if (threadIdx.x == 0)
    sh.found = -1;
  __syncthreads();
  if (local > 0 && target >= before && target < before + local) {
    double sum = before;
    int32_t pick = last; // the running sum may round below the target: this range's last
    for (int i = begin; i < end; ++i) {
      const double p = r.prob(i);
      if (p == 0 || !r.active(i, r.key(i), p))
        continue;
      sum += p;
      if (target < sum) {
        pick = i;
        break;
      }
    }
    atomicMax(&sh.found, pick); // one range holds the target; max guards rounding
  }
  __syncthreads();
  int32_t found = sh.found;
  __syncthreads();
  if (found >= 0)
    return found;
  // Rounding: u * total reached the end; the last element with weight.
  const uint64_t k = block_max_key(last < 0 ? 0 : static_cast<uint64_t>(last) + 1, sh);
  return k == 0 ? 0 : static_cast<int32_t>(k - 1);
}

__global__ void __launch_bounds__(threads)
    sample_kernel(float* logits, int V, const row_params* params, const int32_t* pen_tokens,
                  const int32_t* pen_counts, float* pen_saved, const int32_t* bias_tokens,
                  const float* bias_values, float* bias_saved, const int32_t* banned,
                  float* ban_saved, const uint32_t* masks, row_result* results) {
  __shared__ shared_state sh;
  const row_params& p = params[blockIdx.x];
  row_result& res = results[blockIdx.x];
  float* w = logits + static_cast<size_t>(p.row) * V;

  // 1. Raw statistics: max, logsumexp, top-n (the host's log-softmax of the raw logits).
  uint64_t best = 0;
  for (int i = threadIdx.x; i < V; i += blockDim.x)
    best = max(best, rank_key(w[i], i));
  best = block_max_key(best, sh);
  const float raw_top = w[key_id(best)];
  double z = 0;
  for (int i = threadIdx.x; i < V; i += blockDim.x)
    z += exp(static_cast<double>(__fsub_rn(w[i], raw_top)));
  z = block_sum(z, sh);
  const float log_z = __fadd_rn(raw_top, static_cast<float>(log(z)));
  const int n_top = min(p.logprobs, min(max_top, V));
  uint64_t below = best;
  for (int t = 0; t < n_top; ++t) {
    if (t > 0) {
      uint64_t m = 0;
      for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const uint64_t k = rank_key(w[i], i);
        if (k < below)
          m = max(m, k);
      }
      below = block_max_key(m, sh);
    }
    if (threadIdx.x == 0) {
      res.top_ids[t] = key_id(below);
      res.top_logprobs[t] = __fsub_rn(w[key_id(below)], log_z);
    }
  }

  // 2. Penalties, logit_bias, banned tokens; the raw values are kept for the sampled token's
  // logprob (a penalised token's in pen_saved, which is looked up first).
  for (int j = p.pen_begin + threadIdx.x; j < p.pen_end; j += blockDim.x) {
    const int32_t t = pen_tokens[j], n = pen_counts[j];
    float x = w[t];
    pen_saved[j] = x;
    if (p.repetition != 1.0f)
      x = x > 0 ? __fdiv_rn(x, p.repetition) : __fmul_rn(x, p.repetition);
    x = __fsub_rn(
        x, __fadd_rn(__fmul_rn(p.frequency, static_cast<float>(n)), n > 0 ? p.presence : 0.0f));
    w[t] = x;
  }
  __syncthreads();
  for (int j = p.bias_begin + threadIdx.x; j < p.bias_end; j += blockDim.x) // distinct ids
    if (bias_tokens[j] >= 0 && bias_tokens[j] < V) {
      bias_saved[j] = w[bias_tokens[j]];
      w[bias_tokens[j]] = __fadd_rn(w[bias_tokens[j]], bias_values[j]);
    }
  __syncthreads();
  for (int j = p.ban_begin + threadIdx.x; j < p.ban_end; j += blockDim.x)
    if (banned[j] >= 0 && banned[j] < V)
      ban_saved[j] = w[banned[j]];
  __syncthreads();
  for (int j = p.ban_begin + threadIdx.x; j < p.ban_end; j += blockDim.x)
    if (banned[j] >= 0 && banned[j] < V)
      w[banned[j]] = -INFINITY;
  __syncthreads();
  // Structured output. The sampled token is always allowed (its raw logit stays in the row),
  // unless nothing is: then the pick falls back as for "everything banned" and its logprob is -inf
  // here where the host reports the raw one; the scheduler ends such a request.
  if (p.mask_begin >= 0) {
    const uint32_t* m = masks + p.mask_begin;
    for (int i = threadIdx.x; i < V; i += blockDim.x)
      if ((i >> 5) >= p.mask_words || ((m[i >> 5] >> (i & 31)) & 1u) == 0)
        w[i] = -INFINITY;
    __syncthreads();
  }

  // 3. The token.
  uint64_t top_key = 0;
  for (int i = threadIdx.x; i < V; i += blockDim.x)
    top_key = max(top_key, rank_key(w[i], i));
  top_key = block_max_key(top_key, sh);
  int32_t token = key_id(top_key);
  if (!(p.temperature < greedy_below)) {
    const bool by_k = p.top_k > 0 && p.top_k < V;
    row_view r{w, V, w[token], static_cast<double>(p.temperature), 0, 0, 0.0f, !by_k};
    if (!isfinite(r.top)) {
      token = by_k ? token : 0; // everything banned: the host's cand.front()
    } else {
      if (by_k)
        r.k_min = descend(r, static_cast<double>(p.top_k - 1), true, sh);
      if (p.top_p < 1.0f) {
        r.p_min = descend(r, static_cast<double>(p.top_p) * active_mass(r, sh), false, sh);
      }
      r.min_p = p.min_p;
      const double target = uniform(p.seed, p.index) * active_mass(r, sh);
      token = (by_k || p.top_p < 1.0f) ? key_id(descend(r, target, false, sh))
                                       : draw_by_id(r, target, sh);
    }
  }
  if (threadIdx.x == 0) {
    float raw = w[token];
    bool saved = false;
    for (int j = p.pen_begin; j < p.pen_end && !saved; ++j)
      if (pen_tokens[j] == token) {
        raw = pen_saved[j];
        saved = true;
      }
    for (int j = p.bias_begin; j < p.bias_end && !saved; ++j)
      if (bias_tokens[j] == token) {
        raw = bias_saved[j];
        saved = true;
      }
    for (int j = p.ban_begin; j < p.ban_end && !saved; ++j)
      if (banned[j] == token) {
        raw = ban_saved[j];
        saved = true;
      }
    res.token = token;
    res.logprob = __fsub_rn(raw, log_z);
  }
}

// Grows `b` to at least `bytes` (contents dropped).
expected<void> reserve(device_buffer& b, size_t bytes) {
  if (b.bytes() >= bytes)
    return {};
  return b.allocate(std::max(bytes, b.bytes() * 2));
}

class gpu_sampler_impl final : public gpu_sampler {
 public:
  expected<std::vector<seq_output>> sample(float* logits, int64_t vocab,
                                           std::span<const row_job> jobs, void* stream) override;

 private:
  std::vector<row_params> params_;
  std::vector<int32_t> pen_tokens_, pen_counts_, bias_tokens_, banned_;
  std::vector<uint32_t> masks_;
  std::vector<float> bias_values_;
  std::vector<row_result> results_;
  device_buffer d_params_, d_pen_tokens_, d_pen_counts_, d_pen_saved_, d_bias_tokens_,
      d_bias_values_, d_bias_saved_, d_banned_, d_ban_saved_, d_masks_, d_results_;
};

expected<std::vector<seq_output>> gpu_sampler_impl::sample(float* logits, int64_t vocab,
                                                           std::span<const row_job> jobs,
                                                           void* stream) {
  std::vector<seq_output> out(jobs.size());
  auto s = static_cast<cudaStream_t>(stream);
  if (jobs.empty()) {
    TROUPE_CUDA(cudaStreamSynchronize(s));
    return out;
  }
  params_.clear();
  pen_tokens_.clear();
  pen_counts_.clear();
  bias_tokens_.clear();
  bias_values_.clear();
  banned_.clear();
  masks_.clear();
  for (const auto& j : jobs) {
    const auto& sp = *j.in.params;
    row_params r{};
    r.row = j.row;
    r.top_k = sp.top_k;
    r.temperature = sp.temperature;
    r.top_p = sp.top_p;
    r.min_p = sp.min_p;
    r.repetition = sp.repetition_penalty;
    r.presence = sp.presence_penalty;
    r.frequency = sp.frequency_penalty;
    r.seed = sp.seed;
    r.index = j.in.index;
    r.logprobs = std::max(0, std::min({sp.logprobs, max_top, static_cast<int>(vocab)}));
    r.pen_begin = static_cast<int32_t>(pen_tokens_.size());
    if (j.in.penalties)
      for (const auto& [t, e] : j.in.penalties->tokens)
        if (t >= 0 && t < vocab) {
          pen_tokens_.push_back(t);
          pen_counts_.push_back(e.output_count);
        }
    r.pen_end = static_cast<int32_t>(pen_tokens_.size());
    r.bias_begin = static_cast<int32_t>(bias_tokens_.size());
    bias_tokens_.insert(bias_tokens_.end(), sp.bias_tokens.begin(), sp.bias_tokens.end());
    bias_values_.insert(bias_values_.end(), sp.bias_values.begin(), sp.bias_values.end());
    r.bias_end = static_cast<int32_t>(bias_tokens_.size());
    r.ban_begin = static_cast<int32_t>(banned_.size());
    banned_.insert(banned_.end(), j.in.banned.begin(), j.in.banned.end());
    r.ban_end = static_cast<int32_t>(banned_.size());
    r.mask_begin = j.in.allowed.empty() ? -1 : static_cast<int32_t>(masks_.size());
    r.mask_words = static_cast<int32_t>(j.in.allowed.size());
    masks_.insert(masks_.end(), j.in.allowed.begin(), j.in.allowed.end());
    params_.push_back(r);
  }
  const size_t n = jobs.size(), np = std::max<size_t>(1, pen_tokens_.size()),
               nb = std::max<size_t>(1, banned_.size()),
               nl = std::max<size_t>(1, bias_tokens_.size());
  TROUPE_TRY_VOID(reserve(d_params_, n * sizeof(row_params)));
  TROUPE_TRY_VOID(reserve(d_results_, n * sizeof(row_result)));
  TROUPE_TRY_VOID(reserve(d_pen_tokens_, np * 4));
  TROUPE_TRY_VOID(reserve(d_pen_counts_, np * 4));
  TROUPE_TRY_VOID(reserve(d_pen_saved_, np * 4));
  TROUPE_TRY_VOID(reserve(d_bias_tokens_, nl * 4));
  TROUPE_TRY_VOID(reserve(d_bias_values_, nl * 4));
  TROUPE_TRY_VOID(reserve(d_bias_saved_, nl * 4));
  TROUPE_TRY_VOID(reserve(d_banned_, nb * 4));
  TROUPE_TRY_VOID(reserve(d_ban_saved_, nb * 4));
  TROUPE_TRY_VOID(reserve(d_masks_, std::max<size_t>(1, masks_.size()) * 4));
  TROUPE_CUDA(cudaMemcpyAsync(d_params_.as<void>(), params_.data(), n * sizeof(row_params),
                              cudaMemcpyHostToDevice, s));
  if (!pen_tokens_.empty()) {
    TROUPE_CUDA(cudaMemcpyAsync(d_pen_tokens_.as<void>(), pen_tokens_.data(),
                                pen_tokens_.size() * 4, cudaMemcpyHostToDevice, s));
    TROUPE_CUDA(cudaMemcpyAsync(d_pen_counts_.as<void>(), pen_counts_.data(),
                                pen_counts_.size() * 4, cudaMemcpyHostToDevice, s));
  }
  if (!bias_tokens_.empty()) {
    TROUPE_CUDA(cudaMemcpyAsync(d_bias_tokens_.as<void>(), bias_tokens_.data(),
                                bias_tokens_.size() * 4, cudaMemcpyHostToDevice, s));
    TROUPE_CUDA(cudaMemcpyAsync(d_bias_values_.as<void>(), bias_values_.data(),
                                bias_values_.size() * 4, cudaMemcpyHostToDevice, s));
  }
  if (!banned_.empty())
    TROUPE_CUDA(cudaMemcpyAsync(d_banned_.as<void>(), banned_.data(), banned_.size() * 4,
                                cudaMemcpyHostToDevice, s));
  if (!masks_.empty()) // one upload for every constrained row of the step
    TROUPE_CUDA(cudaMemcpyAsync(d_masks_.as<void>(), masks_.data(), masks_.size() * 4,
                                cudaMemcpyHostToDevice, s));
  sample_kernel<<<static_cast<unsigned>(n), threads, 0, s>>>(
      logits, static_cast<int>(vocab), d_params_.as<row_params>(), d_pen_tokens_.as<int32_t>(),
      d_pen_counts_.as<int32_t>(), d_pen_saved_.as<float>(), d_bias_tokens_.as<int32_t>(),
      d_bias_values_.as<float>(), d_bias_saved_.as<float>(), d_banned_.as<int32_t>(),
      d_ban_saved_.as<float>(), d_masks_.as<uint32_t>(), d_results_.as<row_result>());
  TROUPE_CUDA_LAUNCH();
  results_.resize(n);
  TROUPE_CUDA(cudaMemcpyAsync(results_.data(), d_results_.as<void>(), n * sizeof(row_result),
                              cudaMemcpyDeviceToHost, s));
  TROUPE_CUDA(cudaStreamSynchronize(s));
  for (size_t i = 0; i < n; ++i) {
    const auto& r = results_[i];
    out[i].token = r.token;
    out[i].logprob = r.logprob;
    const int k = params_[i].logprobs;
    out[i].top_ids.assign(r.top_ids, r.top_ids + k);
    out[i].top_logprobs.assign(r.top_logprobs, r.top_logprobs + k);
  }
  return out;
}

} // namespace

expected<std::unique_ptr<gpu_sampler>> make_sampler() {
  return std::unique_ptr<gpu_sampler>(std::make_unique<gpu_sampler_impl>());
}

} // namespace troupe::engine::cuda
