#include "cluster/transfer/kv_transport.hpp"

#include <cstring>
#include <fstream>

namespace troupe::cluster::transfer {
namespace {

constexpr uint32_t descriptor_magic = 0x31564b54;     // "TKV1"
constexpr uint32_t descriptor_ipc_magic = 0x32564b54; // "TKV2": with a CUDA IPC part
constexpr size_t descriptor_size = 32, descriptor_ipc_size = 128;

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

expected<host_id> parse_host_id(std::string_view text) {
  host_id out{};
  size_t digits = 0;
  for (char c : text) {
    if (c == '-')
      continue;
    int v = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
    if (v < 0 || digits == 32)
      return make_error(errc::parse_error, "boot id '{}': expected 32 lowercase hex digits", text);
    out[digits / 2] = static_cast<uint8_t>(out[digits / 2] | (v << (digits % 2 == 0 ? 4 : 0)));
    ++digits;
  }
  if (digits != 32)
    return make_error(errc::parse_error, "boot id '{}': expected 32 lowercase hex digits", text);
  return out;
}

expected<host_id> this_host_id() {
  static constexpr const char* file = "/proc/sys/kernel/random/boot_id";
  std::string text;
  if (!std::getline(std::ifstream(file), text))
    return make_error(errc::unavailable, "cannot read {} (this host's identity)", file);
  return parse_host_id(text);
}

std::string to_string(const host_id& host) {
  std::string out;
  for (size_t i = 0; i < host.size(); ++i)
    out += fmt::format("{}{:02x}", i == 4 || i == 6 || i == 8 || i == 10 ? "-" : "", host[i]);
  return out;
}

// Layout: u32 magic, u8 kind, 3 bytes zero, u64 addr, u64 length, u64 key; with the IPC part
// ("TKV2"), then u64 offset, i32 device, 4 bytes zero, 16 bytes host, 64 bytes handle.
std::vector<uint8_t> region_descriptor::serialize() const {
  std::vector<uint8_t> out(ipc ? descriptor_ipc_size : descriptor_size, 0);
  const uint32_t magic = ipc ? descriptor_ipc_magic : descriptor_magic;
  for (int i = 0; i < 4; ++i)
    out[i] = static_cast<uint8_t>(magic >> (8 * i));
  out[4] = static_cast<uint8_t>(kind);
  put_u64(&out[8], addr);
  put_u64(&out[16], length);
  put_u64(&out[24], key);
  if (ipc) {
    put_u64(&out[32], ipc->offset);
    put_u64(&out[40], static_cast<uint32_t>(ipc->device));
    std::memcpy(&out[48], ipc->host.data(), ipc->host.size());
    std::memcpy(&out[64], ipc->handle.data(), ipc->handle.size());
  }
  return out;
}

expected<region_descriptor> region_descriptor::parse(std::span<const uint8_t> bytes) {
  if (bytes.size() != descriptor_size && bytes.size() != descriptor_ipc_size)
    return make_error(errc::parse_error, "region descriptor: {} bytes, expected {} or {}",
                      bytes.size(), descriptor_size, descriptor_ipc_size);
  const bool with_ipc = bytes.size() == descriptor_ipc_size;
  uint32_t magic = static_cast<uint32_t>(get_u64(bytes.data()) & 0xffffffffu);
  if (magic != (with_ipc ? descriptor_ipc_magic : descriptor_magic))
    return make_error(errc::parse_error, "region descriptor: bad magic {:#x} for {} bytes", magic,
                      bytes.size());
  if (bytes[4] > static_cast<uint8_t>(memory_kind::cuda))
    return make_error(errc::parse_error, "region descriptor: unknown memory kind {}", bytes[4]);
  region_descriptor d;
  d.kind = static_cast<memory_kind>(bytes[4]);
  d.addr = get_u64(&bytes[8]);
  d.length = get_u64(&bytes[16]);
  d.key = get_u64(&bytes[24]);
  if (d.addr + d.length < d.addr)
    return make_error(errc::parse_error, "region descriptor: address range wraps around");
  if (!with_ipc)
    return d;
  if (d.kind != memory_kind::cuda)
    return make_error(errc::parse_error, "region descriptor: a CUDA IPC part on {} memory",
                      to_string(d.kind));
  const uint64_t device = get_u64(&bytes[40]);
  if (bytes[5] != 0 || bytes[6] != 0 || bytes[7] != 0 || device > 0x7fffffff)
    return make_error(errc::parse_error, "region descriptor: reserved bytes are not zero");
  cuda_ipc_part ipc{.offset = get_u64(&bytes[32]), .device = static_cast<int32_t>(device)};
  if (ipc.offset + d.length < ipc.offset)
    return make_error(errc::parse_error, "region descriptor: IPC offset range wraps around");
  std::memcpy(ipc.host.data(), &bytes[48], ipc.host.size());
  std::memcpy(ipc.handle.data(), &bytes[64], ipc.handle.size());
  d.ipc = ipc;
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
