// minilm's operator library: the schemas of every op in csrc/, declared once.
//
// TORCH_LIBRARY defines the ops and their signatures; each device registers its kernels
// separately with TORCH_LIBRARY_IMPL (attention/attention_cpu.cpp always, and
// attention/attention_cuda_binding.cpp in CUDA builds; likewise masking/). Autograd and the fake (meta) kernels that
// torch.compile traces with are registered from Python in minilm/ops/_kernels.py.
// After `import minilm._C` the ops are torch.ops.minilm.attention_fwd / attention_bwd / attention_decode,
// masked_ffn_fwd / masked_ffn_bwd, ffn_compact, cross_entropy_fwd / cross_entropy_bwd, bpe_train,
// bpe_count_chunks, bpe_split and adamw_step_.
#include <Python.h>
#include <torch/library.h>

// `import minilm._C` needs a Python module. It is empty (the ops live in torch.ops.minilm) but for
// `with_cuda`, which says whether this build has the CUDA kernels.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "minilm's compiled kernels (see torch.ops.minilm)",
                                   -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
#ifdef WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (module != nullptr && PyModule_AddIntConstant(module, "with_cuda", with_cuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

TORCH_LIBRARY(minilm, m) {
  // q (B, H, T, D); k, v (B, H_kv, S, D), H a multiple of H_kv; causal is bottom-right aligned
  // (query i sees keys j <= i + S - T). Returns out (B, H, T, D) in q's dtype and
  // lse (B, H, T) float32, the logsumexp of each row of scaled scores, which the backward reuses.
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor out, Tensor lse)");
  // Gradients of out = attention_fwd(q, k, v) given grad_out; grad_k, grad_v (B, H_kv, S, D) sum
  // over the query heads that share each k/v head.
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, "
        "float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // Decoding with a KV cache (attention/attention_decode_cpu.cpp), CPU only, no gradient: the T new
  // queries q (B, H, T, D) against k, v (B, H_kv, S, D) read in place (any strides but head_dim's),
  // bottom-right causal; key_start (B,) int64, if given, marks row b's keys before it as left padding.
  m.def("attention_decode(Tensor q, Tensor k, Tensor v, Tensor? key_start, float scale) -> Tensor");

  // The gated-SiLU FFN of one layer computed over the kept neurons only (csrc/masking/masking.h):
  // x (..., D), gate_up_weight (2F, D) (rows: gate then up), down_weight (D, F), mask (F,) of 0/1.
  // Returns out (..., D) and hidden (N, 2K) = x's kept gate/up projections (N = x.numel() / D, K the
  // kept count), which the backward reuses. Pruned neurons are never multiplied.
  m.def("masked_ffn_fwd(Tensor x, Tensor gate_up_weight, Tensor down_weight, Tensor mask) -> "
        "(Tensor out, Tensor hidden)");
  // Gradients of out for x and both weights; a pruned neuron's rows/column get exactly zero.
  m.def("masked_ffn_bwd(Tensor grad_out, Tensor x, Tensor gate_up_weight, Tensor down_weight, Tensor mask, "
        "Tensor hidden) -> (Tensor grad_x, Tensor grad_gate_up, Tensor grad_down)");
  // Compaction: the kept neurons' weights as new dense tensors (2K, D) and (D, K), in order.
  m.def("ffn_compact(Tensor gate_up_weight, Tensor down_weight, Tensor mask) -> (Tensor gate_up, Tensor down)");

  // Cross-entropy of logits (N, V) against targets (N,) int64, fused (csrc/loss/): loss (N,) per row
  // (0 where target == ignore_index) and lse (N,), each row's logsumexp, which the backward reuses;
  // both float32 (float64 for float64 logits). The mean over kept rows is left to the caller.
  m.def("cross_entropy_fwd(Tensor logits, Tensor targets, int ignore_index) -> (Tensor loss, Tensor lse)");
  // grad_logits (N, V) in logits' dtype: grad_loss[i] * (softmax(logits[i]) - onehot(targets[i])).
  m.def("cross_entropy_bwd(Tensor grad_loss, Tensor logits, Tensor targets, Tensor lse, int ignore_index) -> "
        "Tensor");

  // BPE training (csrc/tokenizer/bpe_train.cpp), CPU only: the distinct chunks as bytes (uint8, all
  // concatenated), their offsets (N + 1,) and counts (N,). Returns merges (M, 2) int64: row k holds
  // the ids joined into token 256 + k; M < n_merges when the text runs out of pairs.
  m.def("bpe_train(Tensor chunks, Tensor offsets, Tensor freqs, int n_merges) -> Tensor");
}

TORCH_LIBRARY_FRAGMENT(minilm, m) {
  // BPE's pre-tokenizer (csrc/tokenizer/pretokenize.cpp), CPU only: split the texts (UTF-8 bytes, all
  // concatenated, and their offsets (T + 1,)) with SPLIT_PATTERN (max_digits 1) or GPT4_SPLIT_PATTERN
  // (max_digits 3), given the per-code-point class table (0x110000,) uint8. Returns the distinct chunks in
  // bpe_train's format: bytes, offsets (N + 1,), counts (N,), in order of first occurrence.
  m.def("bpe_count_chunks(Tensor text, Tensor offsets, Tensor classes, int max_digits) -> "
        "(Tensor chunks, Tensor chunk_offsets, Tensor counts)");
  // The same split of one text, as its chunks' byte boundaries (C + 1,) int64: for tests and lessons.
  m.def("bpe_split(Tensor text, Tensor classes, int max_digits) -> Tensor");

  // One AdamW step of one float32 parameter, in place (csrc/optim/adamw_cpu.cpp), CPU only: the
  // scalars as torch.optim.AdamW computes them for this step (minilm/ops/adamw.py). Updates param,
  // exp_avg and exp_avg_sq exactly as torch.optim.AdamW(foreach=False) would.
  m.def("adamw_step_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, float decay, "
        "float weight1, float beta2, float weight2, float bias_correction2_sqrt, float eps, float neg_step_size) -> ()");
}
