#include "runtime/config.hpp"

#include <algorithm>
#include <fstream>
#include <sstream>

#include <yaml-cpp/yaml.h>

namespace troupe {

namespace {

const std::vector<std::string_view> parallel_keys = {"tensor", "pipeline", "replicas", "expert"};
const std::vector<std::string_view> http_keys = {
    "threads",        "max_connections", "max_header_bytes", "max_body_bytes",
    "read_timeout_s", "idle_timeout_s",  "write_timeout_s"};

std::string where(std::string_view what, const YAML::Mark& m) {
  if (m.is_null())
    return std::string(what);
  return fmt::format("{}:{}:{}", what, m.line + 1, m.column + 1);
}

error unknown_key(std::string_view what, const YAML::Node& key, std::string_view name,
                  const std::vector<std::string_view>& valid, std::string_view section) {
  auto best = std::min_element(valid.begin(), valid.end(), [&](auto a, auto b) {
    return edit_distance(name, a) < edit_distance(name, b);
  });
  return make_error(errc::invalid_argument, "{}: unknown key '{}{}' (did you mean '{}{}'?)",
                    where(what, key.Mark()), section, name, section, *best);
}

// Reads one scalar into `out`, turning yaml-cpp's conversion errors into ours.
template <class T>
expected<void> read(std::string_view what, const YAML::Node& value, std::string_view key, T& out) {
  if (!value.IsScalar())
    return make_error(errc::invalid_argument, "{}: '{}' must be a scalar",
                      where(what, value.Mark()), key);
  try {
    out = value.as<T>();
  } catch (const YAML::Exception&) {
    return make_error(errc::invalid_argument, "{}: '{}' has an invalid value '{}'",
                      where(what, value.Mark()), key, value.Scalar());
  }
  return {};
}

expected<void> read_parallel(std::string_view what, const YAML::Node& node, parallel_size& p) {
  if (!node.IsMap())
    return make_error(errc::invalid_argument,
                      "{}: 'parallel' must be a mapping (tensor, pipeline, replicas, expert)",
                      where(what, node.Mark()));
  for (const auto& kv : node) {
    const auto name = kv.first.Scalar();
    const auto full = "parallel." + name;
    if (name == "tensor")
      TROUPE_TRY_VOID(read(what, kv.second, full, p.tensor));
    else if (name == "pipeline")
      TROUPE_TRY_VOID(read(what, kv.second, full, p.pipeline));
    else if (name == "replicas")
      TROUPE_TRY_VOID(read(what, kv.second, full, p.replicas));
    else if (name == "expert")
      TROUPE_TRY_VOID(read(what, kv.second, full, p.expert));
    else
      return unknown_key(what, kv.first, name, parallel_keys, "parallel.");
  }
  return {};
}

expected<void> read_http(std::string_view what, const YAML::Node& node, http_limits& h) {
  if (!node.IsMap())
    return make_error(errc::invalid_argument,
                      "{}: 'http' must be a mapping (threads, max_connections, ...)",
                      where(what, node.Mark()));
  for (const auto& kv : node) {
    const auto name = kv.first.Scalar();
    const auto full = "http." + name;
    const auto& v = kv.second;
    if (name == "threads")
      TROUPE_TRY_VOID(read(what, v, full, h.threads));
    else if (name == "max_connections")
      TROUPE_TRY_VOID(read(what, v, full, h.max_connections));
    else if (name == "max_header_bytes")
      TROUPE_TRY_VOID(read(what, v, full, h.max_header_bytes));
    else if (name == "max_body_bytes")
      TROUPE_TRY_VOID(read(what, v, full, h.max_body_bytes));
    else if (name == "read_timeout_s")
      TROUPE_TRY_VOID(read(what, v, full, h.read_timeout_s));
    else if (name == "idle_timeout_s")
      TROUPE_TRY_VOID(read(what, v, full, h.idle_timeout_s));
    else if (name == "write_timeout_s")
      TROUPE_TRY_VOID(read(what, v, full, h.write_timeout_s));
    else
      return unknown_key(what, kv.first, name, http_keys, "http.");
  }
  return {};
}

expected<void> check_http(std::string_view what, const http_limits& h) {
  auto bad = [&](std::string_view key, std::string_view rule) {
    return make_error(errc::invalid_argument, "{}: 'http.{}' {}", what, key, rule);
  };
  if (h.threads < 1 || h.threads > 256)
    return bad("threads", "must be in [1, 256]");
  if (h.max_connections < 1)
    return bad("max_connections", "must be >= 1");
  if (h.max_header_bytes < 1024)
    return bad("max_header_bytes", "must be >= 1024");
  if (h.max_body_bytes < 1024)
    return bad("max_body_bytes", "must be >= 1024");
  for (auto [key, v] : {std::pair{"read_timeout_s", h.read_timeout_s},
                        {"idle_timeout_s", h.idle_timeout_s},
                        {"write_timeout_s", h.write_timeout_s}})
    if (!(v > 0 && v <= 86400))
      return bad(key, "must be in (0, 86400] seconds");
  return {};
}

const std::vector<std::string_view> disaggregation_keys = {
    "prefill", "decode",        "provider", "timeout_s", "min_prefill_tokens", "on_prefill_failure",
    "staging", "staging_tokens"};
const std::vector<std::string_view> group_keys = {"tensor", "pipeline", "replicas", "block_size"};

expected<void> read_group(std::string_view what, const YAML::Node& node, std::string_view name,
                          kv_group& g) {
  const auto section = fmt::format("disaggregation.{}.", name);
  if (!node.IsMap())
    return make_error(errc::invalid_argument,
                      "{}: 'disaggregation.{}' must be a mapping (tensor, pipeline, replicas, "
                      "block_size)",
                      where(what, node.Mark()), name);
  for (const auto& kv : node) {
    const auto key = kv.first.Scalar();
    const auto full = section + key;
    if (key == "tensor")
      TROUPE_TRY_VOID(read(what, kv.second, full, g.parallel.tensor));
    else if (key == "pipeline")
      TROUPE_TRY_VOID(read(what, kv.second, full, g.parallel.pipeline));
    else if (key == "replicas")
      TROUPE_TRY_VOID(read(what, kv.second, full, g.parallel.replicas));
    else if (key == "block_size")
      TROUPE_TRY_VOID(read(what, kv.second, full, g.block_size));
    else
      return unknown_key(what, kv.first, key, group_keys, section);
  }
  return {};
}

expected<void> read_disaggregation(std::string_view what, const YAML::Node& node,
                                   disaggregation_config& d) {
  if (!node.IsMap())
    return make_error(errc::invalid_argument,
                      "{}: 'disaggregation' must be a mapping (prefill, decode, provider, ...)",
                      where(what, node.Mark()));
  d.enabled = true;
  for (const auto& kv : node) {
    const auto key = kv.first.Scalar();
    const auto full = "disaggregation." + key;
    const auto& v = kv.second;
    if (key == "prefill" || key == "decode")
      TROUPE_TRY_VOID(read_group(what, v, key, key == "prefill" ? d.prefill : d.decode));
    else if (key == "provider")
      TROUPE_TRY_VOID(read(what, v, full, d.provider));
    else if (key == "timeout_s")
      TROUPE_TRY_VOID(read(what, v, full, d.timeout_s));
    else if (key == "min_prefill_tokens")
      TROUPE_TRY_VOID(read(what, v, full, d.min_prefill_tokens));
    else if (key == "on_prefill_failure")
      TROUPE_TRY_VOID(read(what, v, full, d.on_prefill_failure));
    else if (key == "staging")
      TROUPE_TRY_VOID(read(what, v, full, d.staging));
    else if (key == "staging_tokens")
      TROUPE_TRY_VOID(read(what, v, full, d.staging_tokens));
    else
      return unknown_key(what, kv.first, key, disaggregation_keys, "disaggregation.");
  }
  return {};
}

expected<void> check_disaggregation(std::string_view what, const deployment_config& c) {
  const auto& d = c.disaggregation;
  if (!d.enabled)
    return {};
  auto bad = [&](std::string_view key, std::string_view rule) {
    return make_error(errc::invalid_argument, "{}: 'disaggregation.{}' {}", what, key, rule);
  };
  const auto& p = c.parallel;
  if (p.tensor != 1 || p.pipeline != 1 || p.replicas != 1 || p.expert != 0)
    return make_error(errc::invalid_argument,
                      "{}: 'parallel' and 'disaggregation' exclude each other: give each group "
                      "its sizes under disaggregation.prefill and disaggregation.decode",
                      what);
  for (auto [name, g] : {std::pair{"prefill", &d.prefill}, {"decode", &d.decode}}) {
    const auto& q = g->parallel;
    if (q.tensor < 1 || q.pipeline < 1 || q.replicas < 1)
      return bad(name, "sizes must be >= 1");
    if (g->block_size < 0 || g->block_size > 1024)
      return bad(fmt::format("{}.block_size", name), "must be in [0, 1024] (0 = block_size)");
  }
  static const std::vector<std::string_view> providers = {"auto",  "local", "tcp",
                                                          "verbs", "efa",   "socket"};
  if (std::find(providers.begin(), providers.end(), d.provider) == providers.end())
    return bad("provider",
               fmt::format("must be auto, local, tcp, verbs, efa or socket, got '{}'", d.provider));
  if (!(d.timeout_s > 0 && d.timeout_s <= 3600))
    return bad("timeout_s", "must be in (0, 3600] seconds");
  if (d.min_prefill_tokens < 0)
    return bad("min_prefill_tokens", "must be >= 0 (0 = always hand off)");
  if (d.on_prefill_failure != "decode" && d.on_prefill_failure != "fail")
    return bad("on_prefill_failure",
               fmt::format("must be decode or fail, got '{}'", d.on_prefill_failure));
  if (d.staging != "auto" && d.staging != "always" && d.staging != "never")
    return bad("staging", fmt::format("must be auto, always or never, got '{}'", d.staging));
  if (d.staging_tokens < 0 || d.staging_tokens > (1 << 24))
    return bad("staging_tokens", "must be in [0, 16777216] (0 = twice max_model_len)");
  return {};
}

expected<void> read_key(std::string_view what, const std::string& k, const YAML::Node& v,
                        deployment_config& c) {
  if (k == "model")
    return read(what, v, k, c.model);
  if (k == "served_model_name")
    return read(what, v, k, c.served_model_name);
  if (k == "dtype")
    return read(what, v, k, c.dtype);
  if (k == "device")
    return read(what, v, k, c.device);
  if (k == "max_model_len")
    return read(what, v, k, c.max_model_len);
  if (k == "max_num_seqs")
    return read(what, v, k, c.max_num_seqs);
  if (k == "max_num_batched_tokens")
    return read(what, v, k, c.max_num_batched_tokens);
  if (k == "max_waiting")
    return read(what, v, k, c.max_waiting);
  if (k == "gpu_memory_utilization")
    return read(what, v, k, c.gpu_memory_utilization);
  if (k == "block_size")
    return read(what, v, k, c.block_size);
  if (k == "num_kv_blocks")
    return read(what, v, k, c.num_kv_blocks);
  if (k == "prefix_caching")
    return read(what, v, k, c.prefix_caching);
  if (k == "seed")
    return read(what, v, k, c.seed);
  if (k == "host")
    return read(what, v, k, c.host);
  if (k == "port")
    return read(what, v, k, c.port);
  if (k == "api_key")
    return read(what, v, k, c.api_key);
  if (k == "open_health_metrics")
    return read(what, v, k, c.open_health_metrics);
  if (k == "log_stats_interval_s")
    return read(what, v, k, c.log_stats_interval_s);
  if (k == "parallel")
    return read_parallel(what, v, c.parallel);
  if (k == "http")
    return read_http(what, v, c.http);
  if (k == "disaggregation")
    return read_disaggregation(what, v, c.disaggregation);
  return make_error(errc::internal, "unhandled key {}", k);
}

expected<void> check_ranges(std::string_view what, const deployment_config& c) {
  auto bad = [&](std::string_view key, std::string_view rule) {
    return make_error(errc::invalid_argument, "{}: '{}' {}", what, key, rule);
  };
  if (c.model.empty())
    return bad("model", "is required (a Hugging Face folder or a .gguf file)");
  if (c.dtype != "auto" && c.dtype != "float32" && c.dtype != "bfloat16" && c.dtype != "float16")
    return bad("dtype",
               fmt::format("must be auto, float32, bfloat16 or float16, got '{}'", c.dtype));
  if (c.device != "auto" && c.device != "cpu" && c.device != "cuda")
    return bad("device", fmt::format("must be auto, cpu or cuda, got '{}'", c.device));
  if (c.max_model_len < 0)
    return bad("max_model_len", "must be >= 0 (0 = the model's limit)");
  if (c.max_num_seqs < 1)
    return bad("max_num_seqs", "must be >= 1");
  if (c.max_num_batched_tokens < 1)
    return bad("max_num_batched_tokens", "must be >= 1");
  if (c.max_waiting < 1)
    return bad("max_waiting", "must be >= 1");
  if (!(c.gpu_memory_utilization > 0 && c.gpu_memory_utilization <= 1))
    return bad("gpu_memory_utilization", "must be in (0, 1]");
  if (c.block_size < 1 || c.block_size > 1024)
    return bad("block_size", "must be in [1, 1024]");
  if (c.num_kv_blocks < 0)
    return bad("num_kv_blocks", "must be >= 0 (0 = derived)");
  if (!(c.log_stats_interval_s >= 0 && c.log_stats_interval_s <= 86400))
    return bad("log_stats_interval_s", "must be in [0, 86400] seconds (0: no stats line)");
  if (c.port < 0 || c.port > 65535)
    return bad("port", "must be in [0, 65535]");
  const auto& p = c.parallel;
  if (p.tensor < 1 || p.pipeline < 1 || p.replicas < 1)
    return bad("parallel", "sizes must be >= 1");
  if (p.expert < 0 || p.expert > p.tensor)
    return bad("parallel.expert", "must be in [1, parallel.tensor] (0 = parallel.tensor)");
  TROUPE_TRY_VOID(check_disaggregation(what, c));
  return check_http(what, c.http);
}

} // namespace

std::vector<replica_group> replica_groups(const deployment_config& c) {
  if (!c.disaggregation.enabled)
    return {{.role = "", .parallel = c.parallel, .block_size = c.block_size}};
  std::vector<replica_group> out;
  for (auto [role, g] : {std::pair{"decode", &c.disaggregation.decode},
                         std::pair{"prefill", &c.disaggregation.prefill}})
    out.push_back({.role = role,
                   .parallel = g->parallel,
                   .block_size = g->block_size > 0 ? g->block_size : c.block_size});
  return out;
}

size_t group_index(const std::vector<replica_group>& groups, int32_t replica) {
  for (size_t g = 0; g < groups.size(); ++g) {
    if (replica < groups[g].parallel.replicas)
      return g;
    replica -= groups[g].parallel.replicas;
  }
  return groups.size() - 1;
}

size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j)
    row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

const std::vector<std::string_view>& deployment_keys() {
  static const std::vector<std::string_view> keys = {"model",
                                                     "served_model_name",
                                                     "dtype",
                                                     "device",
                                                     "max_model_len",
                                                     "max_num_seqs",
                                                     "max_num_batched_tokens",
                                                     "max_waiting",
                                                     "gpu_memory_utilization",
                                                     "block_size",
                                                     "num_kv_blocks",
                                                     "prefix_caching",
                                                     "seed",
                                                     "host",
                                                     "port",
                                                     "api_key",
                                                     "open_health_metrics",
                                                     "log_stats_interval_s",
                                                     "parallel",
                                                     "http",
                                                     "disaggregation"};
  return keys;
}

expected<deployment_config> parse_deployment(std::string_view yaml_text, std::string_view what) {
  YAML::Node root;
  try {
    root = YAML::Load(std::string(yaml_text));
  } catch (const YAML::ParserException& e) {
    return make_error(errc::parse_error, "{}: malformed YAML: {}", where(what, e.mark), e.msg);
  } catch (const YAML::Exception& e) {
    return make_error(errc::parse_error, "{}: {}", what, e.what());
  }
  if (!root.IsMap())
    return make_error(errc::parse_error, "{}: expected a mapping of keys (model: ..., port: ...)",
                      what);
  deployment_config c;
  const auto& keys = deployment_keys();
  for (const auto& kv : root) {
    if (!kv.first.IsScalar())
      return make_error(errc::invalid_argument, "{}: keys must be names",
                        where(what, kv.first.Mark()));
    const auto name = kv.first.Scalar();
    if (std::find(keys.begin(), keys.end(), name) == keys.end())
      return unknown_key(what, kv.first, name, keys, "");
    TROUPE_TRY_VOID(read_key(what, name, kv.second, c));
  }
  TROUPE_TRY_VOID(check_ranges(what, c));
  if (c.served_model_name.empty())
    c.served_model_name = std::filesystem::path(c.model).filename().replace_extension().string();
  if (c.served_model_name.empty()) // a folder path ending in '/'
    c.served_model_name = std::filesystem::path(c.model).parent_path().filename().string();
  return c;
}

expected<deployment_config> load_deployment(const std::filesystem::path& file) {
  std::ifstream in(file);
  if (!in)
    return make_error(errc::not_found, "{}: cannot read the deployment file", file.string());
  std::stringstream text;
  text << in.rdbuf();
  auto c = parse_deployment(text.str(), file.string());
  if (c && std::filesystem::path(c->model).is_relative()) // relative to the yaml's folder
    c->model = (file.parent_path() / c->model).lexically_normal().string();
  return c;
}

} // namespace troupe
