// Reading a model folder's small text files (tokenizer.json, tokenizer_config.json, ...), following
// real symlinks and git symlink stubs (a short non-JSON file whose content is a relative path to
// the real file). Used at model load by the tokenizer loaders; blocks on file I/O.
#pragma once

#include <filesystem>
#include <string>

#include "runtime/error.hpp"

namespace troupe::engine {

// The file's content after following stubs (at most a few hops); errors name the path.
expected<std::string> read_model_file(const std::filesystem::path& path);

} // namespace troupe::engine
