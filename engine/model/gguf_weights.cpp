#include "engine/model/gguf_weights.hpp"

#include <algorithm>
#include <charconv>

namespace troupe::engine {

namespace {

struct name_pair {
  std::string_view hf;   // after "model.layers.N." for per-layer names
  std::string_view gguf; // after "blk.N."
};

constexpr name_pair global_names[] = {
    {"model.embed_tokens.weight", "token_embd.weight"},
    {"model.norm.weight", "output_norm.weight"},
    {"lm_head.weight", "output.weight"},
};

constexpr name_pair layer_names[] = {
    {"input_layernorm.weight", "attn_norm.weight"},
    {"post_attention_layernorm.weight", "ffn_norm.weight"},
    {"self_attn.q_proj.weight", "attn_q.weight"},
    {"self_attn.k_proj.weight", "attn_k.weight"},
    {"self_attn.v_proj.weight", "attn_v.weight"},
    {"self_attn.o_proj.weight", "attn_output.weight"},
    {"self_attn.q_proj.bias", "attn_q.bias"},
    {"self_attn.k_proj.bias", "attn_k.bias"},
    {"self_attn.v_proj.bias", "attn_v.bias"},
    {"self_attn.o_proj.bias", "attn_output.bias"},
    {"mlp.gate_proj.weight", "ffn_gate.weight"},
    {"mlp.up_proj.weight", "ffn_up.weight"},
    {"mlp.down_proj.weight", "ffn_down.weight"},
};

// Reads a required positive integer `<arch>.<key>` or an error naming it.
expected<int64_t> require_int(const gguf_file& f, const std::string& key) {
  auto v = f.get_int(key);
  if (!v)
    return std::move(v).error();
  if (!*v)
    return make_error(errc::parse_error, "{}: missing required metadata {}", f.path().string(),
                      key);
  if (**v <= 0)
    return make_error(errc::parse_error, "{}: {} must be positive, got {}", f.path().string(), key,
                      **v);
  return **v;
}

expected<void> read_rope(const gguf_file& f, const std::string& a, model_config& c) {
  const std::string where = f.path().string();
  auto theta = f.get_float(a + ".rope.freq_base");
  if (!theta)
    return std::move(theta).error();
  c.rope.theta = theta->value_or(10000.0);
  auto dims = f.get_int(a + ".rope.dimension_count");
  if (!dims)
    return std::move(dims).error();
  if (*dims && **dims != c.head_dim)
    return make_error(errc::unsupported,
                      "{}: {}.rope.dimension_count = {} (partial rotary) is not "
                      "supported; head_dim is {}",
                      where, a, **dims, c.head_dim);
  if (f.find_tensor("rope_freqs.weight") != nullptr)
    return make_error(errc::unsupported,
                      "{}: per-frequency rope factors (rope_freqs.weight, Llama 3.1 "
                      "style) are not supported for GGUF yet",
                      where);
  auto type = f.get_string(a + ".rope.scaling.type");
  if (!type)
    return std::move(type).error();
  if (!*type || **type == "none")
    return {};
  if (**type != "linear")
    return make_error(errc::unsupported,
                      "{}: {}.rope.scaling.type '{}' is not supported (none, linear)", where, a,
                      **type);
  auto factor = f.get_float(a + ".rope.scaling.factor");
  if (!factor)
    return std::move(factor).error();
  c.rope.type = rope_config::kind::linear;
  c.rope.factor = factor->value_or(1.0);
  if (c.rope.factor <= 0)
    return make_error(errc::parse_error, "{}: {}.rope.scaling.factor must be positive", where, a);
  return {};
}

// bos from tokenizer.ggml.bos_token_id; eos ids from eos_token_id and eot_token_id.
expected<void> read_special_ids(const gguf_file& f, model_config& c) {
  for (auto [key, is_bos] : {std::pair{"tokenizer.ggml.bos_token_id", true},
                             std::pair{"tokenizer.ggml.eos_token_id", false},
                             std::pair{"tokenizer.ggml.eot_token_id", false}}) {
    auto id = f.get_int(key);
    if (!id)
      return std::move(id).error();
    if (!*id)
      continue;
    if (**id < 0 || **id >= c.vocab_size)
      return make_error(errc::parse_error, "{}: {} {} is outside the vocabulary (size {})",
                        f.path().string(), key, **id, c.vocab_size);
    if (is_bos)
      c.bos_token_id = static_cast<int32_t>(**id);
    else if (std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), **id) ==
             c.eos_token_ids.end())
      c.eos_token_ids.push_back(static_cast<int32_t>(**id));
  }
  return {};
}

// llama.cpp stores each head's Q/K rows interleaved for its rotary kernel: HF row
// h*D + i*(D/2) + j (i in {0,1}) is GGUF row h*D + 2*j + i. The GGUF row of HF row r.
int64_t rope_row(int64_t r, int64_t D) {
  const int64_t half = D / 2, h = r / D, i = (r % D) / half, j = r % half;
  return h * D + 2 * j + i;
}

} // namespace

std::optional<std::string> gguf_tensor_name(std::string_view hf) {
  for (const auto& n : global_names)
    if (n.hf == hf)
      return std::string(n.gguf);
  constexpr std::string_view prefix = "model.layers.";
  if (!hf.starts_with(prefix))
    return std::nullopt;
  hf.remove_prefix(prefix.size());
  auto dot = hf.find('.');
  if (dot == std::string_view::npos || dot == 0)
    return std::nullopt;
  int64_t layer = 0;
  auto [end, ec] = std::from_chars(hf.data(), hf.data() + dot, layer);
  if (ec != std::errc() || end != hf.data() + dot)
    return std::nullopt;
  std::string_view rest = hf.substr(dot + 1);
  for (const auto& n : layer_names)
    if (n.hf == rest)
      return fmt::format("blk.{}.{}", layer, n.gguf);
  return std::nullopt;
}

expected<model_config> peek_model_config(const std::filesystem::path& path) {
  auto gguf = gguf_model_file(path);
  if (!gguf)
    return std::move(gguf).error();
  if (!*gguf)
    return load_model_config(path);
  auto file = gguf_file::open(**gguf);
  if (!file)
    return std::move(file).error();
  return gguf_model_config(*file);
}

expected<std::optional<std::filesystem::path>> gguf_model_file(const std::filesystem::path& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (path.extension() == ".gguf" && !fs::is_directory(path, ec))
    return std::optional<fs::path>(path);
  if (!fs::is_directory(path, ec) || fs::exists(path / "config.json", ec))
    return std::optional<fs::path>();
  std::vector<fs::path> found;
  for (const auto& e : fs::directory_iterator(path, ec))
    if (e.path().extension() == ".gguf" && e.is_regular_file(ec))
      found.push_back(e.path());
  if (found.size() > 1) {
    std::sort(found.begin(), found.end());
    std::string names;
    for (const auto& f : found)
      names += (names.empty() ? "" : ", ") + f.filename().string();
    return make_error(errc::invalid_argument,
                      "{}: several .gguf files and no config.json ({}); name the file instead",
                      path.string(), names);
  }
  if (found.empty())
    return std::optional<fs::path>();
  return std::optional<fs::path>(found.front());
}

expected<model_config> gguf_model_config(const gguf_file& f) {
  const std::string where = f.path().string();
  auto arch = f.get_string("general.architecture");
  if (!arch)
    return std::move(arch).error();
  if (!*arch)
    return make_error(errc::parse_error, "{}: missing general.architecture", where);
  if (**arch != "llama")
    return make_error(errc::unsupported,
                      "{}: GGUF architecture '{}' is not supported (supported: llama)", where,
                      **arch);
  const std::string a = **arch;
  model_config c;
  c.architecture = "LlamaForCausalLM";
  c.kind = arch_kind::llama;
  c.checkpoint_dtype = dtype::f32; // dequantised weights are float32
  TROUPE_ASSIGN(c.hidden_size, require_int(f, a + ".embedding_length"));
  TROUPE_ASSIGN(c.intermediate_size, require_int(f, a + ".feed_forward_length"));
  TROUPE_ASSIGN(c.num_layers, require_int(f, a + ".block_count"));
  TROUPE_ASSIGN(c.num_heads, require_int(f, a + ".attention.head_count"));
  TROUPE_ASSIGN(c.max_position_embeddings, require_int(f, a + ".context_length"));
  c.num_kv_heads = c.num_heads;
  if (f.find(a + ".attention.head_count_kv") != nullptr)
    TROUPE_ASSIGN(c.num_kv_heads, require_int(f, a + ".attention.head_count_kv"));
  c.head_dim = c.hidden_size / c.num_heads;
  if (f.find(a + ".attention.key_length") != nullptr)
    TROUPE_ASSIGN(c.head_dim, require_int(f, a + ".attention.key_length"));
  if (c.num_heads % c.num_kv_heads != 0)
    return make_error(errc::parse_error, "{}: head_count {} is not a multiple of head_count_kv {}",
                      where, c.num_heads, c.num_kv_heads);
  auto eps = f.get_float(a + ".attention.layer_norm_rms_epsilon");
  if (!eps)
    return std::move(eps).error();
  c.rms_norm_eps = eps->value_or(1e-5);
  TROUPE_TRY_VOID(read_rope(f, a, c));

  const gguf_tensor_info* embd = f.find_tensor("token_embd.weight");
  if (embd == nullptr || embd->dims.size() != 2)
    return make_error(errc::parse_error, "{}: missing 2-D tensor token_embd.weight", where);
  c.vocab_size = embd->dims[1];
  if (auto v = f.get_int(a + ".vocab_size"); v && *v && **v != c.vocab_size)
    return make_error(errc::parse_error, "{}: {}.vocab_size {} differs from token_embd rows {}",
                      where, a, **v, c.vocab_size);
  c.tie_word_embeddings = f.find_tensor("output.weight") == nullptr;
  c.attention_bias = f.find_tensor("blk.0.attn_q.bias") != nullptr;
  c.o_proj_bias = f.find_tensor("blk.0.attn_output.bias") != nullptr;

  TROUPE_TRY_VOID(read_special_ids(f, c));
  TROUPE_TRY_VOID(check_values(c, where));
  return c;
}

// ---- gguf_weights -----------------------------------------------------------------------------

expected<gguf_weights> gguf_weights::open(const std::filesystem::path& path) {
  auto file = gguf_file::open(path);
  if (!file)
    return std::move(file).error();
  return gguf_weights(std::move(*file));
}

gguf_weights::gguf_weights(gguf_file file) : file_(std::move(file)) {
  // head counts for un-permuting Q and K (llama.cpp's convert_hf_to_gguf.py permutes them)
  if (auto arch = file_.get_string("general.architecture"); arch && *arch && **arch == "llama") {
    auto heads = file_.get_int(**arch + ".attention.head_count");
    auto kv = file_.get_int(**arch + ".attention.head_count_kv");
    num_heads_ = heads && *heads ? **heads : 0;
    num_kv_heads_ = kv && *kv ? **kv : num_heads_;
  }
}

bool gguf_weights::contains(std::string_view name) const {
  auto g = gguf_tensor_name(name);
  return g && file_.find_tensor(*g) != nullptr;
}

expected<gguf_weights::located> gguf_weights::checked(std::string_view name,
                                                      const std::vector<int64_t>& shape) const {
  auto g = gguf_tensor_name(name);
  const gguf_tensor_info* t = g ? file_.find_tensor(*g) : nullptr;
  if (t == nullptr)
    return make_error(errc::not_found, "{}: no tensor {} ({})", file_.path().string(), name,
                      g ? *g : std::string("no GGUF counterpart"));
  auto have = t->torch_shape();
  if (have != shape)
    return make_error(errc::invalid_argument, "{}: tensor {} ({}) has shape {}, expected {}",
                      file_.path().string(), name, t->name, format_shape(have),
                      format_shape(shape));
  int64_t heads = 0;
  if (g->ends_with(".attn_q.weight") || g->ends_with(".attn_q.bias"))
    heads = num_heads_;
  else if (g->ends_with(".attn_k.weight") || g->ends_with(".attn_k.bias"))
    heads = num_kv_heads_;
  const int64_t rows = shape.front();
  if (heads > 0 && (rows % heads != 0 || (rows / heads) % 2 != 0))
    return make_error(errc::parse_error, "{}: tensor {} has {} rows, not {} heads of even size",
                      file_.path().string(), t->name, rows, heads);
  return located{t, heads};
}

expected<std::vector<float>> gguf_weights::load_f32(std::string_view name,
                                                    std::vector<int64_t> shape) const {
  return load_f32_rows(name, shape, 0, shape.empty() ? 0 : shape.front());
}

expected<std::vector<float>> gguf_weights::load_f32_rows(std::string_view name,
                                                         std::vector<int64_t> shape,
                                                         int64_t row_begin, int64_t row_end) const {
  auto loc = checked(name, shape);
  if (!loc)
    return std::move(loc).error();
  const gguf_tensor_info& t = *loc->info;
  if (shape.empty() || row_begin < 0 || row_begin > row_end || row_end > shape.front())
    return make_error(errc::out_of_range, "{}: rows [{}, {}) of tensor {} with shape {}",
                      file_.path().string(), row_begin, row_end, name, format_shape(shape));
  if (shape.size() == 1) { // a vector: its "rows" are elements of the single GGUF row
    auto all = file_.dequantize(t);
    if (!all)
      return std::move(all).error();
    std::vector<float> out;
    for (int64_t r = row_begin; r < row_end; ++r) // a Q/K bias carries its rows' permutation
      out.push_back((*all)[static_cast<size_t>(
          loc->rope_heads > 0 ? rope_row(r, shape[0] / loc->rope_heads) : r)]);
    return out;
  }
  if (loc->rope_heads == 0)
    return file_.dequantize_rows(t, row_begin, row_end);
  // Undo the rotary interleaving row by row.
  const int64_t D = shape.front() / loc->rope_heads, n = t.row_size();
  std::vector<float> out(static_cast<size_t>((row_end - row_begin) * n));
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t src = rope_row(r, D);
    auto row = file_.dequantize_rows(t, src, src + 1);
    if (!row)
      return std::move(row).error();
    std::copy(row->begin(), row->end(), out.begin() + (r - row_begin) * n);
  }
  return out;
}

expected<std::vector<float>> gguf_weights::load_f32_cols(std::string_view name,
                                                         std::vector<int64_t> shape,
                                                         int64_t col_begin, int64_t col_end) const {
  if (shape.size() != 2 || col_begin < 0 || col_begin > col_end || col_end > shape[1])
    return make_error(errc::out_of_range, "{}: columns [{}, {}) of tensor {} with shape {}",
                      file_.path().string(), col_begin, col_end, name, format_shape(shape));
  auto all = load_f32(name, shape);
  if (!all)
    return std::move(all).error();
  const int64_t rows = shape[0], cols = shape[1], w = col_end - col_begin;
  std::vector<float> out(static_cast<size_t>(rows * w));
  for (int64_t r = 0; r < rows; ++r)
    std::copy_n(all->begin() + r * cols + col_begin, w, out.begin() + r * w);
  return out;
}

expected<uint64_t> gguf_weights::read_bytes(const weight_slice& p) const {
  auto loc = checked(p.name, p.shape);
  if (!loc)
    return std::move(loc).error();
  const gguf_tensor_info& t = *loc->info;
  // Rows of a matrix are dequantised row by row; a vector, or columns, from the whole tensor.
  if (p.by_cols || p.shape.size() < 2 || t.num_rows() == 0)
    return t.bytes;
  return t.bytes / static_cast<uint64_t>(t.num_rows()) * static_cast<uint64_t>(p.end - p.begin);
}

} // namespace troupe::engine
