#include "http/openai_response.hpp"

#include <fmt/format.h>

namespace troupe::serve {

namespace {

const char* finish_name(engine::finish_reason r) {
  switch (r) {
  case engine::finish_reason::stop:
    return "stop";
  case engine::finish_reason::length:
    return "length";
  default:
    return "abort";
  }
}

json bytes_of(std::string_view s) {
  json b = json::array();
  for (unsigned char c : s)
    b.push_back(c);
  return b;
}

// Logprobs of one token in the chat shape, or appended to the completions shape.
void add_logprobs(json& lp, const engine::request_output& o, const engine::tokenizer& tok,
                  bool chat) {
  const auto piece = std::string(tok.token_bytes(o.token));
  if (chat) {
    json top = json::array();
    for (size_t i = 0; i < o.top_ids.size(); ++i) {
      const auto t = std::string(tok.token_bytes(o.top_ids[i]));
      top.push_back({{"token", t}, {"logprob", o.top_logprobs[i]}, {"bytes", bytes_of(t)}});
    }
    lp["content"].push_back({{"token", piece},
                             {"logprob", o.logprob},
                             {"bytes", bytes_of(piece)},
                             {"top_logprobs", top}});
    return;
  }
  json top = json::object();
  for (size_t i = 0; i < o.top_ids.size(); ++i)
    top[std::string(tok.token_bytes(o.top_ids[i]))] = o.top_logprobs[i];
  lp["tokens"].push_back(piece);
  lp["token_logprobs"].push_back(o.logprob);
  lp["top_logprobs"].push_back(top);
}

json empty_logprobs(bool chat) {
  return chat ? json{{"content", json::array()}} : json::object();
}

// Completions' logprobs object `from` appended to `to` (token by token).
void append_logprobs(json& to, const json& from) {
  for (const char* key : {"tokens", "token_logprobs", "top_logprobs"})
    if (from.contains(key))
      for (const auto& v : from[key])
        to[key].push_back(v);
}

// One prompt position in vLLM's prompt_logprobs shape: the prompt token and the `k` most likely
// ones there, {"<id>": {logprob, rank, decoded_token}}.
json position_entry(const position_logprobs& p, int32_t k, const engine::tokenizer& tok) {
  json e = json::object();
  const auto n = std::min<size_t>(static_cast<size_t>(std::max(k, 0)), p.top_ids.size());
  for (size_t i = 0; i < n; ++i)
    e[std::to_string(p.top_ids[i])] = {
        {"logprob", p.top_logprobs[i]},
        {"rank", i + 1},
        {"decoded_token", std::string(tok.token_bytes(p.top_ids[i]))}};
  e[std::to_string(p.token)] = {{"logprob", p.logprob},
                                {"rank", p.rank},
                                {"decoded_token", std::string(tok.token_bytes(p.token))}};
  return e;
}

} // namespace

engine::request make_engine_request(const completion_request& req) {
  engine::request r{
      .prompt = req.prompt, .sampling = req.sampling, .stop_token_ids = req.stop_token_ids};
  r.constraint = req.constraint;
  return r;
}

openai_response::openai_response(const completion_request& req, const model_info& m, std::string id,
                                 int64_t created, int32_t index)
  : req_(req), model_(m), id_(std::move(id)), created_(created), index_(index),
    detok_(m.text->text, req.stop, req.skip_special_tokens),
    sent_prompt_ids_(!req.return_token_ids || index % std::max(1, req.n) > 0),
    logprobs_(empty_logprobs(req.chat)), tools_(req.tool_parsing) {}

// New calls in OpenAI's shape (as stream deltas: with their index), appended to tool_calls_;
// without parallel_tool_calls only the first call of the output is kept.
json openai_response::take_calls(std::vector<tool_call> calls) {
  json out = json::array();
  const auto num = id_.substr(id_.find('-') + 1);
  for (auto& c : calls) {
    if (!req_.parallel_tool_calls && !tool_calls_.empty())
      break;
    const size_t index = tool_calls_.size();
    json call = {
        {"id", index_ == 0 ? fmt::format("call_{}_{}", num, index)
                           : fmt::format("call_{}_{}_{}", num, index_, index)},
        {"type", "function"},
        {"function", {{"name", std::move(c.name)}, {"arguments", std::move(c.arguments)}}}};
    tool_calls_.push_back(call);
    json d = {{"index", index}};
    d.update(call);
    out.push_back(std::move(d));
  }
  return out;
}

std::string openai_response::finish_reason() const {
  if (finish_ == engine::finish_reason::stop && !tool_calls_.empty())
    return "tool_calls";
  return finish_name(finish_);
}

json openai_response::base(bool chunk) const {
  const char* object =
      req_.chat ? (chunk ? "chat.completion.chunk" : "chat.completion") : "text_completion";
  return {{"id", id_}, {"object", object}, {"created", created_}, {"model", model_.name}};
}

json openai_response::usage(int64_t completion_tokens, int64_t prompt_tokens) const {
  const auto n_prompt =
      prompt_tokens >= 0 ? prompt_tokens : static_cast<int64_t>(req_.prompt.size());
  const auto n_out = completion_tokens >= 0 ? completion_tokens : static_cast<int64_t>(ids_.size());
  return {{"prompt_tokens", n_prompt},
          {"completion_tokens", n_out},
          {"total_tokens", n_prompt + n_out}};
}

json openai_response::chunk(json choice) {
  json c = base(true);
  c["choices"] = json::array({std::move(choice)});
  if (!sent_prompt_ids_)
    c["prompt_token_ids"] = req_.prompt; // streams carry them in their first chunk
  sent_prompt_ids_ = true;
  return c;
}

// vLLM's prompt_logprobs: null for the first prompt token (nothing predicts it), then one entry
// per prompt token.
json openai_response::prompt_logprobs() const {
  json out = json::array({nullptr});
  for (const auto& p : prompt_lp_)
    out.push_back(position_entry(p, req_.prompt_logprobs, *model_.text->text));
  return out;
}

// Completions with `echo` and `logprobs`: the prompt's tokens in the logprobs object, the first
// without a logprob, each with the top `logprobs` there (and the prompt token itself).
json openai_response::echo_logprobs() const {
  const auto& tok = *model_.text->text;
  json lp = {{"tokens", json::array()},
             {"token_logprobs", json::array()},
             {"top_logprobs", json::array()}};
  for (size_t i = 0; i < req_.prompt.size(); ++i) {
    lp["tokens"].push_back(std::string(tok.token_bytes(req_.prompt[i])));
    if (i == 0 || i > prompt_lp_.size()) {
      lp["token_logprobs"].push_back(nullptr);
      lp["top_logprobs"].push_back(nullptr);
      continue;
    }
    const auto& p = prompt_lp_[i - 1];
    json top = json::object();
    const auto n = std::min<size_t>(static_cast<size_t>(req_.top_logprobs), p.top_ids.size());
    for (size_t k = 0; k < n; ++k)
      top[std::string(tok.token_bytes(p.top_ids[k]))] = p.top_logprobs[k];
    top[std::string(tok.token_bytes(p.token))] = p.logprob;
    lp["token_logprobs"].push_back(p.logprob);
    lp["top_logprobs"].push_back(std::move(top));
  }
  return lp;
}

bool openai_response::echoes_logprobs() const {
  return req_.echo && req_.top_logprobs >= 0;
}

std::optional<json> openai_response::opening_chunk() {
  // Completions: the echoed prompt comes first (with its logprobs: with the first token).
  if (req_.stream && req_.echo && !echoes_logprobs())
    return chunk({{"index", index_},
                  {"text", req_.echo_text},
                  {"logprobs", nullptr},
                  {"finish_reason", nullptr}});
  if (!req_.stream || !req_.chat)
    return std::nullopt;
  return chunk({{"index", index_},
                {"delta", {{"role", "assistant"}, {"content", ""}}},
                {"logprobs", nullptr},
                {"finish_reason", nullptr}});
}

std::optional<json> openai_response::add(const engine::request_output& o) {
  std::string delta;
  json lp_delta = empty_logprobs(req_.chat);
  prompt_lp_.insert(prompt_lp_.end(), o.prompt_logprobs.begin(), o.prompt_logprobs.end());
  // Streams: what waited for the prompt's logprobs goes with the first token (or the end).
  const bool prompt_part = req_.stream && !prompt_sent_ &&
                           (o.has_token || o.finish != engine::finish_reason::none) &&
                           (req_.prompt_logprobs >= 0 || echoes_logprobs());
  if (prompt_part) {
    prompt_sent_ = true;
    if (echoes_logprobs())
      lp_delta = echo_logprobs();
  }
  if (o.has_token) {
    ids_.push_back(o.token);
    delta = detok_.push(o.token, static_cast<int32_t>(ids_.size()) >= req_.sampling.min_tokens);
    if (req_.top_logprobs >= 0) {
      add_logprobs(logprobs_, o, *model_.text->text, req_.chat);
      add_logprobs(lp_delta, o, *model_.text->text, req_.chat);
    }
  }
  // A stop string ends the choice here; the caller cancels the engine's request.
  const bool ends = o.finish != engine::finish_reason::none || detok_.stopped();
  if (ends) {
    finish_ = detok_.stopped() ? engine::finish_reason::stop : o.finish;
    delta += detok_.finish();
  }
  text_ += delta;
  json calls = json::array();
  if (req_.tool_parsing != tool_format::none) {
    auto d = tools_.push(delta);
    if (ends) {
      auto rest = tools_.finish();
      d.content += rest.content;
      d.calls.insert(d.calls.end(), rest.calls.begin(), rest.calls.end());
    }
    delta = std::move(d.content);
    calls = take_calls(std::move(d.calls));
  }
  content_ += delta;
  // A token whose text is held back (part of a UTF-8 character or of a possible stop string)
  // still gets its chunk when the client asked for token ids (as vLLM), or its id is lost.
  const bool ids_chunk = req_.return_token_ids && o.has_token;
  if (!req_.stream || (delta.empty() && calls.empty() && !ends && !ids_chunk && !prompt_part))
    return std::nullopt;
  json choice = {{"index", index_}};
  if (req_.chat) {
    choice["delta"] = delta.empty() ? json::object() : json{{"content", delta}};
    if (!calls.empty())
      choice["delta"]["tool_calls"] = std::move(calls);
  } else {
    choice["text"] = prompt_part && echoes_logprobs() ? req_.echo_text + delta : delta;
  }
  choice["logprobs"] = req_.top_logprobs >= 0 && (o.has_token || prompt_part) ? lp_delta : json();
  choice["finish_reason"] = ends ? json(finish_reason()) : json();
  if (req_.return_token_ids && o.has_token)
    choice["token_ids"] = json::array({o.token});
  if (prompt_part && req_.prompt_logprobs >= 0 && !req_.chat)
    choice["prompt_logprobs"] = prompt_logprobs();
  json c = chunk(std::move(choice));
  if (prompt_part && req_.prompt_logprobs >= 0 && req_.chat) // chat: beside the choices (vLLM)
    c["prompt_logprobs"] = prompt_logprobs();
  return c;
}

json openai_response::usage_chunk(int64_t completion_tokens, int64_t prompt_tokens) const {
  json c = base(true);
  c["choices"] = json::array();
  c["usage"] = usage(completion_tokens, prompt_tokens);
  return c;
}

json openai_response::merged_body(const std::vector<const openai_response*>& choices) {
  json body = choices.at(0)->body();
  int64_t tokens = 0, prompt_tokens = 0;
  for (size_t i = 0; i < choices.size(); ++i) {
    const auto& c = *choices[i];
    tokens += static_cast<int64_t>(c.completion_tokens());
    if (c.index_ % std::max(1, c.req_.n) == 0) // each prompt once
      prompt_tokens += static_cast<int64_t>(c.req_.prompt.size());
    if (i > 0)
      body["choices"].push_back(c.body()["choices"][0]);
  }
  body["usage"] = choices[0]->usage(tokens, prompt_tokens);
  return body;
}

json openai_response::body() const {
  json choice = {{"index", index_}};
  if (req_.chat) {
    choice["message"] = {
        {"role", "assistant"},
        {"content", content_.empty() && !tool_calls_.empty() ? json() : json(content_)}};
    if (!tool_calls_.empty())
      choice["message"]["tool_calls"] = tool_calls_;
  } else {
    choice["text"] = req_.echo ? req_.echo_text + text_ : text_;
  }
  if (echoes_logprobs()) {
    json lp = echo_logprobs();
    append_logprobs(lp, logprobs_);
    choice["logprobs"] = std::move(lp);
  } else {
    choice["logprobs"] = req_.top_logprobs >= 0 ? logprobs_ : json();
  }
  if (req_.prompt_logprobs >= 0 && !req_.chat)
    choice["prompt_logprobs"] = prompt_logprobs();
  choice["finish_reason"] = finish_reason();
  if (!req_.stop.empty() && detok_.stop_string())
    choice["stop_reason"] = *detok_.stop_string();
  if (req_.return_token_ids)
    choice["token_ids"] = ids_;
  if (req_.return_token_ids && req_.num_prompts > 1) // several prompts: each choice has its own
    choice["prompt_token_ids"] = req_.prompt;
  json body = base(false);
  body["choices"] = json::array({choice});
  body["usage"] = usage();
  if (req_.return_token_ids && req_.num_prompts == 1)
    body["prompt_token_ids"] = req_.prompt;
  if (req_.prompt_logprobs >= 0 && req_.chat) // beside the choices (vLLM)
    body["prompt_logprobs"] = prompt_logprobs();
  return body;
}

} // namespace troupe::serve
