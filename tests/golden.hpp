// Where the golden conformance data lives (../shared/golden or $TROUPE_GOLDEN_DIR), and how a test
// skips without it: with a printed reason, or as a failure under CI=true.
#pragma once

#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace troupe::test {

// The golden folder, or nullopt after printing why (and failing the test when CI=true).
std::optional<std::filesystem::path> golden_dir();

// The model folders under golden/models.
std::optional<std::filesystem::path> golden_model(const std::string& name);

nlohmann::json read_json(const std::filesystem::path& path);

// Every case's prompt_ids in a golden model folder's golden.json.
std::vector<std::vector<int32_t>> golden_prompt_ids(const std::filesystem::path& model_dir);

// A fresh empty folder under the system temp dir, removed when the object dies.
class temp_dir {
 public:
  temp_dir();
  ~temp_dir();
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// Runs `f` after the last test case, before main returns (latest first): fixtures that own
// threads or an actor system stop while the process is whole, not during static destruction.
void at_teardown(std::function<void()> f);

} // namespace troupe::test
