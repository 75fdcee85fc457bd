#include "engine/grammar/grammar.hpp"

#include <algorithm>
#include <exception>
#include <thread>

#include <xgrammar/xgrammar.h>

namespace troupe::engine {

namespace {

// xgrammar reports every problem (a bad schema, regex or grammar) by throwing.
template <class F>
auto guarded(const char* what, F&& f) -> expected<decltype(f())> {
  try {
    return f();
  } catch (const std::exception& e) {
    std::string msg = e.what();
    // xgrammar prefixes its messages with the C++ source location ("[12:00:00] /path/x.cc:42: ").
    if (auto p = msg.find(".cc:"); p != std::string::npos)
      if (auto q = msg.find(": ", p + 4); q != std::string::npos)
        msg = msg.substr(q + 2);
    while (!msg.empty() && (msg.back() == '\n' || msg.back() == ' '))
      msg.pop_back();
    return make_error(errc::invalid_argument, "{}: {}", what, msg);
  }
}

class xgrammar_constraint final : public token_constraint {
 public:
  xgrammar_constraint(xgrammar::GrammarMatcher m, int32_t vocab)
    : matcher_(std::move(m)), vocab_(vocab) {}

  void fill_mask(std::vector<uint32_t>& mask) override {
    const int32_t words = xgrammar::GetBitmaskSize(vocab_);
    mask.assign(static_cast<size_t>(words), 0);
    int64_t shape[1] = {words};
    DLTensor t{};
    t.data = mask.data();
    t.device = DLDevice{kDLCPU, 0};
    t.ndim = 1;
    t.dtype = xgrammar::GetBitmaskDLType();
    t.shape = shape;
    t.strides = nullptr;
    t.byte_offset = 0;
    matcher_.FillNextTokenBitmask(&t);
  }
  bool accept(token_id t) override {
    if (t < 0 || t >= vocab_ || matcher_.IsTerminated())
      return false;
    return matcher_.AcceptToken(t);
  }
  bool terminated() const override { return matcher_.IsTerminated(); }
  std::unique_ptr<token_constraint> fork() const override {
    return std::make_unique<xgrammar_constraint>(matcher_.Fork(), vocab_);
  }

 private:
  xgrammar::GrammarMatcher matcher_;
  int32_t vocab_;
};

// The grammar of a JSON schema, printed as EBNF. xgrammar 0.2.9 writes the characters of strings
// with minLength / maxLength as [^"\\\r\n], which lets raw control characters (a tab) into a JSON
// string, where JSON forbids them; the class is narrowed to exclude U+0000-U+001F as its
// unbounded strings do (tests/unit/test_grammar.cpp checks the tab is masked).
std::string json_schema_ebnf(const std::string& schema) {
  auto g = xgrammar::Grammar::FromJSONSchema(schema, false, std::nullopt, std::nullopt, true);
  std::string text = g.ToString();
  const std::string loose = R"([^\"\\\r\n])", tight = R"([^\0-\x1f\"\\])";
  for (size_t p = text.find(loose); p != std::string::npos; p = text.find(loose, p + tight.size()))
    text.replace(p, loose.size(), tight);
  return text;
}

} // namespace

struct grammar_compiler::impl {
  explicit impl(const xgrammar::TokenizerInfo& info)
    : compiler(info, static_cast<int>(std::clamp(std::thread::hardware_concurrency(), 1u, 8u))) {}
  // GrammarCompiler's methods are not const but are safe to call from several threads.
  mutable xgrammar::GrammarCompiler compiler;
};

grammar_compiler::~grammar_compiler() = default;

expected<std::shared_ptr<grammar_compiler>>
grammar_compiler::create(const tokenizer& text, int64_t vocab_size,
                         std::vector<token_id> stop_ids) {
  if (vocab_size <= 0 || vocab_size > (int64_t{1} << 30))
    return make_error(errc::invalid_argument, "grammar: vocabulary size {}", vocab_size);
  std::vector<std::string> vocab(static_cast<size_t>(std::min<int64_t>(vocab_size, text.size())));
  for (size_t t = 0; t < vocab.size(); ++t) {
    const auto id = static_cast<token_id>(t);
    // Special tokens are not text: empty marks them for xgrammar (never inside a match).
    if (text.is_known(id) && !text.is_special(id))
      vocab[t] = std::string(text.token_bytes(id));
  }
  std::erase_if(stop_ids, [&](token_id t) { return t < 0 || t >= vocab_size; });
  if (stop_ids.empty())
    return make_error(errc::invalid_argument, "grammar: the model has no EOS token inside its "
                                              "vocabulary to end a structured output");
  auto c = guarded("grammar: tokenizer", [&] {
    xgrammar::TokenizerInfo info(vocab, xgrammar::VocabType::RAW, static_cast<int>(vocab_size),
                                 stop_ids, false);
    return std::make_shared<impl>(info);
  });
  if (!c)
    return std::move(c).error();
  auto g = std::shared_ptr<grammar_compiler>(new grammar_compiler());
  g->impl_ = std::unique_ptr<impl>(new impl(std::move(**c)));
  g->vocab_size_ = vocab_size;
  return g;
}

std::string ebnf_literal(const std::string& s) {
  // One quoted literal per run of printable text; control bytes as \xHH in literals of their own
  // (xgrammar reads hex digits after \x greedily).
  std::string out = "(\"";
  static const char* hex = "0123456789abcdef";
  for (unsigned char c : s) {
    switch (c) {
    case '"':
      out += "\\\"";
      break;
    case '\\':
      out += "\\\\";
      break;
    case '\n':
      out += "\\n";
      break;
    case '\r':
      out += "\\r";
      break;
    case '\t':
      out += "\\t";
      break;
    default:
      if (c < 0x20 || c == 0x7f) {
        out += "\" \"\\x";
        out += hex[c >> 4];
        out += hex[c & 15];
        out += "\" \"";
      } else {
        out += static_cast<char>(c);
      }
    }
  }
  out += "\")";
  return out;
}

expected<std::unique_ptr<token_constraint>> grammar_compiler::compile(const grammar_spec& g) const {
  auto& xc = impl_->compiler;
  using kind = grammar_spec::kind;
  auto compiled = [&]() -> expected<xgrammar::CompiledGrammar> {
    switch (g.type) {
    case kind::json_object:
      return guarded("json_object", [&] {
        return xc.CompileJSONSchema(R"({"type": "object"})", false, std::nullopt, std::nullopt,
                                    false);
      });
    case kind::json_schema:
      return guarded("json_schema",
                     [&] { return xc.CompileGrammar(json_schema_ebnf(g.text), "root"); });
    case kind::regex:
      return guarded("regex", [&] { return xc.CompileRegex(g.text); });
    case kind::choice: {
      if (g.choices.empty())
        return make_error(errc::invalid_argument, "choice: the list of choices is empty");
      std::string ebnf = "root ::= ";
      for (size_t i = 0; i < g.choices.size(); ++i) {
        if (g.choices[i].empty())
          return make_error(errc::invalid_argument, "choice: choice {} is the empty string", i);
        ebnf += (i ? " | " : "") + ebnf_literal(g.choices[i]);
      }
      return guarded("choice", [&] { return xc.CompileGrammar(ebnf, "root"); });
    }
    case kind::ebnf:
      return guarded("grammar", [&] { return xc.CompileGrammar(g.text, "root"); });
    case kind::tool_calls:
      return guarded("tool call schema", [&] {
        // The call object's grammar (rules root, ...) under a start rule that wraps it.
        std::string call = g.call_begin.empty() ? "root" : ebnf_literal(g.call_begin) + " root";
        if (!g.call_end.empty())
          call += " " + ebnf_literal(g.call_end);
        std::string ebnf = json_schema_ebnf(g.text) + "\ntroupe_tool_calls ::= " + call;
        if (g.repeat)
          ebnf += " (" + (g.call_separator.empty() ? "" : ebnf_literal(g.call_separator) + " ") +
                  call + ")*";
        ebnf += "\n";
        return xc.CompileGrammar(xgrammar::Grammar::FromEBNF(ebnf, "troupe_tool_calls"));
      });
    case kind::structural_tag:
      return guarded("structural_tag", [&] { return xc.CompileStructuralTag(g.text); });
    }
    return make_error(errc::invalid_argument, "unknown grammar kind");
  }();
  if (!compiled)
    return std::move(compiled).error();
  return guarded("grammar matcher", [&]() -> std::unique_ptr<token_constraint> {
    return std::make_unique<xgrammar_constraint>(xgrammar::GrammarMatcher(*compiled),
                                                 static_cast<int32_t>(vocab_size_));
  });
}

} // namespace troupe::engine
