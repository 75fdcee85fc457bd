#include "http/tool_calls.hpp"

#include <algorithm>

#include "runtime/json_depth.hpp"

namespace troupe::serve {

namespace {

using ojson = nlohmann::ordered_json;

constexpr std::string_view open_tag = "<tool_call>";
constexpr std::string_view close_tag = "</tool_call>";
constexpr std::string_view python_tag = "<|python_tag|>";

bool is_space(char c) {
  return c == ' ' || c == '\n' || c == '\t' || c == '\r';
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && is_space(s.front()))
    s.remove_prefix(1);
  while (!s.empty() && is_space(s.back()))
    s.remove_suffix(1);
  return s;
}

// Length of the longest suffix of `s` that is a proper prefix of `tag` (text to hold back).
size_t partial_tag(std::string_view s, std::string_view tag) {
  for (size_t n = std::min(s.size(), tag.size() - 1); n > 0; --n)
    if (s.substr(s.size() - n) == tag.substr(0, n))
      return n;
  return 0;
}

std::optional<ojson> parse_json(std::string_view text) {
  if (!json_nesting_within(text)) // a model can be prompted to write any depth
    return std::nullopt;
  try {
    return ojson::parse(text);
  } catch (const ojson::exception&) {
    return std::nullopt;
  }
}

// Splits `text` into top-level JSON objects separated by whitespace or ';' (Llama 3 writes
// several calls as `{...}; {...}`); nullopt when anything else is in between.
std::optional<std::vector<std::string_view>> split_objects(std::string_view text) {
  std::vector<std::string_view> out;
  size_t i = 0;
  while (i < text.size()) {
    if (is_space(text[i]) || (text[i] == ';' && !out.empty())) {
      ++i;
      continue;
    }
    if (text[i] != '{')
      return std::nullopt;
    int depth = 0;
    bool in_string = false;
    size_t j = i;
    for (; j < text.size(); ++j) {
      const char c = text[j];
      if (in_string) {
        if (c == '\\')
          ++j;
        else if (c == '"')
          in_string = false;
      } else if (c == '"') {
        in_string = true;
      } else if (c == '{' || c == '[') {
        ++depth;
      } else if ((c == '}' || c == ']') && --depth == 0) {
        break;
      }
    }
    if (j >= text.size())
      return std::nullopt;
    out.push_back(text.substr(i, j + 1 - i));
    i = j + 1;
  }
  return out;
}

} // namespace

tool_format detect_tool_format(const engine::model_tokenizer& m) {
  if (m.text->token_to_id(open_tag) && m.text->token_to_id(close_tag))
    return tool_format::hermes;
  if (m.text->token_to_id("<|start_header_id|>"))
    return tool_format::llama3_json;
  return tool_format::none;
}

std::optional<tool_call> read_call(const ojson& j) {
  if (!j.is_object() || !j.contains("name") || !j["name"].is_string() ||
      j["name"].get<std::string>().empty())
    return std::nullopt;
  tool_call c{j["name"].get<std::string>(), "{}"};
  const char* key = j.contains("arguments") ? "arguments" : "parameters";
  if (j.contains(key)) {
    const auto& a = j[key];
    if (a.is_object())
      c.arguments = a.dump(-1, ' ', false, ojson::error_handler_t::replace);
    else if (a.is_string() && parse_json(a.get<std::string>()).value_or(ojson()).is_object())
      c.arguments = a.get<std::string>();
    else
      return std::nullopt;
  }
  return c;
}

void tool_call_parser::emit_content(tool_delta& d, std::string_view text) {
  if (text.empty())
    return;
  if (format_ == tool_format::hermes) {
    // Whitespace waits until it is followed by text (it is dropped before a call and at the end
    // of output that made calls).
    size_t end = text.size();
    while (end > 0 && is_space(text[end - 1]))
      --end;
    if (end == 0) {
      held_ += text;
      return;
    }
    d.content += held_;
    held_.clear();
    d.content += text.substr(0, end);
    held_ += text.substr(end);
    return;
  }
  d.content += text;
}

tool_delta tool_call_parser::hermes(bool end) {
  tool_delta d;
  for (;;) {
    if (!inside_) {
      const auto at = buf_.find(open_tag);
      if (at == std::string::npos) {
        const size_t keep = end ? 0 : partial_tag(buf_, open_tag);
        emit_content(d, std::string_view(buf_).substr(0, buf_.size() - keep));
        buf_.erase(0, buf_.size() - keep);
        break;
      }
      emit_content(d, std::string_view(buf_).substr(0, at));
      pre_call_ = std::move(held_); // whitespace before a call is not content, if it is a call
      held_.clear();
      buf_.erase(0, at + open_tag.size());
      inside_ = true;
      continue;
    }
    const auto at = buf_.find(close_tag);
    if (at == std::string::npos) {
      if (end) { // unterminated: the block is content
        held_ = std::move(pre_call_);
        emit_content(d, std::string(open_tag) + buf_);
        buf_.clear();
        inside_ = false;
      }
      break;
    }
    const std::string body = buf_.substr(0, at);
    buf_.erase(0, at + close_tag.size());
    inside_ = false;
    auto j = parse_json(trim(body));
    auto call = j ? read_call(*j) : std::nullopt;
    if (call) {
      d.calls.push_back(std::move(*call));
      ++calls_;
    } else {
      held_ = std::move(pre_call_);
      emit_content(d, std::string(open_tag) + body + std::string(close_tag));
    }
    pre_call_.clear();
  }
  if (end && calls_ == 0)
    d.content += held_;
  if (end)
    held_.clear();
  return d;
}

tool_delta tool_call_parser::llama(bool end) {
  tool_delta d;
  if (llama_mode_ == 0) {
    std::string_view s = trim(buf_);
    if (!end && s.size() < python_tag.size() && python_tag.starts_with(s))
      return d; // maybe the start of <|python_tag|>
    if (s.starts_with(python_tag))
      s = trim(s.substr(python_tag.size()));
    if (!s.empty())
      llama_mode_ = s.front() == '{' ? 2 : 1;
    else if (end)
      llama_mode_ = 1;
  }
  if (llama_mode_ == 1) {
    d.content = std::move(buf_);
    buf_.clear();
    return d;
  }
  if (llama_mode_ == 0 || !end)
    return d;
  std::string_view s = trim(buf_);
  if (s.starts_with(python_tag))
    s = s.substr(python_tag.size());
  std::vector<tool_call> calls;
  if (auto objects = split_objects(s))
    for (auto o : *objects) {
      auto j = parse_json(o);
      auto call = j ? read_call(*j) : std::nullopt;
      if (!call) {
        calls.clear();
        break;
      }
      calls.push_back(std::move(*call));
    }
  if (calls.empty()) {
    d.content = std::move(buf_);
  } else {
    calls_ += calls.size();
    d.calls = std::move(calls);
  }
  buf_.clear();
  return d;
}

tool_delta tool_call_parser::push(std::string_view text) {
  if (format_ == tool_format::none)
    return {std::string(text), {}};
  buf_ += text;
  return format_ == tool_format::hermes ? hermes(false) : llama(false);
}

tool_delta tool_call_parser::finish() {
  if (format_ == tool_format::none)
    return {};
  return format_ == tool_format::hermes ? hermes(true) : llama(true);
}

} // namespace troupe::serve
