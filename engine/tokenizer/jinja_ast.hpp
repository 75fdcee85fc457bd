// Values and syntax tree of the Jinja subset (jinja.hpp). Internal to engine/tokenizer.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>

namespace troupe::engine::jinja {

// What one template and one render may use, so that neither a template (from a model folder) nor
// the messages it renders (from a request) can exhaust the stack, memory or time; each is a
// parse or render error naming the limit.
inline constexpr int max_nesting = 64;             // () [] {} and unary operators; blocks
inline constexpr size_t max_tag_tokens = 2048;     // tokens in one {{ }} or {% %} tag
inline constexpr int max_value_depth = 128;        // lists and dicts in lists and dicts
inline constexpr int max_eval_depth = 2048;        // the syntax tree, as evaluated
inline constexpr int64_t max_steps = 1'000'000;    // expressions, nodes, loop iterations
inline constexpr size_t max_text_bytes = 64 << 20; // any string value, and the output
inline constexpr int64_t max_list_items = 1 << 20; // a list made while rendering

struct value;
using array = std::vector<value>;
using object = std::vector<std::pair<std::string, value>>; // keeps insertion order (for tojson)

struct value {
  enum class kind : uint8_t {
    undefined,
    none,
    boolean,
    integer,
    number,
    string,
    array,
    object,
    ns
  };
  kind type = kind::undefined;
  bool b = false;
  int64_t i = 0;
  double d = 0;
  std::string s;
  std::shared_ptr<array> a;
  std::shared_ptr<object> o; // object and namespace
  int32_t depth = 0;         // lists and dicts nested in this one, itself included

  static value none() { return with(kind::none); }
  static value boolean(bool v) {
    auto x = with(kind::boolean);
    x.b = v;
    return x;
  }
  static value integer(int64_t v) {
    auto x = with(kind::integer);
    x.i = v;
    return x;
  }
  static value number(double v) {
    auto x = with(kind::number);
    x.d = v;
    return x;
  }
  static value string(std::string v) {
    auto x = with(kind::string);
    x.s = std::move(v);
    return x;
  }
  static value list(array v) {
    auto x = with(kind::array);
    x.depth = 1;
    for (const auto& item : v)
      x.depth = std::max(x.depth, item.depth + 1);
    x.a = std::make_shared<array>(std::move(v));
    return x;
  }
  static value dict(object v, kind k = kind::object) {
    auto x = with(k);
    x.depth = 1;
    for (const auto& item : v)
      x.depth = std::max(x.depth, item.second.depth + 1);
    x.o = std::make_shared<object>(std::move(v));
    return x;
  }
  static value with(kind k) {
    value v;
    v.type = k;
    return v;
  }

  bool is_undefined() const { return type == kind::undefined; }
  bool is_mapping() const { return type == kind::object || type == kind::ns; }
  const value* find(const std::string& key) const; // object/namespace lookup
  void put(const std::string& key, value v);       // object/namespace insert or assign
};

bool truthy(const value& v);
bool equal(const value& a, const value& b);
std::string to_text(const value& v); // what {{ v }} prints (Python str())
std::string to_json(const value& v, int indent = -1,
                    int depth = 0); // json.dumps(ensure_ascii=False)

struct expr {
  enum class op : uint8_t {
    literal,
    name,
    list,
    dict,
    attr,
    index,
    slice,
    call,
    filter,
    test,
    not_,
    neg,
    binary,
    and_,
    or_,
    ternary,
    concat,
  };
  op kind = op::literal;
  value literal;
  std::string name;                 // variable, attribute, filter, test or binary operator
  std::vector<expr> args;           // operands; call: callee then positional arguments
  std::vector<std::string> kwnames; // call/filter: names of trailing keyword arguments
  bool negate = false;              // test: `is not`
  int line = 0;
};

struct node {
  enum class type : uint8_t { text, output, if_, for_, set };
  type kind = type::text;
  std::string text;
  int line = 0;
  // if: one (condition, body) per if/elif; else is the last branch with an empty condition.
  std::vector<std::pair<std::unique_ptr<expr>, std::vector<node>>> branches;
  // for: loop variables, iterable, optional filter, body, else; set: target name (+ attribute).
  std::vector<std::string> vars;
  std::unique_ptr<expr> value_expr;
  std::unique_ptr<expr> filter;
  std::vector<node> body, else_body;
  std::string attr;
};

struct program {
  std::vector<node> nodes;
};

} // namespace troupe::engine::jinja
