// The torch-free launcher API of minilm's CUDA attention kernels (attention_cuda.cu).
//
// Plain C++ and CUDA runtime types only, so the kernels can be compiled and read without PyTorch;
// attention_cuda_binding.cpp is the thin layer that turns at::Tensors into an AttnParams.
// Layouts (all contiguous, row-major):
//   q, out, grad_out, grad_q   (B, H, T, D)       fp16 or bf16
//   k, v, grad_k, grad_v       (B, H_kv, S, D)    same dtype as q
//   lse, delta                 (B, H, T)          fp32
//   dq_accum                   (B, H, T, D)       fp32 scratch
// Query head h reads k/v head h / (H / H_kv). With causal, query i sees keys j <= i + (S - T)
// (bottom-right aligned), which needs T <= S. Every pointer must be 16-byte aligned.
#pragma once

#include <cuda_runtime.h>

namespace minilm {

enum class AttnDType { kFloat16, kBFloat16 };

struct AttnParams {
  // forward reads q, k, v and writes out, lse; backward reads all five
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // row logsumexp of the scaled scores, natural log
  // backward only: inputs, outputs and fp32 scratch the caller allocates
  const void* grad_out = nullptr;
  void* grad_q = nullptr;
  void* grad_k = nullptr;
  void* grad_v = nullptr;
  float* delta = nullptr;     // (B, H, T): rowsum(grad_out * out), written by the launcher
  float* dq_accum = nullptr;  // (B, H, T, D): zeroed and filled by the launcher
  int B = 0, H = 0, H_kv = 0, T = 0, S = 0, D = 0;
  bool causal = false;
  float scale = 1.0f;  // multiplies q.k before the softmax, usually 1/sqrt(D)
};

// Both return nullptr on success, else a static message (a bad argument or a CUDA error).
// They launch asynchronously on `stream` and do not synchronize.
const char* attention_fwd_cuda(const AttnParams& p, AttnDType dtype, cudaStream_t stream);
const char* attention_bwd_cuda(const AttnParams& p, AttnDType dtype, cudaStream_t stream);

// The head dims the kernels are compiled for.
inline bool attention_cuda_supports_head_dim(int d) { return d == 64 || d == 128; }

}  // namespace minilm
