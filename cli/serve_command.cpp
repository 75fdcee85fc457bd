#include "cli/serve_command.hpp"

#include <csignal>
#include <memory>
#include <optional>

#include <fmt/format.h>

#include "actors/caf_glue.hpp"
#include "actors/messages.hpp"
#include "actors/serving/deployment.hpp"
#include "cli/cluster_commands.hpp"

#ifndef TROUPE_VERSION
#define TROUPE_VERSION "0.0.0"
#endif

namespace troupe::cli {

namespace {

struct serve_args {
  std::string file;
  bool block = false;
  std::string stop; // --stop NAME
  std::string address, token, temp_dir;
  int timeout_s = 600;
  std::optional<std::string> host;
  std::optional<int32_t> port;
  std::optional<std::string> api_key;
};

// Sends the deployment (or --stop NAME) to the head and waits for its verdict.
int run_on_cluster(const serve_args& args, const deployment_config* config) {
  auto target = resolve_head(args.address, args.token, args.temp_dir);
  if (!target) {
    fmt::print(stderr,
               "error: {}; start a head (`cluster start --head`) or serve in this process with "
               "--block\n",
               target.error().message());
    return 2;
  }
  const auto timeout = std::chrono::seconds(args.timeout_s);
  auto done = with_head(
      *target, std::chrono::seconds(10),
      [&](caf::scoped_actor& self, const caf::actor& head,
          caf::actor_system& sys) -> expected<void> {
        expected<void> out = make_error(errc::internal, "no reply from the head");
        if (!config) {
          self->request(head, timeout, msg::undeploy_atom::value, target->token, args.stop)
              .receive(
                  [&](bool) {
                    fmt::print("stopped deployment '{}'\n", args.stop);
                    out = {};
                  },
                  [&](caf::error& e) { out = actors::from_caf(e, &sys); });
          return out;
        }
        self->request(head, timeout, msg::deploy_atom::value, target->token, *config)
            .receive(
                [&](msg::deployment_view& v) {
                  std::string ranks;
                  for (const auto& r : v.ranks)
                    ranks += v.replicas > 1
                                 ? fmt::format(" r{}/pp{}/tp{}@{}", r.replica, r.pp_rank, r.tp_rank,
                                               r.node_id)
                                 : fmt::format(" pp{}/tp{}@{}", r.pp_rank, r.tp_rank, r.node_id);
                  fmt::print("serving '{}' at {} (tensor={} pipeline={}{}, ranks:{})\n", v.name,
                             v.endpoint, v.tensor, v.pipeline,
                             v.replicas > 1 ? fmt::format(" replicas={}", v.replicas) : "", ranks);
                  out = {};
                },
                [&](caf::error& e) { out = actors::from_caf(e, &sys); });
        return out;
      });
  if (!done) {
    fmt::print(stderr, "error: {}\n", done.error().message());
    return done.error().code() == errc::invalid_argument ||
                   done.error().code() == errc::resource_exhausted ||
                   done.error().code() == errc::not_found
               ? 2
               : 1;
  }
  return 0;
}

int run(const serve_args& args) {
  if (!args.stop.empty())
    return run_on_cluster(args, nullptr);
  if (args.file.empty()) {
    fmt::print(stderr, "error: model_yaml is required (or --stop NAME)\n");
    return 2;
  }
  auto config = load_deployment(args.file);
  if (!config) {
    fmt::print(stderr, "error: {}\n", config.error().message());
    return 2;
  }
  if (args.host)
    config->host = *args.host;
  if (args.port)
    config->port = *args.port;
  if (args.api_key)
    config->api_key = *args.api_key;
  if (!args.block) {
    config->model = std::filesystem::absolute(config->model).lexically_normal().string();
    return run_on_cluster(args, &*config);
  }
  // Block the stop signals before any thread starts, so that only sigwait below sees them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  fmt::print(stderr, "loading {} ...\n", config->model);
  auto d = serve::deployment::start(*config, TROUPE_VERSION);
  if (!d) {
    fmt::print(stderr, "error: {}\n", d.error().to_string());
    return 1;
  }
  fmt::print("serving '{}' at http://{}:{}/v1 ({}, max_model_len {}, {} KV blocks)\n", (*d)->name(),
             (*d)->host(), (*d)->port(), config->device, (*d)->max_model_len(),
             (*d)->num_kv_blocks());
  std::fflush(stdout);
  int sig = 0;
  sigwait(&stop_signals, &sig);
  fmt::print(stderr, "signal {}: stopping\n", sig);
  d->reset();
  return 0;
}

} // namespace

void add_serve_command(CLI::App& app, int& exit_code) {
  auto args = std::make_shared<serve_args>();
  auto* cmd = app.add_subcommand("serve", "Serve a model (model.yaml) with the OpenAI HTTP API");
  cmd->add_option("model_yaml", args->file, "Deployment file (see README: model.yaml)");
  cmd->add_flag("--block", args->block, "Serve in this process until Ctrl-C / SIGTERM");
  cmd->add_option("--stop", args->stop, "Remove the deployment NAME (its served_model_name)");
  cmd->add_option("--address", args->address, "Head address (default: this host's session)");
  cmd->add_option("--token", args->token, "Cluster token (default: $TROUPE_TOKEN or the session)");
  add_secret_file_option(cmd, "token", args->token);
  cmd->add_option("--temp-dir", args->temp_dir,
                  "Session root (default $TROUPE_TEMP_DIR or /tmp/troupe)");
  cmd->add_option("--timeout", args->timeout_s, "Seconds to wait for the deployment to load")
      ->check(CLI::Range(1, 3600));
  cmd->add_option("--host", args->host, "Override model.yaml's host");
  cmd->add_option("--port", args->port, "Override model.yaml's port (0: any free port)")
      ->check(CLI::Range(0, 65535));
  cmd->add_option("--api-key", args->api_key, "Override model.yaml's api_key");
  add_secret_file_option(cmd, "api-key", args->api_key);
  cmd->callback([args, &exit_code] { exit_code = run(*args); });
}

} // namespace troupe::cli
