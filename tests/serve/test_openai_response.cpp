// openai_response without sockets: engine outputs -> the chat/text completion body and the SSE
// chunks of a stream (role chunk, prompt ids once, token ids, finish, usage), and the one
// errc -> HTTP status map. Uses the golden tiny-qwen3 tokenizer.
#include <optional>

#include <doctest/doctest.h>

#include "golden.hpp"
#include "http/openai_response.hpp"

using namespace troupe;
using namespace troupe::serve;

namespace {

engine::request_output token(token_id t, engine::finish_reason f = engine::finish_reason::none) {
  return {.id = 1, .has_token = true, .token = t, .finish = f};
}

// The golden tiny-qwen3 tokenizer, loaded once; null without golden data.
const engine::model_tokenizer* tiny_tokenizer() {
  static const auto text = []() -> std::optional<engine::model_tokenizer> {
    auto dir = test::golden_model("tiny-qwen3");
    if (!dir)
      return std::nullopt;
    auto t = engine::model_tokenizer::load_for_model(*dir);
    REQUIRE(t.has_value());
    return std::move(*t);
  }();
  return text ? &*text : nullptr;
}

} // namespace

TEST_CASE("openai_response: errc -> HTTP status") {
  CHECK(http_status(errc::invalid_argument) == 400);
  CHECK(http_status(errc::not_found) == 404);
  CHECK(http_status(errc::resource_exhausted) == 503);
  CHECK(http_status(errc::unavailable) == 503);
  CHECK(http_status(errc::cancelled) == 503);
  CHECK(http_status(errc::internal) == 500);
  CHECK(http_status(errc::io_error) == 500);
}

TEST_CASE("openai_response: a chat stream and a text body from the same outputs") {
  const auto* text = tiny_tokenizer();
  if (!text)
    return;
  const model_info m{.name = "tiny", .max_model_len = 256, .vocab_size = 0, .text = text};
  const auto ids = *text->text->encode(" Paris is the capital");
  REQUIRE(ids.size() >= 3);

  completion_request chat{.chat = true,
                          .stream = true,
                          .include_usage = true,
                          .return_token_ids = true,
                          .prompt = {1, 2, 3}};
  openai_response s(chat, m, "chatcmpl-1", 42);
  auto first = s.opening_chunk();
  REQUIRE(first.has_value());
  CHECK((*first)["object"] == "chat.completion.chunk");
  CHECK((*first)["choices"][0]["delta"]["role"] == "assistant");
  CHECK((*first)["prompt_token_ids"] == json::array({1, 2, 3}));
  std::string content;
  std::vector<token_id> streamed;
  for (size_t i = 0; i < ids.size(); ++i) {
    const bool last = i + 1 == ids.size();
    auto c =
        s.add(token(ids[i], last ? engine::finish_reason::length : engine::finish_reason::none));
    REQUIRE(c.has_value()); // token ids asked for: a chunk per token
    CHECK(!c->contains("prompt_token_ids"));
    const auto& choice = (*c)["choices"][0];
    content += choice["delta"].value("content", "");
    streamed.push_back(choice["token_ids"][0].get<token_id>());
    CHECK(choice["finish_reason"] == (last ? json("length") : json()));
  }
  CHECK(s.finished());
  CHECK(streamed == ids);
  CHECK(content == text->text->decode(ids, true));
  auto usage = s.usage_chunk();
  CHECK(usage["choices"].empty());
  CHECK(usage["usage"]["prompt_tokens"] == 3);
  CHECK(usage["usage"]["completion_tokens"] == ids.size());

  completion_request plain{.prompt = {7}};
  openai_response b(plain, m, "cmpl-2", 42);
  CHECK(!b.opening_chunk().has_value());
  for (size_t i = 0; i < ids.size(); ++i)
    CHECK(!b.add(token(ids[i], i + 1 == ids.size() ? engine::finish_reason::stop
                                                   : engine::finish_reason::none))
               .has_value()); // no chunks without stream
  auto body = b.body();
  CHECK(body["object"] == "text_completion");
  CHECK(body["id"] == "cmpl-2");
  CHECK(body["created"] == 42);
  CHECK(body["choices"][0]["text"] == content);
  CHECK(body["choices"][0]["finish_reason"] == "stop");
  CHECK(!body.contains("prompt_token_ids"));
  CHECK(body["usage"]["total_tokens"] == 1 + ids.size());
}

TEST_CASE("openai_response: a stop string ends the choice while the engine still runs") {
  const auto* text = tiny_tokenizer();
  if (!text)
    return;
  const model_info m{.name = "tiny", .max_model_len = 256, .vocab_size = 0, .text = text};
  const auto ids = *text->text->encode(" Paris is the capital of France");
  REQUIRE(ids.size() >= 4);
  // The stop string is the text of token 2 (0-based): the choice ends at that token, with the
  // text before it, though no output carries a finish (the caller then cancels the engine's).
  const auto stop = text->text->decode(std::vector<token_id>{ids[2]}, true);
  const auto before = text->text->decode(std::vector<token_id>{ids[0], ids[1]}, true);
  for (int32_t min_tokens : {0, 3, 5}) {
    completion_request req{.prompt = {7}, .stop = std::vector<std::string>{stop}};
    req.sampling.min_tokens = min_tokens;
    openai_response r(req, m, "cmpl-4", 42);
    size_t fed = 0;
    while (fed < ids.size() && !r.finished())
      r.add(token(ids[fed++]));
    auto body = r.body();
    if (min_tokens <= 3) { // stop strings count from min_tokens on, as stop tokens
      CHECK(fed == 3);
      CHECK(r.finish() == engine::finish_reason::stop);
      CHECK(body["choices"][0]["text"] == before);
      CHECK(body["choices"][0]["stop_reason"] == stop);
      CHECK(body["usage"]["completion_tokens"] == 3);
    } else {
      CHECK(fed == ids.size()); // not stopped: the text goes on past it
      CHECK_FALSE(r.finished());
    }
  }
}

TEST_CASE("openai_response: echo puts the prompt's text before the completion, streamed and not") {
  const auto* text = tiny_tokenizer();
  if (!text)
    return;
  const model_info m{.name = "tiny", .max_model_len = 256, .vocab_size = 0, .text = text};
  const auto ids = *text->text->encode(" is the capital");
  for (bool stream : {false, true})
    for (const json& prompt :
         {json("Paris"), json::array({"Paris"}), json(*text->text->encode("Paris"))}) {
      json b = {{"prompt", prompt}, {"echo", true}, {"stream", stream}, {"max_tokens", 8}};
      auto parsed = parse_completion(b.dump(), false, m);
      REQUIRE(std::holds_alternative<completion_request>(parsed));
      const auto& req = std::get<completion_request>(parsed);
      CHECK(req.echo_text == "Paris");
      openai_response r(req, m, "cmpl-3", 42);
      std::string streamed;
      if (auto c = r.opening_chunk())
        streamed += (*c)["choices"][0]["text"].get<std::string>();
      for (size_t i = 0; i < ids.size(); ++i)
        if (auto c = r.add(token(ids[i], i + 1 == ids.size() ? engine::finish_reason::stop
                                                             : engine::finish_reason::none)))
          streamed += (*c)["choices"][0]["text"].get<std::string>();
      if (stream)
        CHECK(streamed == "Paris is the capital");
      else
        CHECK(r.body()["choices"][0]["text"] == "Paris is the capital");
    }
  auto refused = [&](const std::string& body, bool chat) {
    auto r = parse_completion(body, chat, m);
    REQUIRE(std::holds_alternative<api_error>(r));
    return std::get<api_error>(r).param;
  };
  CHECK(refused(R"({"prompt": "a", "echo": "yes"})", false) == "echo");
  CHECK(refused(R"({"messages": [{"role": "user", "content": "a"}], "echo": true})", true) ==
        "echo");
}

TEST_CASE("openai_response: echo with logprobs and prompt_logprobs render the prompt's scores") {
  const auto* text = tiny_tokenizer();
  if (!text)
    return;
  const model_info m{.name = "tiny", .max_model_len = 256, .vocab_size = 0, .text = text};
  const auto prompt = *text->text->encode("Paris is the");
  REQUIRE(prompt.size() == 3);
  const auto piece = [&](token_id t) { return std::string(text->text->token_bytes(t)); };
  // What the engine reports for prompt positions 1 and 2 (one output each, as two chunks would).
  std::vector<engine::request_output> outs(2);
  outs[0].id = outs[1].id = 1;
  outs[0].prompt_logprobs = {{.position = 1,
                              .token = prompt[1],
                              .logprob = -2.5f,
                              .rank = 4,
                              .top_ids = {11, 12},
                              .top_logprobs = {-0.5f, -1.0f}}};
  outs[1].prompt_logprobs = {{.position = 2,
                              .token = prompt[2],
                              .logprob = -0.25f,
                              .rank = 1,
                              .top_ids = {prompt[2], 13},
                              .top_logprobs = {-0.25f, -3.0f}}};
  outs[1].has_token = true;
  outs[1].token = 42;
  outs[1].logprob = -0.125f;
  outs[1].top_ids = {42};
  outs[1].top_logprobs = {-0.125f};
  outs[1].finish = engine::finish_reason::length;

  for (bool stream : {false, true}) {
    CAPTURE(stream);
    json b = {{"prompt", "Paris is the"}, {"echo", true},         {"logprobs", 1},
              {"stream", stream},         {"prompt_logprobs", 2}, {"max_tokens", 1}};
    auto parsed = parse_completion(b.dump(), false, m);
    REQUIRE(std::holds_alternative<completion_request>(parsed));
    const auto& req = std::get<completion_request>(parsed);
    CHECK(req.sampling.prompt_logprobs == 2);
    openai_response r(req, m, "cmpl-5", 42);
    CHECK(!r.opening_chunk().has_value()); // the echo waits for the prompt's logprobs
    json choice;
    for (const auto& o : outs)
      if (auto c = r.add(o))
        choice = (*c)["choices"][0];
    if (!stream)
      choice = r.body()["choices"][0];
    CHECK(choice["text"] == "Paris is the" + piece(42));
    const auto& lp = choice["logprobs"];
    CHECK(lp["tokens"] == json({piece(prompt[0]), piece(prompt[1]), piece(prompt[2]), piece(42)}));
    CHECK(lp["token_logprobs"] == json({nullptr, -2.5, -0.25, -0.125}));
    CHECK(lp["top_logprobs"][0].is_null());
    // logprobs 1: the most likely token there, and the prompt's own.
    CHECK(lp["top_logprobs"][1] == json({{piece(11), -0.5}, {piece(prompt[1]), -2.5}}));
    CHECK(lp["top_logprobs"][2] == json({{piece(prompt[2]), -0.25}}));
    // vLLM's shape: keyed by token id, with ranks; prompt_logprobs 2 of them.
    const auto& pl = choice["prompt_logprobs"];
    REQUIRE(pl.size() == 3);
    CHECK(pl[0].is_null());
    CHECK(pl[1].size() == 3);
    CHECK(pl[1][std::to_string(prompt[1])] ==
          json({{"logprob", -2.5}, {"rank", 4}, {"decoded_token", piece(prompt[1])}}));
    CHECK(pl[1]["12"]["rank"] == 2);
    CHECK(pl[2].size() == 2);
    CHECK(pl[2][std::to_string(prompt[2])]["rank"] == 1);
  }
  // Chat: prompt_logprobs beside the choices.
  json b = {{"messages", {{{"role", "user"}, {"content", "hi"}}}}, {"prompt_logprobs", 0}};
  auto parsed = parse_completion(b.dump(), true, m);
  REQUIRE(std::holds_alternative<completion_request>(parsed));
  openai_response r(std::get<completion_request>(parsed), m, "chatcmpl-6", 42);
  for (const auto& o : outs)
    r.add(o);
  auto body = r.body();
  REQUIRE(body["prompt_logprobs"].size() == 3);
  CHECK(body["prompt_logprobs"][1].size() == 1); // the prompt token only
  CHECK(!body["choices"][0].contains("prompt_logprobs"));
  auto refused = [&](const json& body) {
    auto r = parse_completion(body.dump(), false, m);
    REQUIRE(std::holds_alternative<api_error>(r));
    return std::get<api_error>(r).param;
  };
  CHECK(refused({{"prompt", "a"}, {"prompt_logprobs", 21}}) == "prompt_logprobs");
  CHECK(refused({{"prompt", "a"}, {"prompt_logprobs", "all"}}) == "prompt_logprobs");
}
