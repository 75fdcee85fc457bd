// Cold start: copies weight slices from host memory (the mmapped safetensors files, or floats a
// non-plain format had to decode) to the GPU as bf16. Bytes travel in their stored type: a
// worker pool gathers each slice (whole rows, or a column range of every row) into pinned
// staging buffers, several slots in flight per worker, and copies them asynchronously; f32 and
// f16 slices are converted to bf16 on the GPU. A queued file slice is madvise(WILLNEED)d, so a
// cold page cache is read ahead while the workers copy earlier slices. Internal to
// engine/backend/cuda.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "engine/backend/cuda/cuda_common.cuh"
#include "engine/model/dtype.hpp"
#include "engine/model/load_progress.hpp"

namespace troupe::engine::cuda {

// Rows [0, rows) x columns [col_begin, col_begin + width) of a row-major matrix of `ld` columns
// of `type` at `src`, to `dst` as bf16 [rows, width] (contiguous). `src` must stay valid until
// weight_uploader::finish(); `owner`, when set, keeps it alive (decoded floats).
struct upload_job {
  const std::byte* src = nullptr;
  dtype type = dtype::bf16; // bf16, f16 or f32
  int64_t rows = 0, ld = 0, col_begin = 0, width = 0;
  bf16* dst = nullptr;
  std::shared_ptr<const void> owner;
};

struct upload_stats {
  size_t bytes = 0;    // bytes read from the source (stored type)
  double gather_s = 0; // host time gathering into staging, summed over workers
  double wall_s = 0;   // first enqueue to finish()
  int workers = 0;
};

class weight_uploader {
 public:
  // `workers` threads with `slots` staging buffers of `slot_bytes` each, on `device`. File bytes
  // gathered into staging are added to `progress` (when set) as each piece is read.
  static expected<std::unique_ptr<weight_uploader>>
  create(int device, int workers, int slots, size_t slot_bytes, load_progress* progress = nullptr);
  ~weight_uploader();
  weight_uploader(const weight_uploader&) = delete;
  weight_uploader& operator=(const weight_uploader&) = delete;

  // Queues a job (split into slot-sized pieces of whole rows); errors on a bad job. Blocks while
  // more than max_owned_bytes of decoded floats wait (back-pressure for non-plain formats).
  expected<void> enqueue(upload_job job);
  // Waits for every queued copy to land on the GPU; the first failure, if any.
  expected<upload_stats> finish();

 private:
  struct slot {
    void* host = nullptr;       // pinned, slot_bytes
    void* dev = nullptr;        // conversion scratch (allocated on first f32 / f16 piece)
    cudaEvent_t done = nullptr; // the slot's last copy (and conversion) has completed
  };
  struct worker {
    std::thread thread;
    cudaStream_t stream = nullptr;
    std::vector<slot> slots;
    double gather_s = 0;
  };
  weight_uploader() = default;
  expected<void> setup(int device, int workers, int slots, size_t slot_bytes);
  void run(worker& w);
  expected<void> piece(worker& w, slot& s, const upload_job& j);
  void fail(error e);

  int device_ = 0;
  size_t slot_bytes_ = 0;
  load_progress* progress_ = nullptr;
  bool advise_ =
      true; // madvise(WILLNEED) each file slice when queued (TROUPE_LOAD_WILLNEED=0: off)
  std::vector<std::unique_ptr<worker>> workers_;
  std::mutex mu_;
  std::condition_variable ready_, drained_;
  std::deque<upload_job> queue_; // pieces, each fitting one slot
  size_t busy_ = 0;              // pieces taken but not yet issued
  size_t owned_bytes_ = 0;       // decoded floats queued
  bool stop_ = false;
  error first_error_;
  bool failed_ = false;
  size_t bytes_ = 0;
  double start_ = -1;
};

// f32 / f16 n elements at src (device) -> bf16 at dst, round to nearest even.
expected<void> to_bf16(const void* src, dtype type, size_t n, bf16* dst, cudaStream_t s);

} // namespace troupe::engine::cuda
