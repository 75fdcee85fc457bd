// The CUDA communicators (nccl_communicator.cpp, host_staged_communicator.cpp): built into the
// CUDA plugin only, whose table (engine/backend/cuda/cuda_plugin.hpp) carries them. Everything
// else reaches them through the seams in device_communicator.hpp.
#pragma once

#include <memory>

#include "engine/comm/device_communicator.hpp"

namespace troupe::engine::cuda {

expected<std::unique_ptr<comm::device_communicator>>
make_nccl_communicator(comm::rendezvous_store& store, int rank, int size,
                       const comm::nccl_options& options);
expected<std::unique_ptr<comm::device_communicator>>
make_host_staged_communicator(comm::communicator& host);

} // namespace troupe::engine::cuda
