// The CUDA implementation of minilm::masked_ffn_fwd / masked_ffn_bwd (schemas in csrc/ops.cpp): the
// gather and cuBLAS matmuls of masking.h around the fused SwiGLU kernels of masking_cuda.cu, launched
// on the current CUDA stream. Compiled only in CUDA builds (setup.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "masking/masking.h"
#include "masking/masking_cuda.h"

namespace {

minilm::FfnDType ffn_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return minilm::FfnDType::kFloat32;
    case at::kDouble: return minilm::FfnDType::kFloat64;
    case at::kHalf: return minilm::FfnDType::kFloat16;
    case at::kBFloat16: return minilm::FfnDType::kBFloat16;
    default: TORCH_CHECK(false, "minilm::masked_ffn (CUDA): dtype must be float32, float64, float16 or bfloat16, "
                         "got ", t.scalar_type());
  }
}

struct CudaSwiglu {
  static at::Tensor forward(const at::Tensor& hidden) {
    const int64_t N = hidden.size(0), K = hidden.size(1) / 2;
    at::Tensor act = at::empty({N, K}, hidden.options());
    const char* err = minilm::swiglu_fwd_cuda(hidden.data_ptr(), act.data_ptr(), N, K, ffn_dtype(hidden),
                                              c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == nullptr, "minilm::masked_ffn_fwd (CUDA) failed: ", err);
    return act;
  }
  static std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& hidden, const at::Tensor& grad_act_in) {
    const at::Tensor grad_act = grad_act_in.contiguous();
    at::Tensor grad_hidden = at::empty_like(hidden), act = at::empty_like(grad_act);
    const char* err = minilm::swiglu_bwd_cuda(hidden.data_ptr(), grad_act.data_ptr(), grad_hidden.data_ptr(),
                                              act.data_ptr(), grad_act.size(0), grad_act.size(1), ffn_dtype(hidden),
                                              c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == nullptr, "minilm::masked_ffn_bwd (CUDA) failed: ", err);
    return {grad_hidden, act};
  }
};

std::tuple<at::Tensor, at::Tensor> masked_ffn_fwd_cuda(const at::Tensor& x, const at::Tensor& gate_up,
                                                       const at::Tensor& down, const at::Tensor& mask) {
  TORCH_CHECK(x.is_cuda(), "minilm::masked_ffn (CUDA): x must be a CUDA tensor, got ", x.device());
  ffn_dtype(x);
  const c10::cuda::CUDAGuard guard(x.device());
  return minilm::masked_ffn_fwd_impl<CudaSwiglu>(x, gate_up, down, mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_ffn_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                                   const at::Tensor& gate_up, const at::Tensor& down,
                                                                   const at::Tensor& mask, const at::Tensor& hidden) {
  TORCH_CHECK(x.is_cuda(), "minilm::masked_ffn (CUDA): x must be a CUDA tensor, got ", x.device());
  ffn_dtype(x);
  const c10::cuda::CUDAGuard guard(x.device());
  return minilm::masked_ffn_bwd_impl<CudaSwiglu>(grad_out, x, gate_up, down, mask, hidden);
}

}  // namespace

TORCH_LIBRARY_IMPL(minilm, CUDA, m) {
  m.impl("masked_ffn_fwd", &masked_ffn_fwd_cuda);
  m.impl("masked_ffn_bwd", &masked_ffn_bwd_cuda);
}
