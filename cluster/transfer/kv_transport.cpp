#include "cluster/transfer/kv_transport.hpp"

#include <cstring>

namespace troupe::cluster::transfer {
namespace {

constexpr uint32_t descriptor_magic = 0x31564b54; // "TKV1"
constexpr size_t descriptor_size = 32;

void put_u64(uint8_t* out, uint64_t v) {
  for (int i = 0; i < 8; ++i)
    out[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint64_t get_u64(const uint8_t* in) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i)
    v |= uint64_t{in[i]} << (8 * i);
  return v;
}

} // namespace

std::string_view to_string(memory_kind kind) {
  switch (kind) {
  case memory_kind::host:
    return "host";
  case memory_kind::pinned_host:
    return "pinned_host";
  case memory_kind::cuda:
    return "cuda";
  }
  return "unknown";
}

// Layout: u32 magic, u8 kind, 3 bytes zero, u64 addr, u64 length, u64 key.
std::vector<uint8_t> region_descriptor::serialize() const {
  std::vector<uint8_t> out(descriptor_size, 0);
  for (int i = 0; i < 4; ++i)
    out[i] = static_cast<uint8_t>(descriptor_magic >> (8 * i));
  out[4] = static_cast<uint8_t>(kind);
  put_u64(&out[8], addr);
  put_u64(&out[16], length);
  put_u64(&out[24], key);
  return out;
}

expected<region_descriptor> region_descriptor::parse(std::span<const uint8_t> bytes) {
  if (bytes.size() != descriptor_size)
    return make_error(errc::parse_error, "region descriptor: {} bytes, expected {}", bytes.size(),
                      descriptor_size);
  uint32_t magic = static_cast<uint32_t>(get_u64(bytes.data()) & 0xffffffffu);
  if (magic != descriptor_magic)
    return make_error(errc::parse_error, "region descriptor: bad magic {:#x}", magic);
  if (bytes[4] > static_cast<uint8_t>(memory_kind::cuda))
    return make_error(errc::parse_error, "region descriptor: unknown memory kind {}", bytes[4]);
  region_descriptor d;
  d.kind = static_cast<memory_kind>(bytes[4]);
  d.addr = get_u64(&bytes[8]);
  d.length = get_u64(&bytes[16]);
  d.key = get_u64(&bytes[24]);
  if (d.addr + d.length < d.addr)
    return make_error(errc::parse_error, "region descriptor: address range wraps around");
  return d;
}

expected<endpoint_address> endpoint_address::parse(std::string_view text) {
  auto at = text.find('@');
  if (at == std::string_view::npos)
    return make_error(errc::parse_error, "endpoint '{}': expected transport@host:port", text);
  endpoint_address e{std::string(text.substr(0, at)), std::string(text.substr(at + 1))};
  if (e.transport != "socket" && e.transport != "verbs" && e.transport != "efa" &&
      e.transport != "tcp")
    return make_error(errc::parse_error, "endpoint '{}': unknown transport '{}'", text,
                      e.transport);
  auto colon = e.address.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == e.address.size() ||
      e.address.find_first_not_of("0123456789", colon + 1) != std::string::npos)
    return make_error(errc::parse_error, "endpoint '{}': '{}' is not host:port", text, e.address);
  return e;
}

} // namespace troupe::cluster::transfer
