#include "runtime/error.hpp"

namespace troupe {

std::string_view to_string(errc code) {
  switch (code) {
  case errc::ok:
    return "ok";
  case errc::invalid_argument:
    return "invalid_argument";
  case errc::not_found:
    return "not_found";
  case errc::io_error:
    return "io_error";
  case errc::parse_error:
    return "parse_error";
  case errc::unsupported:
    return "unsupported";
  case errc::out_of_range:
    return "out_of_range";
  case errc::resource_exhausted:
    return "resource_exhausted";
  case errc::timeout:
    return "timeout";
  case errc::unavailable:
    return "unavailable";
  case errc::cancelled:
    return "cancelled";
  case errc::internal:
    return "internal";
  }
  return "unknown";
}

std::string error::to_string() const {
  return fmt::format("{}: {}", troupe::to_string(code_), message_);
}

error&& error::context(std::string_view what) && {
  message_ = fmt::format("{}: {}", what, message_);
  return std::move(*this);
}

} // namespace troupe
