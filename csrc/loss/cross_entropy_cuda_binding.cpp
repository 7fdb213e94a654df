// The CUDA implementation of minilm::cross_entropy_fwd / cross_entropy_bwd (schemas in csrc/ops.cpp):
// checks the tensors and calls the torch-free launchers of cross_entropy_cuda.cu on the current
// CUDA stream. Compiled only in CUDA builds (setup.py). Targets are not range-checked here (that
// would need a device sync); a target outside [0, V) reads out of its row, as the CPU kernel refuses.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "loss/cross_entropy_cuda.h"

namespace {

minilm::LossDType loss_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return minilm::LossDType::kFloat32;
    case at::kDouble: return minilm::LossDType::kFloat64;
    case at::kHalf: return minilm::LossDType::kFloat16;
    case at::kBFloat16: return minilm::LossDType::kBFloat16;
    default: TORCH_CHECK(false, "minilm::cross_entropy (CUDA): dtype must be float32, float64, float16 or bfloat16, "
                         "got ", t.scalar_type());
  }
}

at::ScalarType acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.is_cuda() && targets.device() == logits.device(),
              "minilm::cross_entropy (CUDA): logits and targets must be on one CUDA device");
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "minilm::cross_entropy: logits must be (N, V), got ",
              logits.sizes());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0) && targets.scalar_type() == at::kLong,
              "minilm::cross_entropy: targets must be int64 of shape (N,), got ", targets.sizes());
  TORCH_CHECK(logits.is_contiguous() && targets.is_contiguous(), "minilm::cross_entropy: inputs must be contiguous");
  loss_dtype(logits);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                                          int64_t ignore_index) {
  check_inputs(logits, targets);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto opts = logits.options().dtype(acc_dtype(logits));
  at::Tensor loss = at::empty({logits.size(0)}, opts), lse = at::empty({logits.size(0)}, opts);
  const char* err = minilm::cross_entropy_fwd_cuda(logits.data_ptr(), targets.const_data_ptr<int64_t>(),
                                                   loss.data_ptr(), lse.data_ptr(), logits.size(0), logits.size(1),
                                                   ignore_index, loss_dtype(logits), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, "minilm::cross_entropy_fwd (CUDA) failed: ", err);
  return {loss, lse};
}

at::Tensor cross_entropy_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& targets,
                                  const at::Tensor& lse, int64_t ignore_index) {
  check_inputs(logits, targets);
  TORCH_CHECK(grad_loss.is_contiguous() && lse.is_contiguous() && grad_loss.scalar_type() == acc_dtype(logits) &&
                  lse.scalar_type() == acc_dtype(logits),
              "minilm::cross_entropy_bwd (CUDA): grad_loss and lse must be contiguous ", acc_dtype(logits));
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad = at::empty_like(logits);
  const char* err = minilm::cross_entropy_bwd_cuda(grad_loss.data_ptr(), logits.data_ptr(),
                                                   targets.const_data_ptr<int64_t>(), lse.data_ptr(), grad.data_ptr(),
                                                   logits.size(0), logits.size(1), ignore_index, loss_dtype(logits),
                                                   c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, "minilm::cross_entropy_bwd (CUDA) failed: ", err);
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(minilm, CUDA, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cuda);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cuda);
}
