// Conformance of the float32 CPU backend against the Hugging Face references in
// golden/models/*/golden.json (see that folder's README for what each field holds).
#include <cmath>

#include <doctest/doctest.h>

#include "engine/backend/cpu/cpu_backend.hpp"
#include "engine/generate.hpp"
#include "golden.hpp"

using namespace troupe;
using namespace troupe::engine;

namespace {

constexpr double logit_tol = 1e-4;

struct golden_case {
  std::vector<token_id> prompt;
  std::vector<token_id> top20_ids;
  std::vector<double> top20_values;
  std::vector<double> first64;
  double l2 = 0, sum = 0;
  std::vector<token_id> all_argmax;
  std::vector<token_id> greedy;
};

std::vector<golden_case> read_cases(const std::filesystem::path& dir) {
  auto j = test::read_json(dir / "golden.json");
  std::vector<golden_case> cases;
  for (auto& c : j.at("cases")) {
    golden_case g;
    g.prompt = c.at("prompt_ids").get<std::vector<token_id>>();
    g.top20_ids = c.at("last_logits_top20").at("ids").get<std::vector<token_id>>();
    g.top20_values = c.at("last_logits_top20").at("values").get<std::vector<double>>();
    g.first64 = c.at("last_logits_first64").get<std::vector<double>>();
    g.l2 = c.at("last_logits_l2").get<double>();
    g.sum = c.at("last_logits_sum").get<double>();
    g.all_argmax = c.at("all_positions_argmax").get<std::vector<token_id>>();
    g.greedy = c.at("greedy_24").get<std::vector<token_id>>();
    cases.push_back(std::move(g));
  }
  return cases;
}

std::unique_ptr<cpu_backend> load(const std::filesystem::path& dir, int32_t block_size,
                                  int32_t num_blocks) {
  auto b = cpu_backend::load(dir, {.num_blocks = num_blocks, .block_size = block_size});
  REQUIRE_MESSAGE(b.has_value(), (b ? "" : b.error().to_string()));
  return std::move(*b);
}

void check_against_golden(const golden_case& g, const generation& got) {
  INFO("prompt of " << g.prompt.size() << " tokens");
  REQUIRE(got.last_prompt_logits.size() > 64);
  const auto& logits = got.last_prompt_logits;
  for (size_t i = 0; i < g.top20_ids.size(); ++i)
    CHECK(std::abs(logits[static_cast<size_t>(g.top20_ids[i])] - g.top20_values[i]) <= logit_tol);
  for (size_t i = 0; i < g.first64.size(); ++i)
    CHECK(std::abs(logits[i] - g.first64[i]) <= logit_tol);
  double l2 = 0, sum = 0;
  for (float v : logits) {
    l2 += static_cast<double>(v) * v;
    sum += v;
  }
  CHECK(std::sqrt(l2) == doctest::Approx(g.l2).epsilon(1e-5));
  CHECK(sum == doctest::Approx(g.sum).epsilon(1e-4));
  CHECK(got.prompt_argmax == g.all_argmax);
  CHECK(got.output == g.greedy);
}

void run_model(const std::string& name) {
  auto dir = test::golden_model(name);
  if (!dir)
    return;
  auto cases = read_cases(*dir);
  REQUIRE(cases.size() >= 4);
  const generate_options opts{.max_new_tokens = 24, .record_prompt_logits = true};

  // Each prompt alone, whole prompt in one step, 16-token blocks.
  auto model = load(*dir, 16, 64);
  std::vector<generation> alone;
  for (const auto& g : cases) {
    auto r = generate_greedy(*model, {g.prompt}, opts);
    REQUIRE_MESSAGE(r.has_value(), (r ? "" : r.error().to_string()));
    check_against_golden(g, r->front());
    alone.push_back(r->front());
  }

  // All prompts in one batch, prefilled in chunks of 5, with block sizes 1 and 16: the same
  // tokens, and logits equal to the single-request run up to float rounding.
  std::vector<std::vector<token_id>> prompts;
  for (const auto& g : cases)
    prompts.push_back(g.prompt);
  for (int32_t block_size : {1, 16}) {
    CAPTURE(block_size);
    auto batched_model = load(*dir, block_size, 1024 / block_size * 4);
    auto chunked = opts;
    chunked.prefill_chunk = 5;
    auto r = generate_greedy(*batched_model, prompts, chunked);
    REQUIRE_MESSAGE(r.has_value(), (r ? "" : r.error().to_string()));
    for (size_t i = 0; i < cases.size(); ++i) {
      const auto& got = (*r)[i];
      CHECK(got.output == alone[i].output);
      CHECK(got.prompt_argmax == alone[i].prompt_argmax);
      double worst = 0;
      for (size_t v = 0; v < got.last_prompt_logits.size(); ++v)
        worst = std::max(worst, static_cast<double>(std::abs(got.last_prompt_logits[v] -
                                                             alone[i].last_prompt_logits[v])));
      CHECK(worst <= 1e-5);
      check_against_golden(cases[i], got);
    }
  }
}

} // namespace

TEST_CASE("golden tiny-qwen3: logits, argmax at every position, greedy 24") {
  run_model("tiny-qwen3");
}
TEST_CASE("golden tiny-qwen2: q/k/v bias, untied lm_head") {
  run_model("tiny-qwen2");
}
TEST_CASE("golden tiny-llama: fp32 weights, llama3 rope scaling") {
  run_model("tiny-llama");
}
TEST_CASE("golden tiny-qwen3-moe: top-2 of 8 experts, normalised router weights") {
  run_model("tiny-qwen3-moe");
}
