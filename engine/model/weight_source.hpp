// Where a backend reads its weights from, by Hugging Face tensor name: a safetensors folder
// (weight_store) or another container format. Backends load through this interface only.
// Loads block the calling thread; implementations are safe for concurrent loads.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/error.hpp"

namespace troupe::engine {

class weight_store;

// One read of a rank's load: rows [begin, end) of the first dimension of a tensor of `shape`, or
// (by_cols) columns [begin, end) of a 2-D one. A whole tensor is rows [0, shape[0]).
struct weight_slice {
  std::string name;
  std::vector<int64_t> shape;
  int64_t begin = 0, end = 0;
  bool by_cols = false;
  int64_t cols() const { return by_cols ? end - begin : shape.size() > 1 ? shape[1] : 1; }
  int64_t rows() const { return by_cols ? shape[0] : end - begin; }
};

class weight_source {
 public:
  virtual ~weight_source() = default;

  virtual bool contains(std::string_view name) const = 0;
  // Whole tensor as float32 after checking that its shape is `shape` (PyTorch order, e.g.
  // [out_features, in_features]); errors name the tensor and both shapes.
  virtual expected<std::vector<float>> load_f32(std::string_view name,
                                                std::vector<int64_t> shape) const = 0;
  // Rows [row_begin, row_end) of the first dimension (shape checked in full first): sharding by
  // output features for tensor parallelism. Reads only those rows where the format allows.
  virtual expected<std::vector<float>> load_f32_rows(std::string_view name,
                                                     std::vector<int64_t> shape, int64_t row_begin,
                                                     int64_t row_end) const = 0;
  // Columns [col_begin, col_end) of a 2-D tensor: sharding by input features.
  virtual expected<std::vector<float>> load_f32_cols(std::string_view name,
                                                     std::vector<int64_t> shape, int64_t col_begin,
                                                     int64_t col_end) const = 0;
  // The bytes of storage a load of `slice` reads, in the stored type (a slice of a safetensors
  // tensor, the quantised blocks of GGUF rows, a whole GGUF tensor where the format decodes it
  // whole). Errors like the load for a tensor that is missing. Sums of these are a rank's total
  // for load progress (load_progress.hpp).
  virtual expected<uint64_t> read_bytes(const weight_slice& slice) const = 0;
  // The safetensors store behind this source, whose bytes a loader may copy directly; null for
  // other formats.
  virtual const weight_store* store() const { return nullptr; }
};

} // namespace troupe::engine
