#include "cli/generate_command.hpp"

#include <chrono>
#include <memory>
#include <optional>
#include <sstream>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "engine/backend/cpu/cpu_backend.hpp"
#include "engine/exec/cuda_executor.hpp"
#include "engine/generate.hpp"
#include "engine/tokenizer/chat_template.hpp"

namespace troupe::cli {

namespace {

struct generate_args {
  std::string model;
  std::string prompt_ids;
  std::string prompt; // text, tokenized as is
  std::string chat;   // one user message through the model's chat template
  int32_t max_tokens = 16;
  int32_t block_size = 16;
  int32_t prefill_chunk = 0;
  bool ignore_eos = false;
  std::string device = "cpu";
};

expected<std::vector<token_id>> parse_ids(const std::string& text) {
  std::vector<token_id> ids;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    try {
      size_t used = 0;
      long v = std::stol(item, &used);
      if (used != item.size() || v < 0 || v > INT32_MAX)
        throw std::invalid_argument(item);
      ids.push_back(static_cast<token_id>(v));
    } catch (const std::exception&) {
      return make_error(errc::invalid_argument,
                        "--prompt-ids: '{}' is not a token id (expected e.g. 1,2,3)", item);
    }
  }
  if (ids.empty())
    return make_error(errc::invalid_argument, "--prompt-ids: no token ids given");
  return ids;
}

// The prompt's ids from whichever of --prompt-ids, --prompt, --chat was given.
expected<std::vector<token_id>> prompt_tokens(const generate_args& args,
                                              const engine::model_tokenizer* text) {
  if (!args.prompt_ids.empty())
    return parse_ids(args.prompt_ids);
  if (!args.prompt.empty())
    return text->text->encode(args.prompt);
  nlohmann::ordered_json messages = nlohmann::ordered_json::array();
  messages.push_back({{"role", "user"}, {"content", args.chat}});
  return text->encode_chat(messages, engine::chat_options{});
}

int run(const generate_args& args) {
  const int given = !args.prompt_ids.empty() + !args.prompt.empty() + !args.chat.empty();
  if (given != 1) {
    fmt::print(stderr, "error: give exactly one of --prompt-ids, --prompt, --chat\n");
    return 2;
  }
  std::optional<engine::model_tokenizer> text;
  if (args.prompt_ids.empty()) {
    auto loaded = engine::model_tokenizer::load_for_model(args.model);
    if (!loaded) {
      fmt::print(stderr, "error: {}\n", loaded.error().to_string());
      return 1;
    }
    text = std::move(*loaded);
  }
  auto prompt = prompt_tokens(args, text ? &*text : nullptr);
  if (!prompt) {
    fmt::print(stderr, "error: {}\n", prompt.error().message());
    return 2;
  }
  const int64_t tokens = static_cast<int64_t>(prompt->size()) + args.max_tokens;
  engine::kv_cache_options kv{.num_blocks = static_cast<int32_t>(tokens / args.block_size + 1),
                              .block_size = args.block_size};
  auto t0 = std::chrono::steady_clock::now();
  expected<std::unique_ptr<engine::backend>> model = make_error(errc::internal, "no backend");
  if (args.device == "cuda") {
    const int max_len = static_cast<int>(tokens + args.block_size);
    auto gpu = engine::load_cuda_backend(args.model, kv,
                                         {.max_num_batched_tokens = std::max(max_len, 16),
                                          .max_num_seqs = 1,
                                          .max_logit_rows = 1,
                                          .max_model_len = max_len});
    if (gpu)
      model = std::unique_ptr<engine::backend>(std::move(*gpu));
    else
      model = std::move(gpu).error();
  } else {
    auto cpu = engine::cpu_backend::load(args.model, kv);
    if (cpu)
      model = std::unique_ptr<engine::backend>(std::move(*cpu));
    else
      model = std::move(cpu).error();
  }
  if (!model) {
    fmt::print(stderr, "error: {}\n", model.error().to_string());
    return 1;
  }
  auto t1 = std::chrono::steady_clock::now();
  engine::generate_options opts{.max_new_tokens = args.max_tokens,
                                .prefill_chunk = args.prefill_chunk,
                                .stop_at_eos = !args.ignore_eos};
  auto out = engine::generate_greedy(**model, {*prompt}, opts);
  if (!out) {
    fmt::print(stderr, "error: {}\n", out.error().to_string());
    return 1;
  }
  auto t2 = std::chrono::steady_clock::now();
  using ms = std::chrono::duration<double, std::milli>;
  const auto& gen = out->front();
  fmt::print("model: {} ({})\n", args.model, (*model)->config().architecture);
  fmt::print("prompt ids: {}\n", fmt::join(gen.prompt, ","));
  fmt::print("generated ids: {}\n", fmt::join(gen.output, ","));
  if (text)
    fmt::print("generated text: {}\n", text->text->decode(gen.output, true));
  fmt::print(stderr, "load {:.1f} ms, generate {} tokens in {:.1f} ms ({:.1f} tokens/s, {})\n",
             ms(t1 - t0).count(), gen.output.size(), ms(t2 - t1).count(),
             gen.output.size() / std::max(1e-9, ms(t2 - t1).count() / 1000), args.device);
  return 0;
}

} // namespace

void add_generate_command(CLI::App& app, int& exit_code) {
  auto args = std::make_shared<generate_args>();
  auto* cmd =
      app.add_subcommand("generate", "Greedy offline generation on the CPU or CUDA backend");
  cmd->add_option("--model", args->model,
                  "Hugging Face model folder (config.json + safetensors) or a .gguf file")
      ->required();
  cmd->add_option("--prompt-ids", args->prompt_ids, "Prompt token ids, comma separated");
  cmd->add_option("--prompt", args->prompt, "Prompt text, tokenized with the model's tokenizer");
  cmd->add_option("--chat", args->chat, "A user message, rendered with the model's chat template");
  cmd->add_option("--max-tokens", args->max_tokens, "Tokens to generate")
      ->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--block-size", args->block_size, "KV cache block size in tokens")
      ->check(CLI::Range(1, 1024));
  cmd->add_option("--prefill-chunk", args->prefill_chunk,
                  "Prompt tokens per step (0 = whole prompt)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--device", args->device, "cpu (float32) or cuda (bf16, GPU 0)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_flag("--ignore-eos", args->ignore_eos, "Keep generating past EOS");
  cmd->callback([args, &exit_code] { exit_code = run(*args); });
}

} // namespace troupe::cli
