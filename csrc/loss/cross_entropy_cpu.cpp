// Fused cross-entropy on the CPU: the kernels of minilm::cross_entropy_fwd / cross_entropy_bwd
// (schemas in csrc/ops.cpp; the same math in readable PyTorch: cross_entropy_reference in
// minilm/ops/reference.py).
//
// For one row of logits x (V,) and its target t:
//   forward   lse = m + log(sum_j exp(x_j - m)), m = max_j x_j      loss = lse - x_t
//   backward  d loss / d x_j = exp(x_j - lse) - [j == t]            (softmax minus the one-hot)
// Why fuse: PyTorch's path under bf16 autocast copies the (N, V) logits to float32, writes the
// float32 log-softmax (N, V), and in the backward reads both, fills an (N, V) zero gradient for the
// NLL and copies the result back to bf16: five passes over the largest tensor of a small model.
// Here the forward reads the logits once (a row at a time converted into a float buffer the size
// of one row, which stays in L2) and keeps only lse (N,); the backward reads the logits once more
// and writes the gradient once, in the logits' dtype. Rows whose target is ignore_index get loss 0
// and gradient 0. Rows run in parallel (at::parallel_for); each row's sums run in one fixed order,
// so results do not depend on the thread count.
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

// at::parallel_for grain: rows per task, so that a task touches >= ~256K logits
int64_t rows_per_task(int64_t V) { return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(V, 1)); }

template <typename scalar_t>
void cross_entropy_fwd_kernel(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                              at::Tensor& loss, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = logits.size(0), V = logits.size(1);
  const scalar_t* X = logits.const_data_ptr<scalar_t>();
  const int64_t* Y = targets.const_data_ptr<int64_t>();
  acc_t *L = loss.mutable_data_ptr<acc_t>(), *LSE = lse.mutable_data_ptr<acc_t>();
  at::parallel_for(0, N, rows_per_task(V), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(V);  // this row in acc_t: converted once, read twice
    for (int64_t i = begin; i < end; i++) {
      const scalar_t* x = X + i * V;
      acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < V; j++) {
        row[j] = static_cast<acc_t>(x[j]);
        m = row[j] > m ? row[j] : m;
      }
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < V; j++) sum += exp_neg(row[j] - m);  // every argument <= 0
      LSE[i] = m + std::log(sum);
      L[i] = Y[i] == ignore_index ? acc_t(0) : LSE[i] - row[Y[i]];
    }
  });
}

template <typename scalar_t>
void cross_entropy_bwd_kernel(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& targets,
                              const at::Tensor& lse, int64_t ignore_index, at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = logits.size(0), V = logits.size(1);
  const scalar_t* X = logits.const_data_ptr<scalar_t>();
  const int64_t* Y = targets.const_data_ptr<int64_t>();
  const acc_t *G = grad_loss.const_data_ptr<acc_t>(), *LSE = lse.const_data_ptr<acc_t>();
  scalar_t* D = grad.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, N, rows_per_task(V), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++) {
      const scalar_t* x = X + i * V;
      scalar_t* d = D + i * V;
      if (Y[i] == ignore_index) {
        std::fill(d, d + V, scalar_t(0));
        continue;
      }
      const acc_t g = G[i], l = LSE[i];
      // x_j - lse <= 0 up to rounding (lse >= max x); exp_neg is exact enough a hair above 0 too
#pragma omp simd
      for (int64_t j = 0; j < V; j++) d[j] = static_cast<scalar_t>(g * exp_neg(static_cast<acc_t>(x[j]) - l));
      d[Y[i]] = static_cast<scalar_t>(g * (exp_neg(static_cast<acc_t>(x[Y[i]]) - l) - acc_t(1)));
    }
  });
}

// Shapes, dtypes and target range, checked once here so the kernels can trust them.
void check_inputs(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index) {
  TORCH_CHECK(logits.device().is_cpu() && targets.device().is_cpu(),
              "minilm::cross_entropy (CPU): logits and targets must be CPU tensors");
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "minilm::cross_entropy: logits must be (N, V) with V > 0, "
              "got ", logits.sizes());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0) && targets.scalar_type() == at::kLong,
              "minilm::cross_entropy: targets must be int64 of shape (N,) = (", logits.size(0), ",), got ",
              targets.scalar_type(), " ", targets.sizes());
  TORCH_CHECK(logits.is_contiguous() && targets.is_contiguous(),
              "minilm::cross_entropy: logits and targets must be contiguous (call .contiguous())");
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
              "minilm::cross_entropy (CPU): dtype must be float32, float64 or bfloat16, got ", dtype);
  const int64_t V = logits.size(1), *Y = targets.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < targets.size(0); i++)
    TORCH_CHECK(Y[i] == ignore_index || (0 <= Y[i] && Y[i] < V), "minilm::cross_entropy: target ", Y[i],
                " at row ", i, " is outside [0, ", V, ") and is not ignore_index ", ignore_index);
}

at::ScalarType acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                                         int64_t ignore_index) {
  check_inputs(logits, targets, ignore_index);
  const auto opts = logits.options().dtype(acc_dtype(logits));
  at::Tensor loss = at::empty({logits.size(0)}, opts), lse = at::empty({logits.size(0)}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, logits.scalar_type(), "minilm_cross_entropy_fwd_cpu", [&] {
    cross_entropy_fwd_kernel<scalar_t>(logits, targets, ignore_index, loss, lse);
  });
  return {loss, lse};
}

at::Tensor cross_entropy_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& targets,
                                 const at::Tensor& lse, int64_t ignore_index) {
  check_inputs(logits, targets, ignore_index);
  for (const auto& [name, x] : {std::pair{"grad_loss", &grad_loss}, std::pair{"lse", &lse}})
    TORCH_CHECK(x->device().is_cpu() && x->is_contiguous() && x->dim() == 1 && x->size(0) == logits.size(0) &&
                    x->scalar_type() == acc_dtype(logits),
                "minilm::cross_entropy_bwd: ", name, " must be a contiguous CPU tensor (N,) = (", logits.size(0),
                ",) of ", acc_dtype(logits), ", got ", x->scalar_type(), " ", x->sizes());
  at::Tensor grad = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, logits.scalar_type(), "minilm_cross_entropy_bwd_cpu", [&] {
    cross_entropy_bwd_kernel<scalar_t>(grad_loss, logits, targets, lse, ignore_index, grad);
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(minilm, CPU, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cpu);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cpu);
}
