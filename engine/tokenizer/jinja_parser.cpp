// Jinja subset, second stage: expressions (Jinja's precedence: ternary, or, and, not, comparisons,
// + -, ~, * / // %, unary, postfix with filters and tests) and block structure (if, for, set).
#include "engine/tokenizer/jinja.hpp"
#include "engine/tokenizer/jinja_ast.hpp"
#include "engine/tokenizer/jinja_lex.hpp"

namespace troupe::engine::jinja {

namespace {

class expr_parser {
 public:
  expr_parser(std::vector<token> tokens, int line) : t_(std::move(tokens)), line_(line) {
    if (t_.size() > max_tag_tokens)
      fail(fmt::format("a tag of {} tokens (at most {})", t_.size(), max_tag_tokens));
  }

  bool at(std::string_view op) const {
    return (t_[p_].kind == token::type::op || t_[p_].kind == token::type::name) &&
           t_[p_].text == op;
  }
  bool accept(std::string_view op) {
    if (!at(op))
      return false;
    ++p_;
    return true;
  }
  void expect(std::string_view op) {
    if (!accept(op))
      fail(fmt::format("expected '{}' but found '{}'", op, t_[p_].text));
  }
  std::string name() {
    if (t_[p_].kind != token::type::name)
      fail(fmt::format("expected a name but found '{}'", t_[p_].text));
    return t_[p_++].text;
  }
  bool done() const { return t_[p_].kind == token::type::end; }
  [[noreturn]] void fail(const std::string& what) const { throw error_at{line_, what}; }

  struct error_at {
    int line;
    std::string what;
  };

  expr parse() { return ternary(); }
  expr or_expr() { return or_(); }

  // Counts the recursion of the descent (parentheses, lists, calls, unary operators).
  struct nested {
    explicit nested(expr_parser& p) : p_(p) {
      if (++p_.depth_ > max_nesting)
        p_.fail(fmt::format("an expression nests deeper than {} levels", max_nesting));
    }
    ~nested() { --p_.depth_; }
    nested(const nested&) = delete;
    nested& operator=(const nested&) = delete;
    expr_parser& p_;
  };

  expr ternary() {
    nested guard(*this);
    expr e = or_();
    if (accept("if")) {
      expr cond = or_();
      expr other = accept("else") ? ternary() : make(expr::op::literal);
      expr t = make(expr::op::ternary);
      t.args = {std::move(e), std::move(cond), std::move(other)};
      return t;
    }
    return e;
  }

 private:
  expr make(expr::op k) const {
    expr e;
    e.kind = k;
    e.line = line_;
    return e;
  }
  expr binary(expr::op k, std::string op, expr a, expr b) const {
    expr e = make(k);
    e.name = std::move(op);
    e.args.push_back(std::move(a));
    e.args.push_back(std::move(b));
    return e;
  }
  expr or_() {
    expr e = and_();
    while (accept("or"))
      e = binary(expr::op::or_, "or", std::move(e), and_());
    return e;
  }
  expr and_() {
    expr e = not_();
    while (accept("and"))
      e = binary(expr::op::and_, "and", std::move(e), not_());
    return e;
  }
  expr not_() {
    nested guard(*this);
    if (accept("not")) {
      expr e = make(expr::op::not_);
      e.args.push_back(not_());
      return e;
    }
    return compare();
  }
  expr compare() {
    expr e = math1();
    for (;;) {
      std::string op;
      for (const char* o : {"==", "!=", "<=", ">=", "<", ">", "in"})
        if (accept(o)) {
          op = o;
          break;
        }
      if (op.empty() && at("not") && t_[p_ + 1].text == "in") {
        p_ += 2;
        op = "not in";
      }
      if (op.empty())
        return e;
      e = binary(expr::op::binary, op, std::move(e), math1());
    }
  }
  expr math1() {
    expr e = concat();
    while (at("+") || at("-")) {
      std::string op = t_[p_++].text;
      e = binary(expr::op::binary, op, std::move(e), concat());
    }
    return e;
  }
  expr concat() {
    expr e = math2();
    while (accept("~"))
      e = binary(expr::op::concat, "~", std::move(e), math2());
    return e;
  }
  expr math2() {
    expr e = unary();
    while (at("*") || at("/") || at("//") || at("%")) {
      std::string op = t_[p_++].text;
      e = binary(expr::op::binary, op, std::move(e), unary());
    }
    return e;
  }
  expr unary() {
    nested guard(*this);
    if (accept("-")) {
      expr e = make(expr::op::neg);
      e.args.push_back(unary());
      return e;
    }
    accept("+");
    return postfix(primary());
  }
  void call_args(expr& e) { // after '(' up to and including ')'
    while (!accept(")")) {
      if (t_[p_].kind == token::type::name && t_[p_ + 1].text == "=") {
        e.kwnames.push_back(t_[p_].text);
        p_ += 2;
      } else if (!e.kwnames.empty()) {
        fail("positional argument after a keyword argument");
      }
      e.args.push_back(parse());
      if (!at(")"))
        expect(",");
    }
  }
  expr postfix(expr e) {
    for (;;) {
      if (accept(".")) {
        expr a = make(expr::op::attr);
        a.name = name();
        a.args.push_back(std::move(e));
        e = std::move(a);
      } else if (accept("[")) {
        e = subscript(std::move(e));
      } else if (accept("(")) {
        expr c = make(expr::op::call);
        c.args.push_back(std::move(e));
        call_args(c);
        e = std::move(c);
      } else if (accept("|")) {
        expr f = make(expr::op::filter);
        f.name = name();
        f.args.push_back(std::move(e));
        if (accept("("))
          call_args(f);
        e = std::move(f);
      } else if (accept("is")) {
        expr t = make(expr::op::test);
        t.negate = accept("not");
        t.name = name();
        t.args.push_back(std::move(e));
        if (accept("("))
          call_args(t);
        e = std::move(t);
      } else {
        return e;
      }
    }
  }
  expr subscript(expr target) {
    expr parts[3] = {make(expr::op::literal), make(expr::op::literal), make(expr::op::literal)};
    int n = 0;
    bool is_slice = false;
    for (;;) {
      if (!at(":") && !at("]"))
        parts[n] = parse();
      if (accept(":")) {
        is_slice = true;
        if (++n > 2)
          fail("too many ':' in a slice");
        continue;
      }
      expect("]");
      break;
    }
    expr e = make(is_slice ? expr::op::slice : expr::op::index);
    e.args.push_back(std::move(target));
    for (int k = 0; k < (is_slice ? 3 : 1); ++k)
      e.args.push_back(std::move(parts[k]));
    return e;
  }
  expr primary() {
    const token tok = t_[p_++];
    expr e = make(expr::op::literal);
    switch (tok.kind) {
    case token::type::string: {
      e.literal = value::string(tok.text);
      while (t_[p_].kind == token::type::string) // adjacent literals concatenate
        e.literal.s += t_[p_++].text;
      return e;
    }
    case token::type::integer:
      e.literal = value::integer(std::stoll(tok.text));
      return e;
    case token::type::number:
      e.literal = value::number(std::stod(tok.text));
      return e;
    case token::type::name:
      if (tok.text == "true" || tok.text == "True")
        e.literal = value::boolean(true);
      else if (tok.text == "false" || tok.text == "False")
        e.literal = value::boolean(false);
      else if (tok.text == "none" || tok.text == "None")
        e.literal = value::none();
      else {
        e.kind = expr::op::name;
        e.name = tok.text;
      }
      return e;
    case token::type::op:
      if (tok.text == "(") {
        expr inner = parse();
        if (accept(",")) { // a tuple: treated as a list
          expr l = make(expr::op::list);
          l.args.push_back(std::move(inner));
          while (!at(")")) {
            l.args.push_back(parse());
            if (!at(")"))
              expect(",");
          }
          inner = std::move(l);
        }
        expect(")");
        return inner;
      }
      if (tok.text == "[" || tok.text == "{") {
        const bool is_dict = tok.text == "{";
        e.kind = is_dict ? expr::op::dict : expr::op::list;
        const char* close = is_dict ? "}" : "]";
        while (!accept(close)) {
          e.args.push_back(parse());
          if (is_dict) {
            expect(":");
            e.args.push_back(parse());
          }
          if (!at(close))
            expect(",");
        }
        return e;
      }
      break;
    case token::type::end:
      fail("unexpected end of expression");
    }
    fail(fmt::format("unexpected '{}'", tok.text));
  }

  std::vector<token> t_;
  size_t p_ = 0;
  int line_;
  int depth_ = 0;
};

class block_parser {
 public:
  explicit block_parser(std::vector<segment> segs) : s_(std::move(segs)) {}

  // Parses nodes until a statement whose first word is in `stops`; returns that word ("" at end).
  std::string parse_block(std::vector<node>& out, std::initializer_list<std::string_view> stops,
                          expr_parser** stop_parser) {
    if (++depth_ > max_nesting)
      throw expr_parser::error_at{i_ < s_.size() ? s_[i_].line : 0,
                                  fmt::format("blocks nest deeper than {} levels", max_nesting)};
    struct leave {
      int& depth;
      ~leave() { --depth; }
    } left{depth_};
    while (i_ < s_.size()) {
      const segment& seg = s_[i_++];
      if (seg.kind == segment::type::text) {
        if (!seg.body.empty())
          out.push_back(node{.kind = node::type::text, .text = seg.body});
        continue;
      }
      auto tokens = lex(seg.body, seg.line);
      if (!tokens)
        throw expr_parser::error_at{seg.line, tokens.error().message()};
      parsers_.push_back(std::make_unique<expr_parser>(std::move(*tokens), seg.line));
      expr_parser& p = *parsers_.back();
      if (seg.kind == segment::type::output) {
        node n{.kind = node::type::output, .line = seg.line};
        n.value_expr = std::make_unique<expr>(p.parse());
        finish(p);
        out.push_back(std::move(n));
        continue;
      }
      const std::string word = p.name();
      for (auto stop : stops)
        if (word == stop) {
          *stop_parser = &p;
          return word;
        }
      out.push_back(statement(word, p, seg.line));
    }
    if (stops.size() > 0)
      throw expr_parser::error_at{s_.empty() ? 0 : s_.back().line,
                                  fmt::format("missing '{{% {} %}}'", *stops.begin())};
    return "";
  }

 private:
  void finish(expr_parser& p) {
    if (!p.done())
      p.fail("unexpected tokens at the end of the tag");
  }
  node statement(const std::string& word, expr_parser& p, int line) {
    node n{.line = line};
    if (word == "if") {
      n.kind = node::type::if_;
      auto cond = std::make_unique<expr>(p.parse());
      finish(p);
      for (;;) {
        std::vector<node> body;
        expr_parser* stop = nullptr;
        const std::string end = parse_block(body, {"endif", "elif", "else"}, &stop);
        n.branches.emplace_back(std::move(cond), std::move(body));
        if (end == "endif") {
          finish(*stop);
          return n;
        }
        cond = end == "elif" ? std::make_unique<expr>(stop->parse()) : nullptr;
        finish(*stop);
      }
    }
    if (word == "for") {
      n.kind = node::type::for_;
      n.vars.push_back(p.name());
      while (p.accept(","))
        n.vars.push_back(p.name());
      p.expect("in");
      n.value_expr = std::make_unique<expr>(p.or_expr()); // `if` after it filters items
      if (p.accept("if"))
        n.filter = std::make_unique<expr>(p.or_expr());
      finish(p);
      expr_parser* stop = nullptr;
      if (parse_block(n.body, {"endfor", "else"}, &stop) == "else")
        parse_block(n.else_body, {"endfor"}, &stop);
      finish(*stop);
      return n;
    }
    if (word == "set") {
      n.kind = node::type::set;
      n.vars.push_back(p.name());
      if (p.accept("."))
        n.attr = p.name();
      p.expect("=");
      n.value_expr = std::make_unique<expr>(p.parse());
      finish(p);
      return n;
    }
    p.fail(
        fmt::format("'{{% {} %}}' is not supported by troupe's chat template interpreter", word));
  }

  std::vector<segment> s_;
  size_t i_ = 0;
  int depth_ = 0;
  std::vector<std::unique_ptr<expr_parser>> parsers_;
};

} // namespace

expected<template_program> template_program::parse(std::string_view source) {
  auto segs = segment_source(source);
  if (!segs)
    return std::move(segs).error();
  auto prog = std::make_shared<program>();
  try {
    block_parser parser(std::move(*segs));
    expr_parser* none = nullptr;
    parser.parse_block(prog->nodes, {}, &none);
  } catch (const expr_parser::error_at& e) {
    return make_error(errc::parse_error, "chat template line {}: {}", e.line, e.what);
  } catch (const std::exception& e) { // std::stoll on an out-of-range literal
    return make_error(errc::parse_error, "chat template: {}", e.what());
  }
  template_program t;
  t.program_ = std::move(prog);
  return t;
}

} // namespace troupe::engine::jinja
