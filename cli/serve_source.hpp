// What `cluster serve TARGET [flags]` deploys: TARGET is a model.yaml, a model folder, a .gguf
// file, or a Hugging Face id (ORG/NAME) found in the local Hugging Face cache (never
// downloaded); the flags override the file's keys. Reads files only.
#pragma once

#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "cli/serve_flags.hpp"
#include "runtime/config.hpp"

namespace troupe::cli {

// The deployment for TARGET with the flags applied: the file's errors name it (with line and
// column), a flag's errors name the flag. `model` comes back as an absolute path (a relative
// one in model.yaml is relative to its folder; an HF id is resolved in the cache).
expected<deployment_config> load_serve_target(const std::string& target,
                                              const std::vector<deployment_flags::override>& flags);

// ORG/NAME, as Hugging Face spells repository ids.
bool looks_like_hf_id(std::string_view s);
// The Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else
// $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub.
std::filesystem::path hf_hub_cache();
// The snapshot of `id` in the cache (refs/main's revision, else the newest snapshot); inside a
// snapshot without config.json, its one .gguf file. not_found names where it looked.
expected<std::filesystem::path> resolve_hf_id(std::string_view id);

} // namespace troupe::cli
