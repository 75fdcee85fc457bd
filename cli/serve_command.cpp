#include "cli/serve_command.hpp"

#include <csignal>
#include <memory>
#include <optional>

#include <fmt/format.h>

#include "cli/serve/deployment.hpp"

#ifndef TROUPE_VERSION
#define TROUPE_VERSION "0.0.0"
#endif

namespace troupe::cli {

namespace {

struct serve_args {
  std::string file;
  bool block = false;
  std::optional<std::string> host;
  std::optional<int32_t> port;
  std::optional<std::string> api_key;
};

int run(const serve_args& args) {
  if (!args.block) {
    fmt::print(stderr,
               "error: serving through the cluster's head is not implemented yet; use "
               "`cluster serve {} --block` to serve in this process\n",
               args.file);
    return 2;
  }
  auto config = engine::load_deployment(args.file);
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
  fmt::print("serving '{}' at http://{}:{}/v1 (cpu, max_model_len {}, {} KV blocks)\n",
             (*d)->name(), (*d)->host(), (*d)->port(), (*d)->max_model_len(),
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
  cmd->add_option("model_yaml", args->file, "Deployment file (see README: model.yaml)")->required();
  cmd->add_flag("--block", args->block, "Serve in this process until Ctrl-C / SIGTERM");
  cmd->add_option("--host", args->host, "Override model.yaml's host");
  cmd->add_option("--port", args->port, "Override model.yaml's port (0: any free port)")
      ->check(CLI::Range(0, 65535));
  cmd->add_option("--api-key", args->api_key, "Override model.yaml's api_key");
  cmd->callback([args, &exit_code] { exit_code = run(*args); });
}

} // namespace troupe::cli
