// A model's architecture as read from Hugging Face config.json (+ generation_config.json).
// Parsed once at load by every backend and by the placement actor (head counts for TP checks).
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "engine/model/dtype.hpp"
#include "runtime/error.hpp"

namespace troupe::engine {

enum class arch_kind : uint8_t { llama, qwen2, qwen3, qwen3_moe };

// The `architectures` values we accept, for error messages.
std::string_view supported_architectures();

struct rope_config {
  enum class kind : uint8_t { standard, linear, llama3 };
  kind type = kind::standard;
  double theta = 10000.0;
  double factor = 1.0;                  // linear and llama3
  double low_freq_factor = 1.0;         // llama3
  double high_freq_factor = 4.0;        // llama3
  int64_t original_max_position = 8192; // llama3
};

struct model_config {
  std::string architecture;            // as spelled in config.json, e.g. "Qwen3ForCausalLM"
  dtype checkpoint_dtype = dtype::f32; // "dtype" / "torch_dtype": what the weights were saved as
  arch_kind kind = arch_kind::llama;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  bool attention_bias = false; // bias on q/k/v (Qwen2 always; Llama/Qwen3 when attention_bias)
  bool o_proj_bias = false;    // Llama's attention_bias also covers o_proj
  bool qk_norm = false;        // Qwen3: RMSNorm over each head of q and k before RoPE
  bool tie_word_embeddings = false;
  rope_config rope;

  // Mixture of experts (Qwen3-MoE); num_experts == 0 for dense models.
  int64_t num_experts = 0;
  int64_t num_experts_per_tok = 0;
  int64_t moe_intermediate_size = 0;
  bool norm_topk_prob = false;
  int64_t decoder_sparse_step = 1;
  std::vector<int64_t> mlp_only_layers;

  std::optional<int32_t> bos_token_id;
  std::vector<int32_t> eos_token_ids; // config.json and generation_config.json, merged

  bool is_moe_layer(int64_t layer) const;
  int64_t q_size() const { return num_heads * head_dim; }
  int64_t kv_size() const { return num_kv_heads * head_dim; }
};

// Parses config.json text; `source` names it in errors. Unknown keys are ignored (HF configs carry
// many training-only fields); missing required keys and unsupported features are errors.
expected<model_config> parse_model_config(std::string_view json_text, std::string_view source);
// Rejects values that would load and then compute NaN or garbage: non-finite or non-positive RoPE
// theta and factors, RMS epsilon outside (0, 1). Called by both config readers (JSON and GGUF).
expected<void> check_values(const model_config& c, std::string_view source);
// Reads DIR/config.json and, when present, DIR/generation_config.json.
expected<model_config> load_model_config(const std::filesystem::path& dir);

} // namespace troupe::engine
