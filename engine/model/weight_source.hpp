// Where a backend reads its weights from, by Hugging Face tensor name: a safetensors folder
// (weight_store) or another container format. Backends load through this interface only.
// Loads block the calling thread; implementations are safe for concurrent loads.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "runtime/error.hpp"

namespace troupe::engine {

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
};

} // namespace troupe::engine
