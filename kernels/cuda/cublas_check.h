#pragma once
// CUBLAS_CHECK: a failing cuBLAS call is fatal, reported like CUDA_CHECK (expression, status,
// file:line) through the same [[noreturn]] exit. Kept apart from cuda_check.h so code that
// does not use cuBLAS does not need its headers.
#include <cublas_api.h>

#include "kernels/cuda/cuda_check.h"

// expr is a cublasStatus_t-valued call.
#define CUBLAS_CHECK(expr)                                                                 \
  do {                                                                                     \
    const cublasStatus_t rlhf_cublas_status_ = (expr);                                     \
    if (rlhf_cublas_status_ != CUBLAS_STATUS_SUCCESS) {                                    \
      ::rlhf::cuda_check_failed(#expr, cublasGetStatusString(rlhf_cublas_status_), __FILE__, \
                                __LINE__);                                                 \
    }                                                                                      \
  } while (0)
