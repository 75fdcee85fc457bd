// The OpenAI / vLLM request vocabulary: parses /v1/chat/completions, /v1/completions, /tokenize
// and /detokenize bodies into engine requests (validated, tokenized), and builds response and
// error JSON. Pure functions called on the HTTP threads; nothing here blocks.
#pragma once

#include <optional>
#include <string>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/grammar/grammar.hpp"
#include "engine/tokenizer/chat_template.hpp"
#include "http/tool_calls.hpp"
#include "runtime/step.hpp"

namespace troupe::serve {

using json = nlohmann::ordered_json;

// An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
struct api_error {
  int status = 400;
  std::string message;
  std::string param; // empty: null
  std::string type;  // empty: derived from status
};
std::string error_body(const api_error& e);

// The front end's one errc -> HTTP status map: invalid_argument 400, not_found 404,
// resource_exhausted / unavailable / cancelled (shutting down) 503, else 500.
int http_status(errc code);

// What the model serves, for validation and tokenization (const, shared by HTTP threads).
struct model_info {
  std::string name;
  int32_t max_model_len = 0;
  int64_t vocab_size = 0;
  const engine::model_tokenizer* text = nullptr;
  // Structured output (response_format, structured_outputs, guided_*, tool_choice required or
  // named); null: such requests are refused.
  const engine::grammar_compiler* grammar = nullptr;
};

// A parsed completion request, ready for the engine.
struct completion_request {
  bool chat = false;
  bool stream = false;
  bool include_usage = false;
  bool return_token_ids = false;
  bool skip_special_tokens = true;
  // /v1/completions `echo`: the prompt's text goes before the completion's (the prompt string as
  // given, or the prompt token ids decoded).
  bool echo = false;
  // `n` choices: n engine requests with the same prompt; choice i samples with seed `seed + i`
  // (when the request has a seed) and its own copy of the constraint.
  int32_t n = 1;
  // /v1/completions with a list of prompts: one request per prompt, each with the body's other
  // fields; its choices have indexes prompt * n + i.
  int32_t num_prompts = 1;
  std::string echo_text;
  int32_t top_logprobs = -1; // -1: no logprobs
  // vLLM's prompt_logprobs (-1: none). sampling.prompt_logprobs is the larger of it and, with
  // `echo`, top_logprobs: what the engine computes for both.
  int32_t prompt_logprobs = -1;
  std::vector<token_id> prompt;
  std::vector<token_id> stop_token_ids;
  std::vector<std::string> stop; // stop strings
  sampling_params sampling;
  // Chat with `tools` (tool_choice not "none"): how to read tool calls back from the output.
  tool_format tool_parsing = tool_format::none;
  bool parallel_tool_calls = true; // false: only the first call is returned
  // Structured output: the compiled grammar's matcher (the engine request takes it over).
  std::shared_ptr<engine::token_constraint> constraint;
  std::string constraint_field; // the request field it came from, e.g. "response_format"
};

std::variant<completion_request, api_error> parse_completion(const std::string& body, bool chat,
                                                             const model_info& m);
// The same for a body whose `prompt` may be a list of prompts (completions): one request each,
// in order (an error names the prompt's index); several prompts times `n` at most 256 choices.
std::variant<std::vector<completion_request>, api_error>
parse_completions(const std::string& body, bool chat, const model_info& m);

// The structured-output grammar of tool_choice "required" (`only` empty: any of `tools`, several
// calls when `parallel`) or of the named function `only`: calls in the model's format `f`, each
// call's arguments following its tool's parameter schema, so the output always parses.
engine::grammar_spec tool_call_grammar(const json& tools, const std::string& only, tool_format f,
                                       bool parallel);

// /tokenize and /detokenize: the response body, or an error.
std::variant<json, api_error> tokenize(const std::string& body, const model_info& m);
std::variant<json, api_error> detokenize(const std::string& body, const model_info& m);

// JSON text that never throws on invalid UTF-8 (replaced by U+FFFD).
std::string dump(const json& j);

} // namespace troupe::serve
