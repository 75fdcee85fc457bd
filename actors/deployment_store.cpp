#include "actors/deployment_store.hpp"

#include <fstream>
#include <iterator>

#include <caf/binary_deserializer.hpp>
#include <caf/binary_serializer.hpp>
#include <fmt/format.h>

#include "actors/messages.hpp"
#include "cluster/session.hpp"

namespace troupe::actors {

namespace fs = std::filesystem;

namespace {
constexpr std::string_view magic = "troupe-deployment ";
}

deployment_store::deployment_store(fs::path dir, std::string version)
  : dir_(std::move(dir)), version_(std::move(version)) {}

fs::path deployment_store::file_of(const std::string& name) const {
  // Names are the API's model names ("Qwen/Qwen3-8B"): no separators in the file name.
  std::string file;
  for (unsigned char c : name)
    file += std::isalnum(c) || c == '-' || c == '.' ? std::string(1, static_cast<char>(c))
                                                    : fmt::format("_{:02x}", c);
  return dir_ / (file + ".deployment");
}

expected<void> deployment_store::save(const deployment_config& dc) const {
  if (!enabled())
    return {};
  std::error_code ec;
  fs::create_directories(dir_, ec);
  if (ec)
    return make_error(errc::io_error, "cannot create {}: {}", dir_.string(), ec.message());
  std::vector<char> buf;
  caf::binary_serializer sink{nullptr, buf};
  if (auto err = sink(const_cast<deployment_config&>(dc)))
    return make_error(errc::internal, "cannot encode deployment '{}'", dc.served_model_name);
  std::string text = fmt::format("{}{}\n", magic, version_);
  text.append(buf.begin(), buf.end());
  return cluster::write_text(file_of(dc.served_model_name), text, true);
}

void deployment_store::remove(const std::string& name) const {
  if (!enabled())
    return;
  std::error_code ec;
  fs::remove(file_of(name), ec);
}

void deployment_store::clear() const {
  if (!enabled())
    return;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir_, ec))
    if (e.path().extension() == ".deployment")
      fs::remove(e.path(), ec);
}

deployment_store::loaded deployment_store::load_all() const {
  loaded out;
  std::error_code ec;
  if (!enabled() || !fs::is_directory(dir_, ec))
    return out;
  for (const auto& e : fs::directory_iterator(dir_, ec)) {
    if (e.path().extension() != ".deployment")
      continue;
    std::ifstream in(e.path(), std::ios::binary);
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const auto eol = text.find('\n');
    const std::string header = text.substr(0, eol);
    auto skip = [&](troupe::error err) {
      out.skipped.push_back(std::move(err));
      fs::remove(e.path(), ec);
    };
    if (eol == std::string::npos || header.rfind(magic, 0) != 0) {
      skip(make_error(errc::invalid_argument, "{} is not a deployment record", e.path().string()));
      continue;
    }
    if (auto saved = header.substr(magic.size()); saved != version_) {
      skip(make_error(errc::unsupported,
                      "{} was written by troupe {} (this is {}); serve it again with `cluster "
                      "serve`",
                      e.path().string(), saved, version_));
      continue;
    }
    std::vector<char> buf(text.begin() + static_cast<std::ptrdiff_t>(eol) + 1, text.end());
    caf::binary_deserializer source{nullptr, buf};
    deployment_config dc;
    if (auto err = source(dc); err || source.remaining() != 0) {
      skip(make_error(errc::invalid_argument, "{} is damaged", e.path().string()));
      continue;
    }
    out.configs.push_back(std::move(dc));
  }
  return out;
}

} // namespace troupe::actors
