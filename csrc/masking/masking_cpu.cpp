// The CPU kernels of minilm's neuron-masked FFN (minilm::masked_ffn_fwd / masked_ffn_bwd) and the
// compaction op minilm::ffn_compact; schemas in csrc/ops.cpp, the shared gather + matmul structure in
// masking.h, the Python face in minilm/ops/masking.py.
//
// Why gather + ATen matmul rather than one fused loop: after the gather, the kept neurons' weights
// are small dense matrices, and the three matmuls per pass are exactly the shape BLAS (oneDNN/MKL in
// the torch wheels) is fastest at, multithreaded and tuned per CPU; a hand-written masked loop would
// have to beat it while skipping rows. So the time falls with the kept fraction K / F for free. What is
// ours is the elementwise SwiGLU step:
//   forward   act = silu(gate) * up: ATen's vectorised silu and mul, so that with every neuron kept
//             the op is bit-for-bit the dense MLP (tests/test_masking.py checks torch.equal);
//   backward  one fused pass (below) that recomputes silu from the saved hidden (N, 2K) and writes
//             grad_hidden and act, split over rows with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "masking/masking.h"

namespace {

// silu(g) = g s with s = sigmoid(g); d silu / dg = s (1 + g (1 - s)).
template <typename scalar_t>
void swiglu_bwd_kernel(const at::Tensor& hidden, const at::Tensor& grad_act, at::Tensor& grad_hidden,
                       at::Tensor& act) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = grad_act.size(0), K = grad_act.size(1);
  const scalar_t* h = hidden.data_ptr<scalar_t>();
  const scalar_t* da = grad_act.data_ptr<scalar_t>();
  scalar_t* dh = grad_hidden.data_ptr<scalar_t>();
  scalar_t* a = act.data_ptr<scalar_t>();
  // ~64K elements per task: smaller inputs stay on the calling thread (waking threads costs more)
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++) {
      const scalar_t* gate = h + i * 2 * K;  // row i: K gate values, then K up values
      const scalar_t* up = gate + K;
      for (int64_t j = 0; j < K; j++) {
        const acc_t g = gate[j], u = up[j], d = da[i * K + j];
        const acc_t s = acc_t(1) / (acc_t(1) + std::exp(-g));
        const acc_t silu = g * s;
        a[i * K + j] = static_cast<scalar_t>(silu * u);
        dh[i * 2 * K + j] = static_cast<scalar_t>(d * u * s * (acc_t(1) + g * (acc_t(1) - s)));
        dh[i * 2 * K + K + j] = static_cast<scalar_t>(d * silu);
      }
    }
  });
}

struct CpuSwiglu {
  static at::Tensor forward(const at::Tensor& hidden) {
    const int64_t K = hidden.size(1) / 2;
    return at::silu(hidden.narrow(1, 0, K)) * hidden.narrow(1, K, K);
  }
  static std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& hidden, const at::Tensor& grad_act_in) {
    const at::Tensor grad_act = grad_act_in.contiguous();
    at::Tensor grad_hidden = at::empty_like(hidden), act = at::empty_like(grad_act);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "minilm_swiglu_bwd_cpu",
                                    [&] { swiglu_bwd_kernel<scalar_t>(hidden, grad_act, grad_hidden, act); });
    return {grad_hidden, act};
  }
};

void check_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "minilm::masked_ffn (CPU): tensors must be on the CPU, got ", x.device());
}

std::tuple<at::Tensor, at::Tensor> masked_ffn_fwd_cpu(const at::Tensor& x, const at::Tensor& gate_up,
                                                      const at::Tensor& down, const at::Tensor& mask) {
  check_cpu(x);
  return minilm::masked_ffn_fwd_impl<CpuSwiglu>(x, gate_up, down, mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_ffn_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                                  const at::Tensor& gate_up, const at::Tensor& down,
                                                                  const at::Tensor& mask, const at::Tensor& hidden) {
  check_cpu(x);
  return minilm::masked_ffn_bwd_impl<CpuSwiglu>(grad_out, x, gate_up, down, mask, hidden);
}

// Compaction: the kept neurons' weights as new dense tensors, (2K, D) gate+up and (D, K) down.
// Composite (plain ATen index_select), so it runs on any device and autograd differentiates it.
std::tuple<at::Tensor, at::Tensor> ffn_compact(const at::Tensor& gate_up, const at::Tensor& down,
                                               const at::Tensor& mask) {
  TORCH_CHECK(gate_up.dim() == 2 && down.dim() == 2 && mask.dim() == 1 && gate_up.size(0) == 2 * down.size(1) &&
                  gate_up.size(1) == down.size(0) && mask.size(0) == down.size(1),
              "minilm::ffn_compact: expected gate_up_weight (2F, D), down_weight (D, F), mask (F,); got ",
              gate_up.sizes(), ", ", down.sizes(), ", ", mask.sizes());
  const minilm::KeptNeurons kept = minilm::kept_neurons(mask);
  return {gate_up.index_select(0, kept.idx2), down.index_select(1, kept.idx)};
}

}  // namespace

TORCH_LIBRARY_IMPL(minilm, CPU, m) {
  m.impl("masked_ffn_fwd", &masked_ffn_fwd_cpu);
  m.impl("masked_ffn_bwd", &masked_ffn_bwd_cpu);
}

TORCH_LIBRARY_IMPL(minilm, CompositeImplicitAutograd, m) { m.impl("ffn_compact", &ffn_compact); }
