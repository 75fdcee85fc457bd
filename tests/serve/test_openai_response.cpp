// openai_response without sockets: engine outputs -> the chat/text completion body and the SSE
// chunks of a stream (role chunk, prompt ids once, token ids, finish, usage), and the one
// errc -> HTTP status map. Uses the golden tiny-qwen3 tokenizer.
#include <doctest/doctest.h>

#include "golden.hpp"
#include "http/openai_response.hpp"

using namespace troupe;
using namespace troupe::serve;

namespace {

engine::request_output token(token_id t, engine::finish_reason f = engine::finish_reason::none) {
  return {.id = 1, .has_token = true, .token = t, .finish = f};
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
  auto dir = test::golden_model("tiny-qwen3");
  if (!dir)
    return;
  auto text = engine::model_tokenizer::load_for_model(*dir);
  REQUIRE(text.has_value());
  const model_info m{.name = "tiny", .max_model_len = 256, .vocab_size = 0, .text = &*text};
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
  auto dir = test::golden_model("tiny-qwen3");
  if (!dir)
    return;
  auto text = engine::model_tokenizer::load_for_model(*dir);
  REQUIRE(text.has_value());
  const model_info m{.name = "tiny", .max_model_len = 256, .vocab_size = 0, .text = &*text};
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
  auto dir = test::golden_model("tiny-qwen3");
  if (!dir)
    return;
  auto text = engine::model_tokenizer::load_for_model(*dir);
  REQUIRE(text.has_value());
  const model_info m{.name = "tiny", .max_model_len = 256, .vocab_size = 0, .text = &*text};
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
  CHECK(refused(R"({"prompt": "a", "echo": true, "logprobs": 2})", false) == "echo");
  CHECK(refused(R"({"prompt": "a", "echo": "yes"})", false) == "echo");
  CHECK(refused(R"({"messages": [{"role": "user", "content": "a"}], "echo": true})", true) ==
        "echo");
}
