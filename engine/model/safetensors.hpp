// Reads Hugging Face safetensors checkpoints: one file, or a sharded folder with
// model.safetensors.index.json. Files are mmapped and validated once at open; loaders copy
// (and convert to float32) only the slices a rank needs. Blocking, any thread; not thread-safe
// for concurrent open, safe for concurrent reads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "engine/model/dtype.hpp"
#include "engine/model/weight_source.hpp"
#include "runtime/error.hpp"

namespace troupe::engine {

struct tensor_info {
  std::string name;
  dtype type = dtype::f32;
  std::vector<int64_t> shape;
  uint64_t begin = 0; // byte offsets into the data section (after the header)
  uint64_t end = 0;

  int64_t numel() const;
};

std::string format_shape(std::span<const int64_t> shape);

// A read-only memory mapping of a whole file.
class mapped_file {
 public:
  static expected<std::shared_ptr<mapped_file>> open(const std::filesystem::path& path);
  ~mapped_file();
  mapped_file(const mapped_file&) = delete;
  mapped_file& operator=(const mapped_file&) = delete;

  std::span<const std::byte> bytes() const { return {data_, size_}; }

 private:
  mapped_file(const std::byte* data, size_t size) : data_(data), size_(size) {}
  const std::byte* data_;
  size_t size_;
};

class safetensors_file {
 public:
  static expected<safetensors_file> open(const std::filesystem::path& path);
  // Validates a whole file image; `path` only names it in errors. Used by open() and by tests.
  static expected<safetensors_file> parse(std::shared_ptr<mapped_file> file,
                                          const std::filesystem::path& path);

  const std::filesystem::path& path() const { return path_; }
  const std::vector<tensor_info>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const tensor_info* find(std::string_view name) const;
  // The tensor's raw bytes (unaligned; length end - begin).
  const std::byte* data(const tensor_info& t) const { return data_ + t.begin; }

 private:
  std::filesystem::path path_;
  std::shared_ptr<mapped_file> file_;
  const std::byte* data_ = nullptr; // start of the data section
  std::vector<tensor_info> tensors_;
  std::map<std::string, std::string> metadata_;
  std::map<std::string, size_t, std::less<>> by_name_;
};

// All weights of one model folder (or one .safetensors file).
class weight_store final : public weight_source {
 public:
  static expected<weight_store> open(const std::filesystem::path& path);

  bool contains(std::string_view name) const override;
  size_t num_tensors() const;
  const std::filesystem::path& root() const { return root_; }
  // The tensor's metadata and its file; error names the folder when absent.
  expected<std::pair<const safetensors_file*, const tensor_info*>>
  lookup(std::string_view name) const;

  expected<std::vector<float>> load_f32(std::string_view name,
                                        std::vector<int64_t> shape) const override;
  expected<std::vector<float>> load_f32_rows(std::string_view name, std::vector<int64_t> shape,
                                             int64_t row_begin, int64_t row_end) const override;
  expected<std::vector<float>> load_f32_cols(std::string_view name, std::vector<int64_t> shape,
                                             int64_t col_begin, int64_t col_end) const override;
  expected<uint64_t> read_bytes(const weight_slice& slice) const override;
  const weight_store* store() const override { return this; }

 private:
  expected<std::pair<const safetensors_file*, const tensor_info*>>
  checked(std::string_view name, const std::vector<int64_t>& shape) const;

  std::filesystem::path root_;
  std::vector<safetensors_file> files_;
  std::map<std::string, size_t, std::less<>> where_; // tensor name -> index into files_
};

} // namespace troupe::engine
