// Sampling: parameter validation, greedy ties, seeded draws that depend only on the seed and the
// token index, the frequency of draws, top-k/top-p/min-p, penalties, banned tokens, logprobs.
#include <cmath>
#include <map>

#include <doctest/doctest.h>

#include "engine/sampling/sampler.hpp"

using namespace troupe;
using namespace troupe::engine;

namespace {
sampling_params temp(float t, uint64_t seed = 7) {
  sampling_params p;
  p.temperature = t;
  p.has_seed = true;
  p.seed = seed;
  return p;
}
token_id draw(const std::vector<float>& logits, const sampling_params& p, uint64_t index,
              std::span<const token_id> banned = {}, const penalty_state* pen = nullptr) {
  std::vector<float> scratch;
  return sample_row(logits, {.params = &p, .index = index, .banned = banned, .penalties = pen},
                    scratch)
      .token;
}
} // namespace

TEST_CASE("sampler: validate names the parameter") {
  sampling_params p;
  CHECK(validate(p).has_value());
  p.temperature = -1;
  auto r = validate(p);
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().message().find("temperature") != std::string::npos);
  p = {};
  p.top_p = NAN;
  CHECK(validate(p).error().message().find("top_p") != std::string::npos);
}

TEST_CASE("sampler: greedy takes the argmax, lowest id on ties, banned tokens never win") {
  std::vector<float> l{1, 3, 3, 2};
  CHECK(draw(l, temp(0), 0) == 1);
  std::vector<token_id> ban{1, 2};
  CHECK(draw(l, temp(0), 0, ban) == 3);
  auto tk = temp(1.0f);
  tk.top_k = 1;
  CHECK(draw(l, tk, 5) == 1);
}

TEST_CASE("sampler: logit_bias shifts logits before sampling, not the reported logprobs") {
  std::vector<float> l{1, 3, 2, 0};
  auto p = temp(0);
  p.bias_tokens = {0, 1};
  p.bias_values = {2.5f, -100.0f};
  CHECK(validate(p).has_value());
  std::vector<float> scratch;
  auto out = sample_row(l, {.params = &p, .index = 0}, scratch);
  CHECK(out.token == 0); // 1 + 2.5 beats 2; token 1 is pushed far down
  double z = 0;
  for (float x : l)
    z += std::exp(x - 3.0);
  CHECK(out.logprob == doctest::Approx(1 - 3 - std::log(z)));
  auto hot = temp(1.0f);
  hot.bias_tokens = {3};
  hot.bias_values = {100.0f};
  for (uint64_t i = 0; i < 50; ++i)
    CHECK(draw(l, hot, i) == 3);
  p.bias_values = {2.5f, -100.5f};
  CHECK(validate(p).error().message().find("logit_bias") != std::string::npos);
  p.bias_values = {2.5f, 1};
  p.bias_tokens = {1, 0};
  CHECK(validate(p).error().message().find("logit_bias") != std::string::npos);
  p.bias_tokens = {1};
  CHECK(validate(p).error().message().find("logit_bias") != std::string::npos);
}

TEST_CASE("sampler: a draw depends only on seed and index, and follows the distribution") {
  std::vector<float> l{std::log(0.5f), std::log(0.3f), std::log(0.2f)};
  auto p = temp(1.0f, 1234);
  CHECK(draw(l, p, 17) == draw(l, p, 17));
  std::map<token_id, int> counts;
  const int n = 20000;
  for (int i = 0; i < n; ++i)
    ++counts[draw(l, p, static_cast<uint64_t>(i))];
  CHECK(counts[0] / double(n) == doctest::Approx(0.5).epsilon(0.05));
  CHECK(counts[1] / double(n) == doctest::Approx(0.3).epsilon(0.05));
  CHECK(counts[2] / double(n) == doctest::Approx(0.2).epsilon(0.05));
  // Another seed gives another sequence of draws.
  auto q = temp(1.0f, 99);
  int differ = 0;
  for (int i = 0; i < 100; ++i)
    differ += draw(l, p, static_cast<uint64_t>(i)) != draw(l, q, static_cast<uint64_t>(i));
  CHECK(differ > 20);
}

TEST_CASE("sampler: top_p and min_p cut the tail") {
  std::vector<float> l{std::log(0.6f), std::log(0.3f), std::log(0.1f)};
  auto p = temp(1.0f);
  p.top_p = 0.5f; // the top token alone covers it
  for (int i = 0; i < 200; ++i)
    CHECK(draw(l, p, static_cast<uint64_t>(i)) == 0);
  p.top_p = 0.8f; // top two
  auto m = temp(1.0f);
  m.min_p = 0.4f; // 0.1 / 0.6 < 0.4 is cut, 0.3 / 0.6 stays
  std::map<token_id, int> tp, mp;
  for (int i = 0; i < 2000; ++i) {
    ++tp[draw(l, p, static_cast<uint64_t>(i))];
    ++mp[draw(l, m, static_cast<uint64_t>(i))];
  }
  CHECK(tp.count(2) == 0);
  CHECK(tp[1] > 400);
  CHECK(mp.count(2) == 0);
  CHECK(mp[1] > 400);
}

TEST_CASE("sampler: repetition, presence and frequency penalties") {
  std::vector<float> l{2.0f, 1.9f, -1.0f};
  penalty_state st;
  st.add(0, true); // in the prompt only
  auto p = temp(0);
  p.repetition_penalty = 1.2f; // 2.0 / 1.2 < 1.9
  CHECK(draw(l, p, 0, {}, &st) == 1);
  auto f = temp(0);
  f.frequency_penalty = 0.1f; // prompt tokens are not counted
  CHECK(draw(l, f, 0, {}, &st) == 0);
  st.add(0, false);
  st.add(0, false);
  CHECK(draw(l, f, 0, {}, &st) == 1); // 2.0 - 2 * 0.1 < 1.9
  auto pr = temp(0);
  pr.presence_penalty = 0.2f;
  CHECK(draw(l, pr, 0, {}, &st) == 1);
}

TEST_CASE("sampler: logprobs are the raw log-softmax, top-n sorted") {
  std::vector<float> l{0.0f, 1.0f, 2.0f, 1.0f};
  auto p = temp(0);
  p.logprobs = 3;
  std::vector<float> scratch;
  auto o = sample_row(l, {.params = &p}, scratch);
  double z = 0;
  for (float x : l)
    z += std::exp(x);
  CHECK(o.token == 2);
  CHECK(o.logprob == doctest::Approx(2.0 - std::log(z)));
  CHECK(o.top_ids == std::vector<token_id>{2, 1, 3});
  REQUIRE(o.top_logprobs.size() == 3);
  CHECK(o.top_logprobs[1] == doctest::Approx(1.0 - std::log(z)));
}

TEST_CASE("sampler: penalty state comes from the plan's tokens and is dropped when told") {
  sampler s;
  forward_output out;
  step_plan plan;
  seq_step st;
  st.id = 5;
  st.tokens = {0, 1};
  st.num_prompt_tokens = 1; // token 0 is prompt, token 1 generated
  st.first_step = true;
  st.sampling = temp(0);
  st.sampling.frequency_penalty = 2.0f;
  plan.seqs.push_back(st);
  // Logits favour token 1, but it was generated once: 3 - 2 < 2 (token 0 untouched).
  out.vocab_size = 3;
  out.logits = {2.0f, 3.0f, 0.0f};
  out.first_row = {0};
  out.num_rows = {1};
  auto r = s.sample(plan, out);
  REQUIRE(r.has_value());
  REQUIRE(r->outputs.size() == 1);
  CHECK(r->outputs[0].token == 0);
  CHECK(s.num_tracked() == 1);
  step_plan done;
  done.finished = {5};
  forward_output none;
  REQUIRE(s.sample(done, none).has_value());
  CHECK(s.num_tracked() == 0);
}

TEST_CASE("sampler: prompt logprobs score each prompt position from the row before it") {
  // A 5-token prompt fed as chunks [0, 3) and [3, 5), every row's logits back (vocab 4).
  const std::vector<float> rows = {0.0f, 2.0f, 1.0f, 1.0f,  // predicts position 1 (token 2)
                                   3.0f, 0.0f, 0.0f, 0.0f,  // position 2 (token 0)
                                   0.0f, 0.0f, 0.0f, 5.0f,  // position 3 (token 1)
                                   1.0f, 1.0f, 1.0f, 1.0f,  // position 4 (token 3)
                                   0.0f, 0.0f, 9.0f, 0.0f}; // after the prompt: sampled
  const std::vector<token_id> prompt = {1, 2, 0, 1, 3};
  auto log_softmax = [&](size_t row, token_id t) {
    double z = 0;
    for (size_t i = 0; i < 4; ++i)
      z += std::exp(static_cast<double>(rows[row * 4 + i]));
    return static_cast<float>(rows[row * 4 + static_cast<size_t>(t)] - std::log(z));
  };
  sampler s;
  std::vector<position_logprobs> scored;
  for (int32_t chunk = 0; chunk < 2; ++chunk) {
    const int32_t begin = chunk == 0 ? 0 : 3, end = chunk == 0 ? 3 : 5;
    step_plan plan;
    seq_step st;
    st.id = 9;
    st.start_pos = begin;
    st.tokens.assign(prompt.begin() + begin, prompt.begin() + end);
    st.logits = logits_mode::all;
    st.num_prompt_tokens = 5;
    st.sampling = temp(0);
    st.sampling.prompt_logprobs = 2;
    st.next_prompt_token = end < 5 ? prompt[static_cast<size_t>(end)] : -1;
    plan.seqs.push_back(st);
    forward_output out{.vocab_size = 4,
                       .logits = {rows.begin() + begin * 4, rows.begin() + end * 4},
                       .first_row = {0},
                       .num_rows = {end - begin}};
    CHECK(scores_prompt(plan));
    auto r = s.sample(plan, out);
    REQUIRE(r.has_value());
    REQUIRE(r->outputs.size() == 1);
    CHECK(r->outputs[0].id == 9);
    // The first chunk samples nothing; the last samples from its last row.
    CHECK(r->outputs[0].token == (chunk == 0 ? -1 : 2));
    scored.insert(scored.end(), r->outputs[0].prompt_logprobs.begin(),
                  r->outputs[0].prompt_logprobs.end());
  }
  REQUIRE(scored.size() == 4);
  const int32_t ranks[] = {2, 1, 2, 1}; // 1 + the logits above it (ties share a rank)
  for (int32_t p = 1; p <= 4; ++p) {
    const auto& e = scored[static_cast<size_t>(p - 1)];
    CAPTURE(p);
    CHECK(e.position == p);
    CHECK(e.token == prompt[static_cast<size_t>(p)]);
    CHECK(e.logprob == doctest::Approx(log_softmax(static_cast<size_t>(p - 1), e.token)));
    CHECK(e.rank == ranks[p - 1]);
    REQUIRE(e.top_ids.size() == 2);
    CHECK(e.top_logprobs[0] >= e.top_logprobs[1]);
  }
  CHECK(scored[0].top_ids == std::vector<token_id>{1, 2}); // 2.0, then 1.0 (lower id of the tie)
  CHECK(scored[2].top_ids == std::vector<token_id>{3, 0});
  // Without prompt logprobs no step scores, and a bad token is an internal error.
  step_plan plain;
  plain.seqs.push_back({.id = 1, .tokens = {0}, .num_prompt_tokens = 1});
  CHECK_FALSE(scores_prompt(plain));
  step_plan bad;
  seq_step b{.id = 2, .tokens = {0, 7}, .logits = logits_mode::all, .num_prompt_tokens = 3};
  b.sampling.prompt_logprobs = 0;
  b.next_prompt_token = 1;
  bad.seqs.push_back(b);
  forward_output two{
      .vocab_size = 4, .logits = std::vector<float>(8, 0.0f), .first_row = {0}, .num_rows = {2}};
  auto r = sampler{}.sample(bad, two);
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code() == errc::internal);
}
