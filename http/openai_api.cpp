#include "http/openai_api.hpp"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <map>

#include <fmt/format.h>

#include "runtime/json_depth.hpp"

namespace troupe::serve {

namespace {

api_error bad(std::string param, std::string message) {
  return api_error{400, std::move(message), std::move(param), {}};
}

// Request bodies nest a few levels (messages -> content parts); anything deeper is refused before
// parsing, so no recursive walk (dump, copy, comparison) ever sees attacker-chosen depth. The
// same holds for JSON carried in strings (tool call arguments, schemas): checked before parsing.
constexpr int max_body_depth = 32;

// The request body as a JSON object, or the 400 that says why not.
std::variant<json, api_error> parse_object(const std::string& body) {
  if (!json_nesting_within(body, max_body_depth))
    return bad("", fmt::format("the JSON body nests deeper than {} levels", max_body_depth));
  json b;
  try {
    b = json::parse(body);
  } catch (const json::exception& e) {
    return bad("", fmt::format("malformed JSON body: {}", e.what()));
  }
  if (!b.is_object())
    return bad("", "the request body must be a JSON object");
  return b;
}

// Reads an optional number into `out`; a wrong type is an error naming the parameter.
template <class T>
std::optional<api_error> opt_number(const json& j, const char* key, T& out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null())
    return std::nullopt;
  if constexpr (std::is_same_v<T, bool>) {
    if (!it->is_boolean())
      return bad(key, fmt::format("'{}' must be a boolean", key));
    out = it->get<bool>();
  } else if constexpr (std::is_integral_v<T>) {
    if (!it->is_number_integer())
      return bad(key, fmt::format("'{}' must be an integer", key));
    const auto v = it->get<int64_t>();
    if (v < static_cast<int64_t>(std::numeric_limits<T>::min()) ||
        (v > 0 && static_cast<uint64_t>(v) > static_cast<uint64_t>(std::numeric_limits<T>::max())))
      return bad(key, fmt::format("'{}' is out of range", key));
    out = static_cast<T>(v);
  } else {
    if (!it->is_number())
      return bad(key, fmt::format("'{}' must be a number", key));
    out = it->get<T>();
  }
  return std::nullopt;
}

std::optional<api_error> token_list(const json& j, const char* key, int64_t vocab,
                                    std::vector<token_id>& out) {
  if (!j.is_array())
    return bad(key, fmt::format("'{}' must be a list of token ids", key));
  for (const auto& t : j) {
    if (!t.is_number_integer() || t.get<int64_t>() < 0 || (vocab > 0 && t.get<int64_t>() >= vocab))
      return bad(key, fmt::format("'{}' holds an invalid token id {} (vocabulary size {})", key,
                                  t.dump(), vocab));
    out.push_back(t.get<token_id>());
  }
  return std::nullopt;
}

// An assistant message's `tool_calls`: checked, and each function's `arguments` (a JSON string in
// the OpenAI API) turned into the object chat templates expect (as vLLM does).
std::optional<api_error> normalise_tool_calls(json& msg) {
  auto it = msg.find("tool_calls");
  if (it == msg.end() || it->is_null()) {
    if (it != msg.end())
      msg.erase(it);
    return std::nullopt;
  }
  if (!it->is_array())
    return bad("messages", "'tool_calls' must be a list");
  for (auto& call : *it) {
    if (!call.is_object() || !call.contains("function") || !call["function"].is_object() ||
        !call["function"].contains("name") || !call["function"]["name"].is_string())
      return bad("messages", "each of 'tool_calls' needs a 'function' with a string 'name'");
    auto& f = call["function"];
    if (f.contains("arguments") && f["arguments"].is_string()) {
      json args;
      const auto& text = f["arguments"].get_ref<const std::string&>();
      if (!json_nesting_within(text, max_body_depth))
        return bad("messages", fmt::format("the arguments of tool call '{}' nest deeper than {} "
                                           "levels",
                                           f["name"].get<std::string>(), max_body_depth));
      try {
        args = json::parse(text);
      } catch (const json::exception&) {
        return bad("messages", fmt::format("the arguments of tool call '{}' are not valid JSON",
                                           f["name"].get<std::string>()));
      }
      f["arguments"] = std::move(args);
    }
  }
  return std::nullopt;
}

bool valid_function_name(const std::string& n) {
  return !n.empty() && n.size() <= 64 && std::all_of(n.begin(), n.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-';
  });
}

// `tools`, `tool_choice` and `parallel_tool_calls`: the tools to render (null for none) and, in
// `r`, how to parse the output. Refuses what cannot be honoured.
std::variant<json, api_error> read_tools(const json& body, const model_info& m,
                                         completion_request* r,
                                         std::optional<engine::grammar_spec>* grammar) {
  json tools = json();
  std::vector<std::string> names;
  std::string strict_tool, named; // a tool with 'strict': true; the function tool_choice names
  if (auto it = body.find("tools"); it != body.end() && !it->is_null()) {
    if (!it->is_array())
      return bad("tools", "'tools' must be a list of {\"type\": \"function\", \"function\": ...}");
    for (const auto& t : *it) {
      if (!t.is_object() || t.value("type", "") != "function" || !t.contains("function") ||
          !t["function"].is_object())
        return bad("tools", "each tool must be {\"type\": \"function\", \"function\": {...}} (only "
                            "function tools are supported)");
      const auto& f = t["function"];
      const std::string name =
          f.contains("name") && f["name"].is_string() ? f["name"].get<std::string>() : "";
      if (!valid_function_name(name))
        return bad("tools", "a function's 'name' must be 1-64 letters, digits, '_' or '-'");
      if (std::find(names.begin(), names.end(), name) != names.end())
        return bad("tools", fmt::format("two tools are named '{}'", name));
      names.push_back(name);
      if (f.contains("description") && !f["description"].is_string())
        return bad("tools", fmt::format("the description of tool '{}' must be a string", name));
      if (f.contains("parameters") && !f["parameters"].is_object())
        return bad("tools",
                   fmt::format("the parameters of tool '{}' must be a JSON schema object", name));
      if (f.contains("strict") && f["strict"].is_boolean() && f["strict"].get<bool>())
        strict_tool = name;
    }
    if (!it->empty())
      tools = *it;
  }
  std::string choice = tools.is_null() ? "none" : "auto";
  if (auto it = body.find("tool_choice"); it != body.end() && !it->is_null()) {
    if (it->is_string()) {
      choice = it->get<std::string>();
      if (choice != "auto" && choice != "none" && choice != "required")
        return bad("tool_choice", "'tool_choice' must be \"auto\", \"none\", \"required\" or "
                                  "{\"type\": \"function\", \"function\": {\"name\": ...}}");
    } else if (it->is_object() && it->value("type", "") == "function" && it->contains("function") &&
               (*it)["function"].is_object() && (*it)["function"].contains("name") &&
               (*it)["function"]["name"].is_string()) {
      const auto name = (*it)["function"]["name"].get<std::string>();
      if (std::find(names.begin(), names.end(), name) == names.end())
        return bad("tool_choice",
                   fmt::format("'tool_choice' names '{}', which is not in 'tools'", name));
      choice = "named";
      named = name;
    } else {
      return bad("tool_choice", "'tool_choice' must be \"auto\", \"none\", \"required\" or "
                                "{\"type\": \"function\", \"function\": {\"name\": ...}}");
    }
    if (tools.is_null() && choice != "none")
      return bad("tool_choice", "'tool_choice' other than \"none\" needs 'tools'");
  }
  if (!strict_tool.empty() && choice == "auto")
    return bad("tools", fmt::format("tool '{}': 'strict': true is enforced only with 'tool_choice' "
                                    "\"required\" or a named function (with \"auto\" the model "
                                    "may answer in text)",
                                    strict_tool));
  bool parallel = true;
  if (auto e = opt_number(body, "parallel_tool_calls", parallel))
    return *e;
  if (choice == "none")
    return json(); // the model is not to call tools: they are not shown to it
  const auto format = detect_tool_format(*m.text);
  if (format == tool_format::none)
    return bad("tools", fmt::format("model '{}' writes tool calls in no format this server reads "
                                    "(Qwen2.5/Qwen3 <tool_call>, Llama 3.x JSON)",
                                    m.name));
  if (r) {
    r->tool_parsing = format;
    r->parallel_tool_calls = parallel;
  }
  if (grammar && (choice == "required" || choice == "named"))
    *grammar = tool_call_grammar(tools, named, format, parallel);
  return tools;
}

// Chat messages with content as a string or a list of {"type": "text", "text": ...} parts,
// normalised to strings for the chat template.
std::variant<json, api_error> normalise_messages(const json& body) {
  auto it = body.find("messages");
  if (it == body.end() || !it->is_array() || it->empty())
    return bad("messages", "'messages' must be a non-empty list of {role, content}");
  json out = json::array();
  for (const auto& m : *it) {
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string())
      return bad("messages", "each message needs a string 'role'");
    json msg = m;
    const auto& c = m.contains("content") ? m["content"] : json();
    if (c.is_array()) {
      std::string text;
      for (const auto& part : c) {
        if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
            !part["text"].is_string())
          return bad("messages", "only text content parts ({\"type\": \"text\"}) are supported");
        text += part["text"].get<std::string>();
      }
      msg["content"] = text;
    } else if (c.is_null()) {
      msg["content"] = ""; // what the SDK sends after a tool call; templates expect a string
    } else if (!c.is_string()) {
      return bad("messages", "message 'content' must be a string or a list of text parts");
    }
    if (auto e = normalise_tool_calls(msg))
      return *e;
    out.push_back(std::move(msg));
  }
  return out;
}

std::variant<std::vector<token_id>, api_error>
chat_prompt(const json& body, const model_info& m, completion_request* r = nullptr,
            std::optional<engine::grammar_spec>* tool_grammar = nullptr) {
  auto msgs = normalise_messages(body);
  if (auto* e = std::get_if<api_error>(&msgs))
    return *e;
  if (!m.text->chat)
    return bad("messages", fmt::format("model '{}' has no chat template", m.name));
  auto tools = read_tools(body, m, r, tool_grammar);
  if (auto* e = std::get_if<api_error>(&tools))
    return *e;
  engine::chat_options opts;
  if (auto e = opt_number(body, "add_generation_prompt", opts.add_generation_prompt))
    return *e;
  auto kw = body.find("chat_template_kwargs");
  if (kw != body.end() && kw->is_object() && kw->contains("enable_thinking") &&
      (*kw)["enable_thinking"].is_boolean())
    opts.enable_thinking = (*kw)["enable_thinking"].get<bool>();
  auto text = m.text->chat->render(std::get<json>(msgs), opts);
  if (!text)
    return bad("messages", text.error().message());
  if (opts.tools = std::move(std::get<json>(tools)); !opts.tools.is_null()) {
    auto with_tools = m.text->chat->render(std::get<json>(msgs), opts);
    if (!with_tools)
      return bad("tools", with_tools.error().message());
    if (*with_tools == *text)
      return bad("tools", fmt::format("the chat template of model '{}' does not show tools to the "
                                      "model",
                                      m.name));
    text = std::move(with_tools);
  }
  auto ids = m.text->text->encode(*text);
  if (!ids)
    return bad("messages", ids.error().message());
  return std::move(*ids);
}

std::variant<std::vector<token_id>, api_error> text_prompt(const json& body, const model_info& m) {
  auto it = body.find("prompt");
  if (it == body.end())
    return bad("prompt", "'prompt' is required");
  const json* p = &*it;
  if (p->is_array() && p->size() == 1 && ((*p)[0].is_string() || (*p)[0].is_array()))
    p = &(*p)[0]; // ["text"] or [[ids]]: one prompt
  std::vector<token_id> ids;
  if (p->is_string()) {
    auto enc = m.text->text->encode(p->get<std::string>());
    if (!enc)
      return bad("prompt", enc.error().message());
    ids = std::move(*enc);
  } else if (p->is_array() && !p->empty() && (*p)[0].is_number()) {
    if (auto e = token_list(*p, "prompt", m.vocab_size, ids))
      return *e;
  } else if (p->is_array() && p->size() > 1) {
    return bad("prompt", "batched prompts (a list of several prompts) are not supported; send one "
                         "request per prompt");
  } else {
    return bad("prompt", "'prompt' must be a string, a list of token ids, or a one-element list");
  }
  if (ids.empty())
    return bad("prompt", "the prompt is empty");
  return ids;
}

std::optional<api_error> read_sampling(const json& b, bool chat, int64_t vocab,
                                       completion_request& r) {
  auto& s = r.sampling;
  if (auto e = opt_number(b, "temperature", s.temperature))
    return e;
  if (auto e = opt_number(b, "top_p", s.top_p))
    return e;
  if (auto e = opt_number(b, "top_k", s.top_k))
    return e;
  if (auto e = opt_number(b, "min_p", s.min_p))
    return e;
  if (auto e = opt_number(b, "presence_penalty", s.presence_penalty))
    return e;
  if (auto e = opt_number(b, "frequency_penalty", s.frequency_penalty))
    return e;
  if (auto e = opt_number(b, "repetition_penalty", s.repetition_penalty))
    return e;
  if (auto e = opt_number(b, "ignore_eos", s.ignore_eos))
    return e;
  if (auto e = opt_number(b, "min_tokens", s.min_tokens))
    return e;
  if (b.contains("seed") && !b["seed"].is_null()) {
    if (!b["seed"].is_number_integer())
      return bad("seed", "'seed' must be an integer");
    s.has_seed = true;
    s.seed = static_cast<uint64_t>(b["seed"].get<int64_t>());
  }
  if (auto it = b.find("logit_bias"); it != b.end() && !it->is_null()) {
    if (!it->is_object())
      return bad("logit_bias", "'logit_bias' must map token ids (as strings) to numbers");
    std::map<token_id, float> bias;
    for (const auto& [key, value] : it->items()) {
      int64_t id = -1;
      const auto [end, ec] = std::from_chars(key.data(), key.data() + key.size(), id);
      if (ec != std::errc() || end != key.data() + key.size() || id < 0 ||
          (vocab > 0 && id >= vocab))
        return bad("logit_bias", fmt::format("'logit_bias' key '{}' is not a token id of this "
                                             "model (vocabulary size {})",
                                             key, vocab));
      if (!value.is_number() || !(value.get<double>() >= -100 && value.get<double>() <= 100))
        return bad("logit_bias", fmt::format("'logit_bias' values must be numbers in [-100, 100], "
                                             "got {} for token {}",
                                             value.dump(), key));
      if (!bias.emplace(static_cast<token_id>(id), value.get<float>()).second)
        return bad("logit_bias", fmt::format("'logit_bias' names token {} twice", id));
    }
    for (const auto& [id, v] : bias) {
      s.bias_tokens.push_back(id);
      s.bias_values.push_back(v);
    }
  }
  if (chat) {
    bool want = false;
    if (auto e = opt_number(b, "logprobs", want))
      return e;
    int32_t top = 0;
    if (auto e = opt_number(b, "top_logprobs", top))
      return e;
    if (top < 0 || top > 20)
      return bad("top_logprobs", "'top_logprobs' must be in [0, 20]");
    if (!want && top > 0)
      return bad("top_logprobs", "'top_logprobs' needs 'logprobs': true");
    r.top_logprobs = want ? top : -1;
  } else {
    int32_t n = -1;
    if (auto e = opt_number(b, "logprobs", n))
      return e;
    if (n > 20)
      return bad("logprobs", "'logprobs' must be in [0, 20]");
    r.top_logprobs = n < 0 ? -1 : n;
  }
  s.logprobs = r.top_logprobs;
  // vLLM's prompt_logprobs: each prompt token's logprob, rank and the top ones there.
  if (auto e = opt_number(b, "prompt_logprobs", r.prompt_logprobs))
    return e;
  if (r.prompt_logprobs < -1 || r.prompt_logprobs > 20)
    return bad("prompt_logprobs", "'prompt_logprobs' must be in [0, 20]");
  s.prompt_logprobs = r.prompt_logprobs;
  return std::nullopt;
}

std::optional<api_error> read_stops(const json& b, const model_info& m, completion_request& r) {
  if (auto it = b.find("stop"); it != b.end() && !it->is_null()) {
    if (it->is_string())
      r.stop.push_back(it->get<std::string>());
    else if (it->is_array() &&
             std::all_of(it->begin(), it->end(), [](auto& x) { return x.is_string(); }))
      for (const auto& x : *it)
        r.stop.push_back(x.get<std::string>());
    else
      return bad("stop", "'stop' must be a string or a list of strings");
    for (const auto& x : r.stop)
      if (x.empty())
        return bad("stop", "stop strings must not be empty");
  }
  if (auto it = b.find("stop_token_ids"); it != b.end() && !it->is_null())
    if (auto e = token_list(*it, "stop_token_ids", m.vocab_size, r.stop_token_ids))
      return e;
  return std::nullopt;
}

constexpr int32_t max_choices = 64;

std::optional<api_error> read_limits(const json& b, bool chat, const model_info& m,
                                     completion_request& r) {
  int32_t n = 1;
  if (auto e = opt_number(b, "n", n))
    return e;
  if (n < 1 || n > max_choices)
    return bad("n", fmt::format("'n' must be in [1, {}]", max_choices));
  r.n = n;
  int32_t max_tokens = -1;
  if (auto e = opt_number(b, "max_tokens", max_tokens))
    return e;
  if (chat && b.contains("max_completion_tokens") && !b["max_completion_tokens"].is_null())
    if (auto e = opt_number(b, "max_completion_tokens", max_tokens))
      return e;
  const int32_t len = static_cast<int32_t>(r.prompt.size());
  const char* prompt_key = chat ? "messages" : "prompt";
  if (len >= m.max_model_len)
    return bad(prompt_key, fmt::format("the prompt has {} tokens, but this model's maximum context "
                                       "length is {} tokens (max_model_len)",
                                       len, m.max_model_len));
  if (max_tokens == -1 && !b.contains("max_tokens") && !b.contains("max_completion_tokens"))
    max_tokens = chat ? m.max_model_len - len : 16; // OpenAI: completions default to 16
  const char* mt =
      chat && b.contains("max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
  if (max_tokens < 1)
    return bad(mt, fmt::format("'{}' must be at least 1", mt));
  if (len + static_cast<int64_t>(max_tokens) > m.max_model_len)
    return bad(mt, fmt::format("'{}' is too large: {} prompt tokens + {} exceeds this model's "
                               "maximum context length of {} tokens",
                               mt, len, max_tokens, m.max_model_len));
  r.sampling.max_tokens = max_tokens;
  return std::nullopt;
}

// Fields of OpenAI's or vLLM's API that this server does not implement: given with a value that
// asks for their behaviour, they are a 400 naming them rather than silently ignored.
std::optional<api_error> refuse_unsupported(const json& b, const completion_request& r) {
  auto given = [&](const char* key) {
    auto it = b.find(key);
    return it != b.end() && !it->is_null() && !(it->is_boolean() && !it->get<bool>()) &&
           !(it->is_string() && it->get<std::string>().empty()) && !(it->is_array() && it->empty());
  };
  if (auto it = b.find("best_of");
      it != b.end() && !it->is_null() && !(it->is_number_integer() && it->get<int64_t>() == r.n))
    return bad("best_of", "'best_of' other than 'n' is not supported (every choice sampled is "
                          "returned)");
  if (given("use_beam_search"))
    return bad("use_beam_search", "'use_beam_search' is not supported (no beam search)");
  if (given("suffix"))
    return bad("suffix", "'suffix' is not supported (no fill-in-the-middle)");
  for (const char* key : {"allowed_token_ids", "bad_words", "truncate_prompt_tokens",
                          "include_stop_str_in_output", "prediction", "logits_processors"})
    if (given(key))
      return bad(key, fmt::format("'{}' is not supported", key));
  return std::nullopt;
}

// A JSON schema given as an object, or as a string holding one (vLLM accepts both).
std::variant<std::string, api_error> schema_text(const json& v, const std::string& field) {
  if (v.is_object() || v.is_boolean())
    return dump(v);
  if (v.is_string()) {
    if (!json_nesting_within(v.get_ref<const std::string&>(), max_body_depth))
      return bad(field, fmt::format("'{}' nests deeper than {} levels", field, max_body_depth));
    try {
      const auto parsed = json::parse(v.get<std::string>());
      if (parsed.is_object() || parsed.is_boolean())
        return dump(parsed);
    } catch (const json::exception&) {
    }
  }
  return bad(field,
             fmt::format("'{}' must be a JSON schema (an object, or a string holding one)", field));
}

std::variant<std::string, api_error> string_field(const json& v, const std::string& field) {
  if (!v.is_string() || v.get<std::string>().empty())
    return bad(field, fmt::format("'{}' must be a non-empty string", field));
  return v.get<std::string>();
}

std::variant<std::vector<std::string>, api_error> choice_list(const json& v,
                                                              const std::string& field) {
  std::vector<std::string> out;
  if (v.is_array())
    for (const auto& c : v)
      if (c.is_string() && !c.get<std::string>().empty())
        out.push_back(c.get<std::string>());
  if (!v.is_array() || v.empty() || out.size() != v.size())
    return bad(field, fmt::format("'{}' must be a non-empty list of non-empty strings", field));
  return out;
}

// A structural tag (free text in which tagged parts follow a format: a JSON schema, a regex, ...),
// as xgrammar reads it: {"type": "structural_tag", "format": {...}}. Given so (`v` is the
// response_format object, or vLLM's structured_outputs.structural_tag, an object or a string
// holding one), or in vLLM's older form {"structures": [{"begin", "schema", "end"}, ...],
// "triggers": [...]}, which becomes the "triggered_tags" format it stands for (as xgrammar's
// StructuralTag.from_legacy_structural_tag converts it).
std::variant<std::string, api_error> structural_tag_text(const json& v, const std::string& field) {
  json tag = v;
  if (v.is_string()) {
    if (!json_nesting_within(v.get_ref<const std::string&>(), max_body_depth))
      return bad(field, fmt::format("'{}' nests deeper than {} levels", field, max_body_depth));
    try {
      tag = json::parse(v.get<std::string>());
    } catch (const json::exception&) {
      return bad(field, fmt::format("'{}' is not valid JSON", field));
    }
  }
  if (!tag.is_object())
    return bad(field, fmt::format("'{}' must be a structural tag object", field));
  if (auto t = tag.find("type"); t != tag.end() && *t != "structural_tag")
    return bad(field, fmt::format("'{}' must have \"type\": \"structural_tag\"", field));
  if (tag.contains("format"))
    return dump(json{{"type", "structural_tag"}, {"format", tag["format"]}});
  const auto structures = tag.find("structures");
  const auto triggers = tag.find("triggers");
  if (structures == tag.end() || triggers == tag.end())
    return bad(field, fmt::format("'{}' needs 'format' (a structural tag format), or "
                                  "'structures' and 'triggers'",
                                  field));
  if (!structures->is_array() || structures->empty())
    return bad(field, fmt::format("'{}.structures' must be a non-empty list", field));
  auto trigger_list = choice_list(*triggers, field + ".triggers");
  if (auto* e = std::get_if<api_error>(&trigger_list))
    return *e;
  json tags = json::array();
  for (const auto& st : *structures) {
    if (!st.is_object() || !st.contains("begin") || !st["begin"].is_string() ||
        !st.contains("end") || !st["end"].is_string())
      return bad(field, fmt::format("each of '{}.structures' needs 'begin' and 'end' strings and "
                                    "a 'schema'",
                                    field));
    auto schema = schema_text(st.contains("schema") ? st["schema"] : json::object(),
                              field + ".structures.schema");
    if (auto* e = std::get_if<api_error>(&schema))
      return *e;
    tags.push_back(
        {{"type", "tag"},
         {"begin", st["begin"]},
         {"content",
          {{"type", "json_schema"}, {"json_schema", json::parse(std::get<std::string>(schema))}}},
         {"end", st["end"]}});
  }
  return dump(json{{"type", "structural_tag"},
                   {"format",
                    {{"type", "triggered_tags"},
                     {"triggers", std::get<std::vector<std::string>>(trigger_list)},
                     {"tags", tags}}}});
}

// One constraint kind (json / regex / choice / grammar) from vLLM's names.
std::optional<api_error> read_guided(const std::string& kind, const json& v,
                                     const std::string& field, engine::grammar_spec& g) {
  using k = engine::grammar_spec::kind;
  if (kind == "json") {
    auto s = schema_text(v, field);
    if (auto* e = std::get_if<api_error>(&s))
      return *e;
    g.type = k::json_schema;
    g.text = std::get<std::string>(s);
  } else if (kind == "regex" || kind == "grammar") {
    auto s = string_field(v, field);
    if (auto* e = std::get_if<api_error>(&s))
      return *e;
    g.type = kind == "regex" ? k::regex : k::ebnf;
    g.text = std::get<std::string>(s);
  } else if (kind == "choice") {
    auto c = choice_list(v, field);
    if (auto* e = std::get_if<api_error>(&c))
      return *e;
    g.type = k::choice;
    g.choices = std::get<std::vector<std::string>>(c);
  } else if (kind == "json_object") {
    if (!v.is_boolean())
      return bad(field, fmt::format("'{}' must be a boolean", field));
    if (!v.get<bool>())
      return std::nullopt;
    g.type = k::json_object;
  }
  return std::nullopt;
}

// Structured output: response_format (OpenAI), structured_outputs and the older guided_* fields
// (vLLM), and the tool-call grammar of tool_choice "required" / a named function. At most one
// applies; it is compiled here (a bad schema, regex or grammar is a 400 naming the field) and its
// matcher travels with the request.
std::optional<api_error> read_constraints(const json& b, const model_info& m,
                                          std::optional<engine::grammar_spec> tool_grammar,
                                          completion_request& r) {
  std::optional<engine::grammar_spec> spec;
  std::string field;
  auto set = [&](engine::grammar_spec g, std::string f) -> std::optional<api_error> {
    if (spec)
      return bad(f, fmt::format("'{}' and '{}' both constrain the output; give one", field, f));
    spec = std::move(g);
    field = std::move(f);
    return std::nullopt;
  };
  if (tool_grammar)
    (void)set(std::move(*tool_grammar), "tool_choice");
  if (auto it = b.find("response_format"); it != b.end() && !it->is_null()) {
    if (!it->is_object() || !it->contains("type") || !(*it)["type"].is_string())
      return bad("response_format", "'response_format' must be {\"type\": ...}");
    const auto type = (*it)["type"].get<std::string>();
    engine::grammar_spec g;
    if (type == "json_object") {
      g.type = engine::grammar_spec::kind::json_object;
    } else if (type == "json_schema") {
      const auto& js = it->contains("json_schema") ? (*it)["json_schema"] : json();
      if (!js.is_object() || !js.contains("name") || !js["name"].is_string())
        return bad("response_format", "'response_format' of type \"json_schema\" needs "
                                      "'json_schema': {\"name\": ..., \"schema\": {...}}");
      auto s = schema_text(js.contains("schema") ? js["schema"] : json::object(),
                           "response_format.json_schema.schema");
      if (auto* e = std::get_if<api_error>(&s))
        return *e;
      g.type = engine::grammar_spec::kind::json_schema;
      g.text = std::get<std::string>(s);
      bool strict = false; // enforced either way: the output has only the listed properties
      if (auto e = opt_number(js, "strict", strict))
        return bad("response_format", "'response_format.json_schema.strict' must be a boolean");
    } else if (type == "structural_tag") {
      auto tag = structural_tag_text(*it, "response_format");
      if (auto* e = std::get_if<api_error>(&tag))
        return *e;
      g.type = engine::grammar_spec::kind::structural_tag;
      g.text = std::get<std::string>(tag);
    } else if (type != "text") {
      return bad("response_format",
                 fmt::format("'response_format' type '{}' is not one of \"text\", "
                             "\"json_object\", \"json_schema\", \"structural_tag\"",
                             type));
    }
    if (type != "text")
      if (auto e = set(std::move(g), "response_format"))
        return e;
  }
  if (auto it = b.find("structured_outputs"); it != b.end() && !it->is_null()) {
    if (!it->is_object())
      return bad("structured_outputs", "'structured_outputs' must be an object");
    for (const auto& [key, v] : it->items()) {
      if (v.is_null())
        continue;
      const std::string f = "structured_outputs." + key;
      if (key != "json" && key != "regex" && key != "choice" && key != "grammar" &&
          key != "json_object" && key != "structural_tag")
        return bad(f, fmt::format("'{}' is not supported (supported: json, regex, choice, "
                                  "grammar, json_object, structural_tag)",
                                  f));
      engine::grammar_spec g;
      if (key == "json_object" && v.is_boolean() && !v.get<bool>())
        continue;
      if (key == "structural_tag") {
        auto tag = structural_tag_text(v, f);
        if (auto* e = std::get_if<api_error>(&tag))
          return *e;
        g.type = engine::grammar_spec::kind::structural_tag;
        g.text = std::get<std::string>(tag);
      } else if (auto e = read_guided(key, v, f, g)) {
        return e;
      }
      if (auto e = set(std::move(g), f))
        return e;
    }
  }
  for (const char* kind : {"json", "regex", "choice", "grammar"}) {
    const std::string f = std::string("guided_") + kind;
    if (auto it = b.find(f); it != b.end() && !it->is_null()) {
      engine::grammar_spec g;
      if (auto e = read_guided(kind, *it, f, g))
        return e;
      if (auto e = set(std::move(g), f))
        return e;
    }
  }
  if (auto it = b.find("guided_decoding_backend"); it != b.end() && !it->is_null())
    if (!it->is_string() ||
        (it->get<std::string>() != "xgrammar" && it->get<std::string>() != "auto"))
      return bad("guided_decoding_backend", "'guided_decoding_backend' must be \"xgrammar\" (the "
                                            "only structured-output engine here) or \"auto\"");
  if (auto it = b.find("guided_whitespace_pattern"); it != b.end() && !it->is_null())
    return bad("guided_whitespace_pattern", "'guided_whitespace_pattern' is not supported (JSON "
                                            "output is written without optional whitespace)");
  if (!spec)
    return std::nullopt;
  if (!m.grammar)
    return bad(field, fmt::format("'{}' needs constrained decoding, which is not set up for model "
                                  "'{}'",
                                  field, m.name));
  auto c = m.grammar->compile(*spec);
  if (!c)
    return bad(field, fmt::format("'{}': {}", field, c.error().message()));
  r.constraint = std::shared_ptr<engine::token_constraint>(std::move(*c));
  r.constraint_field = field;
  return std::nullopt;
}

} // namespace

engine::grammar_spec tool_call_grammar(const json& tools, const std::string& only, tool_format f,
                                       bool parallel) {
  const char* args = f == tool_format::llama3_json ? "parameters" : "arguments";
  json alts = json::array();
  for (const auto& t : tools) {
    const auto& fn = t["function"];
    const auto name = fn["name"].get<std::string>();
    if (!only.empty() && name != only)
      continue;
    json params = fn.contains("parameters") && fn["parameters"].is_object()
                      ? fn["parameters"]
                      : json{{"type", "object"}, {"properties", json::object()}};
    alts.push_back({{"type", "object"},
                    {"properties", {{"name", {{"const", name}}}, {args, std::move(params)}}},
                    {"required", {"name", args}},
                    {"additionalProperties", false}});
  }
  engine::grammar_spec g;
  g.type = engine::grammar_spec::kind::tool_calls;
  g.text = dump(alts.size() == 1 ? alts[0] : json{{"anyOf", alts}});
  g.repeat = parallel && only.empty();
  if (f == tool_format::llama3_json) {
    g.call_separator = "; ";
  } else { // hermes, as Qwen's chat templates show it
    g.call_begin = "<tool_call>\n";
    g.call_end = "\n</tool_call>";
    g.call_separator = "\n";
  }
  return g;
}

std::string dump(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

int http_status(errc code) {
  switch (code) {
  case errc::invalid_argument:
    return 400;
  case errc::not_found:
    return 404;
  case errc::resource_exhausted:
  case errc::unavailable:
  case errc::cancelled:
    return 503;
  default:
    return 500;
  }
}

std::string error_body(const api_error& e) {
  std::string type = e.type;
  if (type.empty())
    type = e.status == 401                      ? "authentication_error"
           : e.status == 404                    ? "not_found_error"
           : e.status == 429 || e.status == 503 ? "rate_limit_error"
           : e.status >= 500                    ? "server_error"
                                                : "invalid_request_error";
  json err = {{"message", e.message},
              {"type", type},
              {"param", e.param.empty() ? json() : json(e.param)},
              {"code", e.status}};
  return dump(json{{"error", err}});
}

namespace {

std::variant<completion_request, api_error> parse_body(json& b, bool chat, const model_info& m) {
  if (auto it = b.find("model"); it != b.end() && !it->is_null()) {
    if (!it->is_string() || it->get<std::string>() != m.name)
      return api_error{404,
                       fmt::format("the model '{}' does not exist; this server serves '{}'",
                                   it->is_string() ? it->get<std::string>() : it->dump(), m.name),
                       "model",
                       {}};
  }
  completion_request r;
  r.chat = chat;
  std::optional<engine::grammar_spec> tool_grammar;
  auto prompt = chat ? chat_prompt(b, m, &r, &tool_grammar) : text_prompt(b, m);
  if (auto* e = std::get_if<api_error>(&prompt))
    return *e;
  r.prompt = std::move(std::get<std::vector<token_id>>(prompt));
  if (auto e = opt_number(b, "stream", r.stream))
    return *e;
  if (auto it = b.find("stream_options"); it != b.end() && it->is_object())
    if (auto e = opt_number(*it, "include_usage", r.include_usage))
      return *e;
  if (auto e = opt_number(b, "return_token_ids", r.return_token_ids))
    return *e;
  if (auto e = opt_number(b, "skip_special_tokens", r.skip_special_tokens))
    return *e;
  if (auto e = opt_number(b, "echo", r.echo))
    return *e;
  if (r.echo && chat)
    return bad("echo", "'echo' is supported on /v1/completions only");
  if (auto e = read_sampling(b, chat, m.vocab_size, r))
    return *e;
  if (auto e = read_stops(b, m, r))
    return *e;
  if (auto e = read_limits(b, chat, m, r))
    return *e;
  if (auto e = refuse_unsupported(b, r))
    return *e;
  if (r.echo) {
    if (r.top_logprobs >= 0) // the logprobs cover the echoed prompt too
      r.sampling.prompt_logprobs = std::max(r.sampling.prompt_logprobs, r.top_logprobs);
    const json* p = &b["prompt"];
    if (p->is_array() && p->size() == 1)
      p = &(*p)[0];
    r.echo_text = p->is_string() ? p->get<std::string>()
                                 : m.text->text->decode(r.prompt, r.skip_special_tokens);
  }
  // Last: compiling a grammar is the costly part of parsing.
  if (auto e = read_constraints(b, m, std::move(tool_grammar), r))
    return *e;
  if (r.constraint && r.sampling.min_tokens > 0)
    return bad("min_tokens", fmt::format("'min_tokens' cannot be combined with '{}' (the grammar "
                                         "decides where the output ends)",
                                         r.constraint_field));
  return r;
}

// A list of several prompts (strings or token-id lists), not one prompt's token ids.
bool several_prompts(const json& b) {
  auto it = b.find("prompt");
  return it != b.end() && it->is_array() && it->size() > 1 &&
         ((*it)[0].is_string() || (*it)[0].is_array());
}

constexpr size_t max_batch_choices = 256;

} // namespace

std::variant<completion_request, api_error> parse_completion(const std::string& body, bool chat,
                                                             const model_info& m) {
  auto parsed = parse_object(body);
  if (auto* e = std::get_if<api_error>(&parsed))
    return *e;
  return parse_body(std::get<json>(parsed), chat, m);
}

std::variant<std::vector<completion_request>, api_error>
parse_completions(const std::string& body, bool chat, const model_info& m) {
  auto parsed = parse_object(body);
  if (auto* e = std::get_if<api_error>(&parsed))
    return *e;
  json& b = std::get<json>(parsed);
  if (chat || !several_prompts(b)) {
    auto one = parse_body(b, chat, m);
    if (auto* e = std::get_if<api_error>(&one))
      return *e;
    return std::vector<completion_request>{std::move(std::get<completion_request>(one))};
  }
  json prompts = std::move(b["prompt"]);
  std::vector<completion_request> out;
  for (size_t i = 0; i < prompts.size(); ++i) {
    b["prompt"] = std::move(prompts[i]);
    auto one = parse_body(b, chat, m);
    if (auto* e = std::get_if<api_error>(&one)) {
      e->message = fmt::format("prompt {}: {}", i, e->message);
      return *e;
    }
    out.push_back(std::move(std::get<completion_request>(one)));
    out.back().num_prompts = static_cast<int32_t>(prompts.size());
    if (out.size() * static_cast<size_t>(out.back().n) > max_batch_choices)
      return bad("prompt", fmt::format("{} prompts with n = {} make more than {} choices",
                                       prompts.size(), out.back().n, max_batch_choices));
  }
  return out;
}

std::variant<json, api_error> tokenize(const std::string& body, const model_info& m) {
  auto parsed = parse_object(body);
  if (auto* e = std::get_if<api_error>(&parsed))
    return *e;
  json& b = std::get<json>(parsed);
  std::variant<std::vector<token_id>, api_error> ids;
  if (b.contains("messages")) {
    ids = chat_prompt(b, m);
  } else if (b.contains("prompt") && b["prompt"].is_string()) {
    auto enc = m.text->text->encode(b["prompt"].get<std::string>());
    if (!enc)
      return bad("prompt", enc.error().message());
    ids = std::move(*enc);
  } else {
    return bad("prompt", "give 'prompt' (a string) or 'messages'");
  }
  if (auto* e = std::get_if<api_error>(&ids))
    return *e;
  const auto& t = std::get<std::vector<token_id>>(ids);
  return json{{"count", t.size()}, {"max_model_len", m.max_model_len}, {"tokens", t}};
}

std::variant<json, api_error> detokenize(const std::string& body, const model_info& m) {
  auto parsed = parse_object(body);
  if (auto* e = std::get_if<api_error>(&parsed))
    return *e;
  json& b = std::get<json>(parsed);
  if (!b.contains("tokens"))
    return bad("tokens", "'tokens' (a list of token ids) is required");
  std::vector<token_id> ids;
  if (auto e = token_list(b["tokens"], "tokens", m.vocab_size, ids))
    return *e;
  return json{{"prompt", m.text->text->decode(ids, false)}};
}

} // namespace troupe::serve
