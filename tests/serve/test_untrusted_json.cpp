// Request bodies as an attacker writes them, without sockets: JSON nested 100k levels in every
// field of every endpoint, and as JSON text inside strings (tool call arguments, schemas), is a
// 400 naming the limit; nothing walks it recursively (the server once died of a stack overflow
// here). The tiny model of the fuzz harnesses (fuzz/fuzz_util.hpp) serves the requests.
#include <doctest/doctest.h>

#include "fuzz/fuzz_util.hpp"
#include "http/openai_api.hpp"

using namespace troupe;
using namespace troupe::serve;

namespace {

const model_info& tiny() {
  static const model_info m{
      .name = "tiny", .max_model_len = 512, .vocab_size = 262, .text = &fuzz::tiny_model()};
  return m;
}

// The route's answer: 0 when accepted, else the error's status; `message` gets the error text.
int status_of(const std::string& route, const std::string& body, std::string* message = nullptr) {
  auto error = [&](const api_error& e) {
    if (message)
      *message = e.message;
    return e.status;
  };
  if (route == "/tokenize" || route == "/detokenize") {
    auto r = route == "/tokenize" ? tokenize(body, tiny()) : detokenize(body, tiny());
    return std::holds_alternative<api_error>(r) ? error(std::get<api_error>(r)) : 0;
  }
  auto r = parse_completion(body, route == "/v1/chat/completions", tiny());
  return std::holds_alternative<api_error>(r) ? error(std::get<api_error>(r)) : 0;
}

const std::string deep_array = std::string(100000, '[') + std::string(100000, ']');
std::string deep_object() {
  std::string s;
  for (int i = 0; i < 100000; ++i)
    s += R"({"a":)";
  return s + "1" + std::string(100000, '}');
}

// Every field the routes read, and some they do not.
const char* const fields[] = {"model",
                              "messages",
                              "prompt",
                              "tokens",
                              "stream",
                              "stream_options",
                              "max_tokens",
                              "max_completion_tokens",
                              "temperature",
                              "top_p",
                              "top_k",
                              "min_p",
                              "presence_penalty",
                              "frequency_penalty",
                              "repetition_penalty",
                              "ignore_eos",
                              "min_tokens",
                              "seed",
                              "logit_bias",
                              "logprobs",
                              "top_logprobs",
                              "stop",
                              "stop_token_ids",
                              "n",
                              "echo",
                              "return_token_ids",
                              "skip_special_tokens",
                              "tools",
                              "tool_choice",
                              "parallel_tool_calls",
                              "response_format",
                              "structured_outputs",
                              "guided_json",
                              "guided_regex",
                              "guided_choice",
                              "guided_grammar",
                              "guided_decoding_backend",
                              "guided_whitespace_pattern",
                              "chat_template_kwargs",
                              "add_generation_prompt",
                              "user",
                              "prompt_logprobs",
                              "best_of",
                              "no_such_field"};

} // namespace

TEST_CASE("untrusted JSON: 100k-deep nesting in every field of every route is a 400") {
  const std::string routes[] = {"/v1/chat/completions", "/v1/completions", "/tokenize",
                                "/detokenize"};
  const std::string valid[] = {R"("messages": [{"role": "user", "content": "hi"}])",
                               R"("prompt": "hi")", R"("prompt": "hi")", R"("tokens": [1, 2])"};
  const std::string deep_obj = deep_object();
  for (size_t r = 0; r < 4; ++r) {
    // The valid body is accepted, so each refusal below is the nesting's.
    CHECK_MESSAGE(status_of(routes[r], "{" + valid[r] + "}") == 0, routes[r]);
    for (const char* field : fields)
      for (const std::string* deep : {&deep_array, &deep_obj}) {
        const std::string body = "{" + valid[r] + R"(, ")" + field + R"(": )" + *deep + "}";
        std::string message;
        CHECK_MESSAGE(status_of(routes[r], body, &message) == 400, routes[r], " ", field);
        CHECK_MESSAGE(message.find("nests deeper than 32 levels") != std::string::npos, routes[r],
                      " ", field, ": ", message);
      }
  }
  // Inside messages, tools and schemas.
  const std::string inner[] = {
      R"({"messages": [{"role": "user", "content": D}]})",
      R"({"messages": [{"role": D, "content": "x"}]})",
      R"({"messages": [{"role": "user", "content": [{"type": "text", "text": D}]}]})",
      R"({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"type": "function",
          "function": {"name": "f", "arguments": D}}]}]})",
      R"({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function",
          "function": {"name": "f", "parameters": D}}]})",
      R"({"messages": [{"role": "user", "content": "x"}], "response_format": {"type":
          "json_schema", "json_schema": {"name": "s", "schema": D}}})",
      R"({"messages": [{"role": "user", "content": "x"}], "structured_outputs": {"json": D}})"};
  for (std::string body : inner) {
    body.replace(body.find('D'), 1, deep_array);
    CHECK(status_of("/v1/chat/completions", body) == 400);
    CHECK(status_of("/tokenize", body) == 400);
  }
}

TEST_CASE("untrusted JSON: JSON text in strings is depth-checked before it is parsed") {
  const std::string deep_text = std::string(100000, '[') + std::string(100000, ']');
  std::string message;
  const std::string call =
      R"({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"type": "function",
          "function": {"name": "f", "arguments": ")" +
      deep_text + R"("}}]}]})";
  CHECK(status_of("/v1/chat/completions", call, &message) == 400);
  CHECK(message == "the arguments of tool call 'f' nest deeper than 32 levels");
  CHECK(status_of("/tokenize", call) == 400);
  for (const std::string& field :
       {std::string(R"("response_format": {"type": "json_schema", "json_schema": {"name": "s",
           "schema": "S"}})"),
        std::string(R"("guided_json": "S")"),
        std::string(R"("structured_outputs": {"json": "S"})")}) {
    std::string body = R"({"messages": [{"role": "user", "content": "x"}], )" + field + "}";
    body.replace(body.find("\"S\"") + 1, 1, deep_text);
    CHECK(status_of("/v1/chat/completions", body, &message) == 400);
    CHECK_MESSAGE(message.find("nests deeper than 32 levels") != std::string::npos, message);
  }
  // What real requests nest is still accepted: a tool call with nested arguments renders.
  const std::string ok =
      R"({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"type": "function",
          "function": {"name": "f", "arguments": "{\"a\": [[[{\"b\": [1, 2]}]]]}"}}]},
          {"role": "user", "content": "and?"}]})";
  CHECK(status_of("/tokenize", ok, &message) == 0);
}
