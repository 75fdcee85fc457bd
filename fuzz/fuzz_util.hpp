// Shared by the fuzz harnesses (fuzz/*.cpp): a file image made from fuzz bytes (for the readers
// that take a mapped file), and a tiny model (byte-level tokenizer with the Qwen tool tokens and
// a ChatML template that shows tools and tool calls) for the OpenAI request parsers. Harness code
// only: nothing in the runtime includes it.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "engine/model/safetensors.hpp"
#include "engine/tokenizer/chat_template.hpp"
#include "engine/tokenizer/utf8.hpp"

namespace troupe::fuzz {

// The bytes as a mapped file (an anonymous memfd), so parse() reads them as it reads a model
// file. Aborts when the kernel refuses (that is the harness failing, not the input).
inline std::shared_ptr<engine::mapped_file> map_bytes(const uint8_t* data, size_t size) {
  const int fd = memfd_create("fuzz", MFD_CLOEXEC);
  if (fd < 0)
    std::abort();
  for (size_t done = 0; done < size;) {
    const ssize_t n = write(fd, data + done, size - done);
    if (n <= 0)
      std::abort();
    done += static_cast<size_t>(n);
  }
  auto file = engine::mapped_file::open("/proc/self/fd/" + std::to_string(fd));
  close(fd);
  if (!file)
    std::abort();
  return *file;
}

// Qwen-style ChatML with tools (their JSON via tojson) and assistant tool calls.
inline constexpr std::string_view tiny_chat_template =
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>\n{%- for tool in tools %}\n"
    "{{ tool | tojson }}\n{%- endfor %}\n</tools><|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == \"assistant\" and message.tool_calls %}<|im_start|>assistant\n"
    "{{ message.content }}{%- for tool_call in message.tool_calls %}\n<tool_call>\n"
    "{\"name\": \"{{ tool_call.function.name }}\", \"arguments\": "
    "{{ tool_call.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{%- endif %}{%- endif %}";

// 256 byte tokens, two merges, and the ChatML and tool-call added tokens.
inline const engine::model_tokenizer& tiny_model() {
  static const engine::model_tokenizer m = [] {
    engine::tokenizer_parts p;
    for (int b = 0; b < 256; ++b)
      p.vocab.push_back(engine::utf8::byte_level_encode(std::string(1, static_cast<char>(b))));
    p.vocab.push_back(engine::utf8::byte_level_encode(" t"));
    p.vocab.push_back(engine::utf8::byte_level_encode(" th"));
    p.merges = {{engine::utf8::byte_level_encode(" "), "t"},
                {engine::utf8::byte_level_encode(" t"), "h"}};
    int32_t id = 258;
    for (const char* t : {"<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"})
      p.added_tokens.push_back({.id = id++, .content = t, .special = true});
    p.pre_tokenizer = {engine::preset_step(engine::pre_tokenizer_preset::gpt2)};
    auto tok = engine::tokenizer::from_parts(std::move(p));
    auto chat = engine::chat_template::create(tiny_chat_template,
                                              nlohmann::ordered_json{{"eos_token", "<|im_end|>"}});
    if (!tok || !chat)
      std::abort();
    engine::model_tokenizer out;
    out.text = std::make_shared<const engine::tokenizer>(std::move(*tok));
    out.chat = std::move(*chat);
    out.eos_ids = {259};
    return out;
  }();
  return m;
}

} // namespace troupe::fuzz
