#include "actors/serving/handoff.hpp"

#include <caf/send.hpp>
#include <fmt/format.h>

namespace troupe::serve {

std::shared_ptr<decode_role> make_decode_role(const disaggregation_config& config, uint32_t index,
                                              uint32_t notices,
                                              std::shared_ptr<handoff_stats> stats) {
  auto role = std::make_shared<decode_role>();
  role->index = index;
  role->notices = notices;
  role->timeout = std::chrono::milliseconds(static_cast<int64_t>(config.timeout_s * 1000));
  role->min_prefill_tokens = config.min_prefill_tokens;
  role->prefill_on_failure = config.on_prefill_failure == "decode";
  role->stats = std::move(stats);
  return role;
}

std::string handoff_stats::text(const std::string& model) const {
  std::string out;
  auto counter = [&](const char* name, const char* help, uint64_t v) {
    out += fmt::format("# HELP {} {}\n# TYPE {} counter\n{}{{model_name=\"{}\",provider=\"{}\"}} "
                       "{}\n",
                       name, help, name, name, model, provider, v);
  };
  counter("troupe_kv_handoffs_total", "Requests whose prompt KV moved from prefill to decode.",
          handoffs.load());
  counter("troupe_kv_transfer_bytes_total", "KV bytes written from prefill to decode replicas.",
          bytes.load());
  counter("troupe_kv_transfer_writes_total", "One-sided writes posted for KV handoffs.",
          writes.load());
  counter("troupe_kv_handoff_failures_total",
          "Handoffs whose prefill or transfer failed (then prefilled on decode, or ended).",
          failed.load());
  counter("troupe_kv_handoff_expired_total", "Handoffs past their deadline.", expired.load());
  counter("troupe_kv_handoff_retries_total",
          "Handoffs tried again on another prefill replica after a failure.", retried.load());
  counter("troupe_kv_local_prefills_total",
          "Requests a decode replica prefilled itself (short or cached prompt, or fallback).",
          local_prefills.load());
  transfer_seconds.render(out, "troupe_kv_transfer_seconds",
                          "Time from posting a request's KV writes to their completion.", model);
  return out;
}

notice_listener::notice_listener(std::shared_ptr<cluster::transfer::kv_connection> conn,
                                 caf::actor target)
  : thread_([conn = std::move(conn), target = std::move(target)](std::stop_token stop) {
      using namespace std::chrono_literals;
      while (!stop.stop_requested()) {
        auto n = conn->wait_notice(cluster::transfer::clock::now() + 100ms);
        if (n)
          caf::anon_send(target, landed_atom::value, n->lease_id, n->cancelled);
        else if (n.error().code() != errc::timeout)
          std::this_thread::sleep_for(100ms); // the link is down: its batches fail on the sender
      }
    }) {}

notice_listener::~notice_listener() {
  thread_.request_stop();
}

} // namespace troupe::serve
