// The GPU sampler against the host sampler (sampler.cpp) over many random logits rows and
// parameter mixes: same tokens, logprobs and top logprobs; and cuda_executor on a golden model:
// greedy equals the backend's forward_greedy, sampling equals the host sampler on the same
// logits (local_executor over the same CUDA backend); structured-output masks (random and real
// xgrammar ones) applied on the device pick what the host sampler picks. Label `gpu`; skips
// without a GPU.
#include <cmath>
#include <random>

#include <cuda_runtime.h>
#include <set>

#include <doctest/doctest.h>

#include "engine/backend/cuda/gpu_sampler.hpp"
#include "engine/exec/cuda_executor.hpp"
#include "engine/exec/local_executor.hpp"
#include "engine/grammar/grammar.hpp"
#include "engine/tokenizer/chat_template.hpp"
#include "golden.hpp"
#include "gpu_test_util.hpp"

using namespace troupe;
using namespace troupe::engine;

namespace {

// Parameters of mix m (0..8) for a row; every mix sets a seed.
sampling_params mix_params(int m, std::mt19937_64& rng) {
  sampling_params p;
  p.has_seed = true;
  p.seed = rng();
  std::uniform_real_distribution<float> u(0, 1);
  const int lp[] = {-1, 0, 5, 20};
  p.logprobs = lp[rng() % 4];
  p.temperature = 0.3f + 1.5f * u(rng);
  switch (m) {
  case 0:
    p.temperature = 0;
    break;
  case 1:
    break;
  case 2:
    p.top_k = 1 + static_cast<int32_t>(rng() % 50);
    break;
  case 3:
    p.top_p = 0.05f + 0.9f * u(rng);
    break;
  case 4:
    p.min_p = 0.3f * u(rng);
    break;
  case 5:
    p.top_k = 1 + static_cast<int32_t>(rng() % 200);
    p.top_p = 0.2f + 0.8f * u(rng);
    p.min_p = 0.1f * u(rng);
    break;
  case 6:
  case 7:
    p.repetition_penalty = 0.5f + 1.5f * u(rng);
    p.presence_penalty = -2 + 4 * u(rng);
    p.frequency_penalty = -2 + 4 * u(rng);
    p.top_p = m == 6 ? 0.5f + 0.5f * u(rng) : 1.0f;
    if (m == 7)
      p.temperature = 0;
    break;
  default:
    p.temperature = (rng() % 2) ? 0.0f : 1.0f;
    break; // everything banned
  }
  return p;
}

} // namespace

TEST_CASE("gpu sampler equals the host sampler over random rows and parameter mixes") {
  if (!test::have_gpu())
    return;
  auto gs = make_gpu_sampler();
  REQUIRE_MESSAGE(gs.has_value(), (gs ? "" : gs.error().to_string()));
  std::mt19937_64 rng(20261202);
  std::normal_distribution<float> normal(0, 1);
  int mismatched_tokens = 0, rows_checked = 0;
  for (int64_t V : {7, 1000, 32003, 151936}) {
    const int rows = V > 100000 ? 90 : 270;
    std::vector<float> logits(static_cast<size_t>(rows * V));
    std::vector<sampling_params> params(static_cast<size_t>(rows));
    std::vector<penalty_state> pens(static_cast<size_t>(rows));
    std::vector<std::vector<token_id>> banned(static_cast<size_t>(rows));
    std::vector<row_job> jobs;
    for (int r = 0; r < rows; ++r) {
      const int m = r % 9;
      const float scale = (r / 9) % 2 ? 4.0f : 1.0f;
      const bool ties = (r / 18) % 2 == 1; // values on a 0.5 grid: many equal logits
      for (int64_t i = 0; i < V; ++i) {
        float x = normal(rng) * scale;
        logits[static_cast<size_t>(r * V + i)] = ties ? std::round(x * 2) / 2 : x;
      }
      params[r] = mix_params(m, rng);
      if (m == 6 || m == 7)
        for (int k = 0, n = static_cast<int>(rng() % 60); k < n; ++k)
          pens[r].add(static_cast<token_id>(rng() % V), rng() % 2 == 0);
      if (r % 4 == 1) { // logit_bias: distinct ascending ids, large and small biases
        std::set<token_id> ids;
        for (int k = 0, n = 1 + static_cast<int>(rng() % 8); k < n; ++k)
          ids.insert(static_cast<token_id>(rng() % V));
        const float range = (r / 4) % 2 ? 100.0f : 3.0f;
        for (auto id : ids) {
          params[r].bias_tokens.push_back(id);
          params[r].bias_values.push_back(
              range * (2 * std::uniform_real_distribution<float>(0, 1)(rng) - 1));
        }
      }
      if (m == 8)
        for (int64_t i = 0; i < V; ++i)
          banned[r].push_back(static_cast<token_id>(i));
      else if (m % 3 == 0)
        for (int k = 0; k < 5; ++k)
          banned[r].push_back(static_cast<token_id>(rng() % V));
      jobs.push_back({.seq = static_cast<size_t>(r),
                      .row = r,
                      .in = {.params = &params[r],
                             .index = rng() % 1000,
                             .banned = banned[r],
                             .penalties = (m == 6 || m == 7) ? &pens[r] : nullptr}});
    }
    float* d = nullptr;
    REQUIRE(cudaMalloc(&d, logits.size() * 4) == cudaSuccess);
    REQUIRE(cudaMemcpy(d, logits.data(), logits.size() * 4, cudaMemcpyHostToDevice) == cudaSuccess);
    auto got = (*gs)->sample(d, V, jobs, nullptr);
    cudaFree(d);
    REQUIRE_MESSAGE(got.has_value(), (got ? "" : got.error().to_string()));
    REQUIRE(got->size() == jobs.size());
    std::vector<float> scratch;
    for (int r = 0; r < rows; ++r) {
      CAPTURE(V);
      CAPTURE(r);
      CAPTURE(r % 9);
      std::span<const float> row(logits.data() + r * V, static_cast<size_t>(V));
      auto want = sample_row(row, jobs[r].in, scratch);
      const auto& g = (*got)[r];
      ++rows_checked;
      if (g.token != want.token) {
        ++mismatched_tokens;
        MESSAGE("token " << g.token << " != host " << want.token);
        continue;
      }
      CHECK(g.logprob == doctest::Approx(want.logprob).epsilon(1e-5).scale(1));
      REQUIRE(g.top_ids.size() == want.top_ids.size());
      for (size_t k = 0; k < want.top_ids.size(); ++k) {
        CHECK(g.top_ids[k] == want.top_ids[k]);
        CHECK(g.top_logprobs[k] == doctest::Approx(want.top_logprobs[k]).epsilon(1e-5).scale(1));
      }
    }
  }
  MESSAGE(rows_checked << " rows, " << mismatched_tokens << " tokens differ");
  CHECK(mismatched_tokens == 0);
}

namespace {

// Runs prompts to `steps` new tokens through `step` (plan -> one token per sequence), one
// sequence per contiguous run of KV blocks; returns each sequence's tokens.
template <class Step>
std::vector<std::vector<token_id>> run_loop(const std::vector<std::vector<token_id>>& prompts,
                                            const sampling_params& sp, int steps, uint64_t base,
                                            Step&& step) {
  constexpr int block = 16, per_seq = 8;
  std::vector<std::vector<token_id>> out(prompts.size());
  for (int t = 0; t < steps; ++t) {
    step_plan plan;
    plan.step = base + static_cast<uint64_t>(t);
    for (size_t i = 0; i < prompts.size(); ++i) {
      seq_step s;
      s.id = base + i;
      s.num_prompt_tokens = static_cast<int32_t>(prompts[i].size());
      s.first_step = t == 0;
      s.start_pos = t == 0 ? 0 : s.num_prompt_tokens + t - 1;
      s.tokens = t == 0 ? prompts[i] : std::vector<token_id>{out[i].back()};
      for (int b = 0; b < per_seq; ++b)
        s.block_table.push_back(static_cast<int32_t>(i) * per_seq + b);
      REQUIRE(s.start_pos + static_cast<int>(s.tokens.size()) <= block * per_seq);
      s.sampling = sp;
      plan.seqs.push_back(std::move(s));
    }
    auto ids = step(plan);
    REQUIRE(ids.size() == prompts.size());
    for (size_t i = 0; i < prompts.size(); ++i)
      out[i].push_back(ids[i]);
  }
  return out;
}

std::vector<token_id> tokens_of(const expected<step_result>& r) {
  REQUIRE_MESSAGE(r.has_value(), (r ? "" : r.error().to_string()));
  std::vector<token_id> ids;
  for (const auto& o : r->outputs)
    ids.push_back(o.token);
  return ids;
}

} // namespace

TEST_CASE("cuda_executor on a golden model: greedy equals forward_greedy, sampling equals the "
          "host sampler") {
  if (!test::have_gpu())
    return;
  auto dir = test::golden_model("tiny-qwen3");
  if (!dir)
    return;
  auto model = load_cuda_backend(*dir, {.num_blocks = 64, .block_size = 16},
                                 {.max_num_batched_tokens = 512,
                                  .max_num_seqs = 8,
                                  .max_logit_rows = 8,
                                  .max_model_len = 128});
  REQUIRE_MESSAGE(model.has_value(), (model ? "" : model.error().to_string()));
  auto exec = cuda_executor::create(**model);
  REQUIRE(exec.has_value());
  local_executor host(**model);
  auto j = test::read_json(*dir / "golden.json");
  std::vector<std::vector<token_id>> prompts;
  for (auto& c : j.at("cases"))
    if (prompts.size() < 4)
      prompts.push_back(c.at("prompt_ids").get<std::vector<token_id>>());
  for (auto& p : prompts)
    if (p.size() > 100)
      p.resize(100);

  sampling_params greedy{.temperature = 0, .has_seed = true, .seed = 1, .logprobs = 3};
  auto ref = run_loop(prompts, greedy, 12, 100, [&](const step_plan& plan) {
    std::vector<token_id> ids;
    auto r = (*model)->forward_greedy(plan, ids);
    REQUIRE_MESSAGE(r.has_value(), (r ? "" : r.error().to_string()));
    return ids;
  });
  auto got = run_loop(prompts, greedy, 12, 200,
                      [&](const step_plan& plan) { return tokens_of((*exec)->execute(plan)); });
  CHECK(got == ref);

  for (int mix = 0; mix < 3; ++mix) {
    sampling_params sp{.temperature = 0.9f, .has_seed = true, .seed = 42u + mix};
    if (mix == 1) {
      sp.top_k = 20;
      sp.top_p = 0.9f;
    }
    if (mix == 2) {
      sp.min_p = 0.05f;
      sp.repetition_penalty = 1.3f;
      sp.frequency_penalty = 0.5f;
    }
    CAPTURE(mix);
    auto on_host = run_loop(prompts, sp, 12, 1000 + 100 * mix,
                            [&](const step_plan& plan) { return tokens_of(host.execute(plan)); });
    auto on_gpu = run_loop(prompts, sp, 12, 1000 + 100 * mix, [&](const step_plan& plan) {
      return tokens_of((*exec)->execute(plan));
    });
    CHECK(on_gpu == on_host);
  }
}

TEST_CASE("gpu sampler applies structured-output masks exactly as the host sampler") {
  if (!test::have_gpu())
    return;
  auto gs = make_gpu_sampler();
  REQUIRE_MESSAGE(gs.has_value(), (gs ? "" : gs.error().to_string()));
  std::mt19937_64 rng(20261206);
  std::normal_distribution<float> normal(0, 1);
  // Real masks: the JSON-schema grammar over the Qwen3 vocabulary, along a random walk.
  std::vector<std::vector<uint32_t>> real;
  if (auto dir = test::golden_model("tiny-qwen3")) {
    auto text = model_tokenizer::load(*dir);
    REQUIRE(text.has_value());
    auto gc = grammar_compiler::create(*text->text, 151936, text->eos_ids);
    REQUIRE(gc.has_value());
    auto c = (*gc)->compile({.type = grammar_spec::kind::json_schema,
                             .text = R"({"type": "object", "properties": {"a": {"type": "string",
                                 "maxLength": 6}, "b": {"type": "integer"}}, "required": ["a"]})"});
    REQUIRE(c.has_value());
    for (int step = 0; step < 40; ++step) {
      auto& m = real.emplace_back();
      (*c)->fill_mask(m);
      std::vector<token_id> allowed;
      for (token_id t = 0; t < 151936; ++t)
        if (mask_allows(m, t))
          allowed.push_back(t);
      if (!(*c)->accept(allowed[rng() % allowed.size()]) || (*c)->terminated())
        break;
    }
  }
  int rows_checked = 0, constrained = 0, mismatched = 0;
  for (int64_t V : {7, 1000, 151936}) {
    const int rows = V > 100000 ? 90 : 180;
    const size_t words = static_cast<size_t>((V + 31) / 32);
    std::vector<float> logits(static_cast<size_t>(rows * V));
    std::vector<sampling_params> params(static_cast<size_t>(rows));
    std::vector<std::vector<uint32_t>> masks(static_cast<size_t>(rows));
    std::vector<std::vector<token_id>> banned(static_cast<size_t>(rows));
    std::vector<row_job> jobs;
    for (int r = 0; r < rows; ++r) {
      for (int64_t i = 0; i < V; ++i)
        logits[static_cast<size_t>(r * V + i)] = normal(rng) * ((r / 9) % 2 ? 4.0f : 1.0f);
      params[r] = mix_params(r % 8, rng); // mix 8 (everything banned) is left out
      auto& m = masks[r];
      switch (r % 5) {
      case 0: // unconstrained row in the same batch
        break;
      case 1: // a few allowed tokens
        m.assign(words, 0);
        for (int k = 0, n = 1 + static_cast<int>(rng() % 12); k < n; ++k) {
          const auto t = rng() % static_cast<uint64_t>(V);
          m[t / 32] |= 1u << (t % 32);
        }
        break;
      case 2: // about half
        m.resize(words);
        for (auto& w : m)
          w = static_cast<uint32_t>(rng());
        m[0] |= 1u;
        break;
      case 3: // shorter than the vocabulary: the ids past it are not allowed
        m.assign(std::max<size_t>(1, words / 2), 0xffffffffu);
        break;
      default: // a real grammar mask when the vocabulary is Qwen's
        if (V == 151936 && !real.empty())
          m = real[static_cast<size_t>(r) % real.size()];
        else
          m.assign(words, 0x0f0f0f0fu);
        break;
      }
      if (r % 7 == 3) // banned tokens too
        for (int k = 0; k < 5; ++k)
          banned[r].push_back(static_cast<token_id>(rng() % V));
      jobs.push_back({.seq = static_cast<size_t>(r),
                      .row = r,
                      .in = {.params = &params[r],
                             .index = rng() % 1000,
                             .banned = banned[r],
                             .allowed = masks[r]}});
    }
    float* d = nullptr;
    REQUIRE(cudaMalloc(&d, logits.size() * 4) == cudaSuccess);
    REQUIRE(cudaMemcpy(d, logits.data(), logits.size() * 4, cudaMemcpyHostToDevice) == cudaSuccess);
    auto got = (*gs)->sample(d, V, jobs, nullptr);
    cudaFree(d);
    REQUIRE_MESSAGE(got.has_value(), (got ? "" : got.error().to_string()));
    std::vector<float> scratch;
    for (int r = 0; r < rows; ++r) {
      CAPTURE(V);
      CAPTURE(r);
      std::span<const float> row(logits.data() + r * V, static_cast<size_t>(V));
      auto want = sample_row(row, jobs[r].in, scratch);
      const auto& g = (*got)[r];
      ++rows_checked;
      bool any = true; // some token is allowed and not banned
      if (!masks[r].empty()) {
        ++constrained;
        any = false;
        for (token_id t = 0; t < V && !any; ++t)
          any = mask_allows(masks[r], t) &&
                std::find(banned[r].begin(), banned[r].end(), t) == banned[r].end();
        if (any)
          CHECK(mask_allows(masks[r], g.token));
      }
      if (g.token != want.token) {
        ++mismatched;
        MESSAGE("token " << g.token << " != host " << want.token);
        continue;
      }
      if (any) // else the documented fallback: the GPU reports -inf, the host the raw logprob
        CHECK(g.logprob == doctest::Approx(want.logprob).epsilon(1e-5).scale(1));
    }
  }
  MESSAGE(rows_checked << " rows (" << constrained << " constrained, " << real.size()
                       << " real grammar masks), " << mismatched << " tokens differ");
  CHECK(mismatched == 0);
}
