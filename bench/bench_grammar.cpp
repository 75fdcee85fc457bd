// Structured-output cost on the host: building the grammar compiler for a vocabulary, compiling
// grammars (first time and from xgrammar's cache), and the per-token matcher work the scheduler
// does for a constrained sequence (fill_mask + accept), along random walks through each grammar.
// The bound in the same run: the host sampler's sample_row on one unconstrained row of the same
// vocabulary (what every sampled token costs the CPU sampler anyway).
//   bench_grammar MODEL_OR_TOKENIZER_DIR [--walks 20]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "engine/grammar/grammar.hpp"
#include "engine/sampling/sampler.hpp"
#include "engine/tokenizer/chat_template.hpp"

using namespace troupe;
using namespace troupe::engine;

namespace {

using clk = std::chrono::steady_clock;
double us_since(clk::time_point t0) {
  return std::chrono::duration<double, std::micro>(clk::now() - t0).count();
}

double pct(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1)))];
}

} // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: bench_grammar MODEL_OR_TOKENIZER_DIR [--walks N]\n");
    return 2;
  }
  int walks = 20;
  for (int i = 2; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--walks") == 0)
      walks = std::atoi(argv[i + 1]);
  auto text = model_tokenizer::load(argv[1]);
  if (!text) {
    std::fprintf(stderr, "%s\n", text.error().to_string().c_str());
    return 1;
  }
  const int64_t vocab = text->text->size();
  auto t0 = clk::now();
  auto gc = grammar_compiler::create(*text->text, vocab, text->eos_ids);
  if (!gc) {
    std::fprintf(stderr, "%s\n", gc.error().to_string().c_str());
    return 1;
  }
  std::printf("vocabulary %lld tokens: grammar_compiler::create %.1f ms\n",
              static_cast<long long>(vocab), us_since(t0) / 1e3);

  // The bound: one unconstrained host-sampler row (temperature 1, no top-k/p).
  std::mt19937_64 rng(1);
  std::normal_distribution<float> normal(0, 2);
  std::vector<float> logits(static_cast<size_t>(vocab)), scratch;
  for (auto& x : logits)
    x = normal(rng);
  sampling_params sp{.temperature = 1.0f, .has_seed = true, .seed = 3};
  std::vector<double> row_us;
  for (int i = 0; i < 200; ++i) {
    auto t = clk::now();
    auto o = sample_row(logits, {.params = &sp, .index = static_cast<uint64_t>(i)}, scratch);
    row_us.push_back(us_since(t));
    if (o.token < 0)
      return 1;
  }
  const double bound = pct(row_us, 0.5);
  std::printf("bound: sample_row, one unconstrained row: p50 %.1f us\n\n", bound);

  struct item {
    const char* name;
    grammar_spec spec;
  };
  using k = grammar_spec::kind;
  const item items[] = {
      {"json_object", {.type = k::json_object}},
      {"json_schema (3 fields)",
       {.type = k::json_schema,
        .text = R"({"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
            "rain": {"type": "boolean"}, "temp": {"type": "integer", "minimum": -40,
            "maximum": 50}}, "required": ["city", "rain", "temp"]})"}},
      {"json_schema (nested, arrays)",
       {.type = k::json_schema,
        .text = R"({"type": "object", "properties": {"items": {"type": "array", "maxItems": 4,
            "items": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0,
            "maximum": 999}, "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["a",
            "b", "c"]}}, "note": {"type": "string", "maxLength": 16}}, "required": ["id", "tags",
            "note"]}}}, "required": ["items"]})"}},
      {"regex (email)", {.type = k::regex, .text = "[a-z]{1,10}@[a-z]{2,8}\\.(com|org|net)"}},
      {"choice (4)", {.type = k::choice, .choices = {"Paris", "London", "New York", "Tokyo"}}},
      {"ebnf", {.type = k::ebnf, .text = "root ::= \"(\" [0-9]+ (\"+\" [0-9]+)* \")\""}},
  };
  std::printf("| grammar | compile, first | compile, cached | fill_mask p50 | p99 | accept p50 | "
              "tokens | mask / bound |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n");
  for (const auto& it : items) {
    auto t = clk::now();
    auto first = (*gc)->compile(it.spec);
    const double first_us = us_since(t);
    if (!first) {
      std::fprintf(stderr, "%s: %s\n", it.name, first.error().to_string().c_str());
      return 1;
    }
    t = clk::now();
    auto again = (*gc)->compile(it.spec);
    const double cached_us = us_since(t);
    std::vector<double> fill_us, accept_us;
    std::vector<uint32_t> mask;
    std::vector<token_id> allowed;
    for (int w = 0; w < walks; ++w) {
      auto c = (*gc)->compile(it.spec);
      for (int step = 0; step < 256; ++step) {
        auto t1 = clk::now();
        (*c)->fill_mask(mask);
        fill_us.push_back(us_since(t1));
        allowed.clear();
        for (token_id tok = 0; tok < vocab; ++tok)
          if (mask_allows(mask, tok))
            allowed.push_back(tok);
        const token_id tok = allowed[rng() % allowed.size()];
        auto t2 = clk::now();
        (*c)->accept(tok);
        accept_us.push_back(us_since(t2));
        if ((*c)->terminated())
          break;
      }
    }
    const double p50 = pct(fill_us, 0.5);
    std::printf("| %s | %.2f ms | %.3f ms | %.1f us | %.1f us | %.1f us | %zu | %.2f |\n", it.name,
                first_us / 1e3, cached_us / 1e3, p50, pct(fill_us, 0.99), pct(accept_us, 0.5),
                fill_us.size(), p50 / bound);
  }
  return 0;
}
