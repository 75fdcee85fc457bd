// Structured output on the HTTP request path without sockets: parse_completion turns
// response_format, structured_outputs, guided_* and tool_choice "required" / a named function into
// a compiled constraint (400s naming the field for what cannot be honoured), and random walks
// through those constraints over the golden Qwen3 and Llama 3 vocabularies always give output
// that validates (JSON schemas) or parses into tool calls (the model family's tool-call parser).
#include <random>

#include <doctest/doctest.h>

#include "golden.hpp"
#include "grammar_walk.hpp"
#include "http/openai_api.hpp"
#include "json_schema_check.hpp"

using namespace troupe;
using namespace troupe::serve;

namespace {

struct served {
  engine::model_tokenizer text;
  std::shared_ptr<engine::grammar_compiler> grammar;
  model_info info;
};

// The golden tokenizer `name` with a grammar compiler over its own vocabulary.
std::unique_ptr<served> golden(const std::string& name) {
  auto dir = test::golden_dir();
  if (!dir)
    return nullptr;
  auto t = engine::model_tokenizer::load(*dir / "tokenizers" / name);
  REQUIRE_MESSAGE(t.has_value(), (t ? "" : t.error().to_string()));
  auto s = std::make_unique<served>();
  s->text = std::move(*t);
  const int64_t vocab = s->text.text->size();
  auto g = engine::grammar_compiler::create(*s->text.text, vocab, s->text.eos_ids);
  REQUIRE_MESSAGE(g.has_value(), (g ? "" : g.error().to_string()));
  s->grammar = std::move(*g);
  s->info = {.name = "m",
             .max_model_len = 4096,
             .vocab_size = vocab,
             .text = &s->text,
             .grammar = s->grammar.get()};
  return s;
}

std::variant<completion_request, api_error> chat(const model_info& m, const json& extra) {
  json b = {{"messages", {{{"role", "user"}, {"content", "weather in Paris?"}}}}};
  b.update(extra);
  return parse_completion(b.dump(), true, m);
}

completion_request accepted(const std::variant<completion_request, api_error>& r) {
  if (auto* e = std::get_if<api_error>(&r))
    FAIL("refused: ", e->param, ": ", e->message);
  return std::get<completion_request>(r);
}

api_error refused(const std::variant<completion_request, api_error>& r) {
  REQUIRE(std::holds_alternative<api_error>(r));
  return std::get<api_error>(r);
}

test::walk_result walk(const served& s, const completion_request& r, std::mt19937_64& rng,
                       int max_steps = 400) {
  REQUIRE(r.constraint);
  auto c = r.constraint->fork(); // the request's own stays fresh
  return test::walk(*s.text.text, s.text.eos_ids, s.info.vocab_size, *c, rng, max_steps);
}

json weather_tools() {
  return json::parse(R"([
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
      "properties": {"city": {"type": "string", "maxLength": 8},
                     "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_forecast", "parameters": {"type": "object",
      "properties": {"city": {"type": "string", "maxLength": 8},
                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
      "required": ["city", "days"]}}},
    {"type": "function", "function": {"name": "now"}}])");
}

const json* tool_schema(const json& tools, const std::string& name) {
  for (const auto& t : tools)
    if (t["function"]["name"] == name)
      return t["function"].contains("parameters") ? &t["function"]["parameters"] : nullptr;
  FAIL("no tool ", name);
  return nullptr;
}

// Walks `r`'s constraint `walks` times; every output must parse into 1.. calls (exactly one when
// `single`) of tools in `tools` whose arguments follow the tool's schema.
void check_tool_walks(const served& s, const completion_request& r, tool_format f,
                      const json& tools, bool single, const std::string& only, int walks) {
  std::mt19937_64 rng(42);
  size_t most = 0;
  for (int i = 0; i < walks; ++i) {
    // A uniform walk writes many calls: after each, the separator has several tokens, EOS one.
    auto w = walk(s, r, rng, 5000);
    REQUIRE_MESSAGE(w.complete, w.text);
    tool_call_parser p(f);
    auto d = p.push(w.text);
    auto end = p.finish();
    d.content += end.content;
    d.calls.insert(d.calls.end(), end.calls.begin(), end.calls.end());
    INFO("output: ", w.text);
    CHECK(d.content.find_first_not_of(" \n") == std::string::npos);
    REQUIRE(!d.calls.empty());
    if (single)
      CHECK(d.calls.size() == 1);
    most = std::max(most, d.calls.size());
    for (const auto& call : d.calls) {
      if (!only.empty())
        CHECK(call.name == only);
      const json* schema = tool_schema(tools, call.name);
      const auto args = json::parse(call.arguments);
      if (schema)
        CHECK(test::schema_violation(*schema, args) == "");
      else
        CHECK(args == json::object());
    }
  }
  if (!single)
    MESSAGE("up to ", most, " calls in one output");
}

} // namespace

TEST_CASE("structured output: response_format, structured_outputs and guided_* compile") {
  auto s = golden("qwen3");
  if (!s)
    return;
  const auto& m = s->info;
  std::mt19937_64 rng(5);
  const json schema = json::parse(R"({"type": "object", "properties": {
      "name": {"type": "string", "maxLength": 5}, "n": {"type": "integer", "minimum": 0,
      "maximum": 9}}, "required": ["name", "n"]})");
  const std::pair<json, std::string> ok[] = {
      {{{"response_format",
         {{"type", "json_schema"},
          {"json_schema", {{"name", "x"}, {"schema", schema}, {"strict", true}}}}}},
       "response_format"},
      {{{"response_format", {{"type", "json_object"}}}}, "response_format"},
      {{{"structured_outputs", {{"json", schema}}}}, "structured_outputs.json"},
      {{{"structured_outputs", {{"regex", "[a-c]{2,4}"}}}}, "structured_outputs.regex"},
      {{{"structured_outputs", {{"choice", {"yes", "no"}}}}}, "structured_outputs.choice"},
      {{{"structured_outputs", {{"grammar", "root ::= \"x\" [0-9]"}}}},
       "structured_outputs.grammar"},
      {{{"guided_json", schema.dump()}}, "guided_json"},
      {{{"guided_regex", "[a-c]{2,4}"}}, "guided_regex"},
      {{{"guided_choice", {"yes", "no"}}}, "guided_choice"},
      {{{"guided_grammar", "root ::= \"x\" [0-9]"}}, "guided_grammar"},
  };
  for (const auto& [extra, field] : ok) {
    INFO(extra.dump());
    auto r = accepted(chat(m, extra));
    CHECK(r.constraint_field == field);
    auto w = walk(*s, r, rng, 100);
    if (field == "response_format" && extra["response_format"]["type"] == "json_object") {
      if (w.complete)
        CHECK(json::parse(w.text).is_object());
      continue;
    }
    REQUIRE_MESSAGE(w.complete, w.text);
    if (field.find("json") != std::string::npos || field == "response_format")
      CHECK(test::schema_violation(schema, json::parse(w.text)) == "");
    else if (field.find("regex") != std::string::npos)
      CHECK((w.text.size() >= 2 && w.text.size() <= 4 &&
             w.text.find_first_not_of("abc") == std::string::npos));
    else if (field.find("choice") != std::string::npos)
      CHECK((w.text == "yes" || w.text == "no"));
    else
      CHECK((w.text.size() == 2 && w.text[0] == 'x' && std::isdigit(w.text[1])));
  }
  // Completions take the same fields.
  auto c = parse_completion(R"({"prompt": "hi", "guided_choice": ["a", "b"]})", false, m);
  CHECK(accepted(c).constraint);
  // "text" asks for nothing.
  CHECK_FALSE(accepted(chat(m, {{"response_format", {{"type", "text"}}}})).constraint);
}

TEST_CASE("structured output: what cannot be honoured is a 400 naming the field") {
  auto s = golden("qwen3");
  if (!s)
    return;
  const auto& m = s->info;
  const std::pair<json, std::string> bad[] = {
      {{{"response_format",
         {{"type", "json_schema"},
          {"json_schema", {{"name", "x"}, {"schema", {{"type", "nope"}}}}}}}},
       "response_format"},
      {{{"response_format", {{"type", "json_schema"}}}}, "response_format"},
      {{{"response_format", {{"type", "yaml"}}}}, "response_format"},
      {{{"guided_regex", "(ab"}}, "guided_regex"},
      {{{"guided_json", "{not json"}}, "guided_json"},
      {{{"guided_choice", json::array()}}, "guided_choice"},
      {{{"guided_grammar", "root ::= missing"}}, "guided_grammar"},
      {{{"structured_outputs", {{"regex", "[z-a]"}}}}, "structured_outputs.regex"},
      {{{"structured_outputs", {{"whitespace_pattern", " "}}}},
       "structured_outputs.whitespace_pattern"},
      {{{"guided_whitespace_pattern", " "}}, "guided_whitespace_pattern"},
      {{{"guided_decoding_backend", "outlines"}}, "guided_decoding_backend"},
      {{{"guided_regex", "a"}, {"guided_choice", {"a"}}}, "guided_choice"},
      {{{"guided_regex", "a"}, {"min_tokens", 2}}, "min_tokens"},
      {{{"response_format", {{"type", "structural_tag"}}}}, "response_format"},
      {{{"response_format", {{"type", "structural_tag"}, {"format", {{"type", "no_such"}}}}}},
       "response_format"},
      {{{"response_format",
         {{"type", "structural_tag"},
          {"structures", {{{"begin", "<a>"}, {"schema", {{"type", "nope"}}}, {"end", "</a>"}}}},
          {"triggers", {"<a"}}}}},
       "response_format"},
      {{{"response_format",
         {{"type", "structural_tag"},
          {"structures", {{{"begin", "<a>"}, {"end", "</a>"}}}},
          {"triggers", json::array()}}}},
       "response_format.triggers"},
      {{{"structured_outputs", {{"structural_tag", "{not json"}}}},
       "structured_outputs.structural_tag"},
      {{{"prompt_logprobs", 21}}, "prompt_logprobs"},
      {{{"best_of", 3}}, "best_of"},
      {{{"use_beam_search", true}}, "use_beam_search"},
      {{{"suffix", "end"}}, "suffix"},
      {{{"allowed_token_ids", {1, 2}}}, "allowed_token_ids"},
      {{{"bad_words", {"x"}}}, "bad_words"},
      {{{"truncate_prompt_tokens", 5}}, "truncate_prompt_tokens"},
      {{{"include_stop_str_in_output", true}}, "include_stop_str_in_output"},
  };
  for (const auto& [extra, field] : bad) {
    INFO(extra.dump());
    auto e = refused(chat(m, extra));
    CHECK(e.status == 400);
    CHECK(e.param == field);
  }
  // A model without a grammar engine refuses constraints rather than ignoring them.
  model_info none = m;
  none.grammar = nullptr;
  CHECK(refused(chat(none, {{"guided_regex", "a"}})).param == "guided_regex");
}

// Whether `text` (then an EOS, when `complete`) is a whole output `r`'s constraint allows.
bool allows(const served& s, const completion_request& r, const std::string& text, bool complete) {
  REQUIRE(r.constraint);
  auto c = r.constraint->fork();
  auto ids = s.text.text->encode(text);
  REQUIRE(ids.has_value());
  for (token_id t : *ids)
    if (!c->accept(t))
      return false;
  if (!complete)
    return true;
  return c->accept(s.text.eos_ids.front()) && c->terminated();
}

TEST_CASE("structured output: structural tags constrain the tagged parts (xgrammar's and vLLM's "
          "forms)") {
  auto s = golden("qwen3");
  if (!s)
    return;
  const json schema = json::parse(R"({"type": "object", "properties": {
      "city": {"type": "string"}, "days": {"type": "integer"}},
      "required": ["city", "days"], "additionalProperties": false})");
  // xgrammar's form: the whole output is one tag.
  const json tag = {{"type", "structural_tag"},
                    {"format",
                     {{"type", "tag"},
                      {"begin", "<answer>"},
                      {"content", {{"type", "json_schema"}, {"json_schema", schema}}},
                      {"end", "</answer>"}}}};
  auto r = accepted(chat(s->info, {{"response_format", tag}}));
  CHECK(r.constraint_field == "response_format");
  CHECK(allows(*s, r, R"(<answer>{"city": "Paris", "days": 3}</answer>)", true));
  CHECK_FALSE(allows(*s, r, R"(<answer>{"city": 3)", false));
  CHECK_FALSE(allows(*s, r, "Paris", false));
  CHECK_FALSE(allows(*s, r, R"(<answer>{"city": "Paris", "days": 3})", true)); // no end tag
  // The same as vLLM's structured_outputs.structural_tag (a string holding it).
  auto so = accepted(chat(s->info, {{"structured_outputs", {{"structural_tag", tag.dump()}}}}));
  CHECK(so.constraint_field == "structured_outputs.structural_tag");
  CHECK(allows(*s, so, R"(<answer>{"city": "Oslo", "days": 1}</answer>)", true));

  // vLLM's older form: free text; after a trigger, the tag's schema holds until its end.
  const json legacy = {
      {"type", "structural_tag"},
      {"structures",
       {{{"begin", "<function=get_weather>"}, {"schema", schema}, {"end", "</function>"}}}},
      {"triggers", {"<function="}}};
  auto l = accepted(chat(s->info, {{"response_format", legacy}}));
  CHECK(allows(*s, l, "No call needed.", true));
  CHECK(allows(
      *s, l, R"(Let me look. <function=get_weather>{"city": "Paris", "days": 2}</function> Done.)",
      true));
  CHECK_FALSE(allows(*s, l, R"(Let me look. <function=get_weather>{"town")", false));
  CHECK_FALSE(allows(*s, l, R"(<function=get_forecast>)", false)); // no such tag
}

TEST_CASE("structured output: tool_choice required and named always parse into tool calls (Qwen)") {
  auto s = golden("qwen3");
  if (!s)
    return;
  const auto tools = weather_tools();
  auto required = accepted(chat(s->info, {{"tools", tools}, {"tool_choice", "required"}}));
  CHECK(required.constraint_field == "tool_choice");
  CHECK(required.tool_parsing == tool_format::hermes);
  check_tool_walks(*s, required, tool_format::hermes, tools, false, "", 30);
  auto one = accepted(chat(
      s->info, {{"tools", tools}, {"tool_choice", "required"}, {"parallel_tool_calls", false}}));
  check_tool_walks(*s, one, tool_format::hermes, tools, true, "", 15);
  json named = {{"type", "function"}, {"function", {{"name", "get_forecast"}}}};
  auto forecast = accepted(chat(s->info, {{"tools", tools}, {"tool_choice", named}}));
  check_tool_walks(*s, forecast, tool_format::hermes, tools, true, "get_forecast", 15);
  named["function"]["name"] = "now"; // no parameters: {}
  auto now = accepted(chat(s->info, {{"tools", tools}, {"tool_choice", named}}));
  check_tool_walks(*s, now, tool_format::hermes, tools, true, "now", 5);
  // 'strict' tools are enforced with required / named, refused with auto.
  auto strict = tools;
  strict[0]["function"]["strict"] = true;
  CHECK(accepted(chat(s->info, {{"tools", strict}, {"tool_choice", "required"}})).constraint);
  CHECK(refused(chat(s->info, {{"tools", strict}})).param == "tools");
  // A tool grammar and another constraint at once.
  CHECK(
      refused(chat(s->info, {{"tools", tools}, {"tool_choice", "required"}, {"guided_regex", "a"}}))
          .param == "guided_regex");
}

TEST_CASE("structured output: the Llama 3 tool-call grammar parses with the Llama 3 parser") {
  auto s = golden("llama3");
  if (!s)
    return;
  // The golden Llama 3 chat template shows no tools, so the grammar is compiled directly.
  const auto tools = weather_tools();
  for (bool parallel : {true, false}) {
    auto g = tool_call_grammar(tools, "", tool_format::llama3_json, parallel);
    auto c = s->grammar->compile(g);
    REQUIRE_MESSAGE(c.has_value(), (c ? "" : c.error().to_string()));
    completion_request r;
    r.constraint = std::move(*c);
    check_tool_walks(*s, r, tool_format::llama3_json, tools, !parallel, "", 20);
  }
}
