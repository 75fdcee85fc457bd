// OpenAI tool calling on the chat path: which tool-call format a model writes (from its
// vocabulary), validation of a request's `tools` / `tool_choice`, and the parser that turns the
// model's text back into OpenAI `tool_calls`, fed incrementally so that a stream and a whole body
// give the same result. Pure; no sockets.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/tokenizer/chat_template.hpp"

namespace troupe::serve {

enum class tool_format {
  none,   // no parsing (no tools, or tool_choice "none")
  hermes, // Qwen2.5 / Qwen3: <tool_call>{"name": ..., "arguments": {...}}</tool_call>, repeated
  llama3_json, // Llama 3.x: the whole output is {"name": ..., "parameters": {...}} (";"-separated)
};

// The format a model's vocabulary says it writes: `<tool_call>` -> hermes, Llama 3's
// `<|start_header_id|>` -> llama3_json, else none (tools are refused for that model).
tool_format detect_tool_format(const engine::model_tokenizer& m);

struct tool_call {
  std::string name;
  std::string arguments; // JSON text, as OpenAI sends it
};

// The result of feeding text: content to show, and tool calls completed by this text.
struct tool_delta {
  std::string content;
  std::vector<tool_call> calls;
};

// Splits generated text into content and tool calls. hermes: content streams as it comes except a
// possible start of `<tool_call>` and whitespace that may turn out to precede a call; a call is
// emitted once its closing tag arrives; a block that is not a JSON object with a string "name"
// (and object or string "arguments"/"parameters") stays content, as does an unterminated one.
// llama3_json: output that starts with '{' is held until the end, then becomes calls if every
// ';'-separated object is a call, else content.
class tool_call_parser {
 public:
  explicit tool_call_parser(tool_format f) : format_(f) {}
  tool_delta push(std::string_view text);
  tool_delta finish();
  size_t num_calls() const { return calls_; }

 private:
  tool_delta hermes(bool end);
  tool_delta llama(bool end);
  void emit_content(tool_delta& d, std::string_view text);

  tool_format format_;
  std::string buf_;      // text not yet decided on
  std::string held_;     // whitespace held back outside a call
  std::string pre_call_; // whitespace before the open call: content if it is not a call
  bool inside_ = false;
  int llama_mode_ = 0; // 0 undecided, 1 content, 2 JSON held to the end
  size_t calls_ = 0;
};

// Reads one function call object ({"name", "arguments" | "parameters"}), or nullopt.
std::optional<tool_call> read_call(const nlohmann::ordered_json& j);

} // namespace troupe::serve
