// A model's text interface as one bundle: its tokenizer, its chat template (tokenizer_config.json,
// parsed at load so a broken template fails the load, not a request), and its BOS/EOS ids
// (generation_config.json and tokenizer_config.json). Loaded once per model (blocks on file I/O);
// everything after load is const and thread-safe (HTTP threads tokenize concurrently).
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/model/gguf.hpp"
#include "engine/tokenizer/jinja.hpp"
#include "engine/tokenizer/tokenizer.hpp"

namespace troupe::engine {

struct chat_options {
  bool add_generation_prompt = true;
  std::optional<bool> enable_thinking; // undefined in the template when not set
  nlohmann::ordered_json tools;        // null: no tools
};

class chat_template {
 public:
  // `source` is the Jinja text; special tokens become the variables bos_token, eos_token, ...
  static expected<chat_template> create(std::string_view source,
                                        nlohmann::ordered_json special_tokens);
  // `messages`: [{"role": ..., "content": ...}, ...] as in the OpenAI API.
  expected<std::string> render(const nlohmann::ordered_json& messages,
                               const chat_options& options) const;

 private:
  jinja::template_program program_;
  nlohmann::ordered_json special_tokens_;
};

struct model_tokenizer {
  std::shared_ptr<const tokenizer> text;
  std::optional<chat_template> chat; // absent when tokenizer_config.json has no chat_template
  std::vector<token_id> eos_ids; // generation_config.json eos_token_id (int or list) + eos_token
  std::optional<token_id> bos_id;

  // Reads tokenizer.json, tokenizer_config.json and generation_config.json from a model folder
  // (following git symlink stubs). Errors name the file and the problem.
  static expected<model_tokenizer> load(const std::filesystem::path& folder);
  // From a GGUF file's tokenizer metadata (tokenizer.ggml.model = gpt2: byte-level BPE; control
  // tokens become special added tokens, user-defined ones plain added tokens).
  static expected<model_tokenizer> from_gguf(const gguf_tokenizer_data& data);
  // Whatever a model path in model.yaml or --model names: a .gguf file (or a folder holding one
  // and no config.json), else a Hugging Face folder.
  static expected<model_tokenizer> load_for_model(const std::filesystem::path& path);

  // Renders the chat template and tokenizes the result (added tokens matched, no extra BOS), as
  // transformers' apply_chat_template(tokenize=True) does.
  expected<std::vector<token_id>> encode_chat(const nlohmann::ordered_json& messages,
                                              const chat_options& options) const;
};

} // namespace troupe::engine
