// Decoding attention on the CPU: the kernel of minilm::attention_decode (schema in csrc/ops.cpp).
//
// When a model decodes with a KV cache, each step brings T = 1 (or a few) new queries and S cached
// keys. The tiled kernel (attention_cpu.cpp) is built for T and S both large: it first copies every
// key and value into padded buffers, O(S) work per step that is all overhead at T = 1. This kernel
// reads the keys and values where the cache keeps them (any strides but the head dim's, which must be
// 1), one query row at a time: scores s_j = q . k_j * scale over the visible keys, then
// softmax and the weighted sum of the values, accumulated in float (double for double).
//
// Left padding (a batch of prompts of different lengths) is key_start (B,): row b's keys before
// key_start[b] are padding. Query i of T is the position S - T + i and sees keys
// key_start[b] <= j <= S - T + i (bottom-right causal). A query that would see no key at all (a
// padding position) sees every key instead, as minilm/ops/reference.py's attention_mask decides:
// its output is garbage by construction and ignored, but finite.
//
// Forward only: decoding runs under torch.inference_mode. Work is split over (batch, kv head), about
// a million multiply-adds a chunk, so at the tiny preset's sizes every task runs in one chunk on the
// calling thread (no thread wake-up per step).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu_math.h"

namespace {

using minilm::exp_neg;
using minilm::Vec;

// One Vec of acc_t (16 floats or 8 doubles) from L consecutive values of scalar_t, converted.
template <typename acc_t, typename scalar_t>
inline typename Vec<acc_t>::type load_vec(const scalar_t* p) {
  typename Vec<acc_t>::type v;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    for (int l = 0; l < Vec<acc_t>::kLanes; l++) v[l] = static_cast<acc_t>(p[l]);
  }
  return v;
}

// One query row: out = softmax(q . k_j, j in [lo, hi)) weighted sum of v_j, with q already scaled,
// the head dim D = NV vectors (NV = 0: any D, in plain loops), s a scratch row of >= hi scores.
// A dot product per key would end in a horizontal sum per key, a chain of shuffles that costs more
// than the multiplies (4x at D = 32). So keys go in blocks: the block's accumulators and q's NV
// vectors stay in registers (NV a compile-time constant is what lets the compiler keep them there),
// and each accumulator's lanes are summed once, at the end. The output's NV vectors stay in
// registers too while the values stream past.
template <int NV, typename acc_t, typename scalar_t>
void attend_row(const acc_t* q, const scalar_t* K, int64_t ks, const scalar_t* Vh, int64_t vs, int64_t D,
                int64_t lo, int64_t hi, acc_t* s, acc_t* out) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::kLanes, kKeys = minilm::kVecRegs / 2;  // the other half: q and loads
  int64_t j0 = lo;
  if constexpr (NV > 0) {  // 1. scores, a block of keys at a time
    V qv[NV];
    for (int c = 0; c < NV; c++) qv[c] = load_vec<acc_t>(q + c * L);
    for (; j0 + kKeys <= hi; j0 += kKeys) {
      V acc[kKeys] = {};
#pragma GCC unroll 16
      for (int jj = 0; jj < kKeys; jj++)
        for (int c = 0; c < NV; c++) acc[jj] += qv[c] * load_vec<acc_t>(K + (j0 + jj) * ks + c * L);
      for (int jj = 0; jj < kKeys; jj++) {
        acc_t dot = 0;
        for (int l = 0; l < L; l++) dot += acc[jj][l];
        s[j0 + jj] = dot;
      }
    }
  }
  for (; j0 < hi; j0++) {  // the keys after the last whole block (all of them when NV = 0)
    acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < D; d++) dot += q[d] * static_cast<acc_t>(K[j0 * ks + d]);
    s[j0] = dot;
  }
  acc_t m = -std::numeric_limits<acc_t>::infinity();  // 2. softmax numerators, in place
#pragma omp simd reduction(max : m)
  for (int64_t j = lo; j < hi; j++) m = s[j] > m ? s[j] : m;
  acc_t l = 0;
#pragma omp simd reduction(+ : l)
  for (int64_t j = lo; j < hi; j++) {
    s[j] = exp_neg(s[j] - m);
    l += s[j];
  }
  const acc_t inv_l = acc_t(1) / l;  // l >= 1: the maximum's own term is e^0
  if constexpr (NV > 0) {  // 3. out = sum_j p_j v_j / l
    V o[NV] = {};
    for (int64_t j = lo; j < hi; j++)
      for (int c = 0; c < NV; c++) o[c] += s[j] * load_vec<acc_t>(Vh + j * vs + c * L);
    for (int c = 0; c < NV; c++)
      for (int i = 0; i < L; i++) out[c * L + i] = o[c][i] * inv_l;
  } else {
    std::fill(out, out + D, acc_t(0));
    for (int64_t j = lo; j < hi; j++)
#pragma omp simd
      for (int64_t d = 0; d < D; d++) out[d] += s[j] * static_cast<acc_t>(Vh[j * vs + d]);
    for (int64_t d = 0; d < D; d++) out[d] *= inv_l;
  }
}

template <int NV, typename scalar_t>
void attention_decode_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const int64_t* key_start, at::Tensor& out, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t H_kv = k.size(1), S = k.size(2), group = H / H_kv;
  const int64_t kb = k.stride(0), kh = k.stride(1), ks = k.stride(2);  // the cache's strides
  const int64_t vb = v.stride(0), vh = v.stride(1), vs = v.stride(2);
  const scalar_t *Q = q.const_data_ptr<scalar_t>(), *K = k.const_data_ptr<scalar_t>(),
                 *V = v.const_data_ptr<scalar_t>();
  scalar_t* O = out.mutable_data_ptr<scalar_t>();
  const int64_t work = 4 * group * T * S * D;  // multiply-adds of one (batch, kv head) task
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(work, 1));

  at::parallel_for(0, B * H_kv, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qrow(D), orow(D), s(S);  // one query (times scale), its output, its scores
    for (int64_t task = begin; task < end; task++) {
      const int64_t b = task / H_kv, g = task % H_kv;
      const int64_t start = key_start ? std::clamp<int64_t>(key_start[b], 0, S) : 0;
      for (int64_t h = g * group; h < (g + 1) * group; h++) {  // the query heads that share kv head g
        for (int64_t i = 0; i < T; i++) {
          const int64_t row = (b * H + h) * T + i;  // q and out are contiguous (B, H, T, D)
          for (int64_t d = 0; d < D; d++) qrow[d] = static_cast<acc_t>(Q[row * D + d]) * acc_t(scale);
          int64_t lo = start, hi = S - T + i + 1;  // visible keys [lo, hi)
          if (lo >= hi) lo = 0, hi = S;            // sees no key: every key (see the header)
          attend_row<NV>(qrow.data(), K + b * kb + g * kh, ks, V + b * vb + g * vh, vs, D, lo, hi, s.data(),
                         orow.data());
          for (int64_t d = 0; d < D; d++) O[row * D + d] = static_cast<scalar_t>(orow[d]);
        }
      }
    }
  });
}

// The kernel for this head dim: specialised for the common ones, plain loops for the others.
template <typename scalar_t>
void attention_decode_dispatch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const int64_t* key_start, at::Tensor& out, double scale) {
  constexpr int L = Vec<at::opmath_type<scalar_t>>::kLanes;
  const int64_t D = q.size(3);
  switch (D % L ? 0 : D / L) {
    case 1: return attention_decode_kernel<1, scalar_t>(q, k, v, key_start, out, scale);
    case 2: return attention_decode_kernel<2, scalar_t>(q, k, v, key_start, out, scale);
    case 4: return attention_decode_kernel<4, scalar_t>(q, k, v, key_start, out, scale);
    case 8: return attention_decode_kernel<8, scalar_t>(q, k, v, key_start, out, scale);
    default: return attention_decode_kernel<0, scalar_t>(q, k, v, key_start, out, scale);
  }
}

at::Tensor attention_decode_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& key_start, double scale) {
  for (const auto& [name, x] : {std::pair{"q", &q}, std::pair{"k", &k}, std::pair{"v", &v}}) {
    TORCH_CHECK(x->device().is_cpu(), "minilm::attention_decode (CPU): ", name, " must be a CPU tensor, got ",
                x->device());
    TORCH_CHECK(x->dim() == 4, "minilm::attention_decode: ", name,
                " must be 4-D (B, heads, seq, head_dim), got ", x->sizes());
    TORCH_CHECK(x->scalar_type() == q.scalar_type(), "minilm::attention_decode: q, k, v must share one dtype, ",
                "got q ", q.scalar_type(), " and ", name, " ", x->scalar_type());
    TORCH_CHECK(x->stride(3) == 1, "minilm::attention_decode: ", name,
                "'s head dim must be contiguous (stride 1), got strides ", x->strides());
  }
  TORCH_CHECK(q.is_contiguous(), "minilm::attention_decode: q must be contiguous (call .contiguous())");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
              "minilm::attention_decode (CPU): dtype must be float32, float64 or bfloat16, got ", dtype);
  TORCH_CHECK(k.sizes() == v.sizes(), "minilm::attention_decode: k and v must have the same shape, got k ",
              k.sizes(), " and v ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3) && q.size(3) > 0,
              "minilm::attention_decode: q ", q.sizes(), " and k ", k.sizes(),
              " must share the batch size and a positive head dim");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "minilm::attention_decode: query heads H = ",
              q.size(1), " must be a multiple of k/v heads H_kv = ", k.size(1));
  TORCH_CHECK(q.size(2) <= k.size(2) && k.size(2) > 0, "minilm::attention_decode: the T = ", q.size(2),
              " queries must be the last of the S = ", k.size(2), " positions (0 < T <= S)");
  const int64_t* starts = nullptr;
  if (key_start.has_value()) {
    const at::Tensor& ks = *key_start;
    TORCH_CHECK(ks.device().is_cpu() && ks.scalar_type() == at::kLong && ks.dim() == 1 &&
                    ks.size(0) == q.size(0) && ks.is_contiguous(),
                "minilm::attention_decode: key_start must be a contiguous int64 CPU tensor of shape (B,) = (",
                q.size(0), ",), got ", ks.scalar_type(), " ", ks.sizes(), " on ", ks.device());
    starts = ks.const_data_ptr<int64_t>();
  }
  at::Tensor out = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "minilm_attention_decode_cpu",
                                 [&] { attention_decode_dispatch<scalar_t>(q, k, v, starts, out, scale); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(minilm, CPU, m) { m.impl("attention_decode", &attention_decode_cpu); }
