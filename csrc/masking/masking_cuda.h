// The torch-free launcher API of minilm's CUDA masked-FFN kernels (masking_cuda.cu): the elementwise
// SwiGLU step between the FFN's two matmuls, over the kept neurons only. The matmuls themselves are
// cuBLAS through ATen (masking.h); masking_cuda_binding.cpp turns at::Tensors into these calls.
// Layouts (contiguous, row-major), K the number of kept neurons:
//   hidden       (N, 2K)  row i: K gate values, then K up values
//   act          (N, K)   silu(gate) * up
//   grad_act     (N, K)   gradient of the loss for act
//   grad_hidden  (N, 2K)  gradient for hidden, gate half then up half
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace minilm {

enum class FfnDType { kFloat32, kFloat64, kFloat16, kBFloat16 };

// Both return nullptr on success, else a static message. Asynchronous on `stream`.
const char* swiglu_fwd_cuda(const void* hidden, void* act, int64_t N, int64_t K, FfnDType dtype,
                            cudaStream_t stream);
const char* swiglu_bwd_cuda(const void* hidden, const void* grad_act, void* grad_hidden, void* act, int64_t N,
                            int64_t K, FfnDType dtype, cudaStream_t stream);

}  // namespace minilm
