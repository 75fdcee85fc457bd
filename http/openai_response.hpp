// Engine outputs of one completion -> OpenAI JSON: the chat/text completion body, or the SSE chunk
// payloads of a stream (vLLM's extensions: token_ids, prompt_token_ids, stop_reason). Pure: no
// sockets, no metrics; completion.cpp drives it on the session's strand, tests call it directly.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "engine/scheduler/scheduler.hpp"
#include "engine/tokenizer/detokenizer.hpp"
#include "http/openai_api.hpp"

namespace troupe::serve {

// The engine request of a parsed completion. Stop strings stay here: openai_response finds them.
engine::request make_engine_request(const completion_request& req);

class openai_response {
 public:
  // `id` is the response id ("chatcmpl-7"), `created` its Unix time, `index` the choice's index
  // (with `n` > 1 one openai_response per choice; prompt_token_ids go with the prompt's first
  // choice; several prompts: prompt * n + i).
  openai_response(const completion_request& req, const model_info& m, std::string id,
                  int64_t created, int32_t index = 0);

  // Streams: the first chunk (chat: the assistant role with empty content), or nullopt.
  std::optional<json> opening_chunk();
  // Takes one engine output; for streams returns its chunk, or nullopt when it has nothing to
  // show yet (text held back inside a UTF-8 character or a possible stop string). The choice
  // finishes at the engine's finish or at a stop string, whichever comes first: after a stop
  // string, the engine's request is still running and the caller cancels it.
  std::optional<json> add(const engine::request_output& o);
  bool finished() const { return finish_ != engine::finish_reason::none; }
  size_t completion_tokens() const { return ids_.size(); }
  engine::finish_reason finish() const { return finish_; }
  const std::string& id() const { return id_; }

  // Streams with stream_options.include_usage: the last chunk, with usage and no choices;
  // `completion_tokens`: of every choice (default: this one's); `prompt_tokens`: of every prompt
  // (default: this one's).
  json usage_chunk(int64_t completion_tokens = -1, int64_t prompt_tokens = -1) const;
  // Non-streaming: the whole response body, once finished().
  json body() const;
  // The body of several choices (responses[0]'s id, usage summed over choices and prompts).
  static json merged_body(const std::vector<const openai_response*>& choices);

 private:
  json base(bool chunk) const;
  json usage(int64_t completion_tokens = -1, int64_t prompt_tokens = -1) const;
  json chunk(json choice);
  json prompt_logprobs() const;
  json echo_logprobs() const;
  bool echoes_logprobs() const;

  const completion_request& req_;
  const model_info& model_;
  std::string id_;
  int64_t created_;
  int32_t index_;
  engine::incremental_detokenizer detok_;
  bool sent_prompt_ids_;
  std::string text_;
  std::vector<token_id> ids_;
  json logprobs_;
  std::vector<position_logprobs> prompt_lp_; // prompt positions 1, 2, ... scored so far
  bool prompt_sent_ = false;                 // streams: the prompt's logprobs went out
  engine::finish_reason finish_ = engine::finish_reason::none;
  // Chat with tools: the output split into content and OpenAI tool_calls.
  tool_call_parser tools_;
  std::string content_;
  json tool_calls_ = json::array();
  json take_calls(std::vector<tool_call> calls);
  std::string finish_reason() const;
};

} // namespace troupe::serve
