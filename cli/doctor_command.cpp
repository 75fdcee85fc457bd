#include "cli/doctor_command.hpp"

#include <fmt/format.h>

#include "cluster/transfer/diagnostics.hpp"
#include "cluster/transfer/doctor_peer.hpp"
#include "cluster/transfer/fabric_transport.hpp"

namespace troupe::cli {
namespace {

namespace transfer = troupe::cluster::transfer;

struct doctor_options {
  std::string host = "127.0.0.1";
  std::string provider = "auto";
  uint64_t bytes = uint64_t{64} << 20;
  int rounds = 8;
  bool no_measure = false;
  bool serve = false;
  uint16_t port = 0;
  std::string peer;
};

// --serve: blocks, answering peers' measurements; --peer: measures every transport the peer offers.
int run_peer_mode(const doctor_options& o) {
  if (o.serve) {
    auto served = transfer::serve_measurements(o.host, o.port, o.bytes, [](const std::string& a) {
      fmt::print("serving transfer measurements on {} (cluster doctor --peer {})\n", a, a);
      std::fflush(stdout);
    });
    fmt::print("serve: {}\n", served.error().to_string());
    return 1;
  }
  auto reports = transfer::measure_peer(o.peer, o.host, o.bytes, o.rounds);
  if (!reports) {
    fmt::print("peer {}: {}\n", o.peer, reports.error().to_string());
    return 1;
  }
  int failures = 0;
  fmt::print("WRITE to {} from {} ({} MiB batches x {}, each until the peer's echo):\n", o.peer,
             o.host, o.bytes >> 20, o.rounds);
  for (const auto& r : *reports) {
    if (!r.error.empty()) {
      ++failures;
      fmt::print("  {:<6} failed: {}\n", r.transport, r.error);
      continue;
    }
    fmt::print("  {:<6} {:.2f} GB/s, 4 KiB round trip median {:.0f} us\n", r.transport,
               r.write_gbps, r.round_trip_us);
  }
  return failures == 0 ? 0 : 1;
}

void print_rdma() {
  std::string note;
  auto ports = transfer::rdma_ports(note);
  fmt::print("RDMA devices (ibverbs):\n");
  if (ports.empty())
    fmt::print("  none: {}\n", note);
  for (const auto& p : ports)
    fmt::print("  {} port {}: {}, {}, MTU {}, GID[0] {}\n", p.device, p.port, p.state, p.link_layer,
               p.mtu, p.gid0.empty() ? "-" : p.gid0);
}

int run_doctor(const doctor_options& o) {
  if (o.serve || !o.peer.empty())
    return run_peer_mode(o);
#ifndef TROUPE_WITH_FABRIC
  print_rdma();
  fmt::print("libfabric: built without libfabric-dev; KV transfer between hosts is unavailable\n");
  return 1;
#else
  fmt::print("libfabric providers on {} (FI_EP_MSG, FI_RMA, verbs registration modes):\n", o.host);
  auto probes = transfer::probe_providers(o.host);
  for (const auto& p : probes)
    fmt::print("  {:<6} {}: {}\n", p.name, p.usable ? "usable" : "unusable", p.detail);
  print_rdma();
  auto hints = transfer::transfer_hints();
  fmt::print("hints:{}\n", hints.empty() ? " none" : "");
  for (const auto& h : hints)
    fmt::print("  - {}\n", h);
  auto chosen = transfer::fabric_transport::open({.provider = o.provider, .host = o.host});
  if (!chosen) {
    fmt::print("transfer provider '{}': {}\n", o.provider, chosen.error().to_string());
    return 1;
  }
  fmt::print("transfer provider '{}' selects: {}\n", o.provider, (*chosen)->choice());
  chosen->reset();
  if (o.no_measure)
    return 0;
  int failures = 0;
  fmt::print("loopback WRITE ({} MiB batches × {}, then 4 KiB batches):\n", o.bytes >> 20,
             o.rounds);
  for (const auto& p : probes) {
    if (!p.usable)
      continue;
    auto r = transfer::measure_loopback(p.name, o.host, o.bytes, o.rounds);
    if (!r) {
      ++failures;
      fmt::print("  {:<6} failed: {}\n", p.name, r.error().to_string());
      continue;
    }
    fmt::print("  {:<6} {:.2f} GB/s, 4 KiB post→notice median {:.0f} us\n", p.name, r->write_gbps,
               r->small_latency_us);
  }
  return failures == 0 ? 0 : 1;
#endif
}

} // namespace

void add_doctor_command(CLI::App& app, int& exit_code) {
  auto o = std::make_shared<doctor_options>();
  auto* cmd = app.add_subcommand("doctor", "KV transfer: libfabric providers, RDMA devices, hints, "
                                           "loopback WRITE bandwidth/latency");
  cmd->add_option("--host", o->host, "Local address to probe and measure on")
      ->capture_default_str();
  cmd->add_option("--provider", o->provider, "Provider to select: auto, verbs, efa, tcp")
      ->capture_default_str();
  cmd->add_option("--bytes", o->bytes, "Bytes per measured batch")->capture_default_str();
  cmd->add_option("--rounds", o->rounds, "Measured batches")->check(CLI::Range(1, 10000));
  cmd->add_flag("--no-measure", o->no_measure, "Only list providers, devices and hints");
  cmd->add_flag("--serve", o->serve, "Answer other hosts' `doctor --peer` measurements (blocks)");
  cmd->add_option("--port", o->port, "Side-channel port for --serve (0: any, printed)");
  cmd->add_option("--peer", o->peer,
                  "Measure WRITE to a host running `doctor --serve` (HOST:PORT)");
  cmd->callback([o, &exit_code] { exit_code = run_doctor(*o); });
}

} // namespace troupe::cli
