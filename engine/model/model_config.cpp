#include "engine/model/model_config.hpp"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "runtime/json_depth.hpp"

namespace troupe::engine {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

struct arch_name {
  std::string_view name;
  arch_kind kind;
};
constexpr arch_name architectures[] = {
    {"LlamaForCausalLM", arch_kind::llama},
    {"Qwen2ForCausalLM", arch_kind::qwen2},
    {"Qwen3ForCausalLM", arch_kind::qwen3},
    {"Qwen3MoeForCausalLM", arch_kind::qwen3_moe},
};

// Reads a required integer or an error naming the key.
expected<int64_t> require_int(const json& j, const char* key, std::string_view source) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null())
    return make_error(errc::parse_error, "{}: missing required key \"{}\"", source, key);
  if (!it->is_number_integer())
    return make_error(errc::parse_error, "{}: \"{}\" must be an integer", source, key);
  auto v = it->get<int64_t>();
  if (v <= 0)
    return make_error(errc::parse_error, "{}: \"{}\" must be positive, got {}", source, key, v);
  return v;
}

// An optional field; a wrong type throws json::type_error (caught as "wrong type"). An integer
// field holding a float is refused too: converting 1e300 to int64 is undefined behaviour.
template <class T>
T get_or(const json& j, const char* key, T fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null())
    return fallback;
  if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>)
    if (!it->is_number_integer())
      throw json::type_error::create(302, fmt::format("\"{}\" must be an integer", key), &*it);
  return it->get<T>();
}

// A token id: an integer in [0, 2^31).
expected<int32_t> token_id_value(const json& v, const char* key, std::string_view source) {
  const int64_t id =
      v.is_number_unsigned()
          ? static_cast<int64_t>(std::min<uint64_t>(v.get<uint64_t>(), uint64_t(INT64_MAX)))
          : v.get<int64_t>();
  if (id < 0 || id > INT32_MAX)
    return make_error(errc::parse_error, "{}: {} {} is not a token id", source, key, id);
  return static_cast<int32_t>(id);
}

// A token id field may be an integer or a list of them (other values are not ids: skipped).
expected<void> add_token_ids(const json& j, const char* key, std::vector<int32_t>& out,
                             std::string_view source) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null())
    return {};
  auto add = [&](const json& v) -> expected<void> {
    if (!v.is_number_integer())
      return {};
    auto id = token_id_value(v, key, source);
    if (!id)
      return std::move(id).error();
    if (std::find(out.begin(), out.end(), *id) == out.end())
      out.push_back(*id);
    return {};
  };
  if (it->is_array()) {
    for (auto& v : *it)
      TROUPE_TRY_VOID(add(v));
    return {};
  }
  return add(*it);
}

// bos_token_id when it is an integer.
expected<void> read_bos(const json& j, std::optional<int32_t>& out, std::string_view source) {
  auto bos = j.find("bos_token_id");
  if (bos == j.end() || !bos->is_number_integer())
    return {};
  auto id = token_id_value(*bos, "bos_token_id", source);
  if (!id)
    return std::move(id).error();
  out = *id;
  return {};
}

// rope_theta/rope_scaling at top level (older checkpoints) or rope_parameters (transformers 5).
expected<rope_config> parse_rope(const json& j, std::string_view source) {
  rope_config rope;
  const json* params = nullptr;
  if (auto it = j.find("rope_parameters"); it != j.end() && it->is_object())
    params = &*it;
  else if (auto it = j.find("rope_scaling"); it != j.end() && it->is_object())
    params = &*it;
  rope.theta = get_or<double>(j, "rope_theta", 10000.0);
  if (params == nullptr)
    return rope;
  rope.theta = get_or<double>(*params, "rope_theta", rope.theta);
  std::string type =
      get_or<std::string>(*params, "rope_type", get_or<std::string>(*params, "type", "default"));
  if (type == "default") {
    rope.type = rope_config::kind::standard;
  } else if (type == "linear") {
    rope.type = rope_config::kind::linear;
    rope.factor = get_or<double>(*params, "factor", 1.0);
  } else if (type == "llama3") {
    rope.type = rope_config::kind::llama3;
    rope.factor = get_or<double>(*params, "factor", 8.0);
    rope.low_freq_factor = get_or<double>(*params, "low_freq_factor", 1.0);
    rope.high_freq_factor = get_or<double>(*params, "high_freq_factor", 4.0);
    rope.original_max_position = get_or<int64_t>(*params, "original_max_position_embeddings", 8192);
    if (rope.high_freq_factor <= rope.low_freq_factor)
      return make_error(errc::parse_error,
                        "{}: llama3 rope needs high_freq_factor > low_freq_factor ({} <= {})",
                        source, rope.high_freq_factor, rope.low_freq_factor);
  } else {
    return make_error(errc::unsupported,
                      "{}: rope type '{}' is not supported (supported: default, linear, llama3)",
                      source, type);
  }
  if (rope.factor <= 0)
    return make_error(errc::parse_error, "{}: rope factor must be positive", source);
  return rope;
}

} // namespace

std::string_view supported_architectures() {
  return "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM";
}

bool model_config::is_moe_layer(int64_t layer) const {
  if (num_experts <= 0)
    return false;
  if (std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) != mlp_only_layers.end())
    return false;
  return (layer + 1) % std::max<int64_t>(decoder_sparse_step, 1) == 0;
}

namespace {

// A dimension in [1, limit]: far above any real model, low enough that products of them (weights
// per layer, KV bytes per token) cannot overflow int64 and loops over them end.
expected<void> check_dim(std::string_view source, const char* key, int64_t v, int64_t limit) {
  if (v < 1 || v > limit)
    return make_error(errc::parse_error, "{}: {} must be in [1, {}], got {}", source, key, limit,
                      v);
  return {};
}

} // namespace

expected<void> check_values(const model_config& c, std::string_view source) {
  TROUPE_TRY_VOID(check_dim(source, "vocab_size", c.vocab_size, INT32_MAX));
  TROUPE_TRY_VOID(check_dim(source, "hidden_size", c.hidden_size, 1 << 20));
  TROUPE_TRY_VOID(check_dim(source, "num_hidden_layers", c.num_layers, 1 << 16));
  TROUPE_TRY_VOID(check_dim(source, "num_attention_heads", c.num_heads, 1 << 14));
  TROUPE_TRY_VOID(check_dim(source, "num_key_value_heads", c.num_kv_heads, 1 << 14));
  TROUPE_TRY_VOID(check_dim(source, "head_dim", c.head_dim, 1 << 14));
  if (c.head_dim % 2 != 0)
    return make_error(errc::parse_error, "{}: head_dim={} must be even for RoPE", source,
                      c.head_dim);
  if (c.num_heads % c.num_kv_heads != 0)
    return make_error(errc::parse_error,
                      "{}: num_attention_heads={} is not a multiple of num_key_value_heads={}",
                      source, c.num_heads, c.num_kv_heads);
  TROUPE_TRY_VOID(check_dim(source, "max_position_embeddings", c.max_position_embeddings, 1 << 30));
  if (c.intermediate_size != 0) // 0: every layer is MoE
    TROUPE_TRY_VOID(check_dim(source, "intermediate_size", c.intermediate_size, 1 << 24));
  if (c.num_experts != 0) {
    TROUPE_TRY_VOID(check_dim(source, "num_experts", c.num_experts, 1 << 16));
    TROUPE_TRY_VOID(check_dim(source, "num_experts_per_tok", c.num_experts_per_tok, c.num_experts));
    TROUPE_TRY_VOID(check_dim(source, "moe_intermediate_size", c.moe_intermediate_size, 1 << 24));
    TROUPE_TRY_VOID(check_dim(source, "decoder_sparse_step", c.decoder_sparse_step, 1 << 16));
  }
  if (c.rope.type == rope_config::kind::llama3)
    TROUPE_TRY_VOID(check_dim(source, "rope original_max_position_embeddings",
                              c.rope.original_max_position, 1 << 30));
  if (c.bos_token_id && (*c.bos_token_id < 0 || *c.bos_token_id >= c.vocab_size))
    return make_error(errc::parse_error, "{}: bos_token_id {} is outside the vocabulary (size {})",
                      source, *c.bos_token_id, c.vocab_size);
  auto positive = [&](const char* key, double v) -> expected<void> {
    if (!std::isfinite(v) || v <= 0)
      return make_error(errc::parse_error, "{}: {} must be a finite positive number, got {}",
                        source, key, v);
    return {};
  };
  TROUPE_TRY_VOID(positive("rope_theta", c.rope.theta));
  TROUPE_TRY_VOID(positive("rope factor", c.rope.factor));
  TROUPE_TRY_VOID(positive("rope low_freq_factor", c.rope.low_freq_factor));
  TROUPE_TRY_VOID(positive("rope high_freq_factor", c.rope.high_freq_factor));
  TROUPE_TRY_VOID(positive("rms_norm_eps", c.rms_norm_eps));
  if (c.rms_norm_eps >= 1)
    return make_error(errc::parse_error, "{}: rms_norm_eps must be below 1, got {}", source,
                      c.rms_norm_eps);
  return {};
}

expected<model_config> parse_model_config(std::string_view text, std::string_view source) {
  if (!json_nesting_within(text))
    return make_error(errc::parse_error, "{}: nests deeper than {} levels", source, max_json_depth);
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    return make_error(errc::parse_error, "{}: not valid JSON: {}", source, e.what());
  }
  if (!j.is_object())
    return make_error(errc::parse_error, "{}: not a JSON object", source);
  try {
    model_config c;
    auto archs = j.find("architectures");
    if (archs == j.end() || !archs->is_array() || archs->empty() || !(*archs)[0].is_string())
      return make_error(errc::parse_error, "{}: missing \"architectures\" (supported: {})", source,
                        supported_architectures());
    c.architecture = (*archs)[0].get<std::string>();
    auto known = std::find_if(std::begin(architectures), std::end(architectures),
                              [&](auto& a) { return a.name == c.architecture; });
    if (known == std::end(architectures))
      return make_error(errc::unsupported, "{}: architecture '{}' is not supported (supported: {})",
                        source, c.architecture, supported_architectures());
    c.kind = known->kind;
    std::string saved =
        get_or<std::string>(j, "dtype", get_or<std::string>(j, "torch_dtype", "float32"));
    if (saved == "bfloat16")
      c.checkpoint_dtype = dtype::bf16;
    else if (saved == "float16")
      c.checkpoint_dtype = dtype::f16;

    auto assign = [&](int64_t& field, const char* key) -> expected<void> {
      auto v = require_int(j, key, source);
      if (!v)
        return std::move(v).error();
      field = *v;
      return {};
    };
    TROUPE_TRY_VOID(assign(c.vocab_size, "vocab_size"));
    TROUPE_TRY_VOID(assign(c.hidden_size, "hidden_size"));
    TROUPE_TRY_VOID(assign(c.num_layers, "num_hidden_layers"));
    TROUPE_TRY_VOID(check_dim(source, "num_hidden_layers", c.num_layers, 1 << 16)); // loops below
    TROUPE_TRY_VOID(assign(c.num_heads, "num_attention_heads"));
    c.num_kv_heads = get_or<int64_t>(j, "num_key_value_heads", c.num_heads);
    c.head_dim = get_or<int64_t>(j, "head_dim", 0);
    if (c.head_dim == 0) {
      if (c.hidden_size % c.num_heads != 0)
        return make_error(errc::parse_error,
                          "{}: no head_dim and hidden_size={} is not divisible by "
                          "num_attention_heads={}",
                          source, c.hidden_size, c.num_heads);
      c.head_dim = c.hidden_size / c.num_heads;
    }
    if (c.num_kv_heads <= 0 || c.num_heads % c.num_kv_heads != 0)
      return make_error(errc::parse_error,
                        "{}: num_attention_heads={} is not a multiple of num_key_value_heads={}",
                        source, c.num_heads, c.num_kv_heads);
    if (c.head_dim % 2 != 0)
      return make_error(errc::parse_error, "{}: head_dim={} must be even for RoPE", source,
                        c.head_dim);
    c.max_position_embeddings = get_or<int64_t>(j, "max_position_embeddings", 4096);
    c.rms_norm_eps = get_or<double>(j, "rms_norm_eps", 1e-6);
    c.tie_word_embeddings = get_or<bool>(j, "tie_word_embeddings", false);
    if (auto act = get_or<std::string>(j, "hidden_act", "silu"); act != "silu")
      return make_error(errc::unsupported, "{}: hidden_act '{}' is not supported (only silu)",
                        source, act);
    if (get_or<bool>(j, "mlp_bias", false))
      return make_error(errc::unsupported, "{}: mlp_bias=true is not supported", source);
    if (get_or<bool>(j, "use_sliding_window", false))
      return make_error(errc::unsupported, "{}: use_sliding_window=true is not supported", source);

    switch (c.kind) {
    case arch_kind::qwen2:
      c.attention_bias = true;
      break;
    case arch_kind::llama:
      c.attention_bias = get_or<bool>(j, "attention_bias", false);
      c.o_proj_bias = c.attention_bias;
      break;
    case arch_kind::qwen3:
    case arch_kind::qwen3_moe:
      c.attention_bias = get_or<bool>(j, "attention_bias", false);
      c.qk_norm = true;
      break;
    }
    if (c.kind == arch_kind::qwen3_moe) {
      c.num_experts = get_or<int64_t>(j, "num_experts", get_or<int64_t>(j, "num_local_experts", 0));
      if (c.num_experts <= 0)
        return make_error(errc::parse_error,
                          "{}: Qwen3-MoE needs \"num_experts\" or \"num_local_experts\"", source);
      TROUPE_TRY_VOID(assign(c.num_experts_per_tok, "num_experts_per_tok"));
      TROUPE_TRY_VOID(assign(c.moe_intermediate_size, "moe_intermediate_size"));
      if (c.num_experts_per_tok > c.num_experts)
        return make_error(errc::parse_error, "{}: num_experts_per_tok={} exceeds num_experts={}",
                          source, c.num_experts_per_tok, c.num_experts);
      c.norm_topk_prob = get_or<bool>(j, "norm_topk_prob", false);
      c.decoder_sparse_step = get_or<int64_t>(j, "decoder_sparse_step", 1);
      if (c.decoder_sparse_step <= 0)
        return make_error(errc::parse_error, "{}: decoder_sparse_step must be positive", source);
      for (const auto& l : get_or<json>(j, "mlp_only_layers", json::array())) {
        if (!l.is_number_integer())
          throw json::type_error::create(302, "\"mlp_only_layers\" must hold integers", &l);
        c.mlp_only_layers.push_back(l.get<int64_t>());
      }
    }
    // Dense layers need intermediate_size; an all-MoE model may omit it.
    bool any_dense = false;
    for (int64_t l = 0; l < c.num_layers; ++l)
      any_dense = any_dense || !c.is_moe_layer(l);
    if (any_dense)
      TROUPE_TRY_VOID(assign(c.intermediate_size, "intermediate_size"));

    auto rope = parse_rope(j, source);
    if (!rope)
      return std::move(rope).error();
    c.rope = *rope;
    TROUPE_TRY_VOID(read_bos(j, c.bos_token_id, source));
    TROUPE_TRY_VOID(add_token_ids(j, "eos_token_id", c.eos_token_ids, source));
    TROUPE_TRY_VOID(check_values(c, source));
    return c;
  } catch (const json::exception& e) {
    return make_error(errc::parse_error, "{}: a field has the wrong type: {}", source, e.what());
  }
}

expected<model_config> load_model_config(const fs::path& dir) {
  auto read = [](const fs::path& p) -> expected<std::string> {
    std::ifstream in(p);
    if (!in)
      return make_error(errc::not_found, "{}: cannot read", p.string());
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  };
  auto path = dir / "config.json";
  auto text = read(path);
  if (!text)
    return std::move(text).error();
  auto config = parse_model_config(*text, path.string());
  if (!config)
    return config;
  auto gen_path = dir / "generation_config.json";
  std::error_code ec;
  if (fs::exists(gen_path, ec)) {
    auto gen_text = read(gen_path);
    if (!gen_text)
      return std::move(gen_text).error();
    if (!json_nesting_within(*gen_text))
      return make_error(errc::parse_error, "{}: nests deeper than {} levels", gen_path.string(),
                        max_json_depth);
    try {
      auto gen = json::parse(*gen_text);
      TROUPE_TRY_VOID(add_token_ids(gen, "eos_token_id", config->eos_token_ids, gen_path.string()));
      TROUPE_TRY_VOID(read_bos(gen, config->bos_token_id, gen_path.string()));
    } catch (const json::exception& e) {
      return make_error(errc::parse_error, "{}: not valid JSON: {}", gen_path.string(), e.what());
    }
  }
  return config;
}

} // namespace troupe::engine
