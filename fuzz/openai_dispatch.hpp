// The OpenAI routes' body parsers as the HTTP session calls them (http_session::route): the
// target names the route, the body goes to parse_completion / tokenize / detokenize with the
// tiny model. Every answer is rendered as the session would (error_body, or the JSON dumped).
#pragma once

#include <string>
#include <string_view>

#include "fuzz/fuzz_util.hpp"
#include "http/openai_api.hpp"

namespace troupe::fuzz {

inline void dispatch_body(std::string_view target, const std::string& body) {
  using namespace troupe::serve;
  const model_info m{.name = "tiny",
                     .max_model_len = 512,
                     .vocab_size = 262,
                     .text = &tiny_model(),
                     .grammar = nullptr};
  auto render = [](const auto& result) {
    if (const auto* e = std::get_if<api_error>(&result))
      (void)error_body(*e);
  };
  if (target == "/v1/chat/completions" || target == "/v1/completions") {
    auto r = parse_completion(body, target == "/v1/chat/completions", m);
    render(r);
  } else if (target == "/tokenize") {
    auto r = tokenize(body, m);
    render(r);
    if (auto* j = std::get_if<json>(&r))
      (void)dump(*j);
  } else if (target == "/detokenize") {
    auto r = detokenize(body, m);
    render(r);
    if (auto* j = std::get_if<json>(&r))
      (void)dump(*j);
  }
}

} // namespace troupe::fuzz
