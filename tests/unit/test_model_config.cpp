#include <cmath>
#include <numbers>

#include <doctest/doctest.h>

#include "engine/model/model_config.hpp"
#include "engine/model/rope.hpp"
#include "golden.hpp"
#include "safetensors_writer.hpp"

using namespace troupe;
using namespace troupe::engine;
using json = nlohmann::json;

namespace {

json qwen3_moe() {
  return {{"architectures", {"Qwen3MoeForCausalLM"}},
          {"vocab_size", 100},
          {"hidden_size", 64},
          {"intermediate_size", 128},
          {"moe_intermediate_size", 48},
          {"num_hidden_layers", 4},
          {"num_attention_heads", 4},
          {"num_key_value_heads", 2},
          {"head_dim", 16},
          {"num_experts", 8},
          {"num_experts_per_tok", 2},
          {"norm_topk_prob", true},
          {"decoder_sparse_step", 2},
          {"mlp_only_layers", {3}},
          {"rope_theta", 1000000.0},
          {"eos_token_id", {5, 6}}};
}

expected<model_config> parse(const json& j) {
  return parse_model_config(j.dump(), "config.json");
}

} // namespace

TEST_CASE("config: Qwen3-MoE fields and which layers are sparse") {
  auto c = parse(qwen3_moe());
  REQUIRE_MESSAGE(c.has_value(), (c ? "" : c.error().to_string()));
  CHECK(c->kind == arch_kind::qwen3_moe);
  CHECK(c->qk_norm);
  CHECK(c->num_experts == 8);
  CHECK(c->norm_topk_prob);
  CHECK(c->rope.theta == 1000000.0);
  CHECK(c->eos_token_ids == std::vector<int32_t>{5, 6});
  // decoder_sparse_step 2: layers 1 and 3 would be sparse, but layer 3 is in mlp_only_layers.
  CHECK_FALSE(c->is_moe_layer(0));
  CHECK(c->is_moe_layer(1));
  CHECK_FALSE(c->is_moe_layer(2));
  CHECK_FALSE(c->is_moe_layer(3));

  auto j = qwen3_moe();
  j.erase("num_experts");
  j["num_local_experts"] = 8; // the transformers 5 spelling
  auto c2 = parse(j);
  REQUIRE(c2.has_value());
  CHECK(c2->num_experts == 8);
  j.erase("num_local_experts");
  CHECK(parse(j).error().message().find("num_local_experts") != std::string::npos);
}

TEST_CASE("config: both rope spellings give the same llama3 scaling") {
  json old_style = {{"architectures", {"LlamaForCausalLM"}},
                    {"vocab_size", 10},
                    {"hidden_size", 32},
                    {"intermediate_size", 64},
                    {"num_hidden_layers", 1},
                    {"num_attention_heads", 2},
                    {"rope_theta", 500000.0},
                    {"rope_scaling",
                     {{"rope_type", "llama3"},
                      {"factor", 8.0},
                      {"low_freq_factor", 1.0},
                      {"high_freq_factor", 4.0},
                      {"original_max_position_embeddings", 64}}}};
  json new_style = old_style;
  new_style.erase("rope_theta");
  new_style.erase("rope_scaling");
  new_style["rope_parameters"] = old_style["rope_scaling"];
  new_style["rope_parameters"]["rope_theta"] = 500000.0;
  auto a = parse(old_style);
  auto b = parse(new_style);
  REQUIRE(a.has_value());
  REQUIRE(b.has_value());
  CHECK(a->head_dim == 16); // hidden / heads when head_dim is absent
  CHECK(a->num_kv_heads == 2);
  CHECK(a->rope.type == rope_config::kind::llama3);
  auto fa = rope_inv_freq(*a);
  auto fb = rope_inv_freq(*b);
  CHECK(fa == fb);
  // The same formula written out: wavelengths above 64 tokens are divided by 8, below 16 kept.
  REQUIRE(fa.size() == 8);
  for (size_t i = 0; i < fa.size(); ++i) {
    double base = 1.0 / std::pow(500000.0, 2.0 * static_cast<double>(i) / 16.0);
    double wavelen = 2 * std::numbers::pi / base;
    double want = base;
    if (wavelen > 64)
      want = base / 8;
    else if (wavelen >= 16) {
      double smooth = (64 / wavelen - 1) / 3;
      want = (1 - smooth) * base / 8 + smooth * base;
    }
    CHECK(fa[i] == doctest::Approx(want).epsilon(1e-5));
  }
}

TEST_CASE("config: Qwen2 always has q/k/v bias, Llama attention_bias covers o_proj") {
  json q2 = {{"architectures", {"Qwen2ForCausalLM"}},
             {"vocab_size", 10},
             {"hidden_size", 32},
             {"intermediate_size", 64},
             {"num_hidden_layers", 1},
             {"num_attention_heads", 4},
             {"num_key_value_heads", 2},
             {"tie_word_embeddings", true}};
  auto c = parse(q2);
  REQUIRE(c.has_value());
  CHECK(c->attention_bias);
  CHECK_FALSE(c->o_proj_bias);
  CHECK(c->tie_word_embeddings);
  CHECK(c->head_dim == 8);
  json llama = q2;
  llama["architectures"] = {"LlamaForCausalLM"};
  llama["attention_bias"] = true;
  c = parse(llama);
  REQUIRE(c.has_value());
  CHECK(c->o_proj_bias);
}

TEST_CASE("config: clear errors for unsupported or malformed configs") {
  json j = qwen3_moe();
  j["architectures"] = {"MistralForCausalLM"};
  auto c = parse(j);
  REQUIRE_FALSE(c.has_value());
  CHECK(c.error().code() == errc::unsupported);
  CHECK(c.error().message().find("architecture 'MistralForCausalLM' is not supported (supported: "
                                 "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "
                                 "Qwen3MoeForCausalLM)") != std::string::npos);

  j = qwen3_moe();
  j.erase("hidden_size");
  CHECK(parse(j).error().message() == "config.json: missing required key \"hidden_size\"");

  j = qwen3_moe();
  j["num_key_value_heads"] = 3;
  CHECK(parse(j).error().message().find("num_attention_heads=4 is not a multiple of "
                                        "num_key_value_heads=3") != std::string::npos);

  j = qwen3_moe();
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  CHECK(parse(j).error().message().find("rope type 'yarn' is not supported") != std::string::npos);

  j = qwen3_moe();
  j["num_attention_heads"] = "four";
  CHECK(parse(j).error().message().find("\"num_attention_heads\" must be an integer") !=
        std::string::npos);

  CHECK(parse_model_config("{\"architectures\": [", "x/config.json")
            .error()
            .message()
            .find("x/config.json: not valid JSON") != std::string::npos);
}

TEST_CASE("config: generation_config.json adds EOS ids") {
  test::temp_dir tmp;
  test::tiny_llama m;
  test::write_text(tmp.path() / "config.json", m.config().dump());
  test::write_text(tmp.path() / "generation_config.json",
                   R"({"eos_token_id": [2, 9], "bos_token_id": 1})");
  auto c = load_model_config(tmp.path());
  REQUIRE(c.has_value());
  CHECK(c->eos_token_ids == std::vector<int32_t>{2, 9});
  CHECK(c->bos_token_id == 1);
  auto missing = load_model_config(tmp.path() / "nope");
  REQUIRE_FALSE(missing.has_value());
  CHECK(missing.error().code() == errc::not_found);
}

TEST_CASE("config: every golden model parses") {
  auto dir = test::golden_dir();
  if (!dir)
    return;
  for (auto name : {"tiny-qwen3", "tiny-qwen2", "tiny-llama", "tiny-qwen3-moe"}) {
    CAPTURE(name);
    auto c = load_model_config(*dir / "models" / name);
    REQUIRE_MESSAGE(c.has_value(), (c ? "" : c.error().to_string()));
  }
}

TEST_CASE("rope frequencies are rounded to the checkpoint dtype, as Hugging Face does") {
  json j = {{"architectures", {"Qwen2ForCausalLM"}},
            {"vocab_size", 10},
            {"hidden_size", 64},
            {"intermediate_size", 64},
            {"num_hidden_layers", 1},
            {"num_attention_heads", 4},
            {"rope_theta", 10000.0}};
  auto f32 = parse(j);
  j["dtype"] = "bfloat16";
  auto bf16 = parse(j);
  REQUIRE(f32.has_value());
  REQUIRE(bf16.has_value());
  CHECK(bf16->checkpoint_dtype == dtype::bf16);
  auto exact = rope_inv_freq(*f32);
  auto rounded = rope_inv_freq(*bf16);
  REQUIRE(exact.size() == 8);
  CHECK(exact[1] == doctest::Approx(std::pow(10000.0, -2.0 / 16)));
  for (size_t i = 0; i < exact.size(); ++i)
    CHECK(rounded[i] == round_to_bf16(exact[i]));
  CHECK(rounded[1] != exact[1]);
  CHECK(round_to_bf16(1.0f + 0x1p-8f) == 1.0f);               // tie to even
  CHECK(round_to_bf16(1.0f + 3 * 0x1p-8f) == 1.0f + 0x1p-6f); // tie to even, upwards
}

TEST_CASE("config: values that would compute NaN are refused, naming the key") {
  auto refused = [](const char* key, double v, const char* in_message) {
    auto j = qwen3_moe();
    j[key] = v;
    auto c = parse(j);
    REQUIRE_FALSE(c.has_value());
    CHECK(c.error().code() == errc::parse_error);
    CHECK_MESSAGE(c.error().message().find(in_message) != std::string::npos, c.error().message());
  };
  refused("rope_theta", -1.0, "rope_theta must be a finite positive number");
  refused("rope_theta", 0.0, "rope_theta");
  refused("rms_norm_eps", 0.0, "rms_norm_eps must be a finite positive number");
  refused("rms_norm_eps", -1e-6, "rms_norm_eps");
  refused("rms_norm_eps", 2.0, "rms_norm_eps must be below 1");
  auto ok = qwen3_moe();
  ok["rms_norm_eps"] = 1e-5;
  CHECK(parse(ok).has_value());
}

TEST_CASE("config: every dimension is range-checked at load, naming the key and value") {
  auto refused = [](const char* key, json v, const char* in_message) {
    CAPTURE(key);
    auto j = qwen3_moe();
    j[key] = v;
    auto c = parse(j);
    REQUIRE_FALSE(c.has_value());
    CHECK_MESSAGE(c.error().message().find(in_message) != std::string::npos, c.error().message());
  };
  // A layer count of 2^62 once made the parse loop over every layer (a hang).
  refused("num_hidden_layers", int64_t{1} << 62, "num_hidden_layers must be in [1, 65536], got");
  refused("vocab_size", int64_t{1} << 40, "vocab_size must be in [1, 2147483647], got");
  refused("hidden_size", int64_t{1} << 30, "hidden_size must be in [1, 1048576], got 1073741824");
  refused("num_attention_heads", 1 << 20, "num_attention_heads must be in");
  refused("num_key_value_heads", -2, "num_attention_heads=4 is not a multiple of");
  refused("head_dim", -16, "head_dim must be in [1, 16384], got -16");
  refused("head_dim", 15, "head_dim=15 must be even");
  refused("max_position_embeddings", -1, "max_position_embeddings must be in [1, 1073741824]");
  refused("moe_intermediate_size", int64_t{1} << 40, "moe_intermediate_size must be in");
  refused("num_experts", 1 << 20, "num_experts must be in [1, 65536]");
  refused("decoder_sparse_step", int64_t{1} << 40, "decoder_sparse_step must be in");
  refused("bos_token_id", int64_t{1} << 33, "bos_token_id 8589934592 is not a token id");
  refused("bos_token_id", 100, "bos_token_id 100 is outside the vocabulary (size 100)");
  refused("eos_token_id", json{5, -1}, "eos_token_id -1 is not a token id");
  // JSON has no NaN, and an overflowing literal is a parse error, not infinity.
  std::string inf = qwen3_moe().dump();
  inf.insert(inf.size() - 1, R"(, "rms_norm_eps": 1e999)");
  auto c_inf = parse_model_config(inf, "config.json");
  REQUIRE_FALSE(c_inf.has_value());
  CHECK_MESSAGE(c_inf.error().message().find("1e999") != std::string::npos,
                c_inf.error().message());
  // An integer field holding a float (converting 1e300 to int64 is undefined behaviour).
  refused("num_key_value_heads", 1e300, "\"num_key_value_heads\" must be an integer");
  refused("mlp_only_layers", json{1.5e300}, "\"mlp_only_layers\" must hold integers");
  // Deep JSON is refused before it is parsed.
  std::string deep = qwen3_moe().dump();
  deep.insert(deep.size() - 1, R"(, "x": )" + std::string(100000, '[') + std::string(100000, ']'));
  auto c = parse_model_config(deep, "config.json");
  REQUIRE_FALSE(c.has_value());
  CHECK(c.error().message().find("nests deeper than 64 levels") != std::string::npos);
}
