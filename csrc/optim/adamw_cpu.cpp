// AdamW's update for one float32 parameter, fused: the kernel of minilm::adamw_step_ (schema in
// csrc/ops.cpp; the Python side, which computes the step's scalars, is minilm/ops/adamw.py).
//
// torch.optim.AdamW on a CPU (foreach=False, fused=False, what the course's runs trained with)
// updates each parameter with eight whole-tensor ops, three of them allocating a new tensor:
//   p *= decay                           mul_        decay = 1 - lr * weight_decay
//   m  = fma(w1, g - m, m)               lerp_       w1 = 1 - beta1 (ATen's lerp is one fma)
//   v *= beta2; v = fma(w2 * g, g, v)    addcmul_    w2 = 1 - beta2 (ATen's addcmul is one fma)
//   d  = sqrt(v) / c2 + eps              sqrt, div, add_  c2 = sqrt(1 - beta2^t)
//   p += (s * m) / d                     addcdiv_    s = -lr / (1 - beta1^t)
// For a parameter of n floats that is about 20 n floats read or written, through memory once the
// model outgrows the cache. Here the same operations run block by block (kBlock floats of p, g,
// m and v stay in L2 between them), so each array is read and written once.
//
// The results are torch.optim.AdamW's bit for bit (tests/test_adamw.py checks it over many steps):
// every scalar is rounded to float32 as ATen rounds it, the two fma are explicit, and no other
// multiply-add is left for the compiler to contract. One op is not ours: ATen's float sqrt is
// MKL's vsSqrt, which rounds about one result in six to the other neighbour of the exact root, so
// each block calls at::sqrt_out on its slice of v, the same function the unfused step calls.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/sqrt.h>
#include <torch/library.h>

#include <cmath>
#include <functional>
#include <vector>

namespace {

constexpr int64_t kBlock = 8192;  // floats per block: 5 arrays x 32 KB stay in L2 between passes

// The step's scalars, each rounded to float32 as ATen rounds a Python float for a float32 tensor op.
struct Scalars {
  float decay, lerp_coeff, beta2, weight2, bias_correction2_sqrt, eps, neg_step_size;
  bool small_weight;  // ATen's lerp: start + w (end - start) for |w| < 0.5, else end + (w - 1)(end - start)
};

// mul_, lerp_, mul_ and addcmul_ over one block of n elements
void update_moments(int64_t n, const Scalars& c, float* __restrict p, const float* __restrict g,
                    float* __restrict m, float* __restrict v) {
  const float decay = c.decay, coeff = c.lerp_coeff, beta2 = c.beta2, weight2 = c.weight2;
  if (c.small_weight) {
    for (int64_t i = 0; i < n; i++) {
      p[i] = p[i] * decay;
      m[i] = std::fma(coeff, g[i] - m[i], m[i]);
      v[i] = std::fma(weight2 * g[i], g[i], v[i] * beta2);
    }
  } else {
    for (int64_t i = 0; i < n; i++) {
      p[i] = p[i] * decay;
      m[i] = std::fma(coeff, g[i] - m[i], g[i]);
      v[i] = std::fma(weight2 * g[i], g[i], v[i] * beta2);
    }
  }
}

// div, add_ and addcdiv_ over one block, given root = sqrt(v) as ATen computes it
void update_param(int64_t n, const Scalars& c, float* __restrict p, const float* __restrict m,
                  const float* __restrict root) {
  const float c2 = c.bias_correction2_sqrt, eps = c.eps, s = c.neg_step_size;
  for (int64_t i = 0; i < n; i++) {
    const float denom = root[i] / c2 + eps;
    p[i] = p[i] + (s * m[i]) / denom;
  }
}

void adamw_step_cpu(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                    double decay, double weight1, double beta2, double weight2, double bias_correction2_sqrt,
                    double eps, double neg_step_size) {
  for (const at::Tensor& t : {std::cref(param), std::cref(grad), std::cref(exp_avg), std::cref(exp_avg_sq)}) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
                "adamw_step_: param, grad, exp_avg and exp_avg_sq must be contiguous float32 CPU tensors");
    TORCH_CHECK(t.numel() == param.numel(), "adamw_step_: all four tensors must have param's size");
  }
  const float w1 = static_cast<float>(weight1);
  const bool small_weight = std::fabs(w1) < 0.5f;
  const Scalars c{static_cast<float>(decay), small_weight ? w1 : w1 - 1.0f, static_cast<float>(beta2),
                  static_cast<float>(weight2), static_cast<float>(bias_correction2_sqrt), static_cast<float>(eps),
                  static_cast<float>(neg_step_size), small_weight};
  float* p = param.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  at::parallel_for(0, param.numel(), kBlock, [&](int64_t begin, int64_t end) {
    std::vector<float> root(std::min(kBlock, end - begin));  // sqrt(v) of one block
    for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
      const int64_t n = std::min(kBlock, end - b0);
      update_moments(n, c, p + b0, g + b0, m + b0, v + b0);
      at::Tensor root_t = at::from_blob(root.data(), {n}, at::kFloat);
      at::sqrt_out(root_t, at::from_blob(v + b0, {n}, at::kFloat));
      update_param(n, c, p + b0, m + b0, root.data());
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(minilm, CPU, m) { m.impl("adamw_step_", &adamw_step_cpu); }
