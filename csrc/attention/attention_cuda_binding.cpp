// The CUDA implementation of minilm::attention_fwd / minilm::attention_bwd (schemas in
// csrc/ops.cpp): check the tensors, allocate outputs and scratch, and call the torch-free launchers
// of attention_cuda.cu on the current CUDA stream. Compiled only in CUDA builds (setup.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "attention_cuda.h"

namespace {

minilm::AttnDType attn_dtype(const at::Tensor& q) {
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "minilm attention (CUDA): q, k, v must be float16 or bfloat16, got ", q.scalar_type(),
              " (float32 runs on the CPU kernel or the torch backend)");
  return q.scalar_type() == at::kHalf ? minilm::AttnDType::kFloat16 : minilm::AttnDType::kBFloat16;
}

// `t` must be a contiguous CUDA tensor on q's device with q's dtype (or `dtype` when given).
void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& q, at::ScalarType dtype) {
  TORCH_CHECK(t.is_cuda(), "minilm attention (CUDA): ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == q.device(), "minilm attention (CUDA): ", name, " is on ", t.device(),
              " but q is on ", q.device());
  TORCH_CHECK(t.scalar_type() == dtype, "minilm attention (CUDA): ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "minilm attention (CUDA): ", name, " must be contiguous (call .contiguous())");
}

// q (B, H, T, D); k, v (B, H_kv, S, D), H a multiple of H_kv, D supported, T <= S when causal.
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal) {
  attn_dtype(q);
  check_tensor(q, "q", q, q.scalar_type());
  check_tensor(k, "k", q, q.scalar_type());
  check_tensor(v, "v", q, q.scalar_type());
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && k.sizes() == v.sizes(),
              "minilm attention (CUDA): expected q (B,H,T,D) and k, v (B,H_kv,S,D) of equal shape; got q ",
              q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3),
              "minilm attention (CUDA): q and k/v need equal batch size and head dim; got q ", q.sizes(),
              ", k ", k.sizes());
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "minilm attention (CUDA): q heads (", q.size(1),
              ") must be a multiple of k/v heads (", k.size(1), ")");
  TORCH_CHECK(minilm::attention_cuda_supports_head_dim(static_cast<int>(q.size(3))),
              "minilm attention (CUDA): head dim ", q.size(3), " is not supported (64 or 128)");
  TORCH_CHECK(!causal || q.size(2) <= k.size(2), "minilm attention (CUDA): causal attention needs T <= S "
              "(the mask is bottom-right aligned); got T=", q.size(2), ", S=", k.size(2));
  TORCH_CHECK(q.size(0) <= 65535 && q.size(1) <= 65535 && q.size(2) < (1 << 30) && k.size(2) < (1 << 30),
              "minilm attention (CUDA): sizes too large for the kernel's grid: q ", q.sizes(), ", k ", k.sizes());
}

// The kernels move 16 bytes at a time; a contiguous view at an odd offset is copied first.
at::Tensor aligned16(const at::Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone();
}

minilm::AttnParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                               double scale) {
  minilm::AttnParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.B = static_cast<int>(q.size(0));
  p.H = static_cast<int>(q.size(1));
  p.T = static_cast<int>(q.size(2));
  p.D = static_cast<int>(q.size(3));
  p.H_kv = static_cast<int>(k.size(1));
  p.S = static_cast<int>(k.size(2));
  p.causal = causal;
  p.scale = static_cast<float>(scale);
  return p;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                      const at::Tensor& v_in, bool causal, double scale) {
  check_qkv(q_in, k_in, v_in, causal);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = aligned16(q_in), k = aligned16(k_in), v = aligned16(v_in);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));

  minilm::AttnParams p = make_params(q, k, v, causal, scale);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const char* err = minilm::attention_fwd_cuda(p, attn_dtype(q), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, "minilm attention_fwd (CUDA) failed: ", err);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse, bool causal, double scale) {
  check_qkv(q_in, k_in, v_in, causal);
  check_tensor(out_in, "out", q_in, q_in.scalar_type());
  check_tensor(lse, "lse", q_in, at::kFloat);
  TORCH_CHECK(grad_out_in.is_cuda() && grad_out_in.device() == q_in.device() &&
                  grad_out_in.scalar_type() == q_in.scalar_type(),
              "minilm attention (CUDA): grad_out must be a ", q_in.scalar_type(), " tensor on ", q_in.device(),
              ", got ", grad_out_in.scalar_type(), " on ", grad_out_in.device());
  TORCH_CHECK(out_in.sizes() == q_in.sizes() && grad_out_in.sizes() == q_in.sizes(),
              "minilm attention (CUDA): out and grad_out must have q's shape ", q_in.sizes(), "; got ",
              out_in.sizes(), " and ", grad_out_in.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.sizes() == q_in.sizes().slice(0, 3),
              "minilm attention (CUDA): lse must be (B, H, T) = ", q_in.sizes().slice(0, 3), ", got ",
              lse.sizes());
  const c10::cuda::CUDAGuard guard(q_in.device());
  // autograd may hand us a non-contiguous gradient (e.g. through a transpose); accept it
  const at::Tensor grad_out = aligned16(grad_out_in.contiguous());
  const at::Tensor q = aligned16(q_in), k = aligned16(k_in), v = aligned16(v_in), out = aligned16(out_in);
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  at::Tensor grad_k = at::empty(k.sizes(), k.options());
  at::Tensor grad_v = at::empty(v.sizes(), v.options());
  // fp32 scratch: delta = rowsum(grad_out * out), and dQ summed over key blocks with atomicAdd
  at::Tensor delta = at::empty(lse.sizes(), lse.options());
  at::Tensor dq_accum = at::empty(q.sizes(), q.options().dtype(at::kFloat));

  minilm::AttnParams p = make_params(q, k, v, causal, scale);
  p.out = out.data_ptr();  // read only in the backward pass
  p.lse = lse.data_ptr<float>();
  p.grad_out = grad_out.data_ptr();
  p.grad_q = grad_q.data_ptr();
  p.grad_k = grad_k.data_ptr();
  p.grad_v = grad_v.data_ptr();
  p.delta = delta.data_ptr<float>();
  p.dq_accum = dq_accum.data_ptr<float>();
  const char* err = minilm::attention_bwd_cuda(p, attn_dtype(q), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == nullptr, "minilm attention_bwd (CUDA) failed: ", err);
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(minilm, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}
