// Structured output in the engine: xgrammar compiled against the real Qwen3 vocabulary (golden
// tokenizer). Random walks through the token masks (every step a uniformly drawn allowed token)
// over many JSON schemas, regexes and choices always end in a complete, valid output; tokens
// outside the mask are refused; the CPU sampler never picks a masked token; and the scheduler-
// driven engine on the random-weight tiny-qwen3 model with sampling on returns outputs that
// validate against their schemas, without changing what an unconstrained request in the same
// batch generates.
#include <algorithm>
#include <map>
#include <random>
#include <regex>

#include <doctest/doctest.h>

#include "engine/backend/cpu/cpu_backend.hpp"
#include "engine/exec/local_executor.hpp"
#include "engine/grammar/grammar.hpp"
#include "engine/sampling/sampler.hpp"
#include "engine/scheduler/engine_loop.hpp"
#include "engine/tokenizer/chat_template.hpp"
#include "golden.hpp"
#include "grammar_walk.hpp"
#include "json_schema_check.hpp"

using namespace troupe;
using namespace troupe::engine;
using json = nlohmann::json;

namespace {

struct fixture {
  model_tokenizer text;
  std::shared_ptr<grammar_compiler> compiler;
  int64_t vocab = 0;
};

// The Qwen3 tokenizer over tiny-qwen3's vocabulary size (151,936: padded past the tokenizer).
const fixture* qwen3() {
  static std::optional<fixture> f;
  static bool tried = false;
  if (!tried) {
    tried = true;
    auto dir = test::golden_model("tiny-qwen3");
    if (!dir)
      return nullptr;
    auto t = model_tokenizer::load(*dir);
    REQUIRE_MESSAGE(t.has_value(), (t ? "" : t.error().to_string()));
    const auto cfg = test::read_json(*dir / "config.json");
    f.emplace();
    f->text = std::move(*t);
    f->vocab = cfg["vocab_size"].get<int64_t>();
    auto c = grammar_compiler::create(*f->text.text, f->vocab, f->text.eos_ids);
    REQUIRE_MESSAGE(c.has_value(), (c ? "" : c.error().to_string()));
    f->compiler = std::move(*c);
  }
  return f ? &*f : nullptr;
}

std::unique_ptr<token_constraint> compile(const fixture& f, const grammar_spec& g) {
  auto c = f.compiler->compile(g);
  REQUIRE_MESSAGE(c.has_value(), (c ? "" : c.error().to_string()));
  return std::move(*c);
}

grammar_spec schema_spec(const json& schema) {
  return {.type = grammar_spec::kind::json_schema, .text = schema.dump()};
}

bool is_eos(const fixture& f, token_id t) {
  return std::find(f.text.eos_ids.begin(), f.text.eos_ids.end(), t) != f.text.eos_ids.end();
}

test::walk_result walk(const fixture& f, token_constraint& c, std::mt19937_64& rng, int max_steps) {
  return test::walk(*f.text.text, f.text.eos_ids, f.vocab, c, rng, max_steps);
}

// Schemas whose every value is bounded (lengths, ranges, items), so that a walk always ends.
std::vector<json> bounded_schemas() {
  return {
      json::parse(R"({"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
          "age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"],
          "additionalProperties": false})"),
      json::parse(R"({"type": "object", "properties": {"ok": {"type": "boolean"},
          "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3}},
          "required": ["ok", "tags"]})"),
      json::parse(R"({"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
          "n": {"type": "integer", "minimum": -5, "maximum": 5}}, "required": ["color"]})"),
      json::parse(R"({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
          "minItems": 1, "maxItems": 4})"),
      json::parse(R"({"type": "object", "properties": {"point": {"type": "object", "properties": {
          "x": {"type": "integer", "minimum": 0, "maximum": 99},
          "y": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["x", "y"],
          "additionalProperties": false}}, "required": ["point"], "additionalProperties": false})"),
      json::parse(R"({"anyOf": [{"type": "object", "properties": {"a": {"const": 1}},
          "required": ["a"]}, {"type": "object", "properties": {"b": {"type": "null"}},
          "required": ["b"]}]})"),
      json::parse(R"({"type": "string", "minLength": 2, "maxLength": 5})"),
      json::parse(R"({"type": "object", "properties": {"answer": {"enum": ["yes", "no", 3, null]},
          "why": {"type": "string", "maxLength": 3}}, "required": ["answer", "why"]})"),
      json::parse(R"({"type": "object", "properties": {"items": {"type": "array", "minItems": 1,
          "maxItems": 2, "items": {"type": "object", "properties": {"id": {"type": "integer",
          "minimum": 1, "maximum": 5}, "done": {"type": "boolean"}}, "required": ["id", "done"],
          "additionalProperties": false}}}, "required": ["items"], "additionalProperties": false})"),
      json::parse(R"({"type": "object", "properties": {"city": {"const": "Paris"},
          "temp": {"type": "integer", "minimum": -40, "maximum": 50}}, "required": ["city", "temp"]})"),
      json::parse(R"({"type": "boolean"})"),
      json::parse(R"({"enum": ["alpha", "beta", "gamma delta"]})"),
  };
}

// Runs plans on `inner`, recording when the grammar masks appear: none may be in a plan before
// the engine loop's fill runs (it runs while a GPU computes the forward pass), every constrained
// row has one after.
class mask_observer final : public executor {
 public:
  explicit mask_observer(executor& inner) : inner_(inner) {}
  size_t masks_before_fill = 0, most_masks_in_a_step = 0;
  expected<step_result> execute(const step_plan& plan) override { return inner_.execute(plan); }
  expected<step_result> execute_filling(const step_plan& plan, const mask_fill& fill) override {
    masks_before_fill += masks(plan);
    if (fill)
      fill();
    most_masks_in_a_step = std::max(most_masks_in_a_step, masks(plan));
    return inner_.execute(plan);
  }

 private:
  static size_t masks(const step_plan& plan) {
    return static_cast<size_t>(std::count_if(plan.seqs.begin(), plan.seqs.end(), [](const auto& s) {
      return !s.allowed_tokens.empty();
    }));
  }
  executor& inner_;
};

} // namespace

TEST_CASE("grammar: ebnf_literal quotes, escapes and splits control bytes") {
  CHECK(ebnf_literal("ab") == "(\"ab\")");
  CHECK(ebnf_literal("a\"b\\c\n") == "(\"a\\\"b\\\\c\\n\")");
  CHECK(ebnf_literal(std::string("a\x01"
                                 "b")) == "(\"a\" \"\\x01\" \"b\")");
}

TEST_CASE("grammar: bad schemas, regexes and grammars are invalid_argument errors") {
  const auto* f = qwen3();
  if (!f)
    return;
  using k = grammar_spec::kind;
  const std::pair<grammar_spec, std::string> bad[] = {
      {{.type = k::json_schema, .text = "{not json"}, "json_schema"},
      {{.type = k::json_schema, .text = R"({"type": "no-such-type"})"}, "json_schema"},
      {{.type = k::regex, .text = "(ab"}, "regex"},
      {{.type = k::ebnf, .text = "root ::= "}, "grammar"},
      {{.type = k::ebnf, .text = "root ::= undefined_rule"}, "grammar"},
      {{.type = k::choice, .choices = {}}, "choice"},
      {{.type = k::choice, .choices = {"a", ""}}, "choice"},
  };
  for (const auto& [g, what] : bad) {
    auto c = f->compiler->compile(g);
    REQUIRE_FALSE(c.has_value());
    CHECK(c.error().code() == errc::invalid_argument);
    CHECK_MESSAGE(c.error().message().rfind(what, 0) == 0, c.error().message());
  }
}

TEST_CASE("grammar: random walks through the masks end in valid output for many schemas") {
  const auto* f = qwen3();
  if (!f)
    return;
  std::mt19937_64 rng(20261206);
  int walks = 0;
  for (const auto& schema : bounded_schemas()) {
    for (int i = 0; i < 6; ++i, ++walks) {
      auto c = compile(*f, schema_spec(schema));
      auto r = walk(*f, *c, rng, 400);
      INFO("schema ", schema.dump(), " output ", r.text);
      REQUIRE(r.complete);
      json v;
      REQUIRE_NOTHROW(v = json::parse(r.text));
      CHECK(test::schema_violation(schema, v) == "");
    }
  }
  // json_object: any object.
  for (int i = 0; i < 6; ++i) {
    auto c = compile(*f, {.type = grammar_spec::kind::json_object});
    auto r = walk(*f, *c, rng, 60);
    if (r.complete) // an object can nest without bound; when it ended, it is one
      CHECK_MESSAGE(json::parse(r.text).is_object(), r.text);
  }
  MESSAGE(walks, " schema walks");
}

TEST_CASE("grammar: random walks match regexes and choices") {
  const auto* f = qwen3();
  if (!f)
    return;
  std::mt19937_64 rng(7);
  for (const std::string re :
       {"[a-z]{1,8}@[a-z]{2,5}\\.(com|org)", "\\d{3}-\\d{4}", "(yes|no|maybe)",
        "[A-Z][a-z]{0,6}( [A-Z][a-z]{0,6}){0,2}", "-?(0|[1-9][0-9]{0,3})(\\.[0-9]{1,2})?"})
    for (int i = 0; i < 8; ++i) {
      auto c = compile(*f, {.type = grammar_spec::kind::regex, .text = re});
      auto r = walk(*f, *c, rng, 100);
      REQUIRE_MESSAGE(r.complete, re);
      CHECK_MESSAGE(std::regex_match(r.text, std::regex(re)), re, " vs ", r.text);
    }
  const std::vector<std::string> choices = {"Paris", "London", "New York", "東京", "a\"b\\c"};
  std::map<std::string, int> seen;
  for (int i = 0; i < 40; ++i) {
    auto c = compile(*f, {.type = grammar_spec::kind::choice, .choices = choices});
    auto r = walk(*f, *c, rng, 40);
    REQUIRE(r.complete);
    REQUIRE_MESSAGE(std::find(choices.begin(), choices.end(), r.text) != choices.end(), r.text);
    ++seen[r.text];
  }
  CHECK(seen.size() >= 3);
}

TEST_CASE("grammar: JSON strings never take raw control characters, length-bounded or not") {
  const auto* f = qwen3();
  if (!f)
    return;
  auto tab = f->text.text->encode("\t"), nl = f->text.text->encode("\n"),
       a = f->text.text->encode("a"), quote = f->text.text->encode("\"");
  REQUIRE((tab->size() == 1 && nl->size() == 1 && a->size() == 1 && quote->size() == 1));
  for (const char* schema : {R"({"type": "string", "maxLength": 8})", R"({"type": "string"})",
                             R"({"type": "string", "minLength": 1})"}) {
    auto c = compile(*f, {.type = grammar_spec::kind::json_schema, .text = schema});
    REQUIRE(c->accept(quote->at(0)));
    std::vector<uint32_t> mask;
    c->fill_mask(mask);
    CHECK_MESSAGE(!mask_allows(mask, tab->at(0)), schema);
    CHECK_MESSAGE(!mask_allows(mask, nl->at(0)), schema);
    CHECK_MESSAGE(mask_allows(mask, a->at(0)), schema);
  }
}

TEST_CASE("grammar: a forked matcher continues on its own") {
  const auto* f = qwen3();
  if (!f)
    return;
  auto c = compile(*f, {.type = grammar_spec::kind::choice, .choices = {"ab", "ac"}});
  auto a = f->text.text->encode("a");
  REQUIRE(a.has_value());
  for (token_id t : *a)
    REQUIRE(c->accept(t));
  auto fork = c->fork();
  auto b = f->text.text->encode("b"), cc = f->text.text->encode("c");
  REQUIRE(c->accept(b->at(0)));
  CHECK_FALSE(fork->accept(f->text.eos_ids.at(0))); // "a" is not a choice
  CHECK(fork->accept(cc->at(0)));
  CHECK(c->accept(f->text.eos_ids.at(0)));
  CHECK(c->terminated());
  CHECK_FALSE(fork->terminated());
}

TEST_CASE("grammar: the CPU sampler picks only allowed tokens, with the raw logprob") {
  std::mt19937_64 rng(11);
  std::normal_distribution<float> normal(0, 3);
  const int V = 1000;
  std::vector<float> logits(V), scratch;
  for (int trial = 0; trial < 200; ++trial) {
    for (auto& x : logits)
      x = normal(rng);
    std::vector<uint32_t> mask((V + 31) / 32, 0);
    const int n_allowed = 1 + static_cast<int>(rng() % 20);
    std::vector<token_id> allowed;
    for (int i = 0; i < n_allowed; ++i) {
      const auto t = static_cast<token_id>(rng() % V);
      mask[t / 32] |= 1u << (t % 32);
      allowed.push_back(t);
    }
    sampling_params p;
    p.seed = rng();
    p.has_seed = true;
    p.temperature = trial % 4 == 0 ? 0.0f : 1.5f;
    p.top_k = trial % 3 == 0 ? 5 : 0;
    p.top_p = trial % 5 == 0 ? 0.5f : 1.0f;
    sample_inputs in{.params = &p, .index = static_cast<uint64_t>(trial), .allowed = mask};
    auto o = sample_row(logits, in, scratch);
    REQUIRE(std::find(allowed.begin(), allowed.end(), o.token) != allowed.end());
    if (p.temperature == 0) { // greedy: the best allowed token
      token_id best = allowed[0];
      for (token_id t : allowed)
        if (logits[t] > logits[best] || (logits[t] == logits[best] && t < best))
          best = t;
      CHECK(o.token == best);
    }
    float top = *std::max_element(logits.begin(), logits.end());
    double z = 0;
    for (float x : logits)
      z += std::exp(static_cast<double>(x - top));
    CHECK(o.logprob == doctest::Approx(logits[o.token] - top - std::log(z)).epsilon(1e-4));
  }
}

TEST_CASE("grammar: tiny-qwen3 with sampling writes schema-valid JSON through the scheduler") {
  const auto* f = qwen3();
  auto dir = test::golden_model("tiny-qwen3");
  if (!f || !dir)
    return;
  auto model = cpu_backend::load(*dir, {.num_blocks = 512, .block_size = 16});
  REQUIRE_MESSAGE(model.has_value(), (model ? "" : model.error().to_string()));
  local_executor local(**model);
  mask_observer exec(local);
  scheduler_options o{.num_blocks = 512, .block_size = 16, .max_num_seqs = 32};
  o.vocab_size = (*model)->config().vocab_size;
  o.eos_token_ids = f->text.eos_ids;
  engine_loop loop(o, exec);
  auto prompt = f->text.text->encode("Reply in JSON: ");
  REQUIRE(prompt.has_value());

  // The unconstrained request alone, then in a batch of constrained ones: same tokens.
  sampling_params free_p{.temperature = 1.0f, .has_seed = true, .seed = 99, .max_tokens = 24};
  auto run = [&](std::vector<request> reqs) {
    std::vector<seq_id> ids;
    for (auto& r : reqs) {
      auto id = loop.add_request(std::move(r));
      REQUIRE_MESSAGE(id.has_value(), (id ? "" : id.error().to_string()));
      ids.push_back(*id);
    }
    std::map<seq_id, std::vector<token_id>> toks;
    std::map<seq_id, finish_reason> fin;
    for (int i = 0; loop.has_unfinished(); ++i) {
      REQUIRE(i < 10000);
      auto out = loop.step();
      REQUIRE_MESSAGE(out.has_value(), (out ? "" : out.error().to_string()));
      for (const auto& x : *out) {
        if (x.has_token)
          toks[x.id].push_back(x.token);
        if (x.finish != finish_reason::none)
          fin[x.id] = x.finish;
      }
    }
    std::vector<std::pair<std::vector<token_id>, finish_reason>> res;
    for (auto id : ids)
      res.emplace_back(toks[id], fin[id]);
    return res;
  };
  const auto alone = run({request{.prompt = *prompt, .sampling = free_p}});

  const auto schemas = bounded_schemas();
  std::vector<request> batch;
  batch.push_back({.prompt = *prompt, .sampling = free_p});
  for (size_t i = 0; i < schemas.size() * 2; ++i) {
    request r{.prompt = *prompt};
    r.sampling = {.temperature = i % 3 == 0 ? 0.0f : 1.0f,
                  .top_p = i % 4 == 1 ? 0.9f : 1.0f,
                  .has_seed = true,
                  .seed = 1000 + i,
                  .max_tokens = 200};
    r.constraint = compile(*f, schema_spec(schemas[i % schemas.size()]));
    batch.push_back(std::move(r));
  }
  const auto out = run(std::move(batch));
  CHECK(out[0].first == alone[0].first);
  for (size_t i = 1; i < out.size(); ++i) {
    const auto& schema = schemas[(i - 1) % schemas.size()];
    const auto& [toks, why] = out[i];
    INFO("schema ", schema.dump());
    REQUIRE(why == finish_reason::stop);
    REQUIRE(!toks.empty());
    REQUIRE(is_eos(*f, toks.back()));
    const std::string text =
        f->text.text->decode(std::span<const token_id>(toks.data(), toks.size() - 1));
    json v;
    REQUIRE_NOTHROW(v = json::parse(text));
    CHECK(test::schema_violation(schema, v) == "");
  }
  CHECK(loop.stats().constraint_violations == 0);
  // The masks were filled at the executor's call, many in one step (on the pool's threads).
  CHECK(exec.masks_before_fill == 0);
  CHECK(exec.most_masks_in_a_step == schemas.size() * 2);
}
