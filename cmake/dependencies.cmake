# Finds every third-party dependency (Debian 12 packages; scripts/deps.sh installs them) and
# decides the optional CUDA and RDMA parts. Defines imported targets the folders link against.
find_package(Threads REQUIRED)
find_package(fmt REQUIRED)
find_package(nlohmann_json REQUIRED)
find_package(yaml-cpp REQUIRED)
find_package(CLI11 REQUIRED)
find_package(Boost 1.74 REQUIRED)
find_package(doctest REQUIRED)
list(APPEND CMAKE_MODULE_PATH ${doctest_DIR})

# CAF 0.17 (libcaf-dev) ships no CMake package: find its headers and libraries directly.
find_path(CAF_INCLUDE_DIR caf/all.hpp REQUIRED)
find_library(CAF_CORE_LIBRARY caf_core REQUIRED)
find_library(CAF_IO_LIBRARY caf_io REQUIRED)
add_library(caf::core UNKNOWN IMPORTED)
set_target_properties(caf::core PROPERTIES IMPORTED_LOCATION ${CAF_CORE_LIBRARY}
                      INTERFACE_INCLUDE_DIRECTORIES ${CAF_INCLUDE_DIR})
add_library(caf::io UNKNOWN IMPORTED)
set_target_properties(caf::io PROPERTIES IMPORTED_LOCATION ${CAF_IO_LIBRARY}
                      INTERFACE_LINK_LIBRARIES caf::core)
# The control plane's mutual TLS: CAF's OpenSSL module (in libcaf-dev) and OpenSSL (libssl-dev).
find_package(OpenSSL 3 REQUIRED)
find_library(CAF_OPENSSL_LIBRARY caf_openssl REQUIRED)
add_library(caf::openssl UNKNOWN IMPORTED)
set_target_properties(caf::openssl PROPERTIES IMPORTED_LOCATION ${CAF_OPENSSL_LIBRARY}
                      INTERFACE_LINK_LIBRARIES "caf::io;OpenSSL::SSL;OpenSSL::Crypto")

# CUDA: AUTO builds the CUDA parts when nvcc and NCCL are both present.
set(TROUPE_WITH_CUDA OFF)
if(NOT TROUPE_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  find_package(CUDAToolkit QUIET)
  find_library(NCCL_LIBRARY nccl HINTS ${CUDAToolkit_LIBRARY_DIR} /usr/local/cuda/lib64)
  find_path(NCCL_INCLUDE_DIR nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS} /usr/local/cuda/include)
  if(CMAKE_CUDA_COMPILER AND CUDAToolkit_FOUND AND NCCL_LIBRARY AND NCCL_INCLUDE_DIR)
    set(TROUPE_WITH_CUDA ON)
    # Hopper (sm_90a: wgmma, setmaxnreg) unless the caller names other targets, e.g. -DTROUPE_CUDA_GENCODE="arch=compute_80,code=sm_80".
    set(TROUPE_CUDA_GENCODE "arch=compute_90a,code=sm_90a" CACHE STRING "nvcc -gencode value(s), ';'-separated")
    set(CMAKE_CUDA_ARCHITECTURES OFF)
    enable_language(CUDA)
    # nvcc cannot compile fmt 9's headers: CUDA sources see runtime/error.hpp without fmt (TROUPE_NO_FMT).
    # CMake 3.25 predates nvcc's C++20 mode; tell it the flag (nvcc 12+ accepts it).
    set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA_STANDARD 20)
    foreach(gencode ${TROUPE_CUDA_GENCODE})
      add_compile_options("$<$<COMPILE_LANGUAGE:CUDA>:-gencode=${gencode}>")
    endforeach()
    add_compile_options("$<$<COMPILE_LANGUAGE:CUDA>:-DTROUPE_NO_FMT;-lineinfo;--diag-suppress=20012;-Xcompiler=-Wall>")
    add_library(troupe::nccl UNKNOWN IMPORTED)
    set_target_properties(troupe::nccl PROPERTIES IMPORTED_LOCATION ${NCCL_LIBRARY}
                          INTERFACE_INCLUDE_DIRECTORIES ${NCCL_INCLUDE_DIR})
  elseif(TROUPE_CUDA STREQUAL "ON")
    message(FATAL_ERROR "TROUPE_CUDA=ON but nvcc, the CUDA toolkit or NCCL was not found")
  endif()
endif()

# RDMA: rdma-core's ibverbs (libibverbs-dev).
set(TROUPE_WITH_RDMA OFF)
if(NOT TROUPE_RDMA STREQUAL "OFF")
  find_path(IBVERBS_INCLUDE_DIR infiniband/verbs.h)
  find_library(IBVERBS_LIBRARY ibverbs)
  if(IBVERBS_INCLUDE_DIR AND IBVERBS_LIBRARY)
    set(TROUPE_WITH_RDMA ON)
    add_library(troupe::ibverbs UNKNOWN IMPORTED)
    set_target_properties(troupe::ibverbs PROPERTIES IMPORTED_LOCATION ${IBVERBS_LIBRARY}
                          INTERFACE_INCLUDE_DIRECTORIES ${IBVERBS_INCLUDE_DIR})
  elseif(TROUPE_RDMA STREQUAL "ON")
    message(FATAL_ERROR "TROUPE_RDMA=ON but libibverbs was not found (apt-get install libibverbs-dev)")
  endif()
endif()

# libfabric (libfabric-dev): the KV transfer transport over verbs / efa / tcp (cluster/transfer).
set(TROUPE_WITH_FABRIC OFF)
if(NOT TROUPE_FABRIC STREQUAL "OFF")
  find_path(FABRIC_INCLUDE_DIR rdma/fabric.h)
  find_library(FABRIC_LIBRARY fabric)
  if(FABRIC_INCLUDE_DIR AND FABRIC_LIBRARY)
    set(TROUPE_WITH_FABRIC ON)
    add_library(troupe::fabric UNKNOWN IMPORTED)
    set_target_properties(troupe::fabric PROPERTIES IMPORTED_LOCATION ${FABRIC_LIBRARY}
                          INTERFACE_INCLUDE_DIRECTORIES ${FABRIC_INCLUDE_DIR})
  elseif(TROUPE_FABRIC STREQUAL "ON")
    message(FATAL_ERROR "TROUPE_FABRIC=ON but libfabric was not found (apt-get install libfabric-dev)")
  endif()
endif()

# xgrammar (structured output: JSON schema / regex / EBNF -> token masks) is not packaged in
# Debian: scripts/fetch_xgrammar.sh builds its C++ core from the PyPI source distribution once per
# machine (Release, static, Python bindings off; cached in ~/.cache/troupe/xgrammar-<version>) and
# prints the install prefix. scripts/deps.sh runs it too; here it only prints the cached prefix.
execute_process(COMMAND ${PROJECT_SOURCE_DIR}/scripts/fetch_xgrammar.sh
                OUTPUT_VARIABLE XGRAMMAR_PREFIX OUTPUT_STRIP_TRAILING_WHITESPACE
                RESULT_VARIABLE xgrammar_rc)
if(NOT xgrammar_rc EQUAL 0 OR NOT EXISTS "${XGRAMMAR_PREFIX}/lib/libxgrammar.a")
  message(FATAL_ERROR "xgrammar: scripts/fetch_xgrammar.sh failed (${xgrammar_rc}); run it to see why")
endif()
add_library(troupe::xgrammar STATIC IMPORTED)
set_target_properties(troupe::xgrammar PROPERTIES
  IMPORTED_LOCATION "${XGRAMMAR_PREFIX}/lib/libxgrammar.a"
  INTERFACE_INCLUDE_DIRECTORIES "${XGRAMMAR_PREFIX}/include"
  INTERFACE_LINK_LIBRARIES Threads::Threads)
message(STATUS "troupe: xgrammar from ${XGRAMMAR_PREFIX}")
