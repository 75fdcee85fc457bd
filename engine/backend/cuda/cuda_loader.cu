#include "engine/backend/cuda/cuda_loader.cuh"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>

#include <sys/mman.h>
#include <unistd.h>

#include <cuda_fp16.h>

namespace troupe::engine::cuda {

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// dst[i] = bf16(src[i]) for f32 (is_half = false) or f16 (true) src; grid-stride.
__global__ void to_bf16_kernel(const void* src, bool is_half, size_t n, bf16* dst) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const float f = is_half ? __half2float(static_cast<const __half*>(src)[i])
                            : static_cast<const float*>(src)[i];
    dst[i] = __float2bfloat16_rn(f);
  }
}

size_t job_bytes(const upload_job& j) {
  return static_cast<size_t>(j.rows * j.width) * dtype_size(j.type);
}

} // namespace

expected<void> to_bf16(const void* src, dtype type, size_t n, bf16* dst, cudaStream_t s) {
  if (type != dtype::f32 && type != dtype::f16)
    return error{errc::invalid_argument, "to_bf16: source must be F32 or F16"};
  if (n == 0)
    return {};
  const size_t blocks = std::min<size_t>((n + 255) / 256, 8192);
  to_bf16_kernel<<<static_cast<unsigned>(blocks), 256, 0, s>>>(src, type == dtype::f16, n, dst);
  TROUPE_CUDA_LAUNCH();
  return {};
}

expected<std::unique_ptr<weight_uploader>> weight_uploader::create(int device, int workers,
                                                                   int slots, size_t slot_bytes,
                                                                   load_progress* progress) {
  std::unique_ptr<weight_uploader> u(new weight_uploader());
  u->progress_ = progress;
  if (auto r = u->setup(device, std::max(workers, 1), std::max(slots, 1), slot_bytes); !r)
    return std::move(r).error();
  return expected<std::unique_ptr<weight_uploader>>(std::move(u));
}

expected<void> weight_uploader::setup(int device, int workers, int slots, size_t slot_bytes) {
  device_ = device;
  slot_bytes_ = slot_bytes;
  if (const char* env = std::getenv("TROUPE_LOAD_WILLNEED"))
    advise_ = std::strcmp(env, "0") != 0;
  TROUPE_CUDA(cudaSetDevice(device));
  for (int i = 0; i < workers; ++i) {
    auto w = std::make_unique<worker>();
    TROUPE_CUDA(cudaStreamCreateWithFlags(&w->stream, cudaStreamNonBlocking));
    w->slots.resize(static_cast<size_t>(slots));
    for (auto& s : w->slots) {
      TROUPE_CUDA(cudaHostAlloc(&s.host, slot_bytes, cudaHostAllocDefault));
      TROUPE_CUDA(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming));
    }
    workers_.push_back(std::move(w));
  }
  for (auto& w : workers_)
    w->thread = std::thread([this, p = w.get()] { run(*p); });
  return {};
}

weight_uploader::~weight_uploader() {
  {
    std::lock_guard lk(mu_);
    stop_ = true;
  }
  ready_.notify_all();
  for (auto& w : workers_) {
    if (w->thread.joinable())
      w->thread.join();
    if (w->stream != nullptr)
      cudaStreamSynchronize(w->stream);
    for (auto& s : w->slots) {
      if (s.host != nullptr)
        cudaFreeHost(s.host);
      if (s.dev != nullptr)
        cudaFree(s.dev);
      if (s.done != nullptr)
        cudaEventDestroy(s.done);
    }
    if (w->stream != nullptr)
      cudaStreamDestroy(w->stream);
  }
}

expected<void> weight_uploader::enqueue(upload_job job) {
  const size_t es = dtype_size(job.type);
  if (job.type != dtype::bf16 && job.type != dtype::f16 && job.type != dtype::f32)
    return error{errc::invalid_argument, "weight upload: only BF16, F16 and F32 travel as bytes"};
  if (job.rows < 0 || job.width < 0 || job.col_begin < 0 || job.col_begin + job.width > job.ld)
    return error{errc::out_of_range, "weight upload: slice outside its matrix"};
  const size_t row_bytes = static_cast<size_t>(job.width) * es;
  if (row_bytes > slot_bytes_)
    return error{errc::invalid_argument,
                 strf("weight upload: a row of %zu bytes exceeds the %zu-byte staging buffer",
                      row_bytes, slot_bytes_)};
  if (job.rows == 0 || job.width == 0)
    return {};
  // Pieces of whole rows that fit one slot; each piece is independent of the others.
  const int64_t per = std::max<int64_t>(1, static_cast<int64_t>(slot_bytes_ / row_bytes));
  if (advise_ && !job.owner) { // file bytes: start the kernel's readahead of the whole slice now
    const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    const auto first = reinterpret_cast<uintptr_t>(job.src) & ~(page - 1);
    const auto last = reinterpret_cast<uintptr_t>(job.src) +
                      static_cast<size_t>((job.rows - 1) * job.ld + job.col_begin) * es + row_bytes;
    madvise(reinterpret_cast<void*>(first), last - first, MADV_WILLNEED); // advice: errors ignored
  }
  std::unique_lock lk(mu_);
  if (start_ < 0)
    start_ = now_s();
  constexpr size_t max_owned_bytes = size_t{1} << 30;
  if (job.owner)
    drained_.wait(lk, [&] { return failed_ || owned_bytes_ < max_owned_bytes; });
  if (failed_)
    return first_error_;
  for (int64_t r0 = 0; r0 < job.rows; r0 += per) {
    upload_job p = job;
    p.rows = std::min(per, job.rows - r0);
    p.src = job.src + static_cast<size_t>(r0 * job.ld) * es;
    p.dst = job.dst + r0 * job.width;
    if (p.owner)
      owned_bytes_ += job_bytes(p);
    bytes_ += job_bytes(p);
    queue_.push_back(std::move(p));
  }
  lk.unlock();
  ready_.notify_all();
  return {};
}

void weight_uploader::fail(error e) {
  if (!failed_) {
    failed_ = true;
    first_error_ = std::move(e);
  }
}

void weight_uploader::run(worker& w) {
  if (cudaError_t e = cudaSetDevice(device_); e != cudaSuccess) {
    std::lock_guard lk(mu_);
    fail(cuda_error(e, "cudaSetDevice (weight upload)", __FILE__, __LINE__));
  }
  size_t k = 0;
  for (;;) {
    upload_job j;
    bool skip = false;
    {
      std::unique_lock lk(mu_);
      ready_.wait(lk, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty())
        return;
      j = std::move(queue_.front());
      queue_.pop_front();
      ++busy_;
      skip = failed_;
    }
    auto r = skip ? expected<void>{} : piece(w, w.slots[k++ % w.slots.size()], j);
    const size_t owned = j.owner ? job_bytes(j) : 0;
    if (r && !skip && !j.owner && progress_ != nullptr) // file bytes read into staging
      progress_->add(job_bytes(j));
    j.owner.reset(); // the bytes are in the staging buffer now
    {
      std::lock_guard lk(mu_);
      --busy_;
      owned_bytes_ -= owned;
      if (!r)
        fail(std::move(r).error());
    }
    drained_.notify_all();
  }
}

expected<void> weight_uploader::piece(worker& w, slot& s, const upload_job& j) {
  // [rows, width] of the stored type: gather on the host into pinned memory, copy, convert.
  TROUPE_CUDA(cudaEventSynchronize(s.done)); // the slot's previous copy has left it
  const size_t es = dtype_size(j.type);
  const size_t row = static_cast<size_t>(j.width) * es;
  const size_t bytes = row * static_cast<size_t>(j.rows);
  const double t0 = now_s();
  auto* out = static_cast<std::byte*>(s.host);
  if (j.width == j.ld) {
    std::memcpy(out, j.src, bytes);
  } else {
    for (int64_t r = 0; r < j.rows; ++r)
      std::memcpy(out + static_cast<size_t>(r) * row,
                  j.src + static_cast<size_t>(r * j.ld + j.col_begin) * es, row);
  }
  w.gather_s += now_s() - t0;
  if (j.type == dtype::bf16) {
    TROUPE_CUDA(cudaMemcpyAsync(j.dst, s.host, bytes, cudaMemcpyHostToDevice, w.stream));
  } else {
    if (s.dev == nullptr)
      TROUPE_CUDA(cudaMalloc(&s.dev, slot_bytes_));
    TROUPE_CUDA(cudaMemcpyAsync(s.dev, s.host, bytes, cudaMemcpyHostToDevice, w.stream));
    TROUPE_TRY_VOID(to_bf16(s.dev, j.type, static_cast<size_t>(j.rows * j.width), j.dst, w.stream));
  }
  TROUPE_CUDA(cudaEventRecord(s.done, w.stream));
  return {};
}

expected<upload_stats> weight_uploader::finish() {
  {
    std::unique_lock lk(mu_);
    drained_.wait(lk, [&] { return queue_.empty() && busy_ == 0; });
  }
  for (auto& w : workers_)
    TROUPE_CUDA(cudaStreamSynchronize(w->stream));
  std::lock_guard lk(mu_);
  if (failed_)
    return first_error_;
  upload_stats st;
  st.bytes = bytes_;
  st.wall_s = start_ < 0 ? 0 : now_s() - start_;
  st.workers = static_cast<int>(workers_.size());
  for (auto& w : workers_)
    st.gather_s += w->gather_s;
  return st;
}

} // namespace troupe::engine::cuda
