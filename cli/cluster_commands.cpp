#include "cli/cluster_commands.hpp"

#include <csignal>
#include <memory>
#include <thread>

#include <caf/actor_system.hpp>
#include <caf/io/middleman.hpp>
#include <caf/io/middleman_actor.hpp>
#include <caf/scoped_actor.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "actors/caf_glue.hpp"
#include "actors/messages.hpp"
#include "cli/cluster_daemon.hpp"
#include "cluster/session.hpp"

namespace troupe::cli {

namespace {

namespace fs = std::filesystem;

struct client_options {
  std::string address, token, temp_dir, ca_sha256;
  bool json = false;
  int timeout_s = 5;
};

std::string gib(uint64_t bytes) {
  return fmt::format("{:.1f} GiB", static_cast<double>(bytes) / (1ull << 30));
}

nlohmann::json to_json(const msg::cluster_view& v, const std::string& head) {
  auto nodes = nlohmann::json::array();
  for (const auto& n : v.nodes) {
    auto gpus = nlohmann::json::array();
    for (const auto& g : n.info.resources.gpus)
      gpus.push_back({{"index", g.index},
                      {"name", g.name},
                      {"memory_bytes", g.memory_bytes},
                      {"compute_capability", fmt::format("{}.{}", g.cc_major, g.cc_minor)},
                      {"cpu_standin", g.cpu_standin}});
    auto rdma = nlohmann::json::array();
    for (const auto& d : n.info.resources.rdma_devices)
      rdma.push_back(
          {{"name", d.name}, {"port", d.port}, {"state", d.state}, {"link_layer", d.link_layer}});
    nodes.push_back({{"node_id", n.info.node_id},
                     {"address", n.info.address},
                     {"hostname", n.info.hostname},
                     {"head_node", n.info.head_node},
                     {"state", n.state},
                     {"reason", n.reason},
                     {"incarnation", n.incarnation},
                     {"last_heartbeat_ms_ago", n.heartbeat_age_ms},
                     {"up_ms", n.up_ms},
                     {"gpus_used", n.gpus_used},
                     {"gpus", gpus},
                     {"num_cpus", n.info.resources.num_cpus},
                     {"memory_bytes", n.info.resources.memory_bytes},
                     {"rdma_devices", rdma}});
  }
  auto deployments = nlohmann::json::array();
  for (const auto& d : v.deployments) {
    auto ranks = nlohmann::json::array();
    for (const auto& r : d.ranks)
      ranks.push_back({{"replica", r.replica},
                       {"pp_rank", r.pp_rank},
                       {"tp_rank", r.tp_rank},
                       {"node_id", r.node_id},
                       {"device", r.device}});
    auto groups = nlohmann::json::array();
    for (const auto& g : d.groups)
      groups.push_back({{"role", g.role},
                        {"tensor", g.tensor},
                        {"pipeline", g.pipeline},
                        {"replicas", g.replicas},
                        {"first_replica", g.first_replica},
                        {"ready", g.ready}});
    deployments.push_back({{"name", d.name},
                           {"state", d.state},
                           {"endpoint", d.endpoint},
                           {"reason", d.reason},
                           {"device", d.device},
                           {"tensor", d.tensor},
                           {"pipeline", d.pipeline},
                           {"replicas", d.replicas},
                           {"replica_states", d.replica_states},
                           {"restarts", d.restarts},
                           {"ranks", ranks},
                           {"groups", groups},
                           {"transfer", d.transfer},
                           {"loading", d.loading}});
  }
  return {{"head", head},
          {"version", v.head_version},
          {"nodes", nodes},
          {"kv_namespaces", v.kv_namespaces},
          {"deployments", deployments}};
}

void print_table(const msg::cluster_view& v, const std::string& head) {
  size_t alive = 0;
  for (const auto& n : v.nodes)
    alive += n.state == "alive";
  fmt::print("head {} (troupe {}): {} node(s), {} alive\n", head, v.head_version, v.nodes.size(),
             alive);
  fmt::print("{:<14} {:<16} {:<6} {:<22} {:>5} {:>10} {:<14} {}\n", "NODE", "ADDRESS", "STATE",
             "GPUS used/total", "CPUS", "MEMORY", "RDMA", "LAST HEARTBEAT");
  for (const auto& n : v.nodes) {
    const auto& r = n.info.resources;
    // A node without GPUs (or stand-ins) serves one CPU rank of a device: cpu deployment.
    std::string gpus =
        r.gpus.empty() ? (n.gpus_used > 0 ? "- (CPU rank)" : "-")
                       : fmt::format("{}/{} {}", n.gpus_used, r.gpus.size(), r.gpus.front().name);
    std::string rdma = r.rdma_devices.empty() ? "-" : "";
    for (const auto& d : r.rdma_devices)
      rdma += fmt::format("{}{}({})", rdma.empty() ? "" : ",", d.name, d.state);
    std::string id = n.info.node_id + (n.info.head_node ? "*" : "");
    fmt::print("{:<14} {:<16} {:<6} {:<22} {:>5} {:>10} {:<14} {} ms ago{}\n", id, n.info.address,
               n.state, gpus, r.num_cpus, gib(r.memory_bytes), rdma, n.heartbeat_age_ms,
               n.reason.empty() ? "" : "  (" + n.reason + ")");
  }
  if (v.deployments.empty())
    fmt::print("deployments: none\n");
  for (const auto& d : v.deployments) {
    std::string ranks;
    for (const auto& r : d.ranks)
      ranks += fmt::format(" r{}/pp{}/tp{}@{}", r.replica, r.pp_rank, r.tp_rank, r.node_id);
    fmt::print("deployment {:<20} {:<8} {} ({}, tensor={} pipeline={} replicas={} [{}], {} "
               "restart(s)) ranks:{}{}\n",
               d.name, d.state, d.endpoint.empty() ? "-" : d.endpoint, d.device, d.tensor,
               d.pipeline, d.replicas, fmt::join(d.replica_states, " "), d.restarts, ranks,
               d.reason.empty() ? "" : "  (" + d.reason + ")");
    for (const auto& g : d.groups)
      fmt::print("  {:<8} group: tensor={} pipeline={} replicas {}..{}, {} of {} ready\n", g.role,
                 g.tensor, g.pipeline, g.first_replica, g.first_replica + g.replicas - 1, g.ready,
                 g.replicas);
    if (!d.transfer.empty())
      fmt::print("  KV transfer: {}\n", d.transfer);
    for (const auto& line : d.loading)
      fmt::print("  {}\n", line);
  }
  fmt::print("kv namespaces (one per replica): {}\n",
             v.kv_namespaces.empty() ? "none"
                                     : fmt::format("{}", fmt::join(v.kv_namespaces, ", ")));
}

int run_status(const client_options& o) {
  auto target = resolve_head(o.address, o.token, o.temp_dir, o.ca_sha256);
  if (!target) { // refused at the join bootstrap (3), a usage error (2), unreachable (1)
    fmt::print(stderr, "error: {}\n", target.error().message());
    const auto code = target.error().code();
    return code == errc::invalid_argument ? 3 : code == errc::parse_error ? 2 : 1;
  }
  expected<msg::cluster_view> view = make_error(errc::internal, "no reply");
  auto ok = with_head(*target, std::chrono::seconds(o.timeout_s),
                      [&](caf::scoped_actor& self, const caf::actor& head,
                          caf::actor_system& sys) -> expected<void> {
                        self->request(head, std::chrono::seconds(o.timeout_s),
                                      msg::status_atom::value, target->token)
                            .receive([&](msg::cluster_view& v) { view = std::move(v); },
                                     [&](caf::error& e) {
                                       view = actors::from_caf(e, &sys).context("cluster status");
                                     });
                        return {};
                      });
  if (!ok)
    view = std::move(ok).error();
  if (!view) {
    fmt::print(stderr, "error: {}\n", view.error().message());
    return view.error().code() == errc::invalid_argument ? 3 : 1;
  }
  if (o.json)
    fmt::print("{}\n", to_json(*view, target->address).dump(2));
  else
    print_table(*view, target->address);
  return 0;
}

// Stops one daemon of this host: SIGTERM, then SIGKILL after `grace`.
bool stop_daemon(const fs::path& session, const std::string& role, std::chrono::seconds grace) {
  auto pid = cluster::live_pid(session, role);
  if (!pid)
    return false;
  // The head drains its deployments for the grace period, less the time it needs to exit.
  (void)cluster::write_text(session / "stop_grace", std::to_string(grace.count()) + "\n");
  kill(*pid, SIGTERM);
  auto deadline = std::chrono::steady_clock::now() + grace;
  while (cluster::process_alive(*pid) && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  if (cluster::process_alive(*pid)) {
    fmt::print(stderr, "warning: {} daemon (pid {}) ignored SIGTERM for {} s; killing it\n", role,
               *pid, grace.count());
    kill(*pid, SIGKILL);
  } else {
    fmt::print("stopped the {} daemon (pid {})\n", role, *pid);
  }
  std::error_code ec;
  fs::remove(session / (role + ".pid"), ec);
  return true;
}

int run_stop(const std::string& temp_dir, int grace_s) {
  const fs::path latest = cluster::temp_root(temp_dir) / "session_latest";
  bool any = false;
  for (const char* role : {"node", "head"})
    any |= stop_daemon(latest, role, std::chrono::seconds(grace_s));
  if (!any)
    fmt::print("no troupe daemon is running here (temp dir {})\n", latest.parent_path().string());
  return 0;
}

// The first line of a secret file, or the usage error that names the option.
std::string read_secret(const std::string& option, const std::string& path) {
  auto text = cluster::read_text(path);
  if (!text || text->find_first_not_of(" \t\r\n") == std::string::npos)
    throw CLI::ValidationError(option, "'" + path + "' holds no secret");
  return text->substr(0, text->find_first_of("\r\n"));
}

void add_secret_option(CLI::App* cmd, const std::string& name,
                       std::function<void(std::string)> set) {
  const std::string option = "--" + name + "-file";
  cmd->add_option_function<std::string>(
         option, [set, option](const std::string& path) { set(read_secret(option, path)); },
         "Read the " + name + " from this file (first line), keeping it out of `ps`")
      ->check(CLI::ExistingFile);
}

void add_temp_dir(CLI::App* cmd, std::string& dir) {
  cmd->add_option("--temp-dir", dir, "Session root (default $TROUPE_TEMP_DIR or /tmp/troupe)");
}

} // namespace

void add_secret_file_option(CLI::App* cmd, const std::string& name, std::string& secret) {
  add_secret_option(cmd, name, [&secret](std::string s) { secret = std::move(s); });
}

void add_secret_file_option(CLI::App* cmd, const std::string& name,
                            std::optional<std::string>& secret) {
  add_secret_option(cmd, name, [&secret](std::string s) { secret = std::move(s); });
}

void add_ca_option(CLI::App* cmd, std::string& ca_sha256) {
  auto* sha = cmd->add_option("--ca-sha256", ca_sha256,
                              "SHA-256 fingerprint of the cluster CA, as printed by `cluster start "
                              "--head` (default: $TROUPE_CA_SHA256)");
  cmd->add_option_function<std::string>(
         "--ca-file",
         [&ca_sha256](const std::string& path) {
           auto pem = cluster::read_text(path);
           auto fp = pem ? cluster::tls::fingerprint(*pem + "\n")
                         : expected<std::string>(make_error(errc::io_error, "unreadable"));
           if (!fp)
             throw CLI::ValidationError(
                 "--ca-file", "'" + path + "' is not a PEM certificate: " + fp.error().message());
           ca_sha256 = *fp;
         },
         "The cluster CA's certificate (instead of --ca-sha256: its fingerprint is pinned)")
      ->check(CLI::ExistingFile)
      ->excludes(sha);
}

namespace {

// A certificate for this command, from the head's join bootstrap, in a private folder that is
// removed with the returned handle.
expected<std::pair<cluster::tls::identity_files, std::shared_ptr<void>>>
bootstrap_client(const head_target& t, const std::string& ca_sha256) {
  std::string pin = ca_sha256;
  if (pin.empty())
    if (const char* env = std::getenv("TROUPE_CA_SHA256"))
      pin = env;
  if (pin.empty())
    return make_error(errc::parse_error,
                      "--address needs the cluster CA's fingerprint: pass --ca-sha256 (or set "
                      "TROUPE_CA_SHA256) as printed by `cluster start --head`");
  if (t.token.empty())
    return make_error(errc::parse_error,
                      "--address needs the cluster token: --token-file FILE, $TROUPE_TOKEN or "
                      "--token");
  auto key = cluster::tls::new_private_key();
  if (!key)
    return std::move(key).error();
  auto id = cluster::tls::bootstrap(t.host, cluster::tls::bootstrap_port(t.port), t.token, pin,
                                    fmt::format("cli-{}", getpid()), *key);
  if (!id)
    return std::move(id).error();
  std::string dir = (fs::temp_directory_path() / "troupe-cli-XXXXXX").string();
  if (::mkdtemp(dir.data()) == nullptr)
    return make_error(errc::io_error, "cannot create a private folder under {}: {}",
                      fs::temp_directory_path().string(), strerror(errno));
  std::shared_ptr<void> remove(nullptr, [dir](void*) {
    std::error_code ec;
    fs::remove_all(dir, ec);
  });
  auto files = cluster::tls::write_identity(fs::path(dir) / "tls", "client", *id);
  if (!files)
    return std::move(files).error();
  return std::pair{*files, remove};
}

} // namespace

expected<head_target> resolve_head(const std::string& address, const std::string& token,
                                   const std::string& temp_dir, const std::string& ca_sha256) {
  const fs::path latest = cluster::temp_root(temp_dir) / "session_latest";
  head_target t{address, {}, 0, token, {}, {}};
  const bool from_session = t.address.empty();
  if (from_session)
    t.address = cluster::read_text(latest / "head_address").value_or("");
  if (t.address.empty())
    return make_error(errc::not_found,
                      "no head address: pass --address HOST:PORT (no session in {})",
                      latest.parent_path().string());
  if (t.token.empty())
    if (const char* env = std::getenv("TROUPE_TOKEN"))
      t.token = env;
  if (t.token.empty())
    t.token = cluster::read_text(latest / "token").value_or("");
  auto addr = cluster::parse_address(t.address, 6380);
  if (!addr)
    return make_error(errc::parse_error, "{}", addr.error().message());
  t.host = addr->first;
  t.port = addr->second;
  if (from_session) {
    auto files = cluster::tls::find_identity(latest / "tls", "head");
    if (!files)
      files = cluster::tls::find_identity(latest / "tls", "node");
    if (!files)
      return make_error(errc::not_found,
                        "this host's session ({}) has no control-plane certificate (is its "
                        "daemon running?); pass --address, --token-file and --ca-sha256",
                        fs::weakly_canonical(latest).string());
    t.tls = *files;
    return t;
  }
  auto client = bootstrap_client(t, ca_sha256);
  if (!client)
    return std::move(client).error();
  t.tls = client->first;
  t.temporary = client->second;
  return t;
}

expected<void>
with_head(const head_target& target, std::chrono::seconds connect_timeout,
          const std::function<expected<void>(caf::scoped_actor& self, const caf::actor& head,
                                             caf::actor_system& sys)>& fn) {
  actors::system_config cfg{target.tls};
  msg::add_message_types(cfg);
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  caf::actor head;
  troupe::error failure;
  self->request(actors::connector(sys), connect_timeout, caf::connect_atom::value, target.host,
                target.port)
      .receive([&](const caf::node_id&, caf::strong_actor_ptr& ptr,
                   const std::set<std::string>&) { head = caf::actor_cast<caf::actor>(ptr); },
               [&](caf::error& e) { failure = actors::from_caf(e, &sys); });
  if (!head)
    return make_error(errc::unavailable, "cannot reach the head at {}:{}: {}", target.host,
                      target.port, failure ? failure.message() : "no actor published there");
  return fn(self, head, sys);
}

void add_start_command(CLI::App& app, int& exit_code) {
  auto o = std::make_shared<head_options>();
  auto* cmd = app.add_subcommand("start", "Start this host's daemon (the head with --head)");
  auto head = std::make_shared<bool>(false);
  cmd->add_flag("--head", *head, "Start the head daemon (workers use `cluster join`)")->required();
  cmd->add_option("--host", o->host, "Interface address to listen on (default: all)");
  cmd->add_option("--port", o->port, "Port to listen on");
  cmd->add_option("--token", o->token, "Cluster token (generated when not given)");
  add_secret_file_option(cmd, "token", o->token);
  cmd->add_option("--ca-dir", o->ca_dir,
                  "The cluster CA's folder (ca.pem, ca.key; created when absent; default: "
                  "TEMP/cluster_ca, deleted by a clean stop)");
  cmd->add_option("--num-gpus", o->num_gpus, "CPU stand-in GPUs for the head's own node");
  cmd->add_flag("--block", o->block, "Stay in the foreground");
  cmd->add_option("--grace", o->grace_s,
                  "SIGTERM: seconds the deployments' requests in flight get to finish (default 25; "
                  "`cluster stop --grace` sets its own)")
      ->check(CLI::Range(0.0, 3600.0));
  add_temp_dir(cmd, o->temp_dir);
  cmd->callback([o, head, &exit_code] { exit_code = start_head(*o); });
}

void add_join_command(CLI::App& app, int& exit_code) {
  auto o = std::make_shared<join_options>();
  auto* cmd = app.add_subcommand("join", "Start this host's node daemon and join a head");
  cmd->add_option("address", o->address, "Head address HOST[:PORT]")->required();
  cmd->add_option("--token", o->token,
                  "Cluster token printed by `cluster start --head` (default: $TROUPE_TOKEN); "
                  "--token-file keeps it out of `ps`");
  add_secret_file_option(cmd, "token", o->token);
  add_ca_option(cmd, o->ca_sha256);
  cmd->add_option("--node-ip", o->node_ip, "Address to advertise (default: routes to the head)");
  cmd->add_option("--num-gpus", o->num_gpus, "CPU stand-in GPUs (CPU-only hosts and tests)");
  cmd->add_flag("--block", o->block, "Stay in the foreground");
  add_temp_dir(cmd, o->temp_dir);
  cmd->callback([o, &exit_code] {
    if (const char* env = std::getenv("TROUPE_TOKEN"); o->token.empty() && env != nullptr)
      o->token = env;
    if (const char* env = std::getenv("TROUPE_CA_SHA256"); o->ca_sha256.empty() && env != nullptr)
      o->ca_sha256 = env;
    exit_code = join_cluster(*o);
  });
}

void add_status_command(CLI::App& app, int& exit_code) {
  auto o = std::make_shared<client_options>();
  auto* cmd = app.add_subcommand("status", "Nodes, GPUs, memory, RDMA, health and KV namespaces");
  cmd->add_option("--address", o->address, "Head address (default: this host's session)");
  cmd->add_option("--token", o->token, "Cluster token (default: $TROUPE_TOKEN or the session)");
  add_secret_file_option(cmd, "token", o->token);
  add_ca_option(cmd, o->ca_sha256);
  cmd->add_flag("--json", o->json, "Print JSON");
  cmd->add_option("--timeout", o->timeout_s, "Seconds to wait for the head")
      ->check(CLI::Range(1, 600));
  add_temp_dir(cmd, o->temp_dir);
  cmd->callback([o, &exit_code] { exit_code = run_status(*o); });
}

void add_stop_command(CLI::App& app, int& exit_code) {
  auto dir = std::make_shared<std::string>();
  auto grace = std::make_shared<int>(30);
  auto* cmd = app.add_subcommand("stop", "Stop this host's daemons (the head tells its nodes)");
  cmd->add_option("--grace", *grace,
                  "Seconds before SIGKILL; the head's deployments drain for all but 3 of them")
      ->check(CLI::Range(0, 600));
  add_temp_dir(cmd, *dir);
  cmd->callback([dir, grace, &exit_code] { exit_code = run_stop(*dir, *grace); });
}

} // namespace troupe::cli
