// model_tokenizer from GGUF metadata: the GGUF importer reads the fields (engine/model/gguf.hpp),
// this turns them into tokenizer parts, BOS/EOS ids and the chat template.
#include <algorithm>

#include "engine/model/gguf_weights.hpp"
#include "engine/tokenizer/chat_template.hpp"

namespace troupe::engine {

namespace {

// llama.cpp's tokenizer.ggml.pre names -> the splitting steps Hugging Face uses for those models.
expected<std::vector<split_step>> pre_tokenizer_for(const std::string& pre) {
  if (pre == "smollm") // SmolLM/SmolLM2: Digits(individual) then the GPT-2 ByteLevel regex
    return std::vector<split_step>{digits_step(true), preset_step(pre_tokenizer_preset::gpt2)};
  if (pre == "llama3" || pre == "llama-bpe")
    return std::vector<split_step>{preset_step(pre_tokenizer_preset::llama3)};
  if (pre == "qwen2")
    return std::vector<split_step>{preset_step(pre_tokenizer_preset::qwen2)};
  if (pre == "gpt2" || pre == "default" || pre.empty())
    return std::vector<split_step>{preset_step(pre_tokenizer_preset::gpt2)};
  return make_error(errc::unsupported,
                    "GGUF tokenizer.ggml.pre '{}' is not supported (supported: smollm, llama3, "
                    "llama-bpe, qwen2, gpt2, default)",
                    pre);
}

// llama.cpp token types.
constexpr int32_t type_control = 3, type_user_defined = 4;

} // namespace

expected<model_tokenizer> model_tokenizer::from_gguf(const gguf_tokenizer_data& data) {
  if (data.model != "gpt2")
    return make_error(errc::unsupported,
                      "GGUF tokenizer.ggml.model '{}' is not supported (supported: gpt2, the "
                      "byte-level BPE of GPT-2, Llama 3, Qwen and SmolLM)",
                      data.model);
  auto steps = pre_tokenizer_for(data.pre);
  if (!steps)
    return std::move(steps).error();
  tokenizer_parts parts;
  parts.vocab = data.tokens;
  parts.pre_tokenizer = std::move(*steps);
  parts.ignore_merges = data.pre == "llama3" || data.pre == "llama-bpe";
  parts.nfc = data.pre == "qwen2";
  for (const auto& merge : data.merges) {
    auto space = merge.find(' ');
    if (space == std::string::npos)
      return make_error(errc::parse_error, "GGUF tokenizer.ggml.merges entry '{}' is not a pair",
                        merge);
    parts.merges.emplace_back(merge.substr(0, space), merge.substr(space + 1));
  }
  for (size_t id = 0; id < data.token_types.size(); ++id) {
    const int32_t type = data.token_types[id];
    if (type == type_control || type == type_user_defined)
      parts.added_tokens.push_back({.id = static_cast<token_id>(id),
                                    .content = data.tokens[id],
                                    .special = type == type_control});
  }
  auto tok = tokenizer::from_parts(std::move(parts));
  if (!tok)
    return std::move(tok).error().context("GGUF tokenizer");
  model_tokenizer m;
  m.text = std::make_shared<const tokenizer>(std::move(*tok));
  m.bos_id = data.bos_id;
  for (auto id : {data.eos_id, data.eot_id})
    if (id && std::find(m.eos_ids.begin(), m.eos_ids.end(), *id) == m.eos_ids.end())
      m.eos_ids.push_back(*id);
  if (!data.chat_template.empty()) {
    auto text_of = [&](std::optional<int32_t> id) {
      return id ? data.tokens[static_cast<size_t>(*id)] : std::string{};
    };
    nlohmann::ordered_json special = {{"bos_token", text_of(data.bos_id)},
                                      {"eos_token", text_of(data.eos_id)},
                                      {"pad_token", text_of(data.pad_id)},
                                      {"unk_token", text_of(data.unk_id)}};
    auto chat = chat_template::create(data.chat_template, special);
    if (!chat)
      return std::move(chat).error().context("GGUF tokenizer.chat_template");
    m.chat = std::move(*chat);
  }
  return m;
}

expected<model_tokenizer> model_tokenizer::load_for_model(const std::filesystem::path& path) {
  auto gguf_path = gguf_model_file(path);
  if (!gguf_path)
    return std::move(gguf_path).error();
  if (!*gguf_path)
    return load(path);
  auto file = gguf_file::open(**gguf_path);
  if (!file)
    return std::move(file).error();
  auto data = read_gguf_tokenizer(*file);
  if (!data)
    return std::move(data).error().context((*gguf_path)->string());
  return from_gguf(*data);
}

} // namespace troupe::engine
