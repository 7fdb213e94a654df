// Device building blocks of minilm's CUDA attention (attention_cuda.cu): dtype conversion, vector
// loads, warp reductions, and the two small shared-memory "matmuls" both kernels are made of.
//
// Thread layout they assume: a warp works on a 64-row tile B in shared memory. In dot_rows each
// lane owns two rows of B (lane and lane + 32); in mix_rows each lane owns D/32 consecutive columns
// of the output. Read dot_rows and mix_rows first: the kernels are these two calls plus softmax.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>

namespace minilm {

constexpr int kBlockM = 64;     // query rows per tile
constexpr int kBlockN = 64;     // key rows per tile (2 per lane of a warp, see dot_rows)
constexpr int kPad = 8;         // 16 bytes (8 fp16/bf16) of padding per shared row, see dot_rows
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int D> constexpr int kStride = D + kPad;  // elements per row of a shared tile

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ T from_float(float x);
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// N consecutive 16-bit values moved with one 4-, 8- or 16-byte load or store.
template <typename T, int N> struct alignas(sizeof(T) * N) Vec { T x[N]; };

template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* src, float (&dst)[N]) {
  const Vec<T, N> v = *reinterpret_cast<const Vec<T, N>*>(src);
#pragma unroll
  for (int n = 0; n < N; ++n) dst[n] = to_float(v.x[n]);
}

template <typename T, int N>
__device__ __forceinline__ void store_floats(T* dst, const float (&src)[N]) {
  Vec<T, N> v;
#pragma unroll
  for (int n = 0; n < N; ++n) v.x[n] = from_float<T>(src[n]);
  *reinterpret_cast<Vec<T, N>*>(dst) = v;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// The whole block copies rows [0, kRows) of a (rows, D) global tile into a shared tile of row
// stride kStride<D>, 16 bytes per thread per step (coalesced); rows >= valid_rows become zeros.
template <typename T, int D, int kRows, int kThreads>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int valid_rows) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int c = threadIdx.x; c < kRows * kChunks; c += kThreads) {
    const int row = c / kChunks, col = (c % kChunks) * 8;
    uint4 chunk = make_uint4(0, 0, 0, 0);  // all-zero bits are 0.0 in fp16 and bf16
    if (row < valid_rows) chunk = *reinterpret_cast<const uint4*>(src + static_cast<size_t>(row) * D + col);
    *reinterpret_cast<uint4*>(dst + row * kStride<D> + col) = chunk;
  }
}

// acc[r][c] += dot(A[r], B[c * 32 + lane]) for the kRows rows of A (every lane reads the same
// row: a broadcast) and the two rows of B this lane owns. Both are shared tiles of stride
// kStride<D>; the 16-byte padding puts the rows 8 lanes read at once in different banks.
template <typename T, int D, int kRows>
__device__ __forceinline__ void dot_rows(const T* A, const T* B, float (&acc)[kRows][2]) {
  const int lane = threadIdx.x % 32;
#pragma unroll 2
  for (int d = 0; d < D; d += 8) {
    float b0[8], b1[8];
    load_floats(B + lane * kStride<D> + d, b0);
    load_floats(B + (lane + 32) * kStride<D> + d, b1);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float a[8];
      load_floats(A + r * kStride<D> + d, a);
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        acc[r][0] = fmaf(a[n], b0[n], acc[r][0]);
        acc[r][1] = fmaf(a[n], b1[n], acc[r][1]);
      }
    }
  }
}

// acc[r][:] += sum_j w(r, j) * B[j][lane's dims] over the 64 rows j of the shared tile B.
// Lane l holds w(r, l) in w[r][0] and w(r, l + 32) in w[r][1]; __shfl_sync hands weight j to every
// lane. Lane l owns the D/32 consecutive dims starting at l * D/32 of each output row.
template <typename T, int D, int kRows>
__device__ __forceinline__ void mix_rows(const float (&w)[kRows][2], const T* B, float (&acc)[kRows][D / 32]) {
  constexpr int kDims = D / 32;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int c = 0; c < 2; ++c) {
#pragma unroll 4
    for (int src = 0; src < 32; ++src) {
      float b[kDims];
      load_floats(B + (c * 32 + src) * kStride<D> + lane * kDims, b);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float wj = __shfl_sync(0xffffffffu, w[r][c], src);
#pragma unroll
        for (int n = 0; n < kDims; ++n) acc[r][n] = fmaf(wj, b[n], acc[r][n]);
      }
    }
  }
}

}  // namespace minilm
