// Jinja subset, third stage: evaluation of the syntax tree against a context.
#include <algorithm>
#include <cmath>

#include "engine/tokenizer/jinja.hpp"
#include "engine/tokenizer/jinja_ast.hpp"

namespace troupe::engine::jinja {

// Methods, filters, tests and global functions (jinja_builtins.cpp).
value call_method(const value& self, const std::string& name, const std::vector<value>& args,
                  int line);
value apply_filter(const std::string& name, const value& input, const std::vector<value>& args,
                   const std::vector<std::string>& kwnames, int line);
bool apply_test(const std::string& name, const value& input, const std::vector<value>& args,
                int line);
value call_global(const std::string& name, const std::vector<value>& args,
                  const std::vector<std::string>& kwnames, int line);
[[noreturn]] void fail(int line, const std::string& what);

namespace {

value from_json(const nlohmann::ordered_json& j, int depth = 0) {
  if (depth > max_value_depth)
    fail(0, fmt::format("the template's input nests deeper than {} levels", max_value_depth));
  switch (j.type()) {
  case nlohmann::ordered_json::value_t::null:
    return value::none();
  case nlohmann::ordered_json::value_t::boolean:
    return value::boolean(j.get<bool>());
  case nlohmann::ordered_json::value_t::number_integer:
  case nlohmann::ordered_json::value_t::number_unsigned:
    return value::integer(j.get<int64_t>());
  case nlohmann::ordered_json::value_t::number_float:
    return value::number(j.get<double>());
  case nlohmann::ordered_json::value_t::string:
    return value::string(j.get<std::string>());
  case nlohmann::ordered_json::value_t::array: {
    array a;
    for (const auto& item : j)
      a.push_back(from_json(item, depth + 1));
    return value::list(std::move(a));
  }
  case nlohmann::ordered_json::value_t::object: {
    object o;
    for (auto it = j.begin(); it != j.end(); ++it)
      o.emplace_back(it.key(), from_json(it.value(), depth + 1));
    return value::dict(std::move(o));
  }
  default:
    return value();
  }
}

int64_t to_index(const value& v, int line) {
  if (v.type == value::kind::integer)
    return v.i;
  if (v.type == value::kind::boolean)
    return v.b;
  fail(line, "an index must be an integer, got " + to_text(v));
}

void check_text_size(size_t bytes, int line) {
  if (bytes > max_text_bytes)
    fail(line, fmt::format("a string of {} bytes (at most {})", bytes, max_text_bytes));
}

value arithmetic(const std::string& op, const value& a, const value& b, int line) {
  using k = value::kind;
  if (op == "+" && a.type == k::string && b.type == k::string) {
    check_text_size(a.s.size() + b.s.size(), line);
    return value::string(a.s + b.s);
  }
  if (op == "+" && a.type == k::array && b.type == k::array) {
    if (a.a->size() + b.a->size() > size_t(max_list_items))
      fail(line, fmt::format("a list of {} items (at most {})", a.a->size() + b.a->size(),
                             max_list_items));
    array out = *a.a;
    out.insert(out.end(), b.a->begin(), b.a->end());
    return value::list(std::move(out));
  }
  if (op == "*" && a.type == k::string && b.type == k::integer) {
    if (b.i > 0 && !a.s.empty() && uint64_t(b.i) > max_text_bytes / a.s.size())
      fail(line, fmt::format("a string of {} bytes repeated {} times (at most {} bytes)",
                             a.s.size(), b.i, max_text_bytes));
    std::string out;
    for (int64_t i = 0; i < b.i; ++i)
      out += a.s;
    return value::string(std::move(out));
  }
  const bool ints = (a.type == k::integer || a.type == k::boolean) &&
                    (b.type == k::integer || b.type == k::boolean);
  const bool nums =
      ints || ((a.type == k::number || a.type == k::integer || a.type == k::boolean) &&
               (b.type == k::number || b.type == k::integer || b.type == k::boolean));
  if (!nums)
    fail(line, fmt::format("cannot apply '{}' to {} and {}", op, to_text(a), to_text(b)));
  const double x = a.type == k::number ? a.d : a.type == k::integer ? a.i : a.b;
  const double y = b.type == k::number ? b.d : b.type == k::integer ? b.i : b.b;
  if ((op == "/" || op == "//" || op == "%") && y == 0)
    fail(line, "division by zero");
  if (ints) {
    const int64_t p = a.type == k::integer ? a.i : a.b, q = b.type == k::integer ? b.i : b.b;
    int64_t r = 0;
    const bool overflow = op == "+"   ? __builtin_add_overflow(p, q, &r)
                          : op == "-" ? __builtin_sub_overflow(p, q, &r)
                          : op == "*" ? __builtin_mul_overflow(p, q, &r)
                                      : p == INT64_MIN && q == -1; // // and %
    if (overflow)
      fail(line, fmt::format("integer overflow in {} {} {}", p, op, q));
    if (op == "+" || op == "-" || op == "*")
      return value::integer(r);
    if (op == "//") // Python's floor division
      return value::integer(p / q - ((p % q != 0) && ((p < 0) != (q < 0)) ? 1 : 0));
    if (op == "%") { // Python's: the sign of q
      const int64_t m = p % q;
      return value::integer(m != 0 && ((m < 0) != (q < 0)) ? m + q : m);
    }
  }
  if (op == "+")
    return value::number(x + y);
  if (op == "-")
    return value::number(x - y);
  if (op == "*")
    return value::number(x * y);
  if (op == "/")
    return value::number(x / y);
  if (op == "//")
    return value::number(std::floor(x / y));
  return value::number(x - y * std::floor(x / y));
}

bool contains(const value& hay, const value& needle, int line) {
  switch (hay.type) {
  case value::kind::string:
    if (needle.type != value::kind::string)
      fail(line, "'in <string>' requires a string on the left");
    return hay.s.find(needle.s) != std::string::npos;
  case value::kind::array:
    return std::any_of(hay.a->begin(), hay.a->end(),
                       [&](const value& v) { return equal(v, needle); });
  case value::kind::object:
  case value::kind::ns:
    return needle.type == value::kind::string && hay.find(needle.s) != nullptr;
  case value::kind::undefined:
    return false;
  default:
    fail(line, "'in' needs a string, list or mapping on the right");
  }
}

bool less(const value& a, const value& b, int line) {
  if (a.type == value::kind::string && b.type == value::kind::string)
    return a.s < b.s;
  auto num = [&](const value& v) -> double {
    if (v.type == value::kind::integer)
      return double(v.i);
    if (v.type == value::kind::number)
      return v.d;
    if (v.type == value::kind::boolean)
      return v.b;
    fail(line, "cannot compare " + to_text(a) + " and " + to_text(b));
  };
  return num(a) < num(b);
}

value slice(const value& target, const value& v_start, const value& v_stop, const value& v_step,
            int line) {
  const int64_t n = target.type == value::kind::string ? int64_t(target.s.size())
                    : target.type == value::kind::array
                        ? int64_t(target.a->size())
                        : (fail(line, "only strings and lists can be sliced"), 0);
  const bool has_step = !v_step.is_undefined() && v_step.type != value::kind::none;
  const int64_t step = has_step ? to_index(v_step, line) : 1;
  if (step == 0)
    fail(line, "slice step cannot be zero");
  auto bound = [&](const value& v, int64_t fallback) {
    if (v.is_undefined() || v.type == value::kind::none)
      return fallback;
    int64_t i = to_index(v, line);
    if (i < 0)
      i += n;
    return step > 0 ? std::clamp<int64_t>(i, 0, n) : std::clamp<int64_t>(i, -1, n - 1);
  };
  const int64_t start = bound(v_start, step > 0 ? 0 : n - 1),
                stop = bound(v_stop, step > 0 ? n : -1);
  if (target.type == value::kind::string) {
    std::string out;
    for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step)
      out.push_back(target.s[i]);
    return value::string(std::move(out));
  }
  array out;
  for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step)
    out.push_back((*target.a)[i]);
  return value::list(std::move(out));
}

class evaluator {
 public:
  explicit evaluator(value globals) { frames_.push_back(std::move(globals)); }

  value lookup(const std::string& name) const {
    for (auto it = frames_.rbegin(); it != frames_.rend(); ++it)
      if (const value* v = it->find(name))
        return *v;
    return value();
  }

  // Every expression and node counts against max_steps; what an expression makes is checked
  // against the size and nesting limits.
  value eval(const expr& e) {
    if (++depth_ > max_eval_depth)
      fail(e.line, fmt::format("expressions nest deeper than {} levels", max_eval_depth));
    step(e.line);
    value v = eval_node(e);
    --depth_;
    if (v.depth > max_value_depth)
      fail(e.line, fmt::format("a value nests deeper than {} levels", max_value_depth));
    if (v.type == value::kind::string)
      check_text_size(v.s.size(), e.line);
    return v;
  }

  void run(const std::vector<node>& nodes, std::string& out) {
    for (const auto& n : nodes)
      run(n, out);
  }

 private:
  void step(int line) {
    if (++steps_ > max_steps)
      fail(line, fmt::format("the template ran more than {} steps", max_steps));
  }

  value eval_node(const expr& e) {
    using op = expr::op;
    switch (e.kind) {
    case op::literal:
      return e.literal;
    case op::name:
      return lookup(e.name);
    case op::list: {
      array a;
      for (const auto& item : e.args)
        a.push_back(eval(item));
      return value::list(std::move(a));
    }
    case op::dict: {
      value d = value::dict({});
      for (size_t i = 0; i + 1 < e.args.size(); i += 2)
        d.put(to_text(eval(e.args[i])), eval(e.args[i + 1]));
      return d;
    }
    case op::attr: {
      const value target = eval(e.args[0]);
      const value* v = target.is_mapping() ? target.find(e.name) : nullptr;
      return v ? *v : value();
    }
    case op::index:
      return index(eval(e.args[0]), eval(e.args[1]), e.line);
    case op::slice:
      return slice(eval(e.args[0]), eval(e.args[1]), eval(e.args[2]), eval(e.args[3]), e.line);
    case op::call:
      return call(e);
    case op::filter: {
      std::vector<value> args;
      for (size_t i = 1; i < e.args.size(); ++i)
        args.push_back(eval(e.args[i]));
      return apply_filter(e.name, eval(e.args[0]), args, e.kwnames, e.line);
    }
    case op::test: {
      std::vector<value> args;
      for (size_t i = 1; i < e.args.size(); ++i)
        args.push_back(eval(e.args[i]));
      return value::boolean(apply_test(e.name, eval(e.args[0]), args, e.line) != e.negate);
    }
    case op::not_:
      return value::boolean(!truthy(eval(e.args[0])));
    case op::neg:
      return arithmetic("-", value::integer(0), eval(e.args[0]), e.line);
    case op::and_: {
      value a = eval(e.args[0]);
      return truthy(a) ? eval(e.args[1]) : a;
    }
    case op::or_: {
      value a = eval(e.args[0]);
      return truthy(a) ? a : eval(e.args[1]);
    }
    case op::ternary:
      return truthy(eval(e.args[1])) ? eval(e.args[0]) : eval(e.args[2]);
    case op::concat: {
      std::string a = to_text(eval(e.args[0]));
      const std::string b = to_text(eval(e.args[1]));
      check_text_size(a.size() + b.size(), e.line);
      return value::string(a + b);
    }
    case op::binary:
      return binary(e);
    }
    return value();
  }

  value index(const value& target, const value& key, int line) {
    if (target.is_mapping()) {
      const value* v = target.find(to_text(key));
      return v ? *v : value();
    }
    if (target.type == value::kind::array || target.type == value::kind::string) {
      const int64_t n = target.type == value::kind::array ? target.a->size() : target.s.size();
      int64_t i = to_index(key, line);
      if (i < 0)
        i += n;
      if (i < 0 || i >= n)
        return value(); // Jinja: undefined
      return target.type == value::kind::array ? (*target.a)[i]
                                               : value::string(target.s.substr(i, 1));
    }
    return value();
  }

  value call(const expr& e) {
    std::vector<value> args;
    for (size_t i = 1; i < e.args.size(); ++i)
      args.push_back(eval(e.args[i]));
    const expr& callee = e.args[0];
    if (callee.kind == expr::op::attr)
      return call_method(eval(callee.args[0]), callee.name, args, e.line);
    if (callee.kind == expr::op::name)
      return call_global(callee.name, args, e.kwnames, e.line);
    fail(e.line, "this expression cannot be called");
  }

  value binary(const expr& e) {
    const value a = eval(e.args[0]), b = eval(e.args[1]);
    const std::string& o = e.name;
    if (o == "==")
      return value::boolean(equal(a, b));
    if (o == "!=")
      return value::boolean(!equal(a, b));
    if (o == "<")
      return value::boolean(less(a, b, e.line));
    if (o == ">")
      return value::boolean(less(b, a, e.line));
    if (o == "<=")
      return value::boolean(!less(b, a, e.line));
    if (o == ">=")
      return value::boolean(!less(a, b, e.line));
    if (o == "in")
      return value::boolean(contains(b, a, e.line));
    if (o == "not in")
      return value::boolean(!contains(b, a, e.line));
    return arithmetic(o, a, b, e.line);
  }

  void run(const node& n, std::string& out) {
    step(n.line);
    run_node(n, out);
    check_text_size(out.size(), n.line);
  }

  void run_node(const node& n, std::string& out) {
    switch (n.kind) {
    case node::type::text:
      out += n.text;
      return;
    case node::type::output:
      out += to_text(eval(*n.value_expr));
      return;
    case node::type::if_:
      for (const auto& [cond, body] : n.branches)
        if (!cond || truthy(eval(*cond))) {
          run(body, out);
          return;
        }
      return;
    case node::type::set: {
      value v = eval(*n.value_expr);
      if (n.attr.empty()) {
        frames_.back().put(n.vars[0], std::move(v));
        return;
      }
      value target = lookup(n.vars[0]);
      if (target.type != value::kind::ns)
        fail(n.line, "'set " + n.vars[0] + "." + n.attr + "' needs a namespace()");
      if (holds_namespace(v)) // a namespace inside a namespace could hold itself: a cycle
        fail(n.line, "'set " + n.vars[0] + "." + n.attr + "' cannot store a namespace");
      target.put(n.attr, std::move(v)); // shares the namespace's storage
      return;
    }
    case node::type::for_:
      run_for(n, out);
      return;
    }
  }

  void run_for(const node& n, std::string& out) {
    const value seq = eval(*n.value_expr);
    array items;
    if (seq.type == value::kind::array)
      items = *seq.a;
    else if (seq.is_mapping())
      for (const auto& [k, v] : *seq.o)
        items.push_back(value::string(k));
    else if (seq.type == value::kind::string)
      for (char c : seq.s)
        items.push_back(value::string(std::string(1, c)));
    else if (!seq.is_undefined() && seq.type != value::kind::none)
      fail(n.line, "cannot iterate over " + to_text(seq));
    if (n.filter) { // `for x in xs if cond`: loop.* counts only the kept items
      array kept;
      for (auto& item : items) {
        step(n.line);
        frames_.push_back(value::dict({}));
        bind(n, item);
        const bool keep = truthy(eval(*n.filter));
        frames_.pop_back();
        if (keep)
          kept.push_back(std::move(item));
      }
      items = std::move(kept);
    }
    if (items.empty()) {
      run(n.else_body, out);
      return;
    }
    const int64_t len = items.size();
    for (int64_t i = 0; i < len; ++i) {
      step(n.line); // an iteration counts even when its body is empty
      value frame = value::dict({});
      value loop = value::dict({{"index", value::integer(i + 1)},
                                {"index0", value::integer(i)},
                                {"revindex", value::integer(len - i)},
                                {"revindex0", value::integer(len - i - 1)},
                                {"first", value::boolean(i == 0)},
                                {"last", value::boolean(i == len - 1)},
                                {"length", value::integer(len)},
                                {"previtem", i > 0 ? items[i - 1] : value()},
                                {"nextitem", i + 1 < len ? items[i + 1] : value()}});
      frame.put("loop", std::move(loop));
      frames_.push_back(std::move(frame));
      bind(n, items[i]);
      run(n.body, out);
      frames_.pop_back();
    }
  }

  // Binds the loop variables to `item` in the innermost frame.
  void bind(const node& n, const value& item) {
    if (n.vars.size() == 1) {
      frames_.back().put(n.vars[0], item);
      return;
    }
    if (item.type != value::kind::array || item.a->size() != n.vars.size())
      fail(n.line, "cannot unpack " + to_text(item) + " into the loop variables");
    for (size_t k = 0; k < n.vars.size(); ++k)
      frames_.back().put(n.vars[k], (*item.a)[k]);
  }

  static bool holds_namespace(const value& v) {
    if (v.type == value::kind::ns)
      return true;
    if (v.type == value::kind::array)
      return std::any_of(v.a->begin(), v.a->end(), holds_namespace);
    if (v.type == value::kind::object)
      return std::any_of(v.o->begin(), v.o->end(),
                         [](const auto& kv) { return holds_namespace(kv.second); });
    return false;
  }

  std::vector<value> frames_;
  int depth_ = 0;
  int64_t steps_ = 0;
};

} // namespace

struct render_error {
  int line;
  std::string what;
};

void fail(int line, const std::string& what) {
  throw render_error{line, what};
}

expected<std::string> template_program::render(const nlohmann::ordered_json& context) const {
  std::string out;
  try {
    evaluator ev(context.is_object() ? from_json(context) : value::dict({}));
    ev.run(program_->nodes, out);
  } catch (const render_error& e) {
    return make_error(errc::invalid_argument, "chat template line {}: {}", e.line, e.what);
  }
  return out;
}

} // namespace troupe::engine::jinja
