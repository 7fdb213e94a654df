// minilm's CUDA attention: FlashAttention-2 forward and backward, written for reading.
//
// Forward (Dao 2023, "FlashAttention-2", Algorithm 1): one block of 8 warps per (64-query tile,
// head, batch). The Q tile stays in shared memory while 64-key tiles of K and V stream through it;
// each warp owns 8 query rows and keeps their output, running max and running sum in registers
// (online softmax), so the (T, S) score matrix never exists. Writes O and lse = log(sum(exp(s))).
// Backward (Algorithm 2): recompute P = exp(S - lse) instead of storing it.
//   1. delta_i = rowsum(dO_i * O_i)                   (attention_bwd_delta_kernel)
//   2. one block of 8 warps per (64-key tile, kv head, batch) keeps K_j, V_j in shared memory and
//      loops over the query tiles of every query head that reads this kv head, accumulating dK_j,
//      dV_j in registers; dQ_i gets this block's share through fp32 atomicAdd (attention_bwd_kernel)
//   3. grad_q = scale * dQ in the input dtype                   (scale_convert_kernel)
// Math is plain fp32 FMA on CUDA cores (no tensor cores): lanes read fp16/bf16 from shared memory
// and accumulate in fp32. Causal masks are bottom-right aligned (query i sees keys j <= i + S - T);
// key tiles a whole query tile cannot see are skipped. The API is in attention_cuda.h.
#include "attention_cuda.h"
#include "attention_cuda_tiles.cuh"

#include <cmath>
#include <cstddef>

namespace minilm {
namespace {

constexpr int kFwdWarps = 8;    // 8 query rows per warp
constexpr int kBwdWarps = 8;    // 8 key rows (and in the dQ step 8 query rows) per warp
constexpr int kDsStride = kBlockN + 1;  // fp32 dS tile row: odd, so rows and columns are conflict-free

template <typename T, int D>
__global__ void __launch_bounds__(kFwdWarps * 32, 2) attention_fwd_kernel(const AttnParams p) {
  constexpr int kRows = kBlockM / kFwdWarps;  // query rows per warp
  constexpr int kDims = D / 32;               // output dims per lane
  extern __shared__ __align__(16) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem);  // (kBlockM, kStride): this block's queries
  T* k_s = q_s + kBlockM * kStride<D>;  // (kBlockN, kStride): the current key tile
  T* v_s = k_s + kBlockN * kStride<D>;  // (kBlockN, kStride): the current value tile

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int i0 = blockIdx.x * kBlockM, h = blockIdx.y, b = blockIdx.z;
  const int h_kv = h / (p.H / p.H_kv);
  const size_t q_row0 = (static_cast<size_t>(b) * p.H + h) * p.T;  // first row of this head in q
  const size_t kv_row0 = (static_cast<size_t>(b) * p.H_kv + h_kv) * p.S;
  const T* k = static_cast<const T*>(p.k) + kv_row0 * D;
  const T* v = static_cast<const T*>(p.v) + kv_row0 * D;
  load_tile<T, D, kBlockM, kFwdWarps * 32>(q_s, static_cast<const T*>(p.q) + (q_row0 + i0) * D, p.T - i0);

  // per row: output (this lane's dims), running max, this lane's share of the running sum
  float o[kRows][kDims] = {}, m[kRows], l[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
  }
  const float scale_log2 = p.scale * kLog2e;  // exp(x * scale) == exp2(x * scale_log2)
  const int shift = p.S - p.T;                 // causal: query i sees keys j <= i + shift
  int n_tiles = ceil_div(p.S, kBlockN);
  if (p.causal) n_tiles = min(n_tiles, ceil_div(min(i0 + kBlockM, p.T) + shift, kBlockN));

  for (int t = 0; t < n_tiles; ++t) {
    const int j0 = t * kBlockN;
    __syncthreads();  // every warp is done with the previous K/V tile
    load_tile<T, D, kBlockN, kFwdWarps * 32>(k_s, k + static_cast<size_t>(j0) * D, p.S - j0);
    load_tile<T, D, kBlockN, kFwdWarps * 32>(v_s, v + static_cast<size_t>(j0) * D, p.S - j0);
    __syncthreads();

    // 1. scores of this warp's rows against the lane's keys j0 + lane and j0 + lane + 32
    float s[kRows][2] = {};
    dot_rows<T, D, kRows>(q_s + warp * kRows * kStride<D>, k_s, s);
    // 2. online softmax: rescale what was accumulated under the old max by exp2(m_old - m_new)
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int i = i0 + warp * kRows + r;
      float tile_max = -INFINITY;
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int j = j0 + c * 32 + lane;
        const bool visible = j < p.S && (!p.causal || j <= i + shift);
        s[r][c] = visible ? s[r][c] * scale_log2 : -INFINITY;
        tile_max = fmaxf(tile_max, s[r][c]);
      }
      const float m_new = fmaxf(m[r], warp_max(tile_max));
      const float base = m_new == -INFINITY ? 0.f : m_new;  // a row with no visible key yet
      const float alpha = exp2f(m[r] - base);
      m[r] = m_new;
      s[r][0] = exp2f(s[r][0] - base);  // s now holds the unnormalised probabilities P
      s[r][1] = exp2f(s[r][1] - base);
      l[r] = l[r] * alpha + s[r][0] + s[r][1];
#pragma unroll
      for (int n = 0; n < kDims; ++n) o[r][n] *= alpha;
    }
    // 3. O += P V
    mix_rows<T, D, kRows>(s, v_s, o);
  }

  // 4. O /= l and lse = m + log(l); l is still split over the lanes
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int i = i0 + warp * kRows + r;
    const float l_sum = warp_sum(l[r]);
    if (i >= p.T) continue;  // padding row of the last tile (the whole warp agrees)
    const float inv = l_sum > 0.f ? 1.f / l_sum : 0.f;  // l_sum == 0 only when S == 0
    float row[kDims];
#pragma unroll
    for (int n = 0; n < kDims; ++n) row[n] = o[r][n] * inv;
    store_floats(static_cast<T*>(p.out) + (q_row0 + i) * D + lane * kDims, row);
    if (lane == 0) p.lse[q_row0 + i] = l_sum > 0.f ? (m[r] + log2f(l_sum)) * kLn2 : -INFINITY;
  }
}

// delta[row] = sum_d dO[row][d] * O[row][d]: one warp per row of the (B * H * T, D) matrices.
template <typename T, int D>
__global__ void attention_bwd_delta_kernel(const T* out, const T* dout, float* delta, size_t rows) {
  constexpr int kDims = D / 32;
  const size_t row = (static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // whole warps return together
  float o[kDims], g[kDims], sum = 0.f;
  load_floats(out + row * D + lane * kDims, o);
  load_floats(dout + row * D + lane * kDims, g);
#pragma unroll
  for (int n = 0; n < kDims; ++n) sum = fmaf(o[n], g[n], sum);
  sum = warp_sum(sum);
  if (lane == 0) delta[row] = sum;
}

// D = 128 keeps 64 fp32 accumulators (dK, dV) per thread: at 2 blocks per SM (128 registers) it
// would spill, and its 85 KB of shared memory allows only 1 block per SM on an A100 anyway.
template <typename T, int D>
__global__ void __launch_bounds__(kBwdWarps * 32, D == 64 ? 2 : 1) attention_bwd_kernel(const AttnParams p) {
  constexpr int kThreads = kBwdWarps * 32;
  constexpr int kKeys = kBlockN / kBwdWarps;  // key rows per warp (dK, dV)
  constexpr int kRows = kBlockM / kBwdWarps;  // query rows per warp (dQ)
  constexpr int kDims = D / 32;
  extern __shared__ __align__(16) unsigned char smem[];
  T* k_s = reinterpret_cast<T*>(smem);       // (kBlockN, kStride): this block's keys, resident
  T* v_s = k_s + kBlockN * kStride<D>;       // (kBlockN, kStride): this block's values, resident
  T* q_s = v_s + kBlockN * kStride<D>;       // (kBlockM, kStride): current query tile
  T* do_s = q_s + kBlockM * kStride<D>;      // (kBlockM, kStride): its output gradient
  float* ds_s = reinterpret_cast<float*>(do_s + kBlockM * kStride<D>);  // (kBlockM, kDsStride)
  float* lse_s = ds_s + kBlockM * kDsStride;  // (kBlockM,) lse * log2(e)
  float* delta_s = lse_s + kBlockM;           // (kBlockM,)

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int j0 = blockIdx.x * kBlockN, h_kv = blockIdx.y, b = blockIdx.z;
  const int group = p.H / p.H_kv, shift = p.S - p.T;
  const size_t kv_row0 = (static_cast<size_t>(b) * p.H_kv + h_kv) * p.S;
  load_tile<T, D, kBlockN, kThreads>(k_s, static_cast<const T*>(p.k) + (kv_row0 + j0) * D, p.S - j0);
  load_tile<T, D, kBlockN, kThreads>(v_s, static_cast<const T*>(p.v) + (kv_row0 + j0) * D, p.S - j0);

  float dk[kKeys][kDims] = {}, dv[kKeys][kDims] = {};
  const float scale_log2 = p.scale * kLog2e;
  // causal: key j0 is first seen by query j0 - shift; earlier query tiles see none of these keys
  const int first_tile = p.causal ? max(0, j0 - shift) / kBlockM : 0;
  const int n_tiles = ceil_div(p.T, kBlockM);

  for (int h = h_kv * group; h < (h_kv + 1) * group; ++h) {  // the query heads sharing this kv head
    const size_t q_row0 = (static_cast<size_t>(b) * p.H + h) * p.T;
    for (int t = first_tile; t < n_tiles; ++t) {
      const int i0 = t * kBlockM;
      // Every warp is done with the previous q_s, do_s, lse_s, delta_s: this is already implied by
      // the barrier before step 4 (and ds_s is rewritten only after the next one); kept for safety.
      __syncthreads();
      load_tile<T, D, kBlockM, kThreads>(q_s, static_cast<const T*>(p.q) + (q_row0 + i0) * D, p.T - i0);
      load_tile<T, D, kBlockM, kThreads>(do_s, static_cast<const T*>(p.grad_out) + (q_row0 + i0) * D, p.T - i0);
      for (int r = threadIdx.x; r < kBlockM; r += kThreads) {
        const bool valid = i0 + r < p.T;
        lse_s[r] = valid ? p.lse[q_row0 + i0 + r] * kLog2e : 0.f;
        delta_s[r] = valid ? p.delta[q_row0 + i0 + r] : 0.f;
      }
      __syncthreads();

      // 1. S^T and dP^T = V dO^T for this warp's keys (rows) and the lane's 2 queries (columns)
      float pt[kKeys][2] = {}, dst[kKeys][2] = {};
      dot_rows<T, D, kKeys>(k_s + warp * kKeys * kStride<D>, q_s, pt);
      dot_rows<T, D, kKeys>(v_s + warp * kKeys * kStride<D>, do_s, dst);
      // 2. P = exp(S * scale - lse) and dS = P * (dP - delta); dS also goes to shared memory
#pragma unroll
      for (int kk = 0; kk < kKeys; ++kk) {
        const int j_local = warp * kKeys + kk, j = j0 + j_local;
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int i_local = c * 32 + lane, i = i0 + i_local;
          const bool visible = i < p.T && j < p.S && (!p.causal || j <= i + shift);
          const float prob = visible ? exp2f(pt[kk][c] * scale_log2 - lse_s[i_local]) : 0.f;
          dst[kk][c] = prob * (dst[kk][c] - delta_s[i_local]);
          pt[kk][c] = prob;
          ds_s[i_local * kDsStride + j_local] = dst[kk][c];
        }
      }
      // 3. dV += P^T dO and dK += dS^T Q (dK's factor `scale` is applied once, at the end)
      mix_rows<T, D, kKeys>(pt, do_s, dv);
      mix_rows<T, D, kKeys>(dst, q_s, dk);
      __syncthreads();  // the dS tile is complete

      // 4. dQ += dS K for this warp's query rows; other key blocks add theirs, hence atomics
      float w[kRows][2], dq[kRows][kDims] = {};
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        w[r][0] = ds_s[(warp * kRows + r) * kDsStride + lane];
        w[r][1] = ds_s[(warp * kRows + r) * kDsStride + lane + 32];
      }
      mix_rows<T, D, kRows>(w, k_s, dq);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int i = i0 + warp * kRows + r;
        if (i >= p.T) continue;
        float* dst_row = p.dq_accum + (q_row0 + i) * D + lane * kDims;
#pragma unroll
        for (int n = 0; n < kDims; ++n) atomicAdd(dst_row + n, dq[r][n]);
      }
    }
  }

  // 5. write dK and dV (zeros for a key no query sees) for the real keys of the tile
#pragma unroll
  for (int kk = 0; kk < kKeys; ++kk) {
    const int j = j0 + warp * kKeys + kk;
    if (j >= p.S) continue;
#pragma unroll
    for (int n = 0; n < kDims; ++n) dk[kk][n] *= p.scale;
    store_floats(static_cast<T*>(p.grad_k) + (kv_row0 + j) * D + lane * kDims, dk[kk]);
    store_floats(static_cast<T*>(p.grad_v) + (kv_row0 + j) * D + lane * kDims, dv[kk]);
  }
}

// dst = scale * src in the output dtype (grad_q from the fp32 dQ accumulator).
template <typename T>
__global__ void scale_convert_kernel(const float* src, T* dst, float scale, size_t n) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t idx = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n; idx += stride)
    dst[idx] = from_float<T>(src[idx] * scale);
}

const char* cuda_error(cudaError_t err) { return err == cudaSuccess ? nullptr : cudaGetErrorString(err); }

// Opt in to more than 48 KB of dynamic shared memory (needed for D = 128), then launch.
template <typename Kernel>
const char* launch(Kernel kernel, dim3 grid, int threads, size_t smem, cudaStream_t stream, const AttnParams& p) {
  if (const char* err = cuda_error(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem))))
    return err;
  kernel<<<grid, threads, smem, stream>>>(p);
  return cuda_error(cudaGetLastError());
}

template <typename T, int D>
const char* launch_fwd(const AttnParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.H == 0 || p.T == 0) return nullptr;  // empty output
  const size_t smem = (kBlockM + 2 * kBlockN) * kStride<D> * sizeof(T);  // 27 KB (D=64), 51 KB (D=128)
  const dim3 grid(ceil_div(p.T, kBlockM), p.H, p.B);
  return launch(attention_fwd_kernel<T, D>, grid, kFwdWarps * 32, smem, stream, p);
}

template <typename T, int D>
const char* launch_bwd(const AttnParams& p, cudaStream_t stream) {
  const size_t rows = static_cast<size_t>(p.B) * p.H * p.T;
  if (rows > 0) {
    attention_bwd_delta_kernel<T, D><<<static_cast<unsigned>((rows + 7) / 8), 256, 0, stream>>>(
        static_cast<const T*>(p.out), static_cast<const T*>(p.grad_out), p.delta, rows);
    if (const char* err = cuda_error(cudaGetLastError())) return err;
    if (const char* err = cuda_error(cudaMemsetAsync(p.dq_accum, 0, rows * D * sizeof(float), stream)))
      return err;
  }
  if (p.B > 0 && p.S > 0) {  // also when T == 0: the kernel then writes zero dK, dV
    // 53 KB (D=64), 85 KB (D=128): K, V, Q, dO tiles + the fp32 dS tile + lse and delta
    const size_t smem = (2 * kBlockN + 2 * kBlockM) * kStride<D> * sizeof(T) +
                        (kBlockM * kDsStride + 2 * kBlockM) * sizeof(float);
    const dim3 grid(ceil_div(p.S, kBlockN), p.H_kv, p.B);
    if (const char* err = launch(attention_bwd_kernel<T, D>, grid, kBwdWarps * 32, smem, stream, p)) return err;
  }
  if (rows > 0) {
    const size_t n = rows * D;
    const unsigned blocks = static_cast<unsigned>(n / 256 < 4096 ? (n + 255) / 256 : 4096);
    scale_convert_kernel<T><<<blocks, 256, 0, stream>>>(p.dq_accum, static_cast<T*>(p.grad_q), p.scale, n);
    return cuda_error(cudaGetLastError());
  }
  return nullptr;
}

const char* check_params(const AttnParams& p) {
  if (!attention_cuda_supports_head_dim(p.D)) return "head dim D must be 64 or 128";
  if (p.B < 0 || p.H < 0 || p.T < 0 || p.S < 0 || p.H_kv <= 0 || p.H % p.H_kv != 0)
    return "need B, H, T, S >= 0, H_kv > 0 and H a multiple of H_kv";
  if (p.causal && p.T > p.S) return "causal attention needs T <= S (bottom-right aligned mask)";
  if (p.B > 65535 || p.H > 65535) return "B and H must be at most 65535 (CUDA grid limit)";
  return nullptr;
}

template <typename T>
const char* fwd_for_dtype(const AttnParams& p, cudaStream_t stream) {
  return p.D == 64 ? launch_fwd<T, 64>(p, stream) : launch_fwd<T, 128>(p, stream);
}

template <typename T>
const char* bwd_for_dtype(const AttnParams& p, cudaStream_t stream) {
  return p.D == 64 ? launch_bwd<T, 64>(p, stream) : launch_bwd<T, 128>(p, stream);
}

}  // namespace

const char* attention_fwd_cuda(const AttnParams& p, AttnDType dtype, cudaStream_t stream) {
  if (const char* err = check_params(p)) return err;
  return dtype == AttnDType::kFloat16 ? fwd_for_dtype<__half>(p, stream) : fwd_for_dtype<__nv_bfloat16>(p, stream);
}

const char* attention_bwd_cuda(const AttnParams& p, AttnDType dtype, cudaStream_t stream) {
  if (const char* err = check_params(p)) return err;
  return dtype == AttnDType::kFloat16 ? bwd_for_dtype<__half>(p, stream) : bwd_for_dtype<__nv_bfloat16>(p, stream);
}

}  // namespace minilm
