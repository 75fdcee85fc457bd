// Builds without CUDA/NCCL: the device communicator factories exist and say why they cannot work.
#include "engine/comm/device_communicator.hpp"

namespace troupe::engine::comm {

bool nccl_available() {
  return false;
}

expected<std::unique_ptr<device_communicator>> make_nccl_communicator(rendezvous_store&, int, int,
                                                                      const nccl_options&) {
  return error{errc::unsupported, "NCCL communicator: troupe was built without CUDA and NCCL"};
}

expected<std::unique_ptr<device_communicator>> make_host_staged_communicator(communicator&) {
  return error{errc::unsupported, "host-staged device communicator: troupe was built without CUDA"};
}

} // namespace troupe::engine::comm
