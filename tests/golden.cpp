#include "golden.hpp"

#include <cstdlib>
#include <fstream>
#include <random>

#include <doctest/doctest.h>

namespace troupe::test {

namespace fs = std::filesystem;

std::optional<fs::path> golden_dir() {
  const char* env = std::getenv("TROUPE_GOLDEN_DIR");
  fs::path dir = env != nullptr && *env != 0 ? fs::path(env) : fs::path(TROUPE_DEFAULT_GOLDEN_DIR);
  if (fs::is_directory(dir / "models"))
    return dir;
  const char* ci = std::getenv("CI");
  std::string why = "golden data not found at " + dir.string() + " (set TROUPE_GOLDEN_DIR)";
  if (ci != nullptr && std::string(ci) == "true")
    FAIL_CHECK(why << "; CI=true, so this is a failure");
  else
    MESSAGE("SKIP: " << why);
  return std::nullopt;
}

std::optional<fs::path> golden_model(const std::string& name) {
  auto dir = golden_dir();
  if (!dir)
    return std::nullopt;
  return *dir / "models" / name;
}

nlohmann::json read_json(const fs::path& path) {
  std::ifstream in(path);
  REQUIRE_MESSAGE(in.good(), "cannot read " << path);
  return nlohmann::json::parse(in);
}

std::vector<std::vector<int32_t>> golden_prompt_ids(const fs::path& model_dir) {
  std::vector<std::vector<int32_t>> prompts;
  const auto golden = read_json(model_dir / "golden.json"); // outlives the loop
  for (auto& c : golden.at("cases"))
    prompts.push_back(c.at("prompt_ids").get<std::vector<int32_t>>());
  return prompts;
}

temp_dir::temp_dir() {
  std::random_device rd;
  path_ =
      fs::temp_directory_path() / ("troupe-test-" + std::to_string(rd()) + std::to_string(rd()));
  fs::create_directories(path_);
}

temp_dir::~temp_dir() {
  std::error_code ec;
  fs::remove_all(path_, ec);
}

} // namespace troupe::test
