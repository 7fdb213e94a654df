// Flash-style attention on the CPU: the kernels of minilm::attention_fwd / attention_bwd (schemas in
// csrc/ops.cpp; the same loops in readable PyTorch: minilm/ops/tiled.py).
//
// Forward (FlashAttention-2, Dao 2023, Algorithm 1): for each tile of kBlockQ queries, walk the tiles
// of kBlockK keys, keep per query row the running maximum m and running sum l of exp(score - m),
// rescale the output accumulator whenever m grows, and divide by l at the end. Only one
// kBlockQ x kBlockK tile of the T x S score matrix exists at a time, per thread. lse = m + log(l).
// Backward (Algorithm 2) recomputes each score tile and P = exp(S - lse), then
//   dV += P^T dO,  dP = dO V^T,  dS = P * (dP - Delta) with Delta_i = rowsum(dO_i * O_i),
//   dQ += dS K * scale,  dK += dS^T Q * scale.
// Causal tiles entirely above the diagonal are never visited.
//
// Parallelism (at::parallel_for): the forward splits (batch, head, query tile). The backward splits
// (batch, kv head): one task owns dK and dV of its kv head and dQ of the query heads that share it,
// so no two threads write the same memory (no atomics, no per-thread copies to sum). Training shapes
// have B * H_kv >= 16 tasks, plenty for a CPU; a single sequence with one kv head runs on one core.
//
// Inputs are first copied into zero-padded buffers of acc_t (float for float and bfloat16, double
// for double): k and v once per kv head (also transposed, so every product is a plain C += A B),
// q and dO once per query tile; rows are padded to a multiple of 4 and the head dim to one of 16.
// Then all the math is matmul_acc / matmul_set and exp_neg from csrc/cpu_math.h, loops the compiler
// vectorises.
// Extra memory, linear in T and S: the forward's converted k/v (2 * B * H_kv * S * D), 6 * S * D per
// backward thread (its kv head and dK, dV), a few tiles per thread. lse is float32 for every dtype
// (the op's contract), so float64 gradients are exact to ~1e-7 relative, plenty for gradcheck.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_math.h"

namespace {

using minilm::exp_neg;
using minilm::matmul_acc;
using minilm::matmul_set;
using minilm::round_up;

constexpr int64_t kBlockQ = 64;  // queries per tile
constexpr int64_t kBlockK = 64;  // keys per tile: a 64 x 64 fp32 score tile is 16 KB, L1-sized

// at::parallel_for grain: items per task so that a task does >= ~1M multiply-adds. Waking threads
// costs more than small inputs take (and far more on a busy machine): those run on this thread.
int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(work_per_item, 1));
}

// dst (rows x ld) = src (n x D) * scale, converted to acc_t; rows n.. and columns D.. are zero.
template <typename acc_t, typename scalar_t>
void load_rows(acc_t* dst, const scalar_t* src, int64_t n, int64_t rows, int64_t D, int64_t ld, acc_t scale) {
  std::fill(dst, dst + rows * ld, acc_t(0));
  for (int64_t i = 0; i < n; i++)
    for (int64_t d = 0; d < D; d++) dst[i * ld + d] = static_cast<acc_t>(src[i * D + d]) * scale;
}

// dst (Dp x ld) = the transpose of src (n x D), converted to acc_t, zero outside n x D: with k^T
// as the right-hand side, the scores Q K^T are a plain matmul_acc.
template <typename acc_t, typename scalar_t>
void load_transposed(acc_t* dst, const scalar_t* src, int64_t n, int64_t D, int64_t Dp, int64_t ld) {
  std::fill(dst, dst + Dp * ld, acc_t(0));
  for (int64_t j = 0; j < n; j++)
    for (int64_t d = 0; d < D; d++) dst[d * ld + j] = static_cast<acc_t>(src[j * D + d]);
}

// Number of keys among j0 .. j0 + n - 1 that query i sees: bottom-right causal, i sees j <= i + S - T.
int64_t visible_keys(bool causal, int64_t i, int64_t j0, int64_t n, int64_t T, int64_t S) {
  return causal ? std::clamp(i + S - T + 1 - j0, int64_t(0), n) : n;
}

// One query row against one key tile, the online softmax: s[0:n] holds scores, of which the first
// `visible` count. Overwrites s with p = exp(s - m_new) (0 where masked), updates the running
// maximum m and sum l, and rescales the row's output accumulator o[0:Dp] to the new maximum.
template <typename acc_t>
void online_softmax_row(acc_t* s, int64_t n, int64_t visible, acc_t& m, acc_t& l, acc_t* o, int64_t Dp) {
  std::fill(s + std::max<int64_t>(visible, 0), s + n, acc_t(0));
  if (visible <= 0) return;  // nothing seen in this tile: m, l and o stay as they are
  acc_t m_new = m;
#pragma omp simd reduction(max : m_new)
  for (int64_t j = 0; j < visible; j++) m_new = s[j] > m_new ? s[j] : m_new;
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < visible; j++) {
    const acc_t p = exp_neg(s[j] - m_new);
    s[j] = p;
    sum += p;
  }
  const acc_t alpha = exp_neg(m - m_new);  // 0 on the first tile (m = -inf), 1 if m did not grow
  l = l * alpha + sum;
  m = m_new;
  if (alpha != acc_t(1))
    for (int64_t d = 0; d < Dp; d++) o[d] *= alpha;
}

template <typename scalar_t>
void attention_fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                          at::Tensor& lse, bool causal, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t H_kv = k.size(1), S = k.size(2), group = H / H_kv;
  const int64_t Dp = round_up(D, 16), Sp = round_up(S, kBlockK), n_qtiles = (T + kBlockQ - 1) / kBlockQ;
  const scalar_t *Q = q.const_data_ptr<scalar_t>(), *K = k.const_data_ptr<scalar_t>(),
                 *V = v.const_data_ptr<scalar_t>();
  scalar_t* O = out.mutable_data_ptr<scalar_t>();
  float* LSE = lse.mutable_data_ptr<float>();

  // 1. every kv head once, in acc_t and padded: K^T (Dp x Sp) and V (Sp x Dp), shared by all the
  //    query tiles and query heads that read it
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  at::Tensor kv_buf = at::empty({B * H_kv, 2, Sp * Dp}, q.options().dtype(acc_dtype));
  acc_t* KV = kv_buf.mutable_data_ptr<acc_t>();
  at::parallel_for(0, B * H_kv, grain(2 * S * D), [&](int64_t begin, int64_t end) {
    for (int64_t kv = begin; kv < end; kv++) {
      load_transposed(KV + 2 * kv * Sp * Dp, K + kv * S * D, S, D, Dp, Sp);
      load_rows(KV + (2 * kv + 1) * Sp * Dp, V + kv * S * D, S, Sp, D, Dp, acc_t(1));
    }
  });
  // 2. each query tile of each head walks the key tiles with the online softmax
  const int64_t fwd_grain = grain(2 * std::min(T, kBlockQ) * S * D);
  at::parallel_for(0, B * H * n_qtiles, fwd_grain, [&](int64_t begin, int64_t end) {
    // this thread's tiles: q * scale (kBlockQ x Dp), scores then probabilities, output accumulator
    std::vector<acc_t> q_t(kBlockQ * Dp), s_t(kBlockQ * kBlockK), o_t(kBlockQ * Dp), m(kBlockQ), l(kBlockQ);
    for (int64_t item = begin; item < end; item++) {
      const int64_t bh = item / n_qtiles, i0 = item % n_qtiles * kBlockQ;  // bh = b * H + h
      const int64_t nq = std::min(kBlockQ, T - i0), mq = round_up(nq, 4), row0 = bh * T + i0;
      const int64_t kv = bh / H * H_kv + bh % H / group;  // b * H_kv + the kv head of query head h
      const acc_t *kt_head = KV + 2 * kv * Sp * Dp, *v_head = KV + (2 * kv + 1) * Sp * Dp;
      load_rows(q_t.data(), Q + row0 * D, nq, mq, D, Dp, acc_t(scale));  // scores = (q * scale) k
      std::fill(o_t.begin(), o_t.end(), acc_t(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(l.begin(), l.end(), acc_t(0));
      // causal: keys after the last query's diagonal are invisible to the whole tile
      const int64_t kv_end = causal ? std::min(S, i0 + nq + S - T) : S;
      for (int64_t j0 = 0; j0 < kv_end; j0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, kv_end - j0), nk16 = round_up(nk, 16);
        matmul_set(mq, nk16, Dp, q_t.data(), Dp, 1, kt_head + j0, Sp, s_t.data(), kBlockK);  // S = Q K^T
        for (int64_t r = 0; r < nq; r++)
          online_softmax_row(&s_t[r * kBlockK], nk16, visible_keys(causal, i0 + r, j0, nk, T, S), m[r],
                             l[r], &o_t[r * Dp], Dp);
        matmul_acc(mq, Dp, nk, s_t.data(), kBlockK, 1, v_head + j0 * Dp, Dp, o_t.data(), Dp);  // O += P V
      }
      for (int64_t r = 0; r < nq; r++) {
        const acc_t inv_l = acc_t(1) / l[r];
        for (int64_t d = 0; d < D; d++)
          O[(row0 + r) * D + d] = static_cast<scalar_t>(o_t[r * Dp + d] * inv_l);
        LSE[row0 + r] = static_cast<float>(m[r] + std::log(l[r]));
      }
    }
  });
}

template <typename scalar_t>
void attention_bwd_kernel(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                          at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v, bool causal,
                          double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t H_kv = k.size(1), S = k.size(2), group = H / H_kv;
  const int64_t Dp = round_up(D, 16), Sp = round_up(S, kBlockK);
  const scalar_t *dO = grad_out.const_data_ptr<scalar_t>(), *Q = q.const_data_ptr<scalar_t>(),
                 *K = k.const_data_ptr<scalar_t>(), *V = v.const_data_ptr<scalar_t>(),
                 *O = out.const_data_ptr<scalar_t>();
  const float* LSE = lse.const_data_ptr<float>();
  scalar_t *dQ = grad_q.mutable_data_ptr<scalar_t>(), *dK = grad_k.mutable_data_ptr<scalar_t>(),
           *dV = grad_v.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, B * H_kv, grain(5 * group * T * S * D), [&](int64_t begin, int64_t end) {
    // one kv head (rows and transposed) and its gradient accumulators: 6 * Sp * Dp per thread
    std::vector<acc_t> k_h(Sp * Dp), v_h(Sp * Dp), kt_h(Dp * Sp), vt_h(Dp * Sp), dk_h(Sp * Dp),
        dv_h(Sp * Dp);
    // one query tile: q * scale, dO, the dQ accumulator, P and dS, lse and Delta per row
    std::vector<acc_t> q_t(kBlockQ * Dp), do_t(kBlockQ * Dp), dq_t(kBlockQ * Dp), p_t(kBlockQ * kBlockK),
        ds_t(kBlockQ * kBlockK), lse_t(kBlockQ), delta(kBlockQ);
    acc_t *p = p_t.data(), *ds = ds_t.data();
    for (int64_t kv = begin; kv < end; kv++) {  // kv = b * H_kv + kv head
      load_rows(k_h.data(), K + kv * S * D, S, Sp, D, Dp, acc_t(1));
      load_rows(v_h.data(), V + kv * S * D, S, Sp, D, Dp, acc_t(1));
      load_transposed(kt_h.data(), K + kv * S * D, S, D, Dp, Sp);
      load_transposed(vt_h.data(), V + kv * S * D, S, D, Dp, Sp);
      std::fill(dk_h.begin(), dk_h.end(), acc_t(0));
      std::fill(dv_h.begin(), dv_h.end(), acc_t(0));
      const int64_t bh0 = kv / H_kv * H + kv % H_kv * group;  // query heads bh0 .. bh0 + group - 1 use it
      for (int64_t bh = bh0; bh < bh0 + group; bh++) {
        for (int64_t i0 = 0; i0 < T; i0 += kBlockQ) {
          const int64_t nq = std::min(kBlockQ, T - i0), mq = round_up(nq, 4), row0 = bh * T + i0;
          load_rows(q_t.data(), Q + row0 * D, nq, mq, D, Dp, acc_t(scale));
          load_rows(do_t.data(), dO + row0 * D, nq, mq, D, Dp, acc_t(1));
          std::fill(dq_t.begin(), dq_t.end(), acc_t(0));
          for (int64_t r = 0; r < nq; r++) {  // Delta_r = rowsum(dO * O) = rowsum(P * dP)
            acc_t dot = 0;
            for (int64_t d = 0; d < D; d++) dot += do_t[r * Dp + d] * acc_t(O[(row0 + r) * D + d]);
            delta[r] = dot;
            lse_t[r] = LSE[row0 + r];
          }
          const int64_t kv_end = causal ? std::min(S, i0 + nq + S - T) : S;
          for (int64_t j0 = 0; j0 < kv_end; j0 += kBlockK) {
            const int64_t nk = std::min(kBlockK, kv_end - j0), nk4 = round_up(nk, 4), nk16 = round_up(nk, 16);
            // P = exp(Q K^T * scale - lse), 0 for masked keys and padding rows (so their lse and
            // Delta never matter)
            matmul_set(mq, nk16, Dp, q_t.data(), Dp, 1, kt_h.data() + j0, Sp, p, kBlockK);
            for (int64_t r = 0; r < mq; r++) {
              acc_t* p_r = p + r * kBlockK;
              const int64_t visible = r < nq ? visible_keys(causal, i0 + r, j0, nk, T, S) : 0;
#pragma omp simd
              for (int64_t j = 0; j < visible; j++) p_r[j] = exp_neg(p_r[j] - lse_t[r]);
              std::fill(p_r + visible, p_r + kBlockK, acc_t(0));
            }
            // dV += P^T dO  (P read transposed: a_row = 1, a_col = kBlockK)
            matmul_acc(nk4, Dp, nq, p, 1, kBlockK, do_t.data(), Dp, dv_h.data() + j0 * Dp, Dp);
            // dP = dO V^T, then dS = P * (dP - Delta) in place
            // (columns nk16.. of ds are never read: the products below stop at nk)
            matmul_set(mq, nk16, Dp, do_t.data(), Dp, 1, vt_h.data() + j0, Sp, ds, kBlockK);
            for (int64_t r = 0; r < mq; r++) {
              const acc_t *p_r = p + r * kBlockK, delta_r = delta[r];
              acc_t* ds_r = ds + r * kBlockK;
#pragma omp simd
              for (int64_t j = 0; j < nk16; j++) ds_r[j] = p_r[j] * (ds_r[j] - delta_r);
            }
            // dQ += dS K (times scale at the end); dK += dS^T (Q * scale)
            matmul_acc(mq, Dp, nk, ds, kBlockK, 1, k_h.data() + j0 * Dp, Dp, dq_t.data(), Dp);
            matmul_acc(nk4, Dp, nq, ds, 1, kBlockK, q_t.data(), Dp, dk_h.data() + j0 * Dp, Dp);
          }
          for (int64_t r = 0; r < nq; r++)
            for (int64_t d = 0; d < D; d++)
              dQ[(row0 + r) * D + d] = static_cast<scalar_t>(dq_t[r * Dp + d] * acc_t(scale));
        }
      }
      for (int64_t j = 0; j < S; j++)
        for (int64_t d = 0; d < D; d++) {
          dK[(kv * S + j) * D + d] = static_cast<scalar_t>(dk_h[j * Dp + d]);
          dV[(kv * S + j) * D + d] = static_cast<scalar_t>(dv_h[j * Dp + d]);
        }
    }
  });
}

// Every way the arguments can be wrong, each with its own message.
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal) {
  for (const auto& [name, x] : {std::pair{"q", &q}, std::pair{"k", &k}, std::pair{"v", &v}}) {
    TORCH_CHECK(x->device().is_cpu(), "minilm::attention (CPU): ", name, " must be a CPU tensor, got ",
                x->device());
    TORCH_CHECK(x->dim() == 4, "minilm::attention: ", name, " must be 4-D (B, heads, seq, head_dim), got ",
                x->sizes());
    TORCH_CHECK(x->scalar_type() == q.scalar_type(), "minilm::attention: q, k, v must share one dtype, ",
                "got q ", q.scalar_type(), " and ", name, " ", x->scalar_type());
    TORCH_CHECK(x->is_contiguous(), "minilm::attention: ", name, " must be contiguous (call .contiguous())");
  }
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
              "minilm::attention (CPU): dtype must be float32, float64 or bfloat16, got ", dtype);
  TORCH_CHECK(k.sizes() == v.sizes(), "minilm::attention: k and v must have the same shape, got k ",
              k.sizes(), " and v ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0), "minilm::attention: batch sizes differ: q ", q.size(0), ", k ",
              k.size(0));
  TORCH_CHECK(q.size(3) == k.size(3) && q.size(3) > 0, "minilm::attention: head dim D of q (", q.size(3),
              ") and k/v (", k.size(3), ") must be equal and positive");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "minilm::attention: query heads H = ", q.size(1),
              " must be a multiple of k/v heads H_kv = ", k.size(1));
  TORCH_CHECK(k.size(2) > 0, "minilm::attention: k/v need at least one position (S = 0)");
  TORCH_CHECK(!causal || q.size(2) <= k.size(2), "minilm::attention: causal needs T <= S (the queries are ",
              "the last T of the S positions), got T = ", q.size(2), ", S = ", k.size(2));
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v, bool causal, double scale) {
  check_inputs(q, k, v, causal);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "minilm_attention_fwd_cpu",
                                 [&] { attention_fwd_kernel<scalar_t>(q, k, v, out, lse, causal, scale); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double scale) {
  check_inputs(q, k, v, causal);
  for (const auto& [name, x] : {std::pair{"grad_out", &grad_out}, std::pair{"out", &out}}) {
    TORCH_CHECK(x->sizes() == q.sizes() && x->scalar_type() == q.scalar_type() && x->device().is_cpu(),
                "minilm::attention_bwd: ", name, " must be a CPU tensor like q ", q.sizes(), " ",
                q.scalar_type(), ", got ", x->sizes(), " ", x->scalar_type(), " on ", x->device());
    TORCH_CHECK(x->is_contiguous(), "minilm::attention_bwd: ", name,
                " must be contiguous (call .contiguous())");
  }
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.device().is_cpu() &&
                  lse.sizes() == q.sizes().slice(0, 3),
              "minilm::attention_bwd: lse must be a contiguous float32 CPU tensor of shape (B, H, T) = ",
              q.sizes().slice(0, 3), ", got ", lse.scalar_type(), " ", lse.sizes());
  at::Tensor grad_q = at::empty_like(q), grad_k = at::empty_like(k), grad_v = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "minilm_attention_bwd_cpu", [&] {
    attention_bwd_kernel<scalar_t>(grad_out, q, k, v, out, lse, grad_q, grad_k, grad_v, causal, scale);
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(minilm, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}
