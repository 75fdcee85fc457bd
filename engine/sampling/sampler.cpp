#include "engine/sampling/sampler.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace troupe::engine {

namespace {

constexpr float greedy_below = 1e-5f; // temperatures under this are greedy (as vLLM)
constexpr int32_t max_logprobs = 20;

uint64_t splitmix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Higher logit first, lower id on ties: one total order for every rank.
struct by_value_desc {
  const float* v;
  bool operator()(int32_t a, int32_t b) const { return v[a] > v[b] || (v[a] == v[b] && a < b); }
};

void apply_penalties(std::vector<float>& w, const sampling_params& p, const penalty_state& st) {
  for (const auto& [t, e] : st.tokens) {
    float& x = w[static_cast<size_t>(t)];
    if (p.repetition_penalty != 1.0f)
      x = x > 0 ? x / p.repetition_penalty : x * p.repetition_penalty;
    x -= p.frequency_penalty * static_cast<float>(e.output_count) +
         (e.output_count > 0 ? p.presence_penalty : 0.0f);
  }
}

token_id draw(const std::vector<float>& w, const sampling_params& p, double u) {
  const int32_t vocab = static_cast<int32_t>(w.size());
  std::vector<int32_t> cand(w.size());
  std::iota(cand.begin(), cand.end(), 0);
  by_value_desc order{w.data()};
  bool sorted = false;
  if (p.top_k > 0 && p.top_k < vocab) {
    std::partial_sort(cand.begin(), cand.begin() + p.top_k, cand.end(), order);
    cand.resize(static_cast<size_t>(p.top_k));
    sorted = true;
  }
  float top = -std::numeric_limits<float>::infinity();
  for (int32_t c : cand)
    top = std::max(top, w[c]);
  if (!std::isfinite(top)) // everything banned or penalised away: fall back to the lowest id
    return cand.front();
  // prob ∝ exp((w - top) / T); the best candidate has 1.
  std::vector<double> prob(cand.size());
  double total = 0;
  for (size_t i = 0; i < cand.size(); ++i)
    total += prob[i] = std::exp(static_cast<double>(w[cand[i]] - top) / p.temperature);
  if (p.top_p < 1.0f) {
    if (!sorted) {
      std::vector<size_t> idx(cand.size());
      std::iota(idx.begin(), idx.end(), 0);
      std::sort(idx.begin(), idx.end(), [&](size_t a, size_t b) {
        return prob[a] > prob[b] || (prob[a] == prob[b] && cand[a] < cand[b]);
      });
      std::vector<int32_t> c2(cand.size());
      std::vector<double> p2(cand.size());
      for (size_t i = 0; i < idx.size(); ++i) {
        c2[i] = cand[idx[i]];
        p2[i] = prob[idx[i]];
      }
      cand.swap(c2);
      prob.swap(p2);
    }
    double keep = p.top_p * total, sum = 0;
    size_t n = 0;
    while (n < cand.size() && (n == 0 || sum < keep))
      sum += prob[n++];
    cand.resize(n);
    prob.resize(n);
    total = sum;
  }
  if (p.min_p > 0.0f) // the best candidate has probability 1 before normalising
    for (size_t i = 0; i < prob.size(); ++i)
      if (prob[i] < p.min_p) {
        total -= prob[i];
        prob[i] = 0;
      }
  double target = u * total, sum = 0;
  size_t last_nonzero = 0;
  for (size_t i = 0; i < cand.size(); ++i) {
    if (prob[i] == 0)
      continue;
    last_nonzero = i;
    sum += prob[i];
    if (target < sum)
      return cand[i];
  }
  return cand[last_nonzero]; // rounding: u * total reached the end
}

// log(sum(exp(logits))), from the maximum for range.
float log_normalizer(std::span<const float> logits) {
  const float top = *std::max_element(logits.begin(), logits.end());
  double z = 0;
  for (float x : logits)
    z += std::exp(static_cast<double>(x - top));
  return top + static_cast<float>(std::log(z));
}

// The n most likely ids (ties: lower id) and their logprobs, in one pass over the row.
void top_logprobs(std::span<const float> logits, float log_z, int32_t n, std::vector<token_id>& ids,
                  std::vector<float>& logprobs) {
  n = std::min<int32_t>(n, static_cast<int32_t>(logits.size()));
  if (n <= 0)
    return;
  const by_value_desc order{logits.data()};
  std::vector<int32_t> best; // in order, at most n
  best.reserve(static_cast<size_t>(n) + 1);
  for (int32_t t = 0; t < static_cast<int32_t>(logits.size()); ++t) {
    if (static_cast<int32_t>(best.size()) == n && !order(t, best.back()))
      continue;
    best.insert(std::upper_bound(best.begin(), best.end(), t, order), t);
    if (static_cast<int32_t>(best.size()) > n)
      best.pop_back();
  }
  for (int32_t t : best) {
    ids.push_back(t);
    logprobs.push_back(logits[static_cast<size_t>(t)] - log_z);
  }
}

} // namespace

expected<void> validate(const sampling_params& p) {
  if (!(p.temperature >= 0.0f) || !std::isfinite(p.temperature))
    return make_error(errc::invalid_argument, "temperature must be >= 0, got {}", p.temperature);
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f))
    return make_error(errc::invalid_argument, "top_p must be in (0, 1], got {}", p.top_p);
  if (p.top_k < -1)
    return make_error(errc::invalid_argument, "top_k must be -1, 0 (off) or positive, got {}",
                      p.top_k);
  if (!(p.min_p >= 0.0f && p.min_p <= 1.0f))
    return make_error(errc::invalid_argument, "min_p must be in [0, 1], got {}", p.min_p);
  if (!(p.repetition_penalty > 0.0f) || !std::isfinite(p.repetition_penalty))
    return make_error(errc::invalid_argument, "repetition_penalty must be > 0, got {}",
                      p.repetition_penalty);
  if (!(p.presence_penalty >= -2.0f && p.presence_penalty <= 2.0f))
    return make_error(errc::invalid_argument, "presence_penalty must be in [-2, 2], got {}",
                      p.presence_penalty);
  if (!(p.frequency_penalty >= -2.0f && p.frequency_penalty <= 2.0f))
    return make_error(errc::invalid_argument, "frequency_penalty must be in [-2, 2], got {}",
                      p.frequency_penalty);
  if (p.logprobs < -1 || p.logprobs > max_logprobs)
    return make_error(errc::invalid_argument,
                      "logprobs must be in [0, {}] (or -1 for none), got {}", max_logprobs,
                      p.logprobs);
  if (p.prompt_logprobs < -1 || p.prompt_logprobs > max_logprobs)
    return make_error(errc::invalid_argument,
                      "prompt_logprobs must be in [0, {}] (or -1 for none), got {}", max_logprobs,
                      p.prompt_logprobs);
  if (p.bias_tokens.size() != p.bias_values.size())
    return make_error(errc::invalid_argument, "logit_bias: {} token ids but {} biases",
                      p.bias_tokens.size(), p.bias_values.size());
  for (size_t i = 0; i < p.bias_tokens.size(); ++i) {
    if (p.bias_tokens[i] < 0 || (i > 0 && p.bias_tokens[i] <= p.bias_tokens[i - 1]))
      return make_error(errc::invalid_argument,
                        "logit_bias: token ids must be distinct, ascending and >= 0; got {}",
                        p.bias_tokens[i]);
    if (!(p.bias_values[i] >= -100.0f && p.bias_values[i] <= 100.0f))
      return make_error(errc::invalid_argument, "logit_bias must be in [-100, 100], got {}",
                        p.bias_values[i]);
  }
  if (p.max_tokens < 1)
    return make_error(errc::invalid_argument, "max_tokens must be >= 1, got {}", p.max_tokens);
  if (p.min_tokens < 0 || p.min_tokens > p.max_tokens)
    return make_error(errc::invalid_argument, "min_tokens must be in [0, max_tokens={}], got {}",
                      p.max_tokens, p.min_tokens);
  return {};
}

// A uniform draw in [0, 1) that depends only on the seed and the token's index.
double sample_uniform(uint64_t seed, uint64_t index) {
  uint64_t bits = splitmix(splitmix(seed) ^ splitmix(index + 0x5eed));
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

bool uses_penalties(const sampling_params& p) {
  return p.repetition_penalty != 1.0f || p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f;
}

seq_output sample_row(std::span<const float> logits, const sample_inputs& in,
                      std::vector<float>& w) {
  const auto& p = *in.params;
  seq_output out;
  w.assign(logits.begin(), logits.end());
  if (in.penalties)
    apply_penalties(w, p, *in.penalties);
  for (size_t i = 0; i < p.bias_tokens.size(); ++i)
    if (const auto t = p.bias_tokens[i]; t >= 0 && static_cast<size_t>(t) < w.size())
      w[static_cast<size_t>(t)] += p.bias_values[i];
  for (token_id t : in.banned)
    if (t >= 0 && static_cast<size_t>(t) < w.size())
      w[static_cast<size_t>(t)] = -std::numeric_limits<float>::infinity();
  if (!in.allowed.empty()) // structured output: what the grammar does not allow is -inf
    for (size_t t = 0; t < w.size(); ++t)
      if (t / 32 >= in.allowed.size() || ((in.allowed[t / 32] >> (t % 32)) & 1u) == 0)
        w[t] = -std::numeric_limits<float>::infinity();
  if (p.temperature < greedy_below) // argmax, lowest id on ties
    out.token = static_cast<token_id>(std::max_element(w.begin(), w.end()) - w.begin());
  else
    out.token = draw(w, p, sample_uniform(p.seed, in.index));

  // Logprobs under the model: log-softmax of the raw logits.
  const float log_z = log_normalizer(logits);
  out.logprob = logits[static_cast<size_t>(out.token)] - log_z;
  if (p.logprobs > 0)
    top_logprobs(logits, log_z, p.logprobs, out.top_ids, out.top_logprobs);
  return out;
}

bool scores_prompt(const step_plan& plan) {
  return std::any_of(plan.seqs.begin(), plan.seqs.end(), [](const seq_step& s) {
    return s.logits == logits_mode::all && s.sampling.prompt_logprobs >= 0 &&
           s.start_pos + 1 < s.num_prompt_tokens;
  });
}

expected<void> score_prompt(const seq_step& s, const forward_output& out, size_t i,
                            std::vector<position_logprobs>& scored) {
  const int32_t k = s.sampling.prompt_logprobs;
  for (int32_t r = 0; r < out.num_rows[i]; ++r) {
    const int32_t target = s.start_pos + r + 1; // the position this row's logits predict
    if (target >= s.num_prompt_tokens)
      break;
    const auto logits = out.row(out.first_row[i] + r);
    position_logprobs& p = scored.emplace_back();
    p.position = target;
    p.token = static_cast<size_t>(r) + 1 < s.tokens.size() ? s.tokens[static_cast<size_t>(r) + 1]
                                                           : s.next_prompt_token;
    if (p.token < 0 || static_cast<size_t>(p.token) >= logits.size())
      return make_error(errc::internal, "sequence {}: prompt position {} holds token {}", s.id,
                        target, p.token);
    const float x = logits[static_cast<size_t>(p.token)];
    const float log_z = log_normalizer(logits);
    p.logprob = x - log_z;
    p.rank = 1 + static_cast<int32_t>(
                     std::count_if(logits.begin(), logits.end(), [x](float v) { return v > x; }));
    if (k > 0)
      top_logprobs(logits, log_z, k, p.top_ids, p.top_logprobs);
  }
  return {};
}

expected<std::vector<row_job>> sampler::prepare(const step_plan& plan, const forward_output& out) {
  for (seq_id id : plan.finished)
    state_.erase(id);
  if (!plan.seqs.empty() && out.first_row.size() != plan.seqs.size())
    return make_error(errc::internal, "step {}: forward output has {} sequences, plan {}",
                      plan.step, out.first_row.size(), plan.seqs.size());
  std::vector<row_job> jobs;
  for (size_t i = 0; i < plan.seqs.size(); ++i) {
    const auto& s = plan.seqs[i];
    penalty_state* st = nullptr;
    if (uses_penalties(s.sampling)) {
      if (s.first_step)
        state_.erase(s.id);
      st = &state_[s.id];
      if (s.first_step)
        for (size_t k = 0; k < s.cached_prefix.size(); ++k)
          st->add(s.cached_prefix[k], static_cast<int32_t>(k) < s.num_prompt_tokens);
      for (size_t k = 0; k < s.tokens.size(); ++k)
        st->add(s.tokens[k], s.start_pos + static_cast<int32_t>(k) < s.num_prompt_tokens);
    }
    if (s.logits == logits_mode::none)
      continue;
    if (out.num_rows[i] <= 0)
      return make_error(errc::internal, "step {}: sequence {} asked for logits but got none",
                        plan.step, s.id);
    const int64_t end = s.start_pos + static_cast<int64_t>(s.tokens.size());
    if (end < s.num_prompt_tokens) // a prompt chunk scored for its logprobs: nothing to sample
      continue;
    jobs.push_back(
        {.seq = i,
         .row = out.first_row[i] + out.num_rows[i] - 1,
         .in = {.params = &s.sampling,
                .index = static_cast<uint64_t>(std::max<int64_t>(0, end - s.num_prompt_tokens)),
                .banned = s.banned_tokens,
                .penalties = st,
                .allowed = s.allowed_tokens}});
  }
  return jobs;
}

expected<step_result> sampler::sample(const step_plan& plan, const forward_output& out) {
  auto jobs = prepare(plan, out);
  if (!jobs)
    return std::move(jobs).error();
  step_result result;
  result.step = plan.step;
  auto job = jobs->begin();
  for (size_t i = 0; i < plan.seqs.size(); ++i) {
    const auto& s = plan.seqs[i];
    if (s.logits == logits_mode::none)
      continue;
    seq_output o;
    if (job != jobs->end() && job->seq == i) {
      o = sample_row(out.row(job->row), job->in, scratch_);
      ++job;
    }
    o.id = s.id;
    if (s.logits == logits_mode::all && s.sampling.prompt_logprobs >= 0)
      TROUPE_TRY_VOID(score_prompt(s, out, i, o.prompt_logprobs));
    result.outputs.push_back(std::move(o));
  }
  return result;
}

} // namespace troupe::engine
