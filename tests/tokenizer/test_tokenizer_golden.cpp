// Golden conformance: every case in golden/expected for both tokenizers (encode ids and decoded
// text, chat template text and ids), and the tiny-qwen3 model folder (stubs followed, EOS ids).
#include <doctest/doctest.h>

#include <memory>

#include "engine/tokenizer/chat_template.hpp"
#include "engine/tokenizer/detokenizer.hpp"
#include "golden.hpp"

using namespace troupe;
using namespace troupe::engine;

namespace {

void check_encode(const std::string& name) {
  auto dir = test::golden_dir();
  if (!dir)
    return;
  auto tok = tokenizer::from_file(*dir / "tokenizers" / name / "tokenizer.json");
  REQUIRE_MESSAGE(tok.has_value(), (tok ? "" : tok.error().to_string()));
  const auto shared = std::make_shared<const tokenizer>(std::move(*tok));
  const auto cases = test::read_json(*dir / "expected" / (name + "_encode.json"));
  REQUIRE(cases.size() > 10);
  for (const auto& c : cases) {
    const auto text = c["text"].get<std::string>();
    CAPTURE(text);
    auto ids = shared->encode(text);
    REQUIRE(ids.has_value());
    CHECK(*ids == c["ids"].get<std::vector<token_id>>());
    CHECK(shared->decode(*ids) == c["decoded"].get<std::string>());
    incremental_detokenizer stream(shared, {}, false);
    std::string streamed;
    for (const auto id : *ids)
      streamed += stream.push(id);
    CHECK(streamed + stream.finish() == c["decoded"].get<std::string>());
  }
}

void check_chat(const std::string& name) {
  auto dir = test::golden_dir();
  if (!dir)
    return;
  const auto folder = *dir / "tokenizers" / name;
  auto model = model_tokenizer::load(folder);
  REQUIRE_MESSAGE(model.has_value(), (model ? "" : model.error().to_string()));
  REQUIRE(model->chat.has_value());
  const auto cases = test::read_json(*dir / "expected" / (name + "_chat.json"));
  REQUIRE(cases.size() > 0);
  for (const auto& c : cases) {
    const auto messages = nlohmann::ordered_json::parse(c["messages"].dump());
    chat_options options;
    options.add_generation_prompt = c["kwargs"].value("add_generation_prompt", false);
    if (c["kwargs"].contains("enable_thinking"))
      options.enable_thinking = c["kwargs"]["enable_thinking"].get<bool>();
    CAPTURE(c["messages"].dump());
    auto text = model->chat->render(messages, options);
    REQUIRE_MESSAGE(text.has_value(), (text ? "" : text.error().to_string()));
    CHECK(*text == c["text"].get<std::string>());
    auto ids = model->encode_chat(messages, options);
    REQUIRE(ids.has_value());
    CHECK(*ids == c["ids"].get<std::vector<token_id>>());
  }
}

} // namespace

TEST_CASE("golden qwen3 encode and decode") {
  check_encode("qwen3");
}
TEST_CASE("golden llama3 encode and decode") {
  check_encode("llama3");
}
TEST_CASE("golden qwen3 chat template") {
  check_chat("qwen3");
}
TEST_CASE("golden llama3 chat template") {
  check_chat("llama3");
}

TEST_CASE("tiny-qwen3 folder: stub files followed, eos and template loaded") {
  auto folder = test::golden_model("tiny-qwen3");
  if (!folder)
    return;
  auto model = model_tokenizer::load(*folder);
  REQUIRE_MESSAGE(model.has_value(), (model ? "" : model.error().to_string()));
  CHECK(model->chat.has_value());
  // tokenizer_config.json: eos_token <|im_end|>; generation_config.json has no eos_token_id.
  CHECK(model->eos_ids == std::vector<token_id>{151645});
  CHECK_FALSE(model->bos_id.has_value());
  auto ids = model->text->encode("Hello, world!");
  REQUIRE(ids.has_value());
  CHECK(*ids == std::vector<token_id>{9707, 11, 1879, 0});
}

TEST_CASE("llama3: bos and eos from tokenizer_config.json") {
  auto dir = test::golden_dir();
  if (!dir)
    return;
  auto model = model_tokenizer::load(*dir / "tokenizers" / "llama3");
  REQUIRE(model.has_value());
  CHECK(model->bos_id == std::optional<token_id>(128000));
  CHECK(model->eos_ids == std::vector<token_id>{128001});
}
