// `cluster start --head`, `cluster join`, `cluster status`, `cluster stop`: option parsing and
// the client side of the control plane. Each add_* registers one subcommand (CLI11 callback that
// blocks until done and sets `exit_code`). Called from cli/main.cpp.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include <CLI/CLI.hpp>
#include <caf/actor.hpp>
#include <caf/scoped_actor.hpp>

#include "cluster/tls.hpp"
#include "runtime/error.hpp"

namespace troupe::cli {

// Adds `--NAME-file PATH`: the secret is the file's first line, so it never shows in `ps` or in
// shell history (the file is best kept 0600). An unreadable or empty file is a usage error.
void add_secret_file_option(CLI::App* cmd, const std::string& name, std::string& secret);
void add_secret_file_option(CLI::App* cmd, const std::string& name,
                            std::optional<std::string>& secret);

void add_start_command(CLI::App& app, int& exit_code);
void add_join_command(CLI::App& app, int& exit_code);
void add_status_command(CLI::App& app, int& exit_code);
void add_stop_command(CLI::App& app, int& exit_code);

// Adds `--ca-sha256 FINGERPRINT` (default $TROUPE_CA_SHA256) and `--ca-file CA_PEM` (its
// fingerprint): the cluster CA a join, or a command that names the head by --address, checks
// the head against.
void add_ca_option(CLI::App* cmd, std::string& ca_sha256);

// The head to talk to and the control-plane certificate to talk with. Without --address: this
// host's session (its head address, token and certificate). With --address: the token
// (--token, --token-file, $TROUPE_TOKEN) is proved at the head's join bootstrap, checked against
// the CA fingerprint (--ca-sha256 or $TROUPE_CA_SHA256), for a short-lived certificate kept in a
// private temporary folder until the target is destroyed.
struct head_target {
  std::string address; // as given, for messages
  std::string host;
  uint16_t port = 0;
  std::string token;
  cluster::tls::identity_files tls;
  std::shared_ptr<void> temporary; // removes a bootstrapped identity's folder
};
expected<head_target> resolve_head(const std::string& address, const std::string& token,
                                   const std::string& temp_dir, const std::string& ca_sha256);

// Connects to the head (up to `connect_timeout`) and runs `fn` with a blocking actor and the
// head's handle; `fn` returns the command's outcome. Blocks.
expected<void>
with_head(const head_target& target, std::chrono::seconds connect_timeout,
          const std::function<expected<void>(caf::scoped_actor& self, const caf::actor& head,
                                             caf::actor_system& sys)>& fn);

} // namespace troupe::cli
