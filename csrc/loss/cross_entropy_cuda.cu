// CUDA kernels of minilm's fused cross-entropy (API in cross_entropy_cuda.h; the math and why it is
// fused: cross_entropy_cpu.cpp). Torch-free, so `nvcc -c` compiles it on a machine whose torch is a
// CPU build.
// Forward: one block of kThreads per row. Each thread keeps a running max and sum of exp over its
// strided share of the row (the online softmax, one pass over the logits), then the block merges
// the kThreads pairs in shared memory. Backward: one thread per logit, grid-stride; each needs only
// its row's lse, so it is a single read of the logits and a single write of the gradient.
#include "../cuda_dtype.cuh"
#include "cross_entropy_cuda.h"

namespace minilm {
namespace {

__device__ __forceinline__ float exp_(float x) { return __expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return __logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }

constexpr int kThreads = 256;

// (m, s) pairs stand for s * e^m; merging two rescales both sums to the larger max
template <typename A> __device__ __forceinline__ void merge(A& m, A& s, A m2, A s2) {
  const A m_new = m > m2 ? m : m2;
  if (m_new == -INFINITY) return;  // both empty so far
  s = s * exp_(m - m_new) + s2 * exp_(m2 - m_new);
  m = m_new;
}

template <typename T>
__global__ void fwd_kernel(const T* __restrict__ logits, const int64_t* __restrict__ targets,
                           typename Acc<T>::type* __restrict__ loss, typename Acc<T>::type* __restrict__ lse,
                           int64_t V, int64_t ignore_index) {
  using A = typename Acc<T>::type;
  __shared__ A sm[kThreads], ss[kThreads];
  const int64_t row = blockIdx.x;
  const T* x = logits + row * V;
  A m = -INFINITY, s = 0;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) merge(m, s, load(x + j), A(1));
  sm[threadIdx.x] = m;
  ss[threadIdx.x] = s;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {  // tree merge: kThreads -> 1
    if (threadIdx.x < half) {
      A m1 = sm[threadIdx.x], s1 = ss[threadIdx.x];
      merge(m1, s1, sm[threadIdx.x + half], ss[threadIdx.x + half]);
      sm[threadIdx.x] = m1;
      ss[threadIdx.x] = s1;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const A row_lse = sm[0] + log_(ss[0]);
    const int64_t t = targets[row];
    lse[row] = row_lse;
    loss[row] = t == ignore_index ? A(0) : row_lse - load(x + t);
  }
}

template <typename T>
__global__ void bwd_kernel(const typename Acc<T>::type* __restrict__ grad_loss, const T* __restrict__ logits,
                           const int64_t* __restrict__ targets, const typename Acc<T>::type* __restrict__ lse,
                           T* __restrict__ grad, int64_t N, int64_t V, int64_t ignore_index) {
  using A = typename Acc<T>::type;
  const int64_t total = N * V, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t i = e / V, j = e - i * V, t = targets[i];
    const A p = t == ignore_index ? A(0) : exp_(load(logits + e) - lse[i]);
    store(grad + e, t == ignore_index ? A(0) : grad_loss[i] * (p - (j == t ? A(1) : A(0))));
  }
}

template <typename T>
const char* launch(const void* grad_loss, const void* logits, const int64_t* targets, void* loss, void* lse,
                   void* grad, int64_t N, int64_t V, int64_t ignore_index, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  if (N == 0) return nullptr;
  if (grad == nullptr) {
    if (N > 2147483647LL) return "cross_entropy (CUDA): more than 2^31 - 1 rows";
    fwd_kernel<T><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
        static_cast<const T*>(logits), targets, static_cast<A*>(loss), static_cast<A*>(lse), V, ignore_index);
  } else {
    const int64_t blocks = (N * V + kThreads - 1) / kThreads;
    bwd_kernel<T><<<static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8), kThreads, 0, stream>>>(
        static_cast<const A*>(grad_loss), static_cast<const T*>(logits), targets, static_cast<const A*>(lse),
        static_cast<T*>(grad), N, V, ignore_index);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

const char* dispatch(const void* grad_loss, const void* logits, const int64_t* targets, void* loss, void* lse,
                     void* grad, int64_t N, int64_t V, int64_t ignore_index, LossDType dtype, cudaStream_t stream) {
  if (N < 0 || V <= 0) return "cross_entropy (CUDA): bad size";
  switch (dtype) {
    case LossDType::kFloat32:
      return launch<float>(grad_loss, logits, targets, loss, lse, grad, N, V, ignore_index, stream);
    case LossDType::kFloat64:
      return launch<double>(grad_loss, logits, targets, loss, lse, grad, N, V, ignore_index, stream);
    case LossDType::kFloat16:
      return launch<__half>(grad_loss, logits, targets, loss, lse, grad, N, V, ignore_index, stream);
    case LossDType::kBFloat16:
      return launch<__nv_bfloat16>(grad_loss, logits, targets, loss, lse, grad, N, V, ignore_index, stream);
  }
  return "cross_entropy (CUDA): unknown dtype";
}

}  // namespace

const char* cross_entropy_fwd_cuda(const void* logits, const int64_t* targets, void* loss, void* lse, int64_t N,
                                   int64_t V, int64_t ignore_index, LossDType dtype, cudaStream_t stream) {
  return dispatch(nullptr, logits, targets, loss, lse, nullptr, N, V, ignore_index, dtype, stream);
}

const char* cross_entropy_bwd_cuda(const void* grad_loss, const void* logits, const int64_t* targets,
                                   const void* lse, void* grad_logits, int64_t N, int64_t V, int64_t ignore_index,
                                   LossDType dtype, cudaStream_t stream) {
  return dispatch(grad_loss, logits, targets, nullptr, const_cast<void*>(lse), grad_logits, N, V, ignore_index, dtype,
                  stream);
}

}  // namespace minilm
