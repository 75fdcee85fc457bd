#include "cli/serve_source.hpp"

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include <yaml-cpp/yaml.h>

namespace troupe::cli {

namespace fs = std::filesystem;

namespace {

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

bool is_gguf(const fs::path& p) {
  auto ext = p.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), ::tolower);
  return ext == ".gguf";
}

expected<std::string> read_text(const fs::path& file) {
  std::ifstream in(file);
  if (!in)
    return make_error(errc::not_found, "{}: cannot read the deployment file", file.string());
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

std::string emit(const YAML::Node& root) {
  YAML::Emitter out;
  out << root;
  return out.c_str();
}

void set_key(YAML::Node& root, const std::string& key, const std::string& value) {
  const auto dot = key.find('.');
  if (dot == std::string::npos)
    root[key] = value;
  else
    root[key.substr(0, dot)][key.substr(dot + 1)] = value;
}

// The model's absolute path: `raw` as given or relative to `base` (model.yaml's folder), else
// an HF id from the cache.
expected<std::string> resolve_model(const std::string& raw, const fs::path& base) {
  fs::path p(raw);
  if (p.is_relative() && !base.empty())
    p = base / p;
  std::error_code ec;
  if (fs::exists(p, ec))
    return fs::absolute(p).lexically_normal().string();
  if (!looks_like_hf_id(raw))
    return fs::absolute(p).lexically_normal().string(); // the loader says what is missing
  auto snapshot = resolve_hf_id(raw);
  if (!snapshot)
    return make_error(errc::not_found, "model '{}' is not a file or folder ({} does not exist), {}",
                      raw, p.string(), snapshot.error().message());
  return snapshot->string();
}

} // namespace

bool looks_like_hf_id(std::string_view s) {
  const auto slash = s.find('/');
  if (slash == std::string_view::npos || slash == 0 || slash + 1 == s.size() ||
      s.find('/', slash + 1) != std::string_view::npos)
    return false;
  return std::all_of(s.begin(), s.end(),
                     [](char c) {
                       return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' ||
                              c == '.' || c == '/';
                     }) &&
         s[0] != '.';
}

fs::path hf_hub_cache() {
  if (auto v = env("HF_HUB_CACHE"); !v.empty())
    return v;
  if (auto v = env("HF_HOME"); !v.empty())
    return fs::path(v) / "hub";
  if (auto v = env("XDG_CACHE_HOME"); !v.empty())
    return fs::path(v) / "huggingface" / "hub";
  return fs::path(env("HOME")) / ".cache" / "huggingface" / "hub";
}

expected<fs::path> resolve_hf_id(std::string_view id) {
  const std::string name(id);
  const auto slash = name.find('/');
  const fs::path repo =
      hf_hub_cache() / ("models--" + name.substr(0, slash) + "--" + name.substr(slash + 1));
  const fs::path snapshots = repo / "snapshots";
  auto absent = [&](std::string what) {
    return make_error(errc::not_found,
                      "and '{}' is not in the local Hugging Face cache: {} (the cache is "
                      "$HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub; troupe "
                      "never downloads: fetch it first, e.g. `huggingface-cli download {}`)",
                      name, what, name);
  };
  std::error_code ec;
  if (!fs::is_directory(snapshots, ec))
    return absent(fmt::format("{} does not exist", snapshots.string()));
  fs::path snapshot;
  if (std::ifstream ref(repo / "refs" / "main"); ref) {
    std::string rev;
    std::getline(ref, rev);
    if (!rev.empty() && fs::is_directory(snapshots / rev, ec))
      snapshot = snapshots / rev;
  }
  if (snapshot.empty()) { // no refs/main: the newest snapshot
    fs::file_time_type newest{};
    for (const auto& e : fs::directory_iterator(snapshots, ec))
      if (e.is_directory() && (snapshot.empty() || e.last_write_time() > newest)) {
        snapshot = e.path();
        newest = e.last_write_time();
      }
  }
  if (snapshot.empty())
    return absent(fmt::format("{} holds no snapshot", snapshots.string()));
  if (fs::exists(snapshot / "config.json", ec))
    return snapshot;
  std::vector<fs::path> ggufs;
  for (const auto& e : fs::directory_iterator(snapshot, ec))
    if (is_gguf(e.path()))
      ggufs.push_back(e.path());
  if (ggufs.size() == 1)
    return ggufs[0];
  if (ggufs.empty())
    return make_error(errc::not_found,
                      "the Hugging Face cache's snapshot {} of '{}' has neither config.json nor a "
                      ".gguf file (an incomplete download?)",
                      snapshot.string(), name);
  std::string names;
  for (const auto& g : ggufs)
    names += (names.empty() ? "" : ", ") + g.filename().string();
  return make_error(errc::invalid_argument,
                    "the Hugging Face cache's snapshot {} of '{}' holds several .gguf files ({}); "
                    "serve one of them by its path",
                    snapshot.string(), name, names);
}

expected<deployment_config>
load_serve_target(const std::string& target, const std::vector<deployment_flags::override>& flags) {
  // Each flag alone first, so that its error names the flag.
  for (const auto& f : flags) {
    YAML::Node one;
    one["model"] = "m";
    set_key(one, f.key, f.value);
    auto checked = parse_deployment(emit(one), f.flag);
    if (!checked)
      return std::move(checked).error();
  }
  YAML::Node root;
  fs::path base;
  std::string what = target;
  const fs::path path(target);
  auto ext = path.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), ::tolower);
  std::error_code ec;
  if (ext == ".yaml" || ext == ".yml") {
    auto text = read_text(path);
    if (!text)
      return std::move(text).error();
    auto file = parse_deployment(*text, target); // the file's own errors, with line and column
    if (!file)
      return std::move(file).error();
    root = YAML::Load(*text);
    base = path.parent_path().empty() ? fs::path(".") : path.parent_path();
  } else if (fs::exists(path, ec) || looks_like_hf_id(target)) {
    root["model"] = target;
  } else {
    return make_error(errc::not_found,
                      "'{}' does not exist: give a model.yaml, a model folder (config.json, "
                      "safetensors, tokenizer.json), a .gguf file, or a Hugging Face id ORG/NAME",
                      target);
  }
  for (const auto& f : flags)
    set_key(root, f.key, f.value);
  const std::string raw = root["model"].Scalar();
  auto model = resolve_model(raw, base);
  if (!model)
    return std::move(model).error();
  root["model"] = *model;
  if (!root["served_model_name"]) { // an HF id keeps its name, a folder its whole name
    if (!fs::exists(fs::path(base.empty() ? fs::path(raw) : base / raw), ec) &&
        looks_like_hf_id(raw))
      root["served_model_name"] = raw;
    else if (fs::is_directory(*model, ec))
      root["served_model_name"] = fs::path(*model).filename().string();
  }
  if (!flags.empty())
    what += " with the command-line flags";
  return parse_deployment(emit(root), what);
}

} // namespace troupe::cli
