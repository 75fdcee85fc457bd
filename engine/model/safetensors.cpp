#include "engine/model/safetensors.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <fstream>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "runtime/json_depth.hpp"

namespace troupe::engine {

namespace fs = std::filesystem;
using json = nlohmann::json;

int64_t tensor_info::numel() const {
  int64_t n = 1;
  for (auto d : shape)
    n *= d;
  return n;
}

std::string format_shape(std::span<const int64_t> shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

// ---- mapped_file ------------------------------------------------------------------------------

expected<std::shared_ptr<mapped_file>> mapped_file::open(const fs::path& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return make_error(errno == ENOENT ? errc::not_found : errc::io_error, "{}: cannot open: {}",
                      path.string(), std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return make_error(errc::io_error, "{}: cannot stat: {}", path.string(), std::strerror(err));
  }
  auto size = static_cast<size_t>(st.st_size);
  const std::byte* data = nullptr;
  if (size > 0) {
    void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      int err = errno;
      ::close(fd);
      return make_error(errc::io_error, "{}: cannot mmap {} bytes: {}", path.string(), size,
                        std::strerror(err));
    }
    data = static_cast<const std::byte*>(p);
  }
  ::close(fd); // the mapping keeps the file alive
  return std::shared_ptr<mapped_file>(new mapped_file(data, size));
}

mapped_file::~mapped_file() {
  if (data_ != nullptr)
    ::munmap(const_cast<std::byte*>(data_), size_);
}

// ---- safetensors_file -------------------------------------------------------------------------

namespace {

constexpr uint64_t max_header_bytes = 100u << 20; // the reference implementation's limit

expected<tensor_info> parse_entry(const std::string& name, const json& entry,
                                  const std::string& file) {
  auto bad = [&](std::string_view what) {
    return make_error(errc::parse_error, "{}: tensor '{}': {}", file, name, what);
  };
  if (!entry.is_object())
    return bad("header entry is not an object");
  tensor_info t;
  t.name = name;
  auto dt = entry.find("dtype");
  if (dt == entry.end() || !dt->is_string())
    return bad("missing \"dtype\"");
  auto parsed = parse_dtype(dt->get<std::string>());
  if (!parsed)
    return make_error(errc::unsupported, "{}: tensor '{}': unknown dtype '{}'", file, name,
                      dt->get<std::string>());
  t.type = *parsed;
  auto shape = entry.find("shape");
  if (shape == entry.end() || !shape->is_array())
    return bad("missing \"shape\"");
  // The elements, without overflow: numel() is then safe in any dimension order.
  int64_t nonzero = 1;
  for (auto& d : *shape) {
    if (!d.is_number_unsigned())
      return bad("shape holds a value that is not a non-negative integer");
    const uint64_t v = d.get<uint64_t>();
    if (v > uint64_t(INT64_MAX) ||
        (v > 0 && __builtin_mul_overflow(nonzero, static_cast<int64_t>(v), &nonzero)))
      return bad(fmt::format("shape {} has more than 2^63 elements", shape->dump()));
    t.shape.push_back(static_cast<int64_t>(v));
  }
  auto off = entry.find("data_offsets");
  if (off == entry.end() || !off->is_array() || off->size() != 2 ||
      !(*off)[0].is_number_unsigned() || !(*off)[1].is_number_unsigned())
    return bad("\"data_offsets\" is not a pair of non-negative integers");
  t.begin = (*off)[0].get<uint64_t>();
  t.end = (*off)[1].get<uint64_t>();
  if (t.begin > t.end)
    return make_error(errc::out_of_range,
                      "{}: tensor '{}': data_offsets [{}, {}) end before they begin", file, name,
                      t.begin, t.end);
  uint64_t need = 0;
  if (__builtin_mul_overflow(static_cast<uint64_t>(t.numel()), dtype_size(t.type), &need))
    return bad(fmt::format("shape {} of {} needs more than 2^64 bytes", format_shape(t.shape),
                           dtype_name(t.type)));
  if (t.end - t.begin != need)
    return make_error(
        errc::parse_error,
        "{}: tensor '{}': data_offsets [{}, {}) hold {} bytes but shape {} of {} needs {}", file,
        name, t.begin, t.end, t.end - t.begin, format_shape(t.shape), dtype_name(t.type), need);
  return t;
}

} // namespace

expected<safetensors_file> safetensors_file::open(const fs::path& path) {
  auto file = mapped_file::open(path);
  if (!file)
    return std::move(file).error();
  return parse(std::move(*file), path);
}

expected<safetensors_file> safetensors_file::parse(std::shared_ptr<mapped_file> file,
                                                   const fs::path& path) {
  const std::string name = path.string();
  auto bytes = file->bytes();
  if (bytes.size() < 8)
    return make_error(errc::parse_error, "{}: {} bytes is too short for a safetensors header", name,
                      bytes.size());
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8); // little-endian on every host we support
  if (header_len > max_header_bytes)
    return make_error(errc::parse_error, "{}: header length {} exceeds the {} byte limit", name,
                      header_len, max_header_bytes);
  if (8 + header_len > bytes.size())
    return make_error(errc::out_of_range,
                      "{}: header length {} runs past the end of the file ({} bytes)", name,
                      header_len, bytes.size());
  json header;
  try {
    auto text = reinterpret_cast<const char*>(bytes.data() + 8);
    if (!json_nesting_within({text, header_len}))
      return make_error(errc::parse_error, "{}: header JSON nests deeper than {} levels", name,
                        max_json_depth);
    header = json::parse(text, text + header_len);
  } catch (const json::exception& e) {
    return make_error(errc::parse_error, "{}: header is not valid JSON: {}", name, e.what());
  }
  if (!header.is_object())
    return make_error(errc::parse_error, "{}: header is not a JSON object", name);

  safetensors_file result;
  result.path_ = path;
  result.data_ = bytes.data() + 8 + header_len;
  const uint64_t data_size = bytes.size() - 8 - header_len;
  for (auto& [key, value] : header.items()) {
    if (key == "__metadata__") {
      if (value.is_object())
        for (auto& [mk, mv] : value.items())
          if (mv.is_string())
            result.metadata_[mk] = mv.get<std::string>();
      continue;
    }
    auto t = parse_entry(key, value, name);
    if (!t)
      return std::move(t).error();
    if (t->end > data_size)
      return make_error(errc::out_of_range,
                        "{}: tensor '{}' ends at byte {} of the data section, but the file holds "
                        "only {} bytes of data (truncated file?)",
                        name, key, t->end, data_size);
    result.tensors_.push_back(std::move(*t));
  }
  // Overlapping tensors mean a corrupt header: check neighbours in offset order.
  std::vector<const tensor_info*> order;
  for (auto& t : result.tensors_)
    if (t.end > t.begin)
      order.push_back(&t);
  std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < order.size(); ++i)
    if (order[i]->begin < order[i - 1]->end)
      return make_error(errc::out_of_range, "{}: tensors '{}' [{}, {}) and '{}' [{}, {}) overlap",
                        name, order[i - 1]->name, order[i - 1]->begin, order[i - 1]->end,
                        order[i]->name, order[i]->begin, order[i]->end);
  for (size_t i = 0; i < result.tensors_.size(); ++i)
    result.by_name_.emplace(result.tensors_[i].name, i);
  result.file_ = std::move(file);
  return result;
}

const tensor_info* safetensors_file::find(std::string_view name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &tensors_[it->second];
}

// ---- weight_store -----------------------------------------------------------------------------

expected<weight_store> weight_store::open(const fs::path& path) {
  weight_store store;
  store.root_ = path;
  std::vector<fs::path> files;
  std::error_code ec;
  if (fs::is_regular_file(path, ec)) {
    files.push_back(path);
  } else if (fs::is_directory(path, ec)) {
    auto index = path / "model.safetensors.index.json";
    if (fs::exists(index, ec)) {
      json j;
      try {
        std::ifstream in(index);
        const std::string text{std::istreambuf_iterator<char>(in), {}};
        if (!json_nesting_within(text))
          return make_error(errc::parse_error, "{}: nests deeper than {} levels", index.string(),
                            max_json_depth);
        j = json::parse(text);
      } catch (const json::exception& e) {
        return make_error(errc::parse_error, "{}: not valid JSON: {}", index.string(), e.what());
      }
      auto map = j.find("weight_map");
      if (map == j.end() || !map->is_object())
        return make_error(errc::parse_error, "{}: no \"weight_map\" object", index.string());
      std::map<std::string, size_t> file_pos;
      std::vector<std::pair<std::string, std::string>> entries;
      for (auto& [tensor, file] : map->items()) {
        if (!file.is_string())
          return make_error(errc::parse_error, "{}: weight_map entry '{}' is not a file name",
                            index.string(), tensor);
        auto f = file.get<std::string>();
        if (!file_pos.contains(f)) {
          file_pos.emplace(f, files.size());
          files.push_back(path / f);
        }
        entries.emplace_back(tensor, f);
      }
      for (auto& f : files) {
        auto opened = safetensors_file::open(f);
        if (!opened)
          return std::move(opened).error().context(
              fmt::format("shard listed in {}", index.string()));
        store.files_.push_back(std::move(*opened));
      }
      for (auto& [tensor, f] : entries) {
        size_t i = file_pos[f];
        if (store.files_[i].find(tensor) == nullptr)
          return make_error(errc::not_found, "{}: lists tensor '{}' in {}, which does not hold it",
                            index.string(), tensor, f);
        store.where_.emplace(tensor, i);
      }
      return store;
    }
    if (fs::exists(path / "model.safetensors", ec)) {
      files.push_back(path / "model.safetensors");
    } else {
      for (auto& entry : fs::directory_iterator(path, ec))
        if (entry.path().extension() == ".safetensors")
          files.push_back(entry.path());
      std::sort(files.begin(), files.end());
    }
    if (files.empty())
      return make_error(errc::not_found, "{}: no model.safetensors, index or *.safetensors file",
                        path.string());
  } else {
    return make_error(errc::not_found, "{}: no such file or folder", path.string());
  }
  for (auto& f : files) {
    auto opened = safetensors_file::open(f);
    if (!opened)
      return std::move(opened).error();
    for (auto& t : opened->tensors())
      store.where_.emplace(t.name, store.files_.size());
    store.files_.push_back(std::move(*opened));
  }
  return store;
}

bool weight_store::contains(std::string_view name) const {
  return where_.find(name) != where_.end();
}

size_t weight_store::num_tensors() const {
  return where_.size();
}

expected<std::pair<const safetensors_file*, const tensor_info*>>
weight_store::lookup(std::string_view name) const {
  auto it = where_.find(name);
  if (it == where_.end())
    return make_error(errc::not_found, "{}: missing tensor '{}' ({} tensors in {} file(s))",
                      root_.string(), name, where_.size(), files_.size());
  const auto& file = files_[it->second];
  return std::pair{&file, file.find(name)};
}

expected<std::pair<const safetensors_file*, const tensor_info*>>
weight_store::checked(std::string_view name, const std::vector<int64_t>& shape) const {
  auto found = lookup(name);
  if (!found)
    return found;
  auto [file, info] = *found;
  if (info->shape != shape)
    return make_error(errc::invalid_argument,
                      "{}: tensor '{}' has shape {} but config.json implies {}",
                      file->path().string(), name, format_shape(info->shape), format_shape(shape));
  if (!is_float_loadable(info->type))
    return make_error(errc::unsupported,
                      "{}: tensor '{}' has dtype {}, which cannot be loaded yet "
                      "(supported: F32, BF16, F16)",
                      file->path().string(), name, dtype_name(info->type));
  return found;
}

expected<std::vector<float>> weight_store::load_f32(std::string_view name,
                                                    std::vector<int64_t> shape) const {
  auto found = checked(name, shape);
  if (!found)
    return std::move(found).error();
  auto [file, info] = *found;
  std::vector<float> out(static_cast<size_t>(info->numel()));
  convert_to_f32(info->type, file->data(*info), out.size(), out.data());
  return out;
}

expected<std::vector<float>> weight_store::load_f32_rows(std::string_view name,
                                                         std::vector<int64_t> shape,
                                                         int64_t row_begin, int64_t row_end) const {
  auto found = checked(name, shape);
  if (!found)
    return std::move(found).error();
  auto [file, info] = *found;
  if (shape.empty() || row_begin < 0 || row_end < row_begin || row_end > shape[0])
    return make_error(errc::out_of_range, "tensor '{}': rows [{}, {}) outside shape {}", name,
                      row_begin, row_end, format_shape(shape));
  size_t row = static_cast<size_t>(info->numel() / std::max<int64_t>(shape[0], 1));
  std::vector<float> out(row * static_cast<size_t>(row_end - row_begin));
  size_t esize = dtype_size(info->type);
  convert_to_f32(info->type, file->data(*info) + row * row_begin * esize, out.size(), out.data());
  return out;
}

expected<std::vector<float>> weight_store::load_f32_cols(std::string_view name,
                                                         std::vector<int64_t> shape,
                                                         int64_t col_begin, int64_t col_end) const {
  auto found = checked(name, shape);
  if (!found)
    return std::move(found).error();
  auto [file, info] = *found;
  if (shape.size() != 2 || col_begin < 0 || col_end < col_begin || col_end > shape[1])
    return make_error(errc::out_of_range, "tensor '{}': columns [{}, {}) outside shape {}", name,
                      col_begin, col_end, format_shape(shape));
  size_t rows = static_cast<size_t>(shape[0]);
  size_t cols = static_cast<size_t>(shape[1]);
  size_t width = static_cast<size_t>(col_end - col_begin);
  size_t esize = dtype_size(info->type);
  std::vector<float> out(rows * width);
  for (size_t r = 0; r < rows; ++r)
    convert_to_f32(info->type, file->data(*info) + (r * cols + col_begin) * esize, width,
                   out.data() + r * width);
  return out;
}

expected<uint64_t> weight_store::read_bytes(const weight_slice& p) const {
  auto found = checked(p.name, p.shape);
  if (!found)
    return std::move(found).error();
  const auto* info = found->second;
  // Rows: whole rows of every trailing dimension; columns: that width of every row.
  const int64_t per_row = p.shape.empty() ? 1 : info->numel() / std::max<int64_t>(p.shape[0], 1);
  const int64_t elems = p.by_cols ? p.rows() * (p.end - p.begin) : (p.end - p.begin) * per_row;
  return static_cast<uint64_t>(elems) * dtype_size(info->type);
}

} // namespace troupe::engine
