// The chat-template Jinja subset, construct by construct (the golden tests cover whole templates).
#include <doctest/doctest.h>

#include "engine/tokenizer/jinja.hpp"

using namespace troupe;
using troupe::engine::jinja::template_program;
using ojson = nlohmann::ordered_json;

namespace {
std::string render(std::string_view source, const ojson& context = ojson::object()) {
  auto t = template_program::parse(source);
  REQUIRE_MESSAGE(t.has_value(), (t ? "" : t.error().to_string()));
  auto out = t->render(context);
  REQUIRE_MESSAGE(out.has_value(), (out ? "" : out.error().to_string()));
  return *out;
}
} // namespace

TEST_CASE("jinja: expressions, precedence, filters and tests") {
  CHECK(render("{{ 1 + 2 * 3 }}|{{ 7 // 2 }}|{{ -7 % 3 }}|{{ 'a' ~ 1 }}") == "7|3|2|a1");
  CHECK(render("{{ xs|length - 1 }}", {{"xs", {1, 2, 3}}}) == "2");
  CHECK(render("{{ '  x ' | trim }}|{{ 'ab' + 'c' | upper }}") == "x|abC");
  CHECK(render("{{ {'b': 1, 'a': [true, none, 'é\n']} | tojson }}") ==
        R"({"b": 1, "a": [true, null, "é\n"]})");
  CHECK(render("{{ x is defined }}{{ y is not defined }}{{ n is none }}{{ s is string }}",
               {{"x", 1}, {"n", nullptr}, {"s", "t"}}) == "TrueTrueTrueTrue");
  CHECK(render("{{ 'a' if f else 'b' }}{{ 'x' in 'xyz' }}{{ 3 not in [1, 2] }}", {{"f", false}}) ==
        "bTrueTrue");
}

TEST_CASE("jinja: string methods and slicing") {
  CHECK(render("{{ s.startswith('<a') }}{{ s.endswith('b>') }}", {{"s", "<ab>"}}) == "TrueTrue");
  CHECK(render("{{ s.split('</t>')[-1].lstrip('\\n') }}", {{"s", "x</t>\n\ny"}}) == "y");
  CHECK(render("{{ s.split('<t>')[0].rstrip('\\n') }}|{{ ' a b '.split() }}", {{"s", "q\n<t>"}}) ==
        "q|['a', 'b']");
  CHECK(render("{{ s.strip('\\n') }}|{{ s[1:3] }}|{{ s[::-1] }}", {{"s", "\nab\n"}}) ==
        "ab|ab|\nba\n");
  CHECK(render("{% for x in xs[::-1] %}{{ x }}{% endfor %}", {{"xs", {1, 2, 3}}}) == "321");
}

TEST_CASE("jinja: loops, loop.*, scoping, namespace") {
  CHECK(render("{% for x in xs %}{{ loop.index0 }}{{ loop.first }}{{ loop.last }},{% endfor %}",
               {{"xs", {"a", "b"}}}) == "0TrueFalse,1FalseTrue,");
  // `set` inside a loop does not leak; a namespace attribute does.
  CHECK(render("{% set ns = namespace(n=0) %}{% set k = 5 %}{% for x in xs %}{% set k = x %}"
               "{% set ns.n = ns.n + x %}{% endfor %}{{ k }} {{ ns.n }}",
               {{"xs", {1, 2, 3}}}) == "5 6");
  CHECK(render("{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}",
               {{"d", {{"z", 1}, {"a", 2}}}}) == "z=1;a=2;");
  CHECK(render("{% for x in [] %}x{% else %}empty{% endfor %}") == "empty");
  CHECK(render("{% for m in ms if m.role != 'system' %}{{ loop.index }}{{ m.role }}{% endfor %}",
               {{"ms", {{{"role", "system"}}, {{"role", "user"}}}}}) == "1user");
}

TEST_CASE("jinja: whitespace control, trim_blocks and lstrip_blocks") {
  CHECK(render("a  {%- if true -%}  b  {%- endif %}\nc") == "abc");
  CHECK(render("{% if true %}\n  x\n{% endif %}\n") == "  x\n");
  CHECK(render("line\n    {% if true %}\nyes\n    {% endif %}\nend") == "line\nyes\nend");
  CHECK(render("{# comment #}a{{ 'b' }}{% if x %}c{% elif y %}d{% else %}e{% endif %}",
               {{"y", true}}) == "abd");
}

TEST_CASE("jinja: errors at parse time name the line, raise_exception at render time") {
  auto unclosed = template_program::parse("a\n{% if x %}b");
  REQUIRE_FALSE(unclosed.has_value());
  CHECK(unclosed.error().message().find("endif") != std::string::npos);
  auto bad = template_program::parse("a\nb\n{{ 1 + }}");
  REQUIRE_FALSE(bad.has_value());
  CHECK(bad.error().message().find("line 3") != std::string::npos);
  auto unsupported = template_program::parse("{% macro m() %}{% endmacro %}");
  REQUIRE_FALSE(unsupported.has_value());
  CHECK(unsupported.error().message().find("macro") != std::string::npos);

  auto t = template_program::parse(
      "{% if bad %}{{ raise_exception('roles must alternate') }}{% endif %}");
  REQUIRE(t.has_value());
  auto out = t->render({{"bad", true}});
  REQUIRE_FALSE(out.has_value());
  CHECK(out.error().message().find("roles must alternate") != std::string::npos);
}

TEST_CASE("jinja: limits make hostile templates and inputs errors, never crashes or hangs") {
  auto parse_error = [](const std::string& source, const char* in_message) {
    auto t = template_program::parse(source);
    REQUIRE_FALSE(t.has_value());
    CHECK_MESSAGE(t.error().message().find(in_message) != std::string::npos, t.error().message());
  };
  auto render_error = [](const std::string& source, const char* in_message,
                         const ojson& context = ojson::object()) {
    CAPTURE(source);
    auto t = template_program::parse(source);
    REQUIRE_MESSAGE(t.has_value(), (t ? "" : t.error().to_string()));
    auto out = t->render(context);
    REQUIRE_FALSE(out.has_value());
    CHECK_MESSAGE(out.error().message().find(in_message) != std::string::npos,
                  out.error().message());
  };
  const std::string deep(100000, '(');
  parse_error("{{ " + deep + "1" + std::string(100000, ')') + " }}", "tokens (at most 2048)");
  parse_error("{{ " + std::string(200, '(') + "1" + std::string(200, ')') + " }}",
              "nests deeper than 64 levels");
  parse_error("{{ " + std::string(200, '-') + "1 }}", "nests deeper than 64 levels");
  std::string blocks;
  for (int i = 0; i < 100; ++i)
    blocks += "{% if true %}";
  parse_error(blocks, "blocks nest deeper than 64 levels");
  render_error("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
               "ran more than 1000000 steps");
  render_error("{{ range(9223372036854775807) }}", "range() of");
  render_error("{{ range(-9223372036854775807, 9223372036854775807, 3) }}", "range() of");
  render_error("{{ 'ab' * 9223372036854775807 }}", "repeated 9223372036854775807 times");
  render_error("{{ 9223372036854775807 + 1 }}", "integer overflow");
  render_error("{{ -9223372036854775807 - 2 }}", "integer overflow");
  render_error("{{ 4294967296 * 4294967296 }}", "integer overflow");
  render_error("{{ [1]|tojson(indent=1000000000) }}", "outside [0, 64]");
  render_error("{% set x = 'a' * 1000000 %}{% for i in range(100) %}{{ x }}{% endfor %}",
               "a string of");
  render_error("{% set x = 'ab' * 1000000 %}{{ x.replace('a', x) }}", "replace() would make");
  render_error("{% set ns = namespace(x=1) %}{% set ns.x = [ns] %}{{ ns|tojson }}",
               "cannot store a namespace");
  render_error("{% set ns = namespace(x=[]) %}{% for i in range(1000) %}{% set ns.x = [ns.x] %}"
               "{% endfor %}{{ ns.x }}",
               "a value nests deeper than 128 levels");
  render_error("{% set ns = namespace(x=[1]) %}{% for i in range(30) %}{% set ns.x = ns.x + ns.x %}"
               "{% endfor %}",
               "a list of");
  // Inputs (request messages) nesting deeper than any real request are refused, not recursed.
  ojson deep_value = ojson::array();
  for (int i = 0; i < 1000; ++i)
    deep_value = ojson::array({std::move(deep_value)});
  render_error("{{ m }}", "nests deeper than 128 levels", {{"m", deep_value}});
  // Python semantics kept where limits do not bite.
  CHECK(
      render("{{ -7 // 2 }}|{{ 7 // -2 }}|{{ -7 % 3 }}|{{ 7 % -3 }}|{{ range(10, 0, -3)|list }}") ==
      "-4|-4|2|-2|[10, 7, 4, 1]");
  CHECK(render("{{ 'abcabc'.replace('b', 'XY') }}") == "aXYcaXYc");
}
