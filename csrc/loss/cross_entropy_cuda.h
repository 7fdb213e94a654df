// The torch-free launcher API of minilm's CUDA cross-entropy kernels (cross_entropy_cuda.cu);
// cross_entropy_cuda_binding.cpp turns at::Tensors into these calls. Layouts (contiguous):
//   logits (N, V) in `dtype`; targets (N,) int64; loss, lse, grad_loss (N,) float32 (float64 for
//   float64 logits); grad_logits (N, V) in `dtype`.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace minilm {

enum class LossDType { kFloat32, kFloat64, kFloat16, kBFloat16 };

// Both return nullptr on success, else a static message. Asynchronous on `stream`.
const char* cross_entropy_fwd_cuda(const void* logits, const int64_t* targets, void* loss, void* lse, int64_t N,
                                   int64_t V, int64_t ignore_index, LossDType dtype, cudaStream_t stream);
const char* cross_entropy_bwd_cuda(const void* grad_loss, const void* logits, const int64_t* targets,
                                   const void* lse, void* grad_logits, int64_t N, int64_t V, int64_t ignore_index,
                                   LossDType dtype, cudaStream_t stream);

}  // namespace minilm
