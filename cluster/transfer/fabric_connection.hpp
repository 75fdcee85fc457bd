// One connected FI_EP_MSG endpoint and the progress thread that alone touches it: posts a batch's
// writes within the tx queue depth, sends the batch's completion notice, receives the peer's
// notices, and enforces deadlines. Made by fabric_transport::connect/accept; callers use
// kv_connection.
#pragma once

#include <condition_variable>
#include <deque>
#include <map>
#include <thread>

#include <rdma/fi_endpoint.h>

#include "cluster/transfer/fabric_common.hpp"
#include "cluster/transfer/write_plan.hpp"

namespace troupe::cluster::transfer::detail {

// The completion notice, sent as a plain message after every write of the batch completed locally
// (on RC/verbs and TCP a local write completion means the data was placed at the target).
struct notice_wire {
  uint32_t magic = 0;
  uint32_t cancelled = 0;
  uint64_t lease_id = 0;
  uint64_t bytes = 0;
};

class fabric_connection final : public kv_connection {
 public:
  // Takes a connected (FI_CONNECTED seen) endpoint with its EQ and CQ; `buffers` already holds
  // posted receives for notices (see make_endpoint in fabric_transport.cpp).
  struct parts {
    fid_ptr<fid_eq> eq;
    fid_ptr<fid_cq> cq;
    fid_ptr<fid_ep> ep;
    fid_ptr<fid_mr> notice_mr;
    std::unique_ptr<notice_wire[]> notice_buffers; // [recv_slots + send_slots]
  };
  static constexpr size_t recv_slots = 32;
  static constexpr size_t send_slots = 16;

  fabric_connection(std::shared_ptr<fabric_domain> domain, parts p, std::string path,
                    uint64_t max_write);
  ~fabric_connection() override;

  expected<transfer_id> post(write_batch batch) override;
  expected<transfer_result> wait(transfer_id id) override;
  void cancel(transfer_id id) override;
  expected<transfer_notice> wait_notice(clock::time_point deadline) override;
  std::string describe_path() const override { return path_; }

 private:
  struct op_context {
    fi_context2 ctx; // first: the provider hands back its address
    enum kind_t { write, send, recv } kind = write;
    transfer_id id = 0;
    uint32_t slot = 0;
    uint64_t length = 0;
  };
  struct batch_state {
    write_batch batch;
    std::vector<planned_write> writes;
    std::vector<resolved_region> locals;
    size_t next = 0;        // first write not posted yet
    size_t outstanding = 0; // writes and the notice posted, not completed
    bool cancel = false;
    bool notice_posted = false;
    bool done = false;
    uint64_t bytes = 0;
    error failure;
  };

  void progress_loop();
  void post_pending(std::unique_lock<std::mutex>& lock);
  int post_one_write(batch_state& b, transfer_id id);
  int post_notice(batch_state& b, transfer_id id);
  void handle_completion(const fi_cq_msg_entry& entry);
  void read_cq_error();
  void check_events();
  void check_deadlines();
  int sread_timeout_ms() const;
  void finish(transfer_id id, batch_state& b, error failure);
  void fail_connection(
      error why,
      transfer_id expired = 0); // closes the endpoint: nothing posted touches memory any more
  expected<void> post_recv(uint32_t slot);
  op_context* context_for(op_context::kind_t kind, transfer_id id, uint32_t slot, uint64_t length);
  void free_context(op_context* c) { free_contexts_.push_back(c); }

  std::shared_ptr<fabric_domain> domain_;
  parts parts_;
  std::string path_;
  uint64_t max_write_;
  size_t tx_depth_;
  bool virt_addr_ = true;

  std::mutex mu_;
  std::condition_variable cv_;
  std::map<transfer_id, batch_state> batches_;
  std::deque<transfer_notice> notices_;
  std::deque<op_context> contexts_; // stable addresses; free list below
  std::vector<op_context*> free_contexts_;
  std::vector<uint32_t> free_send_slots_;
  size_t tx_outstanding_ = 0;
  transfer_id next_id_ = 1;
  error broken_;
  bool stop_ = false;
  std::thread thread_;
};

} // namespace troupe::cluster::transfer::detail
