// CUDA kernels of minilm's neuron-masked FFN: the SwiGLU elementwise step over the kept neurons,
// forward and backward, fused into one pass each (API in masking_cuda.h). Torch-free, so
// `nvcc -c` compiles this file on a machine whose torch is a CPU build.
//
// On a GPU the FFN's matmuls go to cuBLAS (masking.h gathers the kept weights so they are dense);
// what is left is memory-bound elementwise work, and fusing it matters: the unfused forward
// silu(gate) * up reads hidden twice and writes a temporary, the unfused backward takes ~6 kernels.
// Here each element is read once and its results written once, 4 bytes of fp32 math per byte moved.
// One thread per (row, kept neuron), grid-stride so any N * K fits the grid.
#include "../cuda_dtype.cuh"
#include "masking_cuda.h"

namespace minilm {
namespace {

__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + __expf(-g)); }
__device__ __forceinline__ double sigmoid(double g) { return 1.0 / (1.0 + exp(-g)); }

template <typename T>
__global__ void swiglu_fwd_kernel(const T* __restrict__ hidden, T* __restrict__ act, int64_t N, int64_t K) {
  using A = typename Acc<T>::type;
  const int64_t total = N * K, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t i = e / K, j = e - i * K;
    const A g = load(hidden + i * 2 * K + j), u = load(hidden + i * 2 * K + K + j);
    store(act + e, g * sigmoid(g) * u);
  }
}

// d act / d gate = up * s (1 + g (1 - s)) with s = sigmoid(gate); d act / d up = silu(gate).
template <typename T>
__global__ void swiglu_bwd_kernel(const T* __restrict__ hidden, const T* __restrict__ grad_act,
                                  T* __restrict__ grad_hidden, T* __restrict__ act, int64_t N, int64_t K) {
  using A = typename Acc<T>::type;
  const int64_t total = N * K, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t i = e / K, j = e - i * K;
    const A g = load(hidden + i * 2 * K + j), u = load(hidden + i * 2 * K + K + j), d = load(grad_act + e);
    const A s = sigmoid(g), silu = g * s;
    store(act + e, silu * u);
    store(grad_hidden + i * 2 * K + j, d * u * s * (A(1) + g * (A(1) - s)));
    store(grad_hidden + i * 2 * K + K + j, d * silu);
  }
}

constexpr int kThreads = 256;

int blocks_for(int64_t total) {
  const int64_t b = (total + kThreads - 1) / kThreads;
  return static_cast<int>(b < 65535 * 8 ? b : 65535 * 8);  // grid-stride covers the rest
}

template <typename T>
const char* launch(const void* hidden, const void* grad_act, void* grad_hidden, void* act, int64_t N, int64_t K,
                   cudaStream_t stream) {
  if (N * K == 0) return nullptr;
  if (grad_act == nullptr) {
    swiglu_fwd_kernel<T><<<blocks_for(N * K), kThreads, 0, stream>>>(static_cast<const T*>(hidden),
                                                                      static_cast<T*>(act), N, K);
  } else {
    swiglu_bwd_kernel<T><<<blocks_for(N * K), kThreads, 0, stream>>>(
        static_cast<const T*>(hidden), static_cast<const T*>(grad_act), static_cast<T*>(grad_hidden),
        static_cast<T*>(act), N, K);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

const char* dispatch(const void* hidden, const void* grad_act, void* grad_hidden, void* act, int64_t N, int64_t K,
                     FfnDType dtype, cudaStream_t stream) {
  if (N < 0 || K < 0) return "swiglu (CUDA): negative size";
  switch (dtype) {
    case FfnDType::kFloat32: return launch<float>(hidden, grad_act, grad_hidden, act, N, K, stream);
    case FfnDType::kFloat64: return launch<double>(hidden, grad_act, grad_hidden, act, N, K, stream);
    case FfnDType::kFloat16: return launch<__half>(hidden, grad_act, grad_hidden, act, N, K, stream);
    case FfnDType::kBFloat16: return launch<__nv_bfloat16>(hidden, grad_act, grad_hidden, act, N, K, stream);
  }
  return "swiglu (CUDA): unknown dtype";
}

}  // namespace

const char* swiglu_fwd_cuda(const void* hidden, void* act, int64_t N, int64_t K, FfnDType dtype,
                            cudaStream_t stream) {
  return dispatch(hidden, nullptr, nullptr, act, N, K, dtype, stream);
}

const char* swiglu_bwd_cuda(const void* hidden, const void* grad_act, void* grad_hidden, void* act, int64_t N,
                            int64_t K, FfnDType dtype, cudaStream_t stream) {
  return dispatch(hidden, grad_act, grad_hidden, act, N, K, dtype, stream);
}

}  // namespace minilm
