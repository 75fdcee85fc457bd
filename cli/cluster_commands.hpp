// `cluster start --head`, `cluster join`, `cluster status`, `cluster stop`: option parsing and
// the client side of the control plane. Each add_* registers one subcommand (CLI11 callback that
// blocks until done and sets `exit_code`). Called from cli/main.cpp.
#pragma once

#include <chrono>
#include <functional>
#include <optional>
#include <string>

#include <CLI/CLI.hpp>
#include <caf/actor.hpp>
#include <caf/scoped_actor.hpp>

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

// The head to talk to: --address/--token when given, else $TROUPE_TOKEN and this host's session.
struct head_target {
  std::string address; // as given, for messages
  std::string host;
  uint16_t port = 0;
  std::string token;
};
expected<head_target> resolve_head(const std::string& address, const std::string& token,
                                   const std::string& temp_dir);

// Connects to the head (up to `connect_timeout`) and runs `fn` with a blocking actor and the
// head's handle; `fn` returns the command's outcome. Blocks.
expected<void>
with_head(const head_target& target, std::chrono::seconds connect_timeout,
          const std::function<expected<void>(caf::scoped_actor& self, const caf::actor& head,
                                             caf::actor_system& sys)>& fn);

} // namespace troupe::cli
