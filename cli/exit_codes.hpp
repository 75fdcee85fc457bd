// The `cluster` exit codes, one mapping for every subcommand (README: "Exit codes").
#pragma once

#include "runtime/error.hpp"

namespace troupe::cli {

enum exit_status : int {
  exit_ok = 0,
  exit_failure = 1, // the environment or the runtime failed: cannot listen, head unreachable, ...
  exit_usage = 2,   // the input is the problem: flags, model.yaml, the model, a refused deployment
  exit_refused = 3, // the head refused this host (`join`, `status`: wrong token, other version)
};

// What an error means for the exit status: the caller's input (2) or the run (1).
inline int exit_status_of(errc code) {
  switch (code) {
  case errc::invalid_argument:
  case errc::not_found:
  case errc::parse_error:
  case errc::unsupported:
  case errc::out_of_range:
  case errc::resource_exhausted:
    return exit_usage;
  default:
    return exit_failure;
  }
}

} // namespace troupe::cli
