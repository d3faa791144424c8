# Every third-party dependency, found once. All come from Debian packages
# (tools/install-deps.sh); nothing is downloaded at configure time.
find_package(Threads REQUIRED)
find_package(OpenMP REQUIRED)
find_package(spdlog REQUIRED)
find_package(fmt REQUIRED)
find_package(yaml-cpp REQUIRED)
find_package(nlohmann_json REQUIRED)
find_package(CLI11 CONFIG QUIET)
find_package(GTest REQUIRED)

# OpenBLAS: prefer the OpenMP build so BLAS calls and our own `omp parallel` loops share one
# thread pool (the pthread build spins its own threads and fights ours for the two cores).
find_library(RLHF_OPENBLAS_LIBRARY NAMES openblas
  PATHS /usr/lib/x86_64-linux-gnu/openblas-openmp NO_DEFAULT_PATH)
find_path(RLHF_OPENBLAS_INCLUDE cblas.h
  PATHS /usr/include/x86_64-linux-gnu/openblas-openmp NO_DEFAULT_PATH)
if(NOT RLHF_OPENBLAS_LIBRARY OR NOT RLHF_OPENBLAS_INCLUDE)
  find_library(RLHF_OPENBLAS_LIBRARY NAMES openblas REQUIRED)
  find_path(RLHF_OPENBLAS_INCLUDE cblas.h PATH_SUFFIXES openblas REQUIRED)
  message(WARNING "OpenMP OpenBLAS not found; using ${RLHF_OPENBLAS_LIBRARY}")
endif()
add_library(rlhf_blas INTERFACE)
target_link_libraries(rlhf_blas INTERFACE ${RLHF_OPENBLAS_LIBRARY})
target_include_directories(rlhf_blas SYSTEM INTERFACE ${RLHF_OPENBLAS_INCLUDE})
message(STATUS "rlhf: BLAS ${RLHF_OPENBLAS_LIBRARY}")

if(NOT TARGET CLI11::CLI11)
  find_path(RLHF_CLI11_INCLUDE CLI/CLI.hpp REQUIRED)
  add_library(CLI11::CLI11 INTERFACE IMPORTED)
  target_include_directories(CLI11::CLI11 INTERFACE ${RLHF_CLI11_INCLUDE})
endif()

# RocksDB (the RolloutStore): the shared library and its header, found directly. Not every
# distribution ships RocksDBConfig.cmake, and Debian's runs find_dependency for gflags, Snappy,
# zlib, bzip2, lz4 and zstd and adds its own Find modules to CMAKE_MODULE_PATH, all for the sake
# of its static library; the shared one records those dependencies itself.
find_library(RLHF_ROCKSDB_LIBRARY NAMES rocksdb REQUIRED)
find_path(RLHF_ROCKSDB_INCLUDE rocksdb/db.h REQUIRED)
add_library(rlhf_rocksdb INTERFACE)
target_link_libraries(rlhf_rocksdb INTERFACE ${RLHF_ROCKSDB_LIBRARY} Threads::Threads)
target_include_directories(rlhf_rocksdb SYSTEM INTERFACE ${RLHF_ROCKSDB_INCLUDE})
message(STATUS "rlhf: RocksDB ${RLHF_ROCKSDB_LIBRARY}")
