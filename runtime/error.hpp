// One error vocabulary for all of troupe: an error code plus a message with context, and
// expected<T> to return either. Engine code (no CAF) uses these directly; caf_glue.hpp converts.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>

#ifndef TROUPE_NO_FMT // nvcc cannot compile fmt 9's headers: CUDA sources build errors with strf()
#include <fmt/format.h>
#endif

namespace troupe {

enum class errc : uint8_t {
  ok = 0,
  invalid_argument,   // a caller passed something malformed (bad parameter, bad request)
  not_found,          // a file, tensor, model, node or key does not exist
  io_error,           // the OS refused a read/write/mmap
  parse_error,        // malformed JSON, YAML, safetensors header, ...
  unsupported,        // well-formed but not supported (architecture, dtype, rope type, ...)
  out_of_range,       // offsets, ids or lengths outside their bounds
  resource_exhausted, // out of KV blocks, queue full, out of memory
  timeout,
  unavailable, // a peer or node is unreachable
  cancelled,
  internal, // a bug: an invariant did not hold
};

std::string_view to_string(errc code);

class error {
 public:
  error() = default;
  error(errc code, std::string message) : code_(code), message_(std::move(message)) {}

  errc code() const { return code_; }
  const std::string& message() const { return message_; }
  explicit operator bool() const { return code_ != errc::ok; }

  // "parse_error: config.json: ..." for logs and user-facing output.
  std::string to_string() const;

  // Prepends context: make_error(...).context("loading model X") -> "loading model X: ...".
  error&& context(std::string_view what) &&;

 private:
  errc code_ = errc::ok;
  std::string message_;
};

#ifndef TROUPE_NO_FMT
template <class... Ts>
error make_error(errc code, fmt::format_string<Ts...> format, Ts&&... args) {
  return error{code, fmt::format(format, std::forward<Ts>(args)...)};
}
#endif

// A value or an error. Minimal on purpose: C++20 has no std::expected.
template <class T>
class [[nodiscard]] expected {
 public:
  expected(T value) : state_(std::in_place_index<0>, std::move(value)) {}
  expected(troupe::error err) : state_(std::in_place_index<1>, std::move(err)) {}

  bool has_value() const { return state_.index() == 0; }
  explicit operator bool() const { return has_value(); }

  T& value() & { return std::get<0>(state_); }
  const T& value() const& { return std::get<0>(state_); }
  T&& value() && { return std::get<0>(std::move(state_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  const troupe::error& error() const& { return std::get<1>(state_); }
  troupe::error&& error() && { return std::get<1>(std::move(state_)); }

 private:
  std::variant<T, troupe::error> state_;
};

// expected<void>: success or an error.
template <>
class [[nodiscard]] expected<void> {
 public:
  expected() = default;
  expected(troupe::error err) : error_(std::move(err)) {}

  bool has_value() const { return !error_; }
  explicit operator bool() const { return has_value(); }
  const troupe::error& error() const& { return error_; }
  troupe::error&& error() && { return std::move(error_); }

 private:
  troupe::error error_;
};

} // namespace troupe

// Evaluates an expression yielding expected<T>; returns its error from the enclosing function.
#define TROUPE_TRY_VOID(expr)                                                                      \
  do {                                                                                             \
    if (auto troupe_try_result_ = (expr); !troupe_try_result_)                                     \
      return std::move(troupe_try_result_).error();                                                \
  } while (false)

// Evaluates an expression yielding expected<T>; assigns its value to `dst`, or returns its error
// from the enclosing function.
#define TROUPE_ASSIGN(dst, expr)                                                                   \
  do {                                                                                             \
    auto troupe_assign_ = (expr);                                                                  \
    if (!troupe_assign_)                                                                           \
      return std::move(troupe_assign_).error();                                                    \
    dst = std::move(*troupe_assign_);                                                              \
  } while (false)
