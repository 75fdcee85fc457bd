// Test driver for the Hugging Face cross-check (crosscheck.py): reads one JSON string per stdin
// line, prints one JSON line per input with our ids, decodes (with and without special tokens),
// whether streaming detokenization (one token at a time) reproduced the full decode, and whether
// streaming with a stop string taken from the middle of the text stopped exactly before it.
#include <iostream>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "engine/tokenizer/chat_template.hpp"
#include "engine/tokenizer/detokenizer.hpp"
#include "engine/tokenizer/tokenizer.hpp"

// `--chat MODEL_DIR`: each stdin line is {"messages", "tools", "add_generation_prompt",
// "enable_thinking"?}; prints {"text"} or {"error"} rendered with the folder's chat template.
int chat_mode(const char* folder) {
  auto model = troupe::engine::model_tokenizer::load(folder);
  if (!model || !model->chat) {
    std::cerr << "error: " << (model ? "no chat template" : model.error().to_string()) << "\n";
    return 1;
  }
  std::string line;
  while (std::getline(std::cin, line)) {
    const auto request = nlohmann::ordered_json::parse(line);
    troupe::engine::chat_options options;
    options.add_generation_prompt = request.value("add_generation_prompt", false);
    options.tools = request.value("tools", nlohmann::ordered_json());
    if (request.contains("enable_thinking"))
      options.enable_thinking = request["enable_thinking"].get<bool>();
    auto text = model->chat->render(request["messages"], options);
    nlohmann::json out;
    if (text)
      out["text"] = *text;
    else
      out["error"] = text.error().to_string();
    std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  }
  return 0;
}

int main(int argc, char** argv) {
  if (argc == 3 && std::string(argv[1]) == "--chat")
    return chat_mode(argv[2]);
  if (argc != 2) {
    std::cerr << "usage: tokenizer_tool TOKENIZER_JSON < strings.jsonl\n"
                 "       tokenizer_tool --chat MODEL_DIR < requests.jsonl\n";
    return 2;
  }
  auto tok = troupe::engine::tokenizer::from_file(argv[1]);
  if (!tok) {
    std::cerr << "error: " << tok.error().to_string() << "\n";
    return 1;
  }
  auto shared = std::make_shared<const troupe::engine::tokenizer>(std::move(*tok));
  std::string line;
  while (std::getline(std::cin, line)) {
    const auto text = nlohmann::json::parse(line).get<std::string>();
    nlohmann::json out;
    auto ids = shared->encode(text);
    if (!ids) {
      out["error"] = ids.error().to_string();
      std::cout << out.dump() << "\n";
      continue;
    }
    const std::string full = shared->decode(*ids, false);
    troupe::engine::incremental_detokenizer stream(shared, {}, false);
    std::string streamed;
    for (const auto id : *ids)
      streamed += stream.push(id);
    streamed += stream.finish();
    out["ids"] = *ids;
    out["decoded"] = full;
    out["decoded_skip_special"] = shared->decode(*ids, true);
    out["stream_ok"] = streamed == full;
    // A stop string of up to 3 characters from the middle of the text, usually spanning tokens.
    size_t begin = full.size() / 2, end = begin;
    while (begin > 0 && (static_cast<unsigned char>(full[begin]) & 0xC0) == 0x80)
      --begin;
    for (int chars = 0; chars < 3 && end < full.size(); ++chars)
      do
        ++end;
      while (end < full.size() && (static_cast<unsigned char>(full[end]) & 0xC0) == 0x80);
    if (end > begin) {
      const std::string stop = full.substr(begin, end - begin);
      troupe::engine::incremental_detokenizer stopping(shared, {stop}, false);
      std::string text;
      for (const auto id : *ids)
        text += stopping.push(id);
      text += stopping.finish();
      out["stop_ok"] = stopping.stopped() && text == full.substr(0, full.find(stop));
    } else {
      out["stop_ok"] = true;
    }
    std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  }
  return 0;
}
