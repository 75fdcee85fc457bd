// Structured output over xgrammar (https://github.com/mlc-ai/xgrammar, its C++ core built from the
// PyPI source distribution by scripts/fetch_xgrammar.sh): JSON schemas, regular expressions,
// choices, EBNF grammars and tool-call formats are compiled against the model's vocabulary into
// grammars whose matchers give, per step, the bitmask of tokens that keep the output matching.
// xgrammar was chosen over llguidance because it builds with CMake and a C++ compiler alone
// (llguidance needs a Rust toolchain). One grammar_compiler per served model, shared by the HTTP
// threads (compiling is thread-safe and cached by xgrammar); a compiled request gets its own
// matcher (token_constraint), which the scheduler owns.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/grammar/constraint.hpp"
#include "engine/tokenizer/tokenizer.hpp"
#include "runtime/error.hpp"

namespace troupe::engine {

// What a request's output must match.
struct grammar_spec {
  enum class kind : uint8_t {
    json_object,    // any JSON object
    json_schema,    // `text`: a JSON schema; objects get only the properties it lists (xgrammar's
                    // strict mode, as vLLM uses it)
    regex,          // `text`: a regular expression the whole output matches
    choice,         // exactly one of `choices`
    ebnf,           // `text`: an EBNF grammar in xgrammar's dialect (GBNF-like), start rule `root`
    tool_calls,     // `text`: the JSON schema of one call object, wrapped as below
    structural_tag, // `text`: an xgrammar structural tag, {"type": "structural_tag", "format":
                    // {...}} (free text with tagged, schema-constrained parts, ...)
  };
  kind type = kind::json_object;
  std::string text;
  std::vector<std::string> choices;
  // tool_calls: each call is `call_begin` <object> `call_end`; with `repeat`, one or more calls
  // separated by `call_separator`.
  std::string call_begin, call_end, call_separator;
  bool repeat = false;
};

class grammar_compiler {
 public:
  // The vocabulary as generated text: token t stands for tokenizer.token_bytes(t); special and
  // unknown tokens (and ids in [tokenizer.size(), vocab_size)) never appear inside a match;
  // `stop_ids` (the model's EOS tokens) end a complete match.
  static expected<std::shared_ptr<grammar_compiler>>
  create(const tokenizer& text, int64_t vocab_size, std::vector<token_id> stop_ids);
  ~grammar_compiler();

  // A fresh matcher for `g`. errc::invalid_argument naming the problem for a schema, regex or
  // grammar xgrammar cannot compile.
  expected<std::unique_ptr<token_constraint>> compile(const grammar_spec& g) const;

  int64_t vocab_size() const { return vocab_size_; }

 private:
  struct impl;
  grammar_compiler() = default;
  std::unique_ptr<impl> impl_;
  int64_t vocab_size_ = 0;
};

// `s` as one EBNF string literal of xgrammar's dialect (quotes included), for generated grammars.
std::string ebnf_literal(const std::string& s);

} // namespace troupe::engine
