// tokenizer.json -> tokenizer_parts -> tokenizer. Every unsupported component is an error naming
// it.
#include <nlohmann/json.hpp>

#include "engine/tokenizer/model_files.hpp"
#include "engine/tokenizer/tokenizer.hpp"
#include "runtime/json_depth.hpp"

namespace troupe::engine {

namespace {

using json = nlohmann::json;

// A token id in [0, 2^24]: an integer (converting a float such as 1e120 is undefined behaviour,
// found by fuzz/tokenizer_json.cpp), within any real vocabulary.
expected<int64_t> token_id_of(const json& v, std::string_view what) {
  if (!v.is_number_integer() ||
      (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)))
    return make_error(errc::parse_error, "{} must be an integer token id", what);
  const int64_t id = v.get<int64_t>();
  if (id < 0 || id > (1 << 24))
    return make_error(errc::out_of_range, "{} has id {}", what, id);
  return id;
}

std::string type_of(const json& j) {
  return j.is_object() ? j.value("type", std::string()) : "";
}

expected<void> read_normalizer(const json& n, tokenizer_parts& parts) {
  if (n.is_null())
    return {};
  const std::string type = type_of(n);
  if (type == "NFC") {
    parts.nfc = true;
    return {};
  }
  if (type == "Sequence") {
    for (const auto& child : n.at("normalizers"))
      TROUPE_TRY_VOID(read_normalizer(child, parts));
    return {};
  }
  return make_error(errc::unsupported, "normalizer '{}' is not supported (supported: NFC)", type);
}

std::string escape_regex(const std::string& literal) {
  std::string out;
  for (char c : literal) {
    if (std::string_view("\\^$.|?*+()[]{}-/").find(c) != std::string_view::npos)
      out.push_back('\\');
    out.push_back(c);
  }
  return out;
}

expected<void> read_pre_tokenizer(const json& p, tokenizer_parts& parts) {
  if (p.is_null())
    return {};
  const std::string type = type_of(p);
  if (type == "Sequence") {
    for (const auto& child : p.at("pretokenizers"))
      TROUPE_TRY_VOID(read_pre_tokenizer(child, parts));
    return {};
  }
  if (type == "Split") {
    const std::string behavior = p.value("behavior", std::string("Isolated"));
    if (behavior != "Isolated" || p.value("invert", false))
      return make_error(errc::unsupported,
                        "Split pre-tokenizer with behavior '{}'{} is not supported (only Isolated)",
                        behavior, p.value("invert", false) ? " and invert" : "");
    const json& pattern = p.at("pattern");
    if (pattern.contains("Regex"))
      parts.pre_tokenizer.push_back(regex_step(pattern.at("Regex").get<std::string>()));
    else
      parts.pre_tokenizer.push_back(
          regex_step(escape_regex(pattern.at("String").get<std::string>())));
    return {};
  }
  if (type == "ByteLevel") {
    if (p.value("add_prefix_space", false)) {
      if (!parts.pre_tokenizer.empty())
        return make_error(
            errc::unsupported,
            "ByteLevel add_prefix_space after another pre-tokenizer is not supported");
      parts.add_prefix_space = true;
    }
    if (p.value("use_regex", true))
      parts.pre_tokenizer.push_back(preset_step(pre_tokenizer_preset::gpt2));
    return {};
  }
  if (type == "Digits") {
    parts.pre_tokenizer.push_back(digits_step(p.value("individual_digits", false)));
    return {};
  }
  return make_error(errc::unsupported,
                    "pre-tokenizer '{}' is not supported (supported: Split, ByteLevel, Digits, "
                    "Sequence); SentencePiece-style tokenizers are not supported yet",
                    type);
}

expected<void> read_model(const json& m, tokenizer_parts& parts) {
  const std::string type = m.value("type", std::string("BPE"));
  if (type != "BPE")
    return make_error(errc::unsupported,
                      "tokenizer model '{}' is not supported (only byte-level BPE)", type);
  if (m.value("byte_fallback", false))
    return make_error(
        errc::unsupported,
        "BPE with byte_fallback (SentencePiece-style) is not supported, only byte-level BPE");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (m.contains(key) && m[key].is_string() && !m[key].get<std::string>().empty())
      return make_error(errc::unsupported, "BPE {} '{}' is not supported", key,
                        m[key].get<std::string>());
  parts.ignore_merges = m.value("ignore_merges", false);
  const json& vocab = m.at("vocab");
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    int64_t id = 0;
    TROUPE_ASSIGN(id, token_id_of(it.value(), fmt::format("vocab token '{}'", it.key())));
    if (static_cast<size_t>(id) >= parts.vocab.size())
      parts.vocab.resize(id + 1);
    parts.vocab[id] = it.key();
  }
  for (const auto& merge : m.at("merges")) {
    if (merge.is_array()) {
      parts.merges.emplace_back(merge.at(0).get<std::string>(), merge.at(1).get<std::string>());
      continue;
    }
    const auto s = merge.get<std::string>();
    const auto space = s.find(' ', 1);
    if (space == std::string::npos)
      return make_error(errc::parse_error, "merge '{}' is not two tokens separated by a space", s);
    parts.merges.emplace_back(s.substr(0, space), s.substr(space + 1));
  }
  return {};
}

expected<void> read_added(const json& list, tokenizer_parts& parts) {
  if (list.is_null())
    return {};
  for (const auto& a : list) {
    if (a.value("single_word", false))
      return make_error(errc::unsupported, "added token '{}' with single_word is not supported",
                        a.at("content").get<std::string>());
    int64_t id = 0;
    TROUPE_ASSIGN(id, token_id_of(a.at("id"), "added token"));
    parts.added_tokens.push_back(added_token{.id = static_cast<token_id>(id),
                                             .content = a.at("content").get<std::string>(),
                                             .special = a.value("special", false),
                                             .lstrip = a.value("lstrip", false),
                                             .rstrip = a.value("rstrip", false)});
  }
  return {};
}

expected<tokenizer_parts> read_parts(const json& j) {
  tokenizer_parts parts;
  TROUPE_TRY_VOID(read_model(j.at("model"), parts));
  TROUPE_TRY_VOID(read_normalizer(j.value("normalizer", json()), parts));
  TROUPE_TRY_VOID(read_pre_tokenizer(j.value("pre_tokenizer", json()), parts));
  TROUPE_TRY_VOID(read_added(j.value("added_tokens", json()), parts));
  const json decoder = j.value("decoder", json());
  const std::string decoder_type = type_of(decoder);
  if (decoder_type != "ByteLevel")
    return make_error(errc::unsupported, "decoder '{}' is not supported (only ByteLevel)",
                      decoder.is_null() ? "none" : decoder_type);
  return parts;
}

} // namespace

expected<tokenizer> tokenizer::from_json(std::string_view json_text, std::string_view what) {
  if (!json_nesting_within(json_text))
    return make_error(errc::parse_error, "{}: nests deeper than {} levels", what, max_json_depth);
  try {
    const json j = json::parse(json_text);
    auto parts = read_parts(j);
    if (!parts)
      return std::move(parts).error().context(what);
    auto t = from_parts(std::move(*parts));
    if (!t)
      return std::move(t).error().context(what);
    return t;
  } catch (const json::exception& e) {
    return make_error(errc::parse_error, "{}: {}", what, e.what());
  }
}

expected<tokenizer> tokenizer::from_file(const std::filesystem::path& path) {
  auto text = read_model_file(path);
  if (!text)
    return std::move(text).error();
  return from_json(*text, path.string());
}

} // namespace troupe::engine
