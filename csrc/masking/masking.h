// The device-independent half of minilm's neuron-masked FFN (minilm::masked_ffn_fwd / _bwd, schemas
// in csrc/ops.cpp): input checks, the gather of kept neurons, and forward/backward written as ATen
// matmuls, templated on the one device-specific piece, the SwiGLU elementwise step. Included by
// masking_cpu.cpp (CPU loops) and masking_cuda_binding.cpp (CUDA kernels of masking_cuda.cu).
//
// A neuron j is row j (gate) and row F + j (up) of gate_up_weight (2F, D) and column j of
// down_weight (D, F). With the K kept neurons idx = nonzero(mask):
//   hidden = x Wgu[idx2]^T           (N, 2K), idx2 = [idx, idx + F]: gate columns then up columns
//   act    = silu(gate) * up         (N, K)
//   out    = act Wd[:, idx]^T        (N, D)
// so every product is a dense matmul over the kept rows/columns only: a pruned neuron costs no
// multiply at all. The gather copies 3 K D weights per call, small next to the 6 N K D flops.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace minilm {

// The kept neurons of `mask`: their indices, and the same for the gate+up rows of gate_up_weight.
struct KeptNeurons {
  at::Tensor idx;   // (K,) int64
  at::Tensor idx2;  // (2K,) int64: idx, then idx + F
  int64_t count = 0;
  bool all = false;  // every neuron kept: use the weights as they are, no copy
};

inline void check_masked_ffn_inputs(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
                                    const at::Tensor& mask) {
  TORCH_CHECK(x.dim() >= 1 && gate_up.dim() == 2 && down.dim() == 2 && mask.dim() == 1,
              "minilm::masked_ffn: expected x (..., D), gate_up_weight (2F, D), down_weight (D, F), mask (F,); "
              "got x ", x.sizes(), ", gate_up_weight ", gate_up.sizes(), ", down_weight ", down.sizes(), ", mask ",
              mask.sizes());
  const int64_t D = x.size(-1), F = down.size(1);
  TORCH_CHECK(gate_up.size(0) == 2 * F && gate_up.size(1) == D && down.size(0) == D,
              "minilm::masked_ffn: shapes do not fit: x (..., ", D, "), gate_up_weight ", gate_up.sizes(),
              " (expected (2F, D) = (", 2 * F, ", ", D, ")), down_weight ", down.sizes(), " (expected (D, F))");
  TORCH_CHECK(mask.size(0) == F, "minilm::masked_ffn: mask has ", mask.size(0), " entries but the FFN has F = ",
              F, " neurons (one 0/1 entry per neuron)");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && x.scalar_type() == gate_up.scalar_type() &&
                  x.scalar_type() == down.scalar_type(),
              "minilm::masked_ffn: x and both weights must share one floating dtype, got x ", x.scalar_type(),
              ", gate_up_weight ", gate_up.scalar_type(), ", down_weight ", down.scalar_type());
  for (const auto* t : {&gate_up, &down, &mask})
    TORCH_CHECK(t->device() == x.device(), "minilm::masked_ffn: all tensors must be on x's device ", x.device(),
                ", got one on ", t->device());
}

inline KeptNeurons kept_neurons(const at::Tensor& mask) {
  const at::Tensor binary = at::logical_or(mask == 0, mask == 1).all();
  TORCH_CHECK(binary.item<bool>(), "minilm::masked_ffn: mask values must be exactly 0 (pruned) or 1 (kept); "
              "for a soft or straight-through mask multiply the activations by it instead");
  KeptNeurons kept;
  kept.idx = at::nonzero(mask).view({-1});
  kept.count = kept.idx.size(0);
  kept.all = kept.count == mask.size(0);
  kept.idx2 = at::cat({kept.idx, kept.idx + mask.size(0)});
  return kept;
}

// The kept neurons' weights as two small dense matrices: (2K, D) gate+up rows and (D, K) down columns.
inline std::tuple<at::Tensor, at::Tensor> gather_kept(const at::Tensor& gate_up, const at::Tensor& down,
                                                      const KeptNeurons& kept) {
  if (kept.all) return {gate_up, down};
  return {gate_up.index_select(0, kept.idx2), down.index_select(1, kept.idx)};
}

// Swiglu provides, for one device:
//   static at::Tensor forward(const at::Tensor& hidden);                       // (N, 2K) -> act (N, K)
//   static std::tuple<at::Tensor, at::Tensor> backward(hidden, grad_act);      // -> grad_hidden, act
template <typename Swiglu>
std::tuple<at::Tensor, at::Tensor> masked_ffn_fwd_impl(const at::Tensor& x, const at::Tensor& gate_up,
                                                       const at::Tensor& down, const at::Tensor& mask) {
  check_masked_ffn_inputs(x, gate_up, down, mask);
  const KeptNeurons kept = kept_neurons(mask);
  const auto [w_gu, w_d] = gather_kept(gate_up, down, kept);
  const at::Tensor x2 = x.reshape({-1, x.size(-1)});            // (N, D)
  const at::Tensor hidden = at::matmul(x2, w_gu.t());             // (N, 2K)
  const at::Tensor out = at::matmul(Swiglu::forward(hidden), w_d.t());  // (N, D)
  return {out.view(x.sizes()), hidden};
}

template <typename Swiglu>
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_ffn_bwd_impl(const at::Tensor& grad_out, const at::Tensor& x,
                                                                   const at::Tensor& gate_up, const at::Tensor& down,
                                                                   const at::Tensor& mask, const at::Tensor& hidden) {
  check_masked_ffn_inputs(x, gate_up, down, mask);
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type(),
              "minilm::masked_ffn_bwd: grad_out must be like x ", x.sizes(), " ", x.scalar_type(), ", got ",
              grad_out.sizes(), " ", grad_out.scalar_type());
  const KeptNeurons kept = kept_neurons(mask);
  const int64_t D = x.size(-1), N = x.numel() / D, K = kept.count;
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) == N && hidden.size(1) == 2 * K,
              "minilm::masked_ffn_bwd: hidden must be the forward's (N, 2K) = (", N, ", ", 2 * K, "), got ",
              hidden.sizes());
  const auto [w_gu, w_d] = gather_kept(gate_up, down, kept);
  const at::Tensor x2 = x.reshape({N, D}), dy = grad_out.reshape({N, D});
  const at::Tensor grad_act = at::matmul(dy, w_d);                      // (N, K)
  const auto [grad_hidden, act] = Swiglu::backward(hidden.contiguous(), grad_act);  // (N, 2K), (N, K)
  const at::Tensor grad_x = at::matmul(grad_hidden, w_gu).view(x.sizes());  // (N, D)
  const at::Tensor grad_gu_kept = at::matmul(grad_hidden.t(), x2);     // (2K, D)
  const at::Tensor grad_d_kept = at::matmul(dy.t(), act);              // (D, K)
  if (kept.all) return {grad_x, grad_gu_kept, grad_d_kept};
  // pruned neurons get exactly zero gradient: they took no part in the forward
  at::Tensor grad_gu = at::zeros_like(gate_up).index_copy_(0, kept.idx2, grad_gu_kept);
  at::Tensor grad_d = at::zeros_like(down).index_copy_(1, kept.idx, grad_d_kept);
  return {grad_x, grad_gu, grad_d};
}

}  // namespace minilm
