#include "engine/model/gguf.hpp"

#include <cstring>
#include <limits>

namespace troupe::engine {

namespace fs = std::filesystem;

namespace {

constexpr uint32_t gguf_magic = 0x46554747; // "GGUF" little-endian
constexpr uint64_t max_dims = 4;            // GGML_MAX_DIMS

#define TROUPE_READ(var, expr)                                                                     \
  auto var = (expr);                                                                               \
  if (!var)                                                                                        \
    return std::move(var).error();

// A bounds-checked little-endian cursor over the file image; every read fails cleanly at the end.
class cursor {
 public:
  cursor(std::span<const std::byte> bytes, const fs::path& path) : bytes_(bytes), path_(path) {}

  size_t pos() const { return pos_; }
  size_t remaining() const { return bytes_.size() - pos_; }
  std::string where() const { return path_.string(); }

  template <class T>
  expected<T> read(std::string_view what) {
    if (bytes_.size() - pos_ < sizeof(T))
      return truncated(what);
    T v;
    std::memcpy(&v, bytes_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }

  expected<std::string> read_string(std::string_view what) {
    auto n = read<uint64_t>(what);
    if (!n)
      return std::move(n).error();
    if (bytes_.size() - pos_ < *n)
      return truncated(what);
    std::string s(reinterpret_cast<const char*>(bytes_.data() + pos_), static_cast<size_t>(*n));
    pos_ += static_cast<size_t>(*n);
    return s;
  }

  error truncated(std::string_view what) const {
    return make_error(errc::parse_error,
                      "{}: truncated GGUF file: {} at byte {} runs past the end ({} bytes)",
                      path_.string(), what, pos_, bytes_.size());
  }

 private:
  std::span<const std::byte> bytes_;
  const fs::path& path_;
  size_t pos_ = 0;
};

size_t scalar_size(gguf_type t) {
  switch (t) {
  case gguf_type::u8:
  case gguf_type::i8:
  case gguf_type::boolean:
    return 1;
  case gguf_type::u16:
  case gguf_type::i16:
    return 2;
  case gguf_type::u32:
  case gguf_type::i32:
  case gguf_type::f32:
    return 4;
  case gguf_type::u64:
  case gguf_type::i64:
  case gguf_type::f64:
    return 8;
  default:
    return 0; // string, array: variable
  }
}

bool is_int(gguf_type t) {
  return t != gguf_type::f32 && t != gguf_type::f64 && t != gguf_type::boolean &&
         scalar_size(t) > 0;
}

// One scalar of type t (not string/array) as the widened variant alternative.
expected<std::variant<int64_t, double, bool>> read_scalar(cursor& c, gguf_type t,
                                                          std::string_view what) {
  auto widen = [&](auto v) -> expected<std::variant<int64_t, double, bool>> {
    if (!v)
      return std::move(v).error();
    return std::variant<int64_t, double, bool>(static_cast<int64_t>(*v));
  };
  switch (t) {
  case gguf_type::u8:
    return widen(c.read<uint8_t>(what));
  case gguf_type::i8:
    return widen(c.read<int8_t>(what));
  case gguf_type::u16:
    return widen(c.read<uint16_t>(what));
  case gguf_type::i16:
    return widen(c.read<int16_t>(what));
  case gguf_type::u32:
    return widen(c.read<uint32_t>(what));
  case gguf_type::i32:
    return widen(c.read<int32_t>(what));
  case gguf_type::i64:
    return widen(c.read<int64_t>(what));
  case gguf_type::u64: {
    auto v = c.read<uint64_t>(what);
    if (v && *v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      return make_error(errc::parse_error, "{}: {} = {} does not fit in int64", c.where(), what,
                        *v);
    return widen(std::move(v));
  }
  case gguf_type::f32: {
    auto v = c.read<float>(what);
    if (!v)
      return std::move(v).error();
    return std::variant<int64_t, double, bool>(static_cast<double>(*v));
  }
  case gguf_type::f64: {
    auto v = c.read<double>(what);
    if (!v)
      return std::move(v).error();
    return std::variant<int64_t, double, bool>(*v);
  }
  case gguf_type::boolean: {
    auto v = c.read<uint8_t>(what);
    if (!v)
      return std::move(v).error();
    return std::variant<int64_t, double, bool>(*v != 0);
  }
  default:
    break;
  }
  return make_error(errc::parse_error, "{}: {}: unknown GGUF value type {}", c.where(), what,
                    static_cast<uint32_t>(t));
}

template <class T>
expected<gguf_value> read_array_of(cursor& c, gguf_value v, uint64_t n, std::string_view what) {
  std::vector<T> out;
  out.reserve(static_cast<size_t>(n));
  for (uint64_t i = 0; i < n; ++i) {
    auto s = read_scalar(c, v.elem_type, what);
    if (!s)
      return std::move(s).error();
    std::visit([&](auto x) { out.push_back(static_cast<T>(x)); }, *s);
  }
  v.value = std::move(out);
  return v;
}

expected<gguf_value> read_value(cursor& c, gguf_type t, const std::string& key) {
  gguf_value v;
  v.type = t;
  if (t == gguf_type::string) {
    auto s = c.read_string(key);
    if (!s)
      return std::move(s).error();
    v.value = std::move(*s);
    return v;
  }
  if (t != gguf_type::array) {
    auto s = read_scalar(c, t, key);
    if (!s)
      return std::move(s).error();
    std::visit([&](auto x) { v.value = x; }, *s);
    return v;
  }
  auto et = c.read<uint32_t>(key);
  auto n = et ? c.read<uint64_t>(key) : expected<uint64_t>(std::move(et).error());
  if (!n)
    return std::move(n).error();
  v.elem_type = static_cast<gguf_type>(*et);
  // Real arrays (vocabularies, merges) hold up to a few million; more would only be memory the
  // file names without holding (an i8 array becomes int64s, an empty string 32 bytes). A count
  // the file cannot hold is truncation (every element needs at least its size, 8 for a string).
  constexpr uint64_t max_array_items = uint64_t{1} << 26;
  const size_t min_size = v.elem_type == gguf_type::string ? 8 : scalar_size(v.elem_type);
  if (min_size > 0 && *n > c.remaining() / min_size)
    return c.truncated(key);
  if (*n > max_array_items)
    return make_error(errc::parse_error, "{}: {}: an array of {} elements (at most {})", c.where(),
                      key, *n, max_array_items);
  if (v.elem_type == gguf_type::string) {
    std::vector<std::string> out;
    for (uint64_t i = 0; i < *n; ++i) {
      auto s = c.read_string(key);
      if (!s)
        return std::move(s).error();
      out.push_back(std::move(*s));
    }
    v.value = std::move(out);
    return v;
  }
  if (v.elem_type == gguf_type::array)
    return make_error(errc::unsupported, "{}: {}: nested GGUF arrays are not supported", c.where(),
                      key);
  // Reject absurd counts before reserving: every element needs at least its scalar size.
  size_t es = scalar_size(v.elem_type);
  if (es == 0)
    return make_error(errc::parse_error, "{}: {}: unknown GGUF array element type {}", c.where(),
                      key, *et);
  if (*n > c.remaining() / es)
    return c.truncated(key);
  if (v.elem_type == gguf_type::boolean)
    return read_array_of<bool>(c, std::move(v), *n, key);
  if (is_int(v.elem_type))
    return read_array_of<int64_t>(c, std::move(v), *n, key);
  return read_array_of<double>(c, std::move(v), *n, key);
}

// One tensor info (name, dims, type, offset), validated: known type, whole blocks per row,
// aligned offset. Its byte size is computed here; whether it fits the file is checked later.
expected<gguf_tensor_info> read_tensor_info(cursor& c, const fs::path& path, uint64_t alignment) {
  gguf_tensor_info t;
  TROUPE_READ(name, c.read_string("tensor name"));
  t.name = std::move(*name);
  TROUPE_READ(n_dims, c.read<uint32_t>(t.name));
  if (*n_dims == 0 || *n_dims > max_dims)
    return make_error(errc::parse_error, "{}: tensor {} has {} dimensions (1 to 4 allowed)",
                      path.string(), t.name, *n_dims);
  int64_t numel = 1;
  for (uint32_t d = 0; d < *n_dims; ++d) {
    TROUPE_READ(dim, c.read<int64_t>(t.name));
    if (*dim < 0 || *dim > (int64_t{1} << 40) || (*dim > 0 && numel > (int64_t{1} << 48) / *dim))
      return make_error(errc::parse_error, "{}: tensor {} has dimension {} (too large or negative)",
                        path.string(), t.name, *dim);
    numel *= *dim;
    t.dims.push_back(*dim);
  }
  TROUPE_READ(type, c.read<uint32_t>(t.name));
  TROUPE_READ(offset, c.read<uint64_t>(t.name));
  t.type = *type;
  t.offset = *offset;
  auto traits = ggml_traits(t.type);
  if (!traits)
    return make_error(errc::unsupported, "{}: tensor {} has unknown ggml type {}", path.string(),
                      t.name, t.type);
  if (t.row_size() % traits->block_size != 0)
    return make_error(errc::parse_error,
                      "{}: tensor {} ({}) row of {} is not a multiple of the block size {}",
                      path.string(), t.name, traits->name, t.row_size(), traits->block_size);
  t.bytes = static_cast<uint64_t>(t.numel() / traits->block_size) * traits->block_bytes;
  if (t.offset % alignment != 0)
    return make_error(errc::parse_error, "{}: tensor {} offset {} is not aligned to {}",
                      path.string(), t.name, t.offset, alignment);
  return t;
}

} // namespace

int64_t gguf_tensor_info::numel() const {
  int64_t n = 1;
  for (auto d : dims)
    n *= d;
  return n;
}

std::vector<int64_t> gguf_tensor_info::torch_shape() const {
  return {dims.rbegin(), dims.rend()};
}

expected<gguf_file> gguf_file::open(const fs::path& path) {
  auto file = mapped_file::open(path);
  if (!file)
    return std::move(file).error();
  return parse(std::move(*file), path);
}

expected<gguf_file> gguf_file::parse(std::shared_ptr<mapped_file> file, const fs::path& path) {
  gguf_file g;
  g.path_ = path;
  g.file_ = std::move(file);
  const auto bytes = g.file_->bytes();
  cursor c(bytes, g.path_);
  TROUPE_READ(magic, c.read<uint32_t>("magic"));
  if (*magic != gguf_magic)
    return make_error(errc::parse_error,
                      "{}: not a GGUF file (bad magic 0x{:08x}, expected \"GGUF\")", path.string(),
                      *magic);
  TROUPE_READ(version, c.read<uint32_t>("version"));
  if (*version != 2 && *version != 3)
    return make_error(errc::unsupported, "{}: GGUF version {} is not supported (2 and 3 are)",
                      path.string(), *version);
  g.version_ = *version;
  TROUPE_READ(n_tensors, c.read<uint64_t>("tensor count"));
  TROUPE_READ(n_kv, c.read<uint64_t>("metadata count"));
  for (uint64_t i = 0; i < *n_kv; ++i) {
    TROUPE_READ(key, c.read_string("metadata key"));
    TROUPE_READ(type, c.read<uint32_t>(*key));
    auto value = read_value(c, static_cast<gguf_type>(*type), *key);
    if (!value)
      return std::move(value).error();
    g.metadata_[*key] = std::move(*value);
  }
  if (auto a = g.get_int("general.alignment"); !a)
    return std::move(a).error();
  else if (*a) {
    if (**a <= 0 || (**a & (**a - 1)) != 0)
      return make_error(errc::parse_error, "{}: general.alignment {} is not a power of two",
                        path.string(), **a);
    g.alignment_ = static_cast<uint64_t>(**a);
  }
  for (uint64_t i = 0; i < *n_tensors; ++i) {
    auto info = read_tensor_info(c, path, g.alignment_);
    if (!info)
      return std::move(info).error();
    gguf_tensor_info& t = *info;
    if (g.by_name_.count(t.name) != 0)
      return make_error(errc::parse_error, "{}: tensor {} appears twice", path.string(), t.name);
    g.by_name_[t.name] = g.tensors_.size();
    g.tensors_.push_back(std::move(t));
  }
  const uint64_t data_start = (c.pos() + g.alignment_ - 1) / g.alignment_ * g.alignment_;
  const uint64_t data_size = bytes.size() > data_start ? bytes.size() - data_start : 0;
  for (const auto& t : g.tensors_)
    if (t.offset > data_size || t.bytes > data_size - t.offset)
      return make_error(
          errc::parse_error,
          "{}: truncated GGUF file: tensor {} ({}, {} bytes at data offset {}) runs past "
          "the end of the data section ({} bytes)",
          path.string(), t.name, ggml_type_name(t.type), t.bytes, t.offset, data_size);
  g.data_ = bytes.data() + std::min<uint64_t>(data_start, bytes.size());
  return g;
}

const gguf_tensor_info* gguf_file::find_tensor(std::string_view name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &tensors_[it->second];
}

const gguf_value* gguf_file::find(std::string_view key) const {
  auto it = metadata_.find(key);
  return it == metadata_.end() ? nullptr : &it->second;
}

namespace {
template <class T>
expected<std::optional<T>> get_as(const gguf_file& f, std::string_view key, const char* want) {
  const gguf_value* v = f.find(key);
  if (v == nullptr)
    return std::optional<T>();
  if (const T* p = std::get_if<T>(&v->value))
    return std::optional<T>(*p);
  return make_error(errc::parse_error, "{}: metadata {} is not {}", f.path().string(), key, want);
}
} // namespace

expected<std::optional<int64_t>> gguf_file::get_int(std::string_view key) const {
  return get_as<int64_t>(*this, key, "an integer");
}
expected<std::optional<double>> gguf_file::get_float(std::string_view key) const {
  const gguf_value* v = find(key);
  if (v != nullptr)
    if (const auto* i = std::get_if<int64_t>(&v->value))
      return std::optional<double>(static_cast<double>(*i));
  return get_as<double>(*this, key, "a number");
}
expected<std::optional<bool>> gguf_file::get_bool(std::string_view key) const {
  return get_as<bool>(*this, key, "a boolean");
}
expected<std::optional<std::string>> gguf_file::get_string(std::string_view key) const {
  return get_as<std::string>(*this, key, "a string");
}
expected<std::optional<std::vector<std::string>>>
gguf_file::get_strings(std::string_view key) const {
  return get_as<std::vector<std::string>>(*this, key, "an array of strings");
}
expected<std::optional<std::vector<int64_t>>> gguf_file::get_ints(std::string_view key) const {
  return get_as<std::vector<int64_t>>(*this, key, "an array of integers");
}

expected<std::vector<float>> gguf_file::dequantize_rows(const gguf_tensor_info& t,
                                                        int64_t row_begin, int64_t row_end) const {
  auto traits = ggml_traits(t.type);
  if (!traits || !traits->dequantizable)
    return make_error(
        errc::unsupported,
        "{}: tensor {} has type {}, which cannot be dequantised (supported: F32, F16, "
        "BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)",
        path_.string(), t.name, ggml_type_name(t.type));
  if (row_begin < 0 || row_begin > row_end || row_end > t.num_rows())
    return make_error(errc::out_of_range, "{}: rows [{}, {}) of tensor {} outside its {} rows",
                      path_.string(), row_begin, row_end, t.name, t.num_rows());
  const int64_t n = t.row_size();
  const size_t row_bytes = static_cast<size_t>(n / traits->block_size) * traits->block_bytes;
  std::vector<float> out(static_cast<size_t>((row_end - row_begin) * n));
  for (int64_t r = row_begin; r < row_end; ++r)
    dequantize_row(static_cast<ggml_type>(t.type), data(t) + static_cast<size_t>(r) * row_bytes, n,
                   out.data() + (r - row_begin) * n);
  return out;
}

} // namespace troupe::engine
