// Tokenizer pieces in isolation: UTF-8 lossy decoding, byte-level alphabet, the parts constructor
// (the GGUF importer's entry point), pre-tokenizer steps, unsupported types, symlink stubs, and the
// streaming detokenizer with stop strings.
#include <doctest/doctest.h>

#include <fstream>

#include "engine/tokenizer/chat_template.hpp"
#include "engine/tokenizer/detokenizer.hpp"
#include "engine/tokenizer/tokenizer.hpp"
#include "engine/tokenizer/utf8.hpp"
#include "golden.hpp"

using namespace troupe;
using namespace troupe::engine;

namespace {

// Bytes 0..255 as ids 0..255, then "ab" = 256, "abc" = 257, "<|x|>" = 300 (added, special).
tokenizer_parts tiny_parts() {
  tokenizer_parts p;
  for (int b = 0; b < 256; ++b)
    p.vocab.push_back(utf8::byte_level_encode(std::string(1, static_cast<char>(b))));
  p.vocab.push_back("ab");
  p.vocab.push_back("abc");
  p.merges = {{"a", "b"}, {"ab", "c"}};
  p.added_tokens = {{.id = 300, .content = "<|x|>", .special = true}};
  p.pre_tokenizer = {preset_step(pre_tokenizer_preset::gpt2)};
  return p;
}

std::string stream_all(incremental_detokenizer& d, const std::vector<token_id>& ids) {
  std::string out;
  for (auto id : ids)
    out += d.push(id);
  return out + d.finish();
}

} // namespace

TEST_CASE("utf8: lossy decoding replaces maximal invalid subparts like Rust") {
  std::string out;
  utf8::append_lossy(out, "a\xE4\xB8"
                          "b\xFF\xF0\x9F\x98\x80");
  CHECK(out == "a\xEF\xBF\xBD"
               "b\xEF\xBF\xBD\xF0\x9F\x98\x80");
  out.clear();
  CHECK(utf8::append_lossy(out, "x\xE4\xB8", false) == 1); // unfinished character held back
  CHECK(out == "x");
  CHECK(utf8::valid_prefix("ok\xC3") == 2);
}

TEST_CASE("utf8: byte-level alphabet round-trips every byte") {
  CHECK(utf8::byte_to_char()[' '] == U'\u0120');
  CHECK(utf8::byte_to_char()['\n'] == U'\u010A');
  std::string all;
  for (int b = 0; b < 256; ++b)
    all.push_back(static_cast<char>(b));
  CHECK(utf8::byte_level_decode(utf8::byte_level_encode(all)) == all);
  CHECK(utf8::byte_level_decode("<|im_start|>") == "<|im_start|>");
}

TEST_CASE("tokenizer from parts: merges by rank, added tokens first, decode") {
  auto tok = tokenizer::from_parts(tiny_parts());
  REQUIRE(tok.has_value());
  auto ids = tok->encode("abc<|x|>ab c");
  REQUIRE(ids.has_value());
  CHECK(*ids == std::vector<token_id>{257, 300, 256, ' ', 'c'});
  CHECK(tok->decode(*ids) == "abc<|x|>ab c");
  CHECK(tok->decode(*ids, true) == "abcab c");
  CHECK(tok->is_special(300));
  CHECK(tok->token_to_id("<|x|>") == std::optional<token_id>(300));
  CHECK(tok->token_to_id("Ġ") == std::optional<token_id>(' '));
  CHECK(tok->decode(std::vector<token_id>{99999, 'a'}) == "a"); // unknown ids skipped, as HF
}

TEST_CASE("tokenizer from parts: Digits(individual) before the regex") {
  auto p = tiny_parts();
  p.pre_tokenizer = {digits_step(true), preset_step(pre_tokenizer_preset::gpt2)};
  auto tok = tokenizer::from_parts(p);
  REQUIRE(tok.has_value());
  CHECK(*tok->encode("12") == std::vector<token_id>{'1', '2'});
  p.pre_tokenizer = {digits_step(false)};
  auto runs = tokenizer::from_parts(p);
  REQUIRE(runs.has_value());
  std::vector<std::string_view> pieces;
  auto pre = pre_tokenizer::create({digits_step(false)});
  REQUIRE(pre.has_value());
  pre->split("ab123c4", pieces);
  CHECK(pieces == std::vector<std::string_view>{"ab", "123", "c", "4"});
}

TEST_CASE("tokenizer: errors name what is wrong") {
  // A byte without a token is dropped when encoding, as Hugging Face's BPE does (SmolLM2's
  // vocabulary lacks some control bytes).
  auto p = tiny_parts();
  p.vocab[7].clear();
  auto missing = tokenizer::from_parts(p);
  REQUIRE(missing.has_value());
  auto with_gap = missing->encode(std::string("\x07"));
  REQUIRE(with_gap.has_value());
  CHECK(with_gap->empty());

  auto bad_regex = pre_tokenizer::create({regex_step("(unclosed")});
  REQUIRE_FALSE(bad_regex.has_value());
  CHECK(bad_regex.error().message().find("(unclosed") != std::string::npos);

  auto unigram = tokenizer::from_json(R"({"model": {"type": "Unigram", "vocab": []}})", "t.json");
  REQUIRE_FALSE(unigram.has_value());
  CHECK(unigram.error().code() == errc::unsupported);
  CHECK(unigram.error().message().find("Unigram") != std::string::npos);

  auto metaspace = tokenizer::from_json(
      R"({"model": {"type": "BPE", "vocab": {}, "merges": []}, "pre_tokenizer": {"type": "Metaspace"}})",
      "t.json");
  REQUIRE_FALSE(metaspace.has_value());
  CHECK(metaspace.error().message().find("Metaspace") != std::string::npos);

  auto tok = tokenizer::from_parts(tiny_parts());
  REQUIRE(tok.has_value());
  auto invalid = tok->encode("bad \xC3");
  REQUIRE_FALSE(invalid.has_value());
  CHECK(invalid.error().code() == errc::invalid_argument);
}

TEST_CASE("tokenizer.json: merges in both forms, stub files followed") {
  test::temp_dir dir;
  nlohmann::json vocab = nlohmann::json::object();
  for (int b = 0; b < 256; ++b)
    vocab[utf8::byte_level_encode(std::string(1, static_cast<char>(b)))] = b;
  vocab["ab"] = 256;
  vocab["abc"] = 257;
  for (const auto& merges : {nlohmann::json::array({"a b", "ab c"}),
                             nlohmann::json::parse(R"([["a", "b"], ["ab", "c"]])")}) {
    nlohmann::json j = {{"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}}},
                        {"pre_tokenizer", {{"type", "ByteLevel"}, {"use_regex", true}}},
                        {"decoder", {{"type", "ByteLevel"}}}};
    std::filesystem::create_directories(dir.path() / "real");
    std::ofstream(dir.path() / "real" / "tokenizer.json") << j.dump();
    std::filesystem::create_directories(dir.path() / "model");
    std::ofstream(dir.path() / "model" / "tokenizer.json") << "../real/tokenizer.json\n";
    auto tok = tokenizer::from_file(dir.path() / "model" / "tokenizer.json");
    REQUIRE_MESSAGE(tok.has_value(), (tok ? "" : tok.error().to_string()));
    CHECK(*tok->encode("abc abc") == std::vector<token_id>{257, ' ', 257});
  }
}

TEST_CASE("model folder: eos list from generation_config.json, broken template fails the load") {
  test::temp_dir dir;
  nlohmann::json vocab = nlohmann::json::object();
  for (int b = 0; b < 256; ++b)
    vocab[utf8::byte_level_encode(std::string(1, static_cast<char>(b)))] = b;
  const nlohmann::json tj = {
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", nlohmann::json::array()}}},
      {"added_tokens", {{{"id", 256}, {"content", "<e>"}, {"special", true}}}},
      {"pre_tokenizer", {{"type", "ByteLevel"}}},
      {"decoder", {{"type", "ByteLevel"}}}};
  std::ofstream(dir.path() / "tokenizer.json") << tj.dump();
  std::ofstream(dir.path() / "generation_config.json")
      << R"({"eos_token_id": [7, 9], "bos_token_id": 1})";
  std::ofstream(dir.path() / "tokenizer_config.json")
      << R"({"eos_token": {"content": "<e>"}, "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"})";
  auto ok = model_tokenizer::load(dir.path());
  REQUIRE_MESSAGE(ok.has_value(), (ok ? "" : ok.error().to_string()));
  CHECK(ok->eos_ids == std::vector<token_id>{7, 9, 256});
  CHECK(ok->bos_id == std::optional<token_id>(1));
  auto ids = ok->encode_chat(
      nlohmann::ordered_json::parse(R"([{"role": "user", "content": "hi<e>"}])"), chat_options{});
  REQUIRE(ids.has_value());
  CHECK(*ids == std::vector<token_id>{'h', 'i', 256});

  std::ofstream(dir.path() / "tokenizer_config.json")
      << R"({"chat_template": "{% for m in messages %}\n{{ m.content }"})";
  auto broken = model_tokenizer::load(dir.path());
  REQUIRE_FALSE(broken.has_value());
  CHECK(broken.error().message().find("tokenizer_config.json") != std::string::npos);
  CHECK(broken.error().message().find("line 2") != std::string::npos);
}

TEST_CASE("detokenizer: whole characters only, stop strings across tokens") {
  auto tok = tokenizer::from_parts(tiny_parts());
  REQUIRE(tok.has_value());
  auto shared = std::make_shared<const tokenizer>(std::move(*tok));
  // "é" is two byte tokens: nothing is emitted after the first.
  incremental_detokenizer d(shared);
  CHECK(d.push(0xC3).empty());
  CHECK(d.push(0xA9) == "\xC3\xA9");
  CHECK(d.finish().empty());

  // Stop "c<" spans tokens: "ab" is emitted, "c" held until "<" arrives, then the stop.
  incremental_detokenizer s(shared, {"c<"});
  CHECK(s.push(256) == "ab");
  CHECK(s.push('c').empty());
  CHECK(s.push('<').empty());
  CHECK(s.stopped());
  CHECK(s.stop_string() == std::optional<std::string>("c<"));
  CHECK(s.push('z').empty());
  CHECK(s.finish().empty());

  // A held prefix that does not become a stop string is released.
  incremental_detokenizer h(shared, {"c<"});
  CHECK(stream_all(h, {256, 'c', 'd'}) == "abcd");
  CHECK_FALSE(h.stopped());

  // Before min_tokens (may_stop false) a complete stop string does not stop; a prefix of one is
  // still held, so a stop string that completes once stopping is allowed is found.
  incremental_detokenizer m(shared, {"c<"});
  CHECK(m.push('c', false).empty());
  CHECK(m.push('<', false) == "c<");
  CHECK_FALSE(m.stopped());
  CHECK(m.push('c', false).empty());
  CHECK(m.push('<', true).empty());
  CHECK(m.stopped());
  incremental_detokenizer late(shared, {"c<"});
  CHECK(late.push('c', false).empty());
  CHECK(late.push('<', false) == "c<");
  CHECK(late.finish().empty());
  CHECK_FALSE(late.stopped());

  // Special tokens are skipped by default; an unfinished character ends as U+FFFD.
  incremental_detokenizer f(shared);
  CHECK(stream_all(f, {'a', 300, 0xE4}) == "a\xEF\xBF\xBD");
}
