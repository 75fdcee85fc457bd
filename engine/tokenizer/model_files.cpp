#include "engine/tokenizer/model_files.hpp"

#include <fstream>
#include <sstream>

namespace troupe::engine {

namespace {

expected<std::string> read_all(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in)
    return make_error(std::filesystem::exists(path) ? errc::io_error : errc::not_found,
                      "{}: cannot open", path.string());
  std::ostringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos)
    return {};
  const auto e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

} // namespace

expected<std::string> read_model_file(const std::filesystem::path& path) {
  std::filesystem::path current = path;
  for (int hop = 0; hop < 4; ++hop) {
    auto text = read_all(current);
    if (!text)
      return std::move(text).error();
    const std::string target = trim(*text);
    // A stub is short, single-line, not JSON, and names an existing file beside it.
    const bool stub_shaped = !target.empty() && target.size() < 1024 && target[0] != '{' &&
                             target[0] != '[' && target.find('\n') == std::string::npos;
    if (!stub_shaped)
      return text;
    const auto next = current.parent_path() / target;
    std::error_code ec;
    if (!std::filesystem::is_regular_file(next, ec))
      return text; // not a stub after all; the caller's parser reports what is wrong
    current = next;
  }
  return make_error(errc::parse_error, "{}: too many symlink stubs in a row", path.string());
}

} // namespace troupe::engine
