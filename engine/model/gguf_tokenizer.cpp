// read_gguf_tokenizer (declared in gguf.hpp): tokenizer.ggml.* metadata into plain data.
#include "engine/model/gguf.hpp"

namespace troupe::engine {

namespace {

// A special token id key: absent -> nullopt; present -> checked against the vocabulary.
expected<void> read_id(const gguf_file& f, std::string_view key, size_t vocab,
                       std::optional<int32_t>& out) {
  auto v = f.get_int(key);
  if (!v)
    return std::move(v).error();
  if (!*v)
    return {};
  if (**v < 0 || static_cast<size_t>(**v) >= vocab)
    return make_error(errc::out_of_range, "{}: {} = {} is outside the vocabulary of {} tokens",
                      f.path().string(), key, **v, vocab);
  out = static_cast<int32_t>(**v);
  return {};
}

} // namespace

expected<gguf_tokenizer_data> read_gguf_tokenizer(const gguf_file& f) {
  gguf_tokenizer_data t;
  const std::string where = f.path().string();
  auto model = f.get_string("tokenizer.ggml.model");
  if (!model)
    return std::move(model).error();
  if (!*model)
    return make_error(errc::not_found, "{}: no tokenizer (tokenizer.ggml.model is missing)", where);
  t.model = std::move(**model);
  auto pre = f.get_string("tokenizer.ggml.pre");
  if (!pre)
    return std::move(pre).error();
  t.pre = pre->value_or("");
  auto tokens = f.get_strings("tokenizer.ggml.tokens");
  if (!tokens)
    return std::move(tokens).error();
  if (!*tokens || (*tokens)->empty())
    return make_error(errc::not_found, "{}: tokenizer.ggml.tokens is missing or empty", where);
  t.tokens = std::move(**tokens);
  auto merges = f.get_strings("tokenizer.ggml.merges");
  if (!merges)
    return std::move(merges).error();
  if (*merges)
    t.merges = std::move(**merges);
  if (t.model == "gpt2" && t.merges.empty())
    return make_error(errc::parse_error, "{}: a gpt2 (BPE) tokenizer needs tokenizer.ggml.merges",
                      where);
  auto types = f.get_ints("tokenizer.ggml.token_type");
  if (!types)
    return std::move(types).error();
  if (*types) {
    if ((*types)->size() != t.tokens.size())
      return make_error(errc::parse_error,
                        "{}: tokenizer.ggml.token_type has {} entries for {} tokens", where,
                        (*types)->size(), t.tokens.size());
    t.token_types.assign((*types)->begin(), (*types)->end());
  }
  const size_t vocab = t.tokens.size();
  TROUPE_TRY_VOID(read_id(f, "tokenizer.ggml.bos_token_id", vocab, t.bos_id));
  TROUPE_TRY_VOID(read_id(f, "tokenizer.ggml.eos_token_id", vocab, t.eos_id));
  TROUPE_TRY_VOID(read_id(f, "tokenizer.ggml.unknown_token_id", vocab, t.unk_id));
  TROUPE_TRY_VOID(read_id(f, "tokenizer.ggml.padding_token_id", vocab, t.pad_id));
  TROUPE_TRY_VOID(read_id(f, "tokenizer.ggml.eot_token_id", vocab, t.eot_id));
  for (auto [key, out] : {std::pair{"tokenizer.ggml.add_bos_token", &t.add_bos},
                          std::pair{"tokenizer.ggml.add_eos_token", &t.add_eos}}) {
    auto b = f.get_bool(key);
    if (!b)
      return std::move(b).error();
    *out = *b;
  }
  auto tmpl = f.get_string("tokenizer.chat_template");
  if (!tmpl)
    return std::move(tmpl).error();
  t.chat_template = tmpl->value_or("");
  return t;
}

} // namespace troupe::engine
