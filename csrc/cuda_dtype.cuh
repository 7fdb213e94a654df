// Loads and stores between a CUDA kernel's storage type and the type its math runs in, shared by
// the torch-free .cu files (masking/, loss/): float for fp32, fp16 and bf16 storage, double for
// double. Template specialisations, not overloads, so a kernel names the storage type once.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace minilm {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename Acc<T>::type load(const T* p) {
  return static_cast<typename Acc<T>::type>(*p);
}
template <> __device__ __forceinline__ float load<__half>(const __half* p) { return __half2float(*p); }
template <> __device__ __forceinline__ float load<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}
template <typename T, typename A> __device__ __forceinline__ void store(T* p, A v) { *p = static_cast<T>(v); }
template <> __device__ __forceinline__ void store<__half, float>(__half* p, float v) { *p = __float2half(v); }
template <> __device__ __forceinline__ void store<__nv_bfloat16, float>(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16(v);
}

}  // namespace minilm
