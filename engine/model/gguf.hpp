// Reads GGUF (version 2 and 3) model files, llama.cpp's single-file format: metadata key/values,
// tensor infos, alignment, and the tensor data (mmapped). Used by gguf_weights and by tools that
// inspect a .gguf; open() validates the whole layout once, so later reads cannot run past the
// file. Blocking, any thread; a parsed gguf_file is immutable and safe for concurrent reads.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "engine/model/gguf_dequant.hpp"
#include "engine/model/safetensors.hpp" // mapped_file
#include "runtime/error.hpp"

namespace troupe::engine {

// GGUF value type ids (gguf.h).
enum class gguf_type : uint32_t {
  u8 = 0,
  i8 = 1,
  u16 = 2,
  i16 = 3,
  u32 = 4,
  i32 = 5,
  f32 = 6,
  boolean = 7,
  string = 8,
  array = 9,
  u64 = 10,
  i64 = 11,
  f64 = 12,
};

// One metadata value. Integers of every width widen to int64_t (u64 above INT64_MAX is a parse
// error), floats to double; arrays keep their element kind. Nested arrays are not supported.
struct gguf_value {
  gguf_type type = gguf_type::u8;      // as stored
  gguf_type elem_type = gguf_type::u8; // arrays only
  std::variant<int64_t, double, bool, std::string, std::vector<int64_t>, std::vector<double>,
               std::vector<bool>, std::vector<std::string>>
      value;
};

struct gguf_tensor_info {
  std::string name;
  std::vector<int64_t> dims; // ggml order: dims[0] is the contiguous one (PyTorch's last)
  uint32_t type = 0;         // ggml_type id
  uint64_t offset = 0;       // from the start of the data section
  uint64_t bytes = 0;

  int64_t numel() const;
  int64_t row_size() const { return dims.empty() ? 1 : dims[0]; }
  int64_t num_rows() const { return row_size() == 0 ? 0 : numel() / row_size(); }
  // PyTorch order: dims reversed.
  std::vector<int64_t> torch_shape() const;
};

class gguf_file {
 public:
  static expected<gguf_file> open(const std::filesystem::path& path);
  // Validates a whole file image; `path` only names it in errors. Used by open() and by tests.
  static expected<gguf_file> parse(std::shared_ptr<mapped_file> file,
                                   const std::filesystem::path& path);

  const std::filesystem::path& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  const std::map<std::string, gguf_value, std::less<>>& metadata() const { return metadata_; }
  const std::vector<gguf_tensor_info>& tensors() const { return tensors_; }
  const gguf_tensor_info* find_tensor(std::string_view name) const;
  const gguf_value* find(std::string_view key) const;

  // Typed metadata lookups: nullopt when absent, an error naming the key on a type mismatch.
  expected<std::optional<int64_t>> get_int(std::string_view key) const;
  expected<std::optional<double>> get_float(std::string_view key) const; // ints accepted too
  expected<std::optional<bool>> get_bool(std::string_view key) const;
  expected<std::optional<std::string>> get_string(std::string_view key) const;
  expected<std::optional<std::vector<std::string>>> get_strings(std::string_view key) const;
  expected<std::optional<std::vector<int64_t>>> get_ints(std::string_view key) const;

  // The tensor's raw bytes (t.bytes long, validated at parse).
  const std::byte* data(const gguf_tensor_info& t) const { return data_ + t.offset; }
  // Rows [row_begin, row_end) of a tensor (a row is dims[0] elements) as float32.
  // Errors when the type cannot be dequantised or the range is outside the tensor.
  expected<std::vector<float>> dequantize_rows(const gguf_tensor_info& t, int64_t row_begin,
                                               int64_t row_end) const;
  expected<std::vector<float>> dequantize(const gguf_tensor_info& t) const {
    return dequantize_rows(t, 0, t.num_rows());
  }

 private:
  std::filesystem::path path_;
  std::shared_ptr<mapped_file> file_;
  const std::byte* data_ = nullptr; // start of the (aligned) data section
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  std::map<std::string, gguf_value, std::less<>> metadata_;
  std::vector<gguf_tensor_info> tensors_;
  std::map<std::string, size_t, std::less<>> by_name_;
};

// The tokenizer a GGUF file carries (tokenizer.ggml.* and tokenizer.chat_template), as plain
// data for the tokenizer to be built from. Token types follow llama.cpp: 1 normal, 2 unknown,
// 3 control, 4 user defined, 5 unused, 6 byte.
struct gguf_tokenizer_data {
  std::string model;                // tokenizer.ggml.model: "gpt2" (byte-level BPE), "llama", ...
  std::string pre;                  // tokenizer.ggml.pre: pre-tokenizer name, e.g. "smollm"
  std::vector<std::string> tokens;  // id -> token text (byte-level BPE alphabet for gpt2)
  std::vector<std::string> merges;  // "left right", highest priority first; empty for non-BPE
  std::vector<int32_t> token_types; // per id; empty when the file has none
  std::optional<int32_t> bos_id, eos_id, unk_id, pad_id, eot_id;
  std::optional<bool> add_bos, add_eos; // tokenizer.ggml.add_bos_token / add_eos_token
  std::string chat_template;            // tokenizer.chat_template (Jinja), empty when absent
};

// Reads the tokenizer metadata; errors when tokenizer.ggml.model or .tokens is missing, a
// special id is outside the vocabulary, or token_types does not match tokens in length.
expected<gguf_tokenizer_data> read_gguf_tokenizer(const gguf_file& file);

} // namespace troupe::engine
