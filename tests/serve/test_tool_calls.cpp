// Tool calling on the chat path without sockets: the format detected from the golden tokenizers,
// the parser on recorded model outputs (whole, in every two-cut chunk split, malformed,
// unterminated), tools and tool-call history reaching the real chat templates through
// parse_completion, the 400s, and openai_response turning tokens into OpenAI tool_calls,
// streamed and not.
#include <doctest/doctest.h>

#include "golden.hpp"
#include "http/openai_response.hpp"

using namespace troupe;
using namespace troupe::serve;

namespace {

std::optional<engine::model_tokenizer> golden_tokenizer(const std::string& name) {
  auto dir = test::golden_dir();
  if (!dir)
    return std::nullopt;
  auto t = engine::model_tokenizer::load(*dir / "tokenizers" / name);
  REQUIRE_MESSAGE(t.has_value(), (t ? "" : t.error().to_string()));
  return std::move(*t);
}

struct parsed {
  std::string content;
  std::vector<tool_call> calls;
};

parsed run(tool_format f, const std::vector<std::string>& chunks) {
  tool_call_parser p(f);
  parsed out;
  auto take = [&](tool_delta d) {
    out.content += d.content;
    for (auto& c : d.calls)
      out.calls.push_back(std::move(c));
  };
  for (const auto& c : chunks)
    take(p.push(c));
  take(p.finish());
  return out;
}

// The parse of `text` whole, checked equal to the parse of every split into three chunks.
parsed parse_all_splits(tool_format f, const std::string& text) {
  const auto whole = run(f, {text});
  for (size_t a = 0; a <= text.size(); ++a)
    for (size_t b = a; b <= text.size(); b += 3) {
      const auto p = run(f, {text.substr(0, a), text.substr(a, b - a), text.substr(b)});
      REQUIRE_MESSAGE(p.content == whole.content, text, " split at ", a, " ", b);
      REQUIRE(p.calls.size() == whole.calls.size());
      for (size_t i = 0; i < p.calls.size(); ++i) {
        CHECK(p.calls[i].name == whole.calls[i].name);
        CHECK(p.calls[i].arguments == whole.calls[i].arguments);
      }
    }
  return whole;
}

const model_info info(const engine::model_tokenizer& t) {
  return {.name = "m", .max_model_len = 4096, .vocab_size = 0, .text = &t};
}

json tools_json() {
  return json::parse(R"([{"type": "function", "function": {"name": "get_weather",
      "description": "Weather now", "parameters": {"type": "object",
      "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])");
}

std::variant<completion_request, api_error> chat(const model_info& m, json extra) {
  json b = {{"messages", {{{"role", "user"}, {"content", "weather in Paris?"}}}}};
  b.update(extra);
  return parse_completion(b.dump(), true, m);
}

api_error refused(const std::variant<completion_request, api_error>& r) {
  REQUIRE(std::holds_alternative<api_error>(r));
  return std::get<api_error>(r);
}

} // namespace

TEST_CASE("tools: the tool-call format comes from the vocabulary") {
  auto qwen = golden_tokenizer("qwen3");
  auto llama = golden_tokenizer("llama3");
  if (!qwen || !llama)
    return;
  CHECK(detect_tool_format(*qwen) == tool_format::hermes);
  CHECK(detect_tool_format(*llama) == tool_format::llama3_json);
}

TEST_CASE("tools: Qwen <tool_call> outputs parse the same whole and in any chunk split") {
  const auto f = tool_format::hermes;
  auto one = parse_all_splits(
      f, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n"
         "</tool_call>");
  CHECK(one.content.empty());
  REQUIRE(one.calls.size() == 1);
  CHECK(one.calls[0].name == "get_weather");
  CHECK(json::parse(one.calls[0].arguments) == json{{"city", "Paris"}});

  auto two = parse_all_splits(
      f, "Let me check <b>both</b>.\n\n<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n"
         "</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": \"{\\\"x\\\": [1, 2]}\"}\n"
         "</tool_call>\n");
  CHECK(two.content == "Let me check <b>both</b>.");
  REQUIRE(two.calls.size() == 2);
  CHECK(two.calls[0].name == "a");
  CHECK(two.calls[0].arguments == "{}");
  CHECK(two.calls[1].arguments == "{\"x\": [1, 2]}");

  auto plain = parse_all_splits(f, "No tools needed.\n\nParis is sunny. <tool_");
  CHECK(plain.calls.empty());
  CHECK(plain.content == "No tools needed.\n\nParis is sunny. <tool_");

  auto bad_json = parse_all_splits(f, "<tool_call>\n{\"name\": \"a\", \"arguments\": {\n"
                                      "</tool_call> and text");
  CHECK(bad_json.calls.empty());
  CHECK(bad_json.content ==
        "<tool_call>\n{\"name\": \"a\", \"arguments\": {\n</tool_call> and text");

  auto no_name = parse_all_splits(f, "<tool_call>{\"arguments\": {}}</tool_call>");
  CHECK(no_name.calls.empty());
  CHECK(no_name.content == "<tool_call>{\"arguments\": {}}</tool_call>");

  auto cut = parse_all_splits(f, "ok <tool_call>\n{\"name\": \"a\", \"argu");
  CHECK(cut.calls.empty());
  CHECK(cut.content == "ok <tool_call>\n{\"name\": \"a\", \"argu");

  auto mixed = parse_all_splits(f, "<tool_call>{\"name\": \"a\"}</tool_call>\n<tool_call>oops"
                                   "</tool_call>\n");
  REQUIRE(mixed.calls.size() == 1);
  CHECK(mixed.calls[0].arguments == "{}");
  CHECK(mixed.content == "\n<tool_call>oops</tool_call>");
}

TEST_CASE("tools: Llama 3 JSON function calls parse the same whole and in any chunk split") {
  const auto f = tool_format::llama3_json;
  auto one = parse_all_splits(
      f, "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris; France\"}}");
  REQUIRE(one.calls.size() == 1);
  CHECK(one.content.empty());
  CHECK(json::parse(one.calls[0].arguments) == json{{"city", "Paris; France"}});

  auto two = parse_all_splits(f, "<|python_tag|>{\"name\": \"a\", \"parameters\": {}}; "
                                 "{\"name\": \"b\", \"parameters\": {\"n\": 1}}");
  REQUIRE(two.calls.size() == 2);
  CHECK(two.calls[1].name == "b");
  CHECK(two.calls[1].arguments == "{\"n\":1}");

  auto text = parse_all_splits(f, "Sure: {\"name\": \"a\"}");
  CHECK(text.calls.empty());
  CHECK(text.content == "Sure: {\"name\": \"a\"}");

  auto not_call = parse_all_splits(f, "{\"answer\": 42}");
  CHECK(not_call.calls.empty());
  CHECK(not_call.content == "{\"answer\": 42}");

  auto trailing = parse_all_splits(f, "{\"name\": \"a\", \"parameters\": {}} and more");
  CHECK(trailing.calls.empty());
  CHECK(trailing.content == "{\"name\": \"a\", \"parameters\": {}} and more");
}

TEST_CASE("tools: parse_completion renders tools and tool-call history with the real template") {
  auto qwen = golden_tokenizer("qwen3");
  if (!qwen)
    return;
  const auto m = info(*qwen);
  json history = json::parse(R"([
    {"role": "user", "content": "weather in Paris?"},
    {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
      "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "21C"}])");
  auto r = parse_completion(json{{"messages", history}, {"tools", tools_json()}}.dump(), true, m);
  REQUIRE_MESSAGE(std::holds_alternative<completion_request>(r), std::get<api_error>(r).message);
  const auto& req = std::get<completion_request>(r);
  CHECK(req.tool_parsing == tool_format::hermes);
  CHECK(req.parallel_tool_calls);
  // What transformers renders for the same conversation (content "" and arguments as an object,
  // the normalisation vLLM applies before the template).
  json normalised = history;
  normalised[1]["content"] = "";
  normalised[1]["tool_calls"][0]["function"]["arguments"] = json{{"city", "Paris"}};
  engine::chat_options opts;
  opts.tools = tools_json();
  auto want = qwen->encode_chat(normalised, opts);
  REQUIRE(want.has_value());
  CHECK(req.prompt == *want);
  const auto text = qwen->text->decode(req.prompt);
  CHECK(text.find("<tools>") != std::string::npos);
  CHECK(text.find("\"get_weather\"") != std::string::npos);
  CHECK(
      text.find("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}") !=
      std::string::npos);
  CHECK(text.find("<tool_response>\n21C\n</tool_response>") != std::string::npos);

  // tool_choice "none": tools are not shown and the output is not parsed.
  auto none = chat(m, {{"tools", tools_json()}, {"tool_choice", "none"}});
  REQUIRE(std::holds_alternative<completion_request>(none));
  CHECK(std::get<completion_request>(none).tool_parsing == tool_format::none);
  auto plain = chat(m, json::object());
  REQUIRE(std::holds_alternative<completion_request>(plain));
  CHECK(std::get<completion_request>(none).prompt == std::get<completion_request>(plain).prompt);
  auto single = chat(m, {{"tools", tools_json()}, {"parallel_tool_calls", false}});
  REQUIRE(std::holds_alternative<completion_request>(single));
  CHECK(!std::get<completion_request>(single).parallel_tool_calls);
}

TEST_CASE("tools: what cannot be honoured is refused with 400 naming the field") {
  auto qwen = golden_tokenizer("qwen3");
  auto llama = golden_tokenizer("llama3");
  if (!qwen || !llama)
    return;
  const auto m = info(*qwen);
  auto tools = tools_json();
  CHECK(refused(chat(m, {{"tools", "get_weather"}})).param == "tools");
  CHECK(refused(chat(m, {{"tools", {{{"type", "code_interpreter"}}}}})).param == "tools");
  auto bad_name = tools;
  bad_name[0]["function"]["name"] = "get weather";
  CHECK(refused(chat(m, {{"tools", bad_name}})).param == "tools");
  auto twice = tools;
  twice.push_back(tools[0]);
  CHECK(refused(chat(m, {{"tools", twice}})).param == "tools");
  auto strict = tools;
  strict[0]["function"]["strict"] = true;
  CHECK(refused(chat(m, {{"tools", strict}})).message.find("strict") != std::string::npos);
  auto bad_params = tools;
  bad_params[0]["function"]["parameters"] = "object";
  CHECK(refused(chat(m, {{"tools", bad_params}})).param == "tools");
  CHECK(refused(chat(m, {{"tools", tools}, {"tool_choice", "sometimes"}})).param == "tool_choice");
  CHECK(refused(chat(m, {{"tools", tools}, {"tool_choice", "required"}})).param == "tool_choice");
  json named = {{"type", "function"}, {"function", {{"name", "get_weather"}}}};
  CHECK(refused(chat(m, {{"tools", tools}, {"tool_choice", named}})).param == "tool_choice");
  named["function"]["name"] = "other";
  CHECK(refused(chat(m, {{"tools", tools}, {"tool_choice", named}})).message.find("other") !=
        std::string::npos);
  CHECK(refused(chat(m, {{"tool_choice", "auto"}})).param == "tool_choice");
  CHECK(refused(chat(m, {{"tools", tools}, {"parallel_tool_calls", "yes"}})).param ==
        "parallel_tool_calls");
  json bad_history = {{"messages", json::parse(R"([{"role": "user", "content": "q"},
      {"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "a",
       "arguments": "{not json"}}]}])")}};
  CHECK(refused(parse_completion(bad_history.dump(), true, m)).param == "messages");
  // The golden Llama 3 template has no tool support: tools would never reach the model.
  auto e = refused(chat(info(*llama), {{"tools", tools}}));
  CHECK(e.param == "tools");
  CHECK(e.message.find("does not show tools") != std::string::npos);
}

TEST_CASE("tools: openai_response turns a Qwen tool call into tool_calls, streamed and not") {
  auto qwen = golden_tokenizer("qwen3");
  if (!qwen)
    return;
  const auto m = info(*qwen);
  const std::string out =
      "I will look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
      "{\"city\": \"巴黎\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", "
      "\"arguments\": {\"city\": \"Lyon\"}}\n</tool_call>";
  const auto ids = *qwen->text->encode(out);
  auto feed = [&](openai_response& r, engine::finish_reason end) {
    std::vector<json> chunks;
    for (size_t i = 0; i < ids.size(); ++i) {
      engine::request_output o{.id = 1, .has_token = true, .token = ids[i]};
      if (i + 1 == ids.size())
        o.finish = end;
      if (auto c = r.add(o))
        chunks.push_back(*c);
    }
    return chunks;
  };
  for (bool parallel : {true, false}) {
    completion_request req{.chat = true, .prompt = {1}};
    req.tool_parsing = tool_format::hermes;
    req.parallel_tool_calls = parallel;
    openai_response whole(req, m, "chatcmpl-9", 1);
    feed(whole, engine::finish_reason::stop);
    const auto body = whole.body();
    const auto& msg = body["choices"][0]["message"];
    CHECK(body["choices"][0]["finish_reason"] == "tool_calls");
    CHECK(msg["content"] == "I will look.");
    REQUIRE(msg["tool_calls"].size() == (parallel ? 2 : 1));
    CHECK(msg["tool_calls"][0]["id"] == "call_9_0");
    CHECK(msg["tool_calls"][0]["type"] == "function");
    CHECK(msg["tool_calls"][0]["function"]["name"] == "get_weather");
    CHECK(json::parse(msg["tool_calls"][0]["function"]["arguments"].get<std::string>()) ==
          json{{"city", "巴黎"}});

    req.stream = true;
    openai_response streamed(req, m, "chatcmpl-9", 1);
    auto chunks = feed(streamed, engine::finish_reason::stop);
    std::string content;
    json calls = json::array();
    for (const auto& c : chunks) {
      const auto& d = c["choices"][0]["delta"];
      content += d.value("content", "");
      if (d.contains("tool_calls"))
        for (const auto& t : d["tool_calls"]) {
          CHECK(t["index"] == calls.size());
          json call = t;
          call.erase("index");
          calls.push_back(call);
        }
    }
    CHECK(chunks.back()["choices"][0]["finish_reason"] == "tool_calls");
    CHECK(content == "I will look.");
    CHECK(calls == msg["tool_calls"]);
  }
  // Cut by max_tokens inside a call: the text stays content, the finish reason "length".
  completion_request req{.chat = true, .prompt = {1}};
  req.tool_parsing = tool_format::hermes;
  openai_response cut(req, m, "chatcmpl-3", 1);
  for (size_t i = 0; i + 3 < ids.size(); ++i)
    cut.add({.id = 1,
             .has_token = true,
             .token = ids[i],
             .finish = i + 4 == ids.size() ? engine::finish_reason::length
                                           : engine::finish_reason::none});
  const auto body = cut.body();
  CHECK(body["choices"][0]["finish_reason"] == "length");
  CHECK(body["choices"][0]["message"]["tool_calls"].size() == 1);
  CHECK(body["choices"][0]["message"]["content"].get<std::string>().find("<tool_call>") !=
        std::string::npos);
}
