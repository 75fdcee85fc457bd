// CPU kernels against straightforward double-precision formulas, and the backend's handling of
// plans: bad plans are refused, a sequence's result does not depend on its batch neighbours.
#include <cmath>
#include <random>

#include <doctest/doctest.h>

#include "engine/backend/cpu/cpu_backend.hpp"
#include "engine/backend/cpu/ops.hpp"
#include "engine/generate.hpp"
#include "golden.hpp"
#include "safetensors_writer.hpp"

using namespace troupe;
using namespace troupe::engine;

namespace {
std::vector<float> random_vector(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(-1, 1);
  std::vector<float> v(n);
  for (auto& x : v)
    x = d(rng);
  return v;
}
} // namespace

TEST_CASE("matmul_nt matches a double-precision reference at odd sizes") {
  for (auto [n, in, out] : {std::tuple{1, 1, 1}, {3, 7, 5}, {9, 33, 17}, {16, 64, 40}}) {
    auto x = random_vector(static_cast<size_t>(n * in), 1);
    auto w = random_vector(static_cast<size_t>(out * in), 2);
    auto b = random_vector(static_cast<size_t>(out), 3);
    std::vector<float> y(static_cast<size_t>(n * out));
    cpu::matmul_nt(x.data(), n, in, w.data(), out, y.data(), b.data());
    for (int t = 0; t < n; ++t)
      for (int o = 0; o < out; ++o) {
        double ref = b[o];
        for (int i = 0; i < in; ++i)
          ref += static_cast<double>(x[t * in + i]) * w[o * in + i];
        CHECK(y[t * out + o] == doctest::Approx(ref).epsilon(1e-5));
      }
  }
}

TEST_CASE("rms_norm, softmax and rope against their formulas") {
  auto x = random_vector(12, 4);
  auto w = random_vector(6, 5);
  std::vector<float> y(12);
  cpu::rms_norm(x.data(), 2, 6, w.data(), 1e-6, y.data());
  for (int t = 0; t < 2; ++t) {
    double ms = 0;
    for (int i = 0; i < 6; ++i)
      ms += x[t * 6 + i] * x[t * 6 + i] / 6.0;
    for (int i = 0; i < 6; ++i)
      CHECK(y[t * 6 + i] == doctest::Approx(w[i] * x[t * 6 + i] / std::sqrt(ms + 1e-6)));
  }
  std::vector<float> s = {1000, 1001, 999};
  cpu::softmax(s.data(), 3);
  double z = std::exp(0) + std::exp(1) + std::exp(-1);
  CHECK(s[1] == doctest::Approx(std::exp(1) / z));

  // RoPE: rotating head pair (i, i + d/2) by pos * inv_freq[i] keeps norms and is invertible.
  std::vector<float> inv = {1.0f, 0.1f};
  std::vector<float> q = {1, 2, 3, 4};
  cpu::apply_rope(q.data(), 1, 4, 3, inv);
  CHECK(q[0] == doctest::Approx(1 * std::cos(3.0) - 3 * std::sin(3.0)));
  CHECK(q[2] == doctest::Approx(3 * std::cos(3.0) + 1 * std::sin(3.0)));
  CHECK(q[1] == doctest::Approx(2 * std::cos(0.3) - 4 * std::sin(0.3)));
  CHECK(q[3] == doctest::Approx(4 * std::cos(0.3) + 2 * std::sin(0.3)));
}

TEST_CASE("cpu backend refuses malformed plans with the reason") {
  test::temp_dir tmp;
  test::tiny_llama m;
  m.write(tmp.path(), false);
  auto b = cpu_backend::load(tmp.path(), {.num_blocks = 4, .block_size = 4});
  REQUIRE(b.has_value());
  forward_output out;
  auto refuse = [&](step_plan plan, const char* text) {
    auto r = (*b)->forward(plan, out);
    REQUIRE_FALSE(r.has_value());
    CHECK_MESSAGE(r.error().message().find(text) != std::string::npos, r.error().message());
  };
  seq_step ok{.id = 1, .start_pos = 0, .tokens = {1, 2, 3}, .block_table = {0}};
  step_plan plan{.step = 7, .seqs = {ok}};
  CHECK((*b)->forward(plan, out).has_value());

  auto bad = ok;
  bad.tokens = {1, 40};
  refuse({.step = 7, .seqs = {bad}}, "token id 40 outside the vocabulary [0, 32)");
  bad = ok;
  bad.block_table = {9};
  refuse({.step = 7, .seqs = {bad}}, "KV block 9 outside the pool [0, 4)");
  bad = ok;
  bad.start_pos = 3;
  refuse({.step = 7, .seqs = {bad}}, "block table holds 4 tokens, needs 6");
  refuse({.step = 7, .seqs = {ok, ok}}, "sequence 1 appears twice");
  bad = ok;
  bad.tokens.clear();
  refuse({.step = 7, .seqs = {bad}}, "feeds no tokens");
}

TEST_CASE("sharded and single-file folders give identical logits, neighbours don't matter") {
  test::temp_dir tmp;
  test::tiny_llama m;
  m.write(tmp.path() / "one", false);
  m.write(tmp.path() / "two", true);
  generate_options opts{.max_new_tokens = 6, .record_prompt_logits = true};
  std::vector<token_id> p = {3, 1, 4, 1, 5, 9, 2, 6};
  auto a = cpu_backend::load(tmp.path() / "one", {.num_blocks = 32, .block_size = 2});
  auto b = cpu_backend::load(tmp.path() / "two", {.num_blocks = 32, .block_size = 2});
  REQUIRE(a.has_value());
  REQUIRE(b.has_value());
  auto ra = generate_greedy(**a, {p}, opts);
  auto rb = generate_greedy(**b, {{7, 7}, p, {1}}, opts);
  REQUIRE(ra.has_value());
  REQUIRE(rb.has_value());
  CHECK(ra->front().output == (*rb)[1].output);
  CHECK(ra->front().prompt_argmax == (*rb)[1].prompt_argmax);
  CHECK(ra->front().last_prompt_logits == (*rb)[1].last_prompt_logits);
  CHECK(ra->front().output.size() == 6);

  auto too_big = generate_greedy(**a, {std::vector<token_id>(60, 1)}, opts);
  REQUIRE_FALSE(too_big.has_value());
  CHECK(too_big.error().code() == errc::resource_exhausted);
}
