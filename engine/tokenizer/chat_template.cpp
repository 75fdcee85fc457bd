#include "engine/tokenizer/chat_template.hpp"

#include <algorithm>

#include "engine/tokenizer/model_files.hpp"
#include "runtime/json_depth.hpp"

namespace troupe::engine {

using ojson = nlohmann::ordered_json;

expected<chat_template> chat_template::create(std::string_view source, ojson special_tokens) {
  auto program = jinja::template_program::parse(source);
  if (!program)
    return std::move(program).error();
  chat_template t;
  t.program_ = std::move(*program);
  t.special_tokens_ = std::move(special_tokens);
  return t;
}

expected<std::string> chat_template::render(const ojson& messages,
                                            const chat_options& options) const {
  ojson context = special_tokens_.is_object() ? special_tokens_ : ojson::object();
  context["messages"] = messages;
  context["add_generation_prompt"] = options.add_generation_prompt;
  context["tools"] = options.tools;
  if (options.enable_thinking)
    context["enable_thinking"] = *options.enable_thinking;
  return program_.render(context);
}

namespace {

// A special token in tokenizer_config.json: "<s>" or {"content": "<s>", ...}.
std::optional<std::string> token_text(const ojson& config, const char* key) {
  if (!config.contains(key))
    return std::nullopt;
  const ojson& v = config[key];
  if (v.is_string())
    return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string())
    return v["content"].get<std::string>();
  return std::nullopt;
}

expected<ojson> read_json(const std::filesystem::path& path, bool optional) {
  std::error_code ec;
  if (optional && !std::filesystem::exists(path, ec))
    return ojson::object();
  auto text = read_model_file(path);
  if (!text)
    return std::move(text).error();
  if (!json_nesting_within(*text))
    return make_error(errc::parse_error, "{}: nests deeper than {} levels", path.string(),
                      max_json_depth);
  try {
    return ojson::parse(*text);
  } catch (const ojson::exception& e) {
    return make_error(errc::parse_error, "{}: {}", path.string(), e.what());
  }
}

void add_ids(const ojson& v, std::vector<token_id>& out) {
  if (v.is_number_integer())
    out.push_back(v.get<token_id>());
  else if (v.is_array())
    for (const auto& id : v)
      if (id.is_number_integer())
        out.push_back(id.get<token_id>());
}

} // namespace

expected<model_tokenizer> model_tokenizer::load(const std::filesystem::path& folder) {
  model_tokenizer m;
  auto tok = tokenizer::from_file(folder / "tokenizer.json");
  if (!tok)
    return std::move(tok).error();
  m.text = std::make_shared<const tokenizer>(std::move(*tok));
  auto config = read_json(folder / "tokenizer_config.json", true);
  if (!config)
    return std::move(config).error();
  auto generation = read_json(folder / "generation_config.json", true);
  if (!generation)
    return std::move(generation).error();

  ojson special = ojson::object();
  for (const char* key : {"bos_token", "eos_token", "pad_token", "unk_token"})
    special[key] = token_text(*config, key).value_or("");
  if (generation->contains("eos_token_id"))
    add_ids((*generation)["eos_token_id"], m.eos_ids);
  if (auto eos = token_text(*config, "eos_token"))
    if (auto id = m.text->token_to_id(*eos);
        id && std::find(m.eos_ids.begin(), m.eos_ids.end(), *id) == m.eos_ids.end())
      m.eos_ids.push_back(*id);
  if (generation->contains("bos_token_id") && (*generation)["bos_token_id"].is_number_integer())
    m.bos_id = (*generation)["bos_token_id"].get<token_id>();
  else if (auto bos = token_text(*config, "bos_token"))
    m.bos_id = m.text->token_to_id(*bos);

  if (config->contains("chat_template")) {
    const ojson& source = (*config)["chat_template"];
    std::string text;
    if (source.is_string()) {
      text = source.get<std::string>();
    } else if (source.is_array()) { // [{"name": "default", "template": ...}, ...]
      for (const auto& named : source)
        if (named.value("name", "") == "default")
          text = named.value("template", "");
    }
    if (!text.empty()) {
      auto chat = chat_template::create(text, special);
      if (!chat)
        return std::move(chat).error().context((folder / "tokenizer_config.json").string());
      m.chat = std::move(*chat);
    }
  }
  return m;
}

expected<std::vector<token_id>> model_tokenizer::encode_chat(const ojson& messages,
                                                             const chat_options& options) const {
  if (!chat)
    return make_error(errc::unsupported, "this model has no chat template");
  auto text = chat->render(messages, options);
  if (!text)
    return std::move(text).error();
  return this->text->encode(*text);
}

} // namespace troupe::engine
