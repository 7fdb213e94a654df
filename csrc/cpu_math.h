// The two pieces of math every CPU kernel in csrc/ is built from, written as plain loops that the
// compiler vectorises (setup.py compiles with -O3 -march=native -fno-trapping-math):
//   matmul_acc   C += A B (and matmul_set, C = A B) on small tiles, register-blocked: 4 to 8 rows of C
//                stay in vector registers;
//   exp_neg      e^x for x <= 0 (softmax arguments after subtracting the max) without a libm call.
// Tiles are padded by the callers (rows to a multiple of 4, columns to a multiple of 16), so there
// are no remainder loops here.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace minilm {

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// 64 bytes of T (16 floats or 8 doubles) as one value, which GCC and Clang keep in one AVX-512
// register (or two AVX2 ones); + and * act lane by lane. Loaded and stored with memcpy (unaligned).
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int kLanes = 64 / sizeof(T);
};

// How many Vec values the registers hold: 32 zmm with AVX-512, 16 ymm (8 Vec of 64 bytes) without.
#if defined(__AVX512F__)
constexpr int kVecRegs = 32;
#else
constexpr int kVecRegs = 8;
#endif

// C (R x NB, row stride ldc) = or += A (R x K) B (K x NB): the R x NB accumulators stay in vector
// registers while k runs, and every row of B loaded from cache feeds R multiply-adds. Each element
// of C sums its K products in order k = 0, 1, ..., whatever R is: the row blocking never changes
// a result's rounding.
template <int R, int NB, bool kAccumulate, typename T>
inline void matmul_rows(int64_t K, const T* A, int64_t a_row, int64_t a_col, const T* B, int64_t ldb,
                        T* C, int64_t ldc) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::kLanes, NV = NB / L;
  V acc[R][NV], b[NV];
  for (int r = 0; r < R; r++)
    for (int n = 0; n < NV; n++) {
      if constexpr (kAccumulate) std::memcpy(&acc[r][n], C + r * ldc + n * L, sizeof(V));
      else acc[r][n] = V{};
    }
  for (int64_t k = 0; k < K; k++) {
    for (int n = 0; n < NV; n++) std::memcpy(&b[n], B + k * ldb + n * L, sizeof(V));
    for (int r = 0; r < R; r++) {
      const T a = A[r * a_row + k * a_col];
      for (int n = 0; n < NV; n++) acc[r][n] += a * b[n];
    }
  }
  for (int r = 0; r < R; r++)
    for (int n = 0; n < NV; n++) std::memcpy(C + r * ldc + n * L, &acc[r][n], sizeof(V));
}

// The most rows R (8, 6 or 4) whose R x NB accumulators and one row of B fit in the vector registers:
// with AVX-512, 8 rows for NB = 16 or 32 floats and 6 for 64, so each row of B loaded from cache
// feeds 6-8 multiply-adds per lane instead of 4.
template <int NV>
constexpr int block_rows() {
  return 9 * NV <= kVecRegs ? 8 : 7 * NV <= kVecRegs ? 6 : 4;
}

// One NB-wide column panel of C, all M rows (M even): R rows at a time, then 4, then 2.
template <int NB, bool kAccumulate, typename T>
inline void matmul_panel(int64_t M, int64_t K, const T* A, int64_t a_row, int64_t a_col, const T* B,
                         int64_t ldb, T* C, int64_t ldc) {
  constexpr int R = block_rows<NB / Vec<T>::kLanes>();
  int64_t i = 0;
  for (; i + R <= M; i += R) matmul_rows<R, NB, kAccumulate>(K, A + i * a_row, a_row, a_col, B, ldb, C + i * ldc, ldc);
  for (; i + 4 <= M; i += 4) matmul_rows<4, NB, kAccumulate>(K, A + i * a_row, a_row, a_col, B, ldb, C + i * ldc, ldc);
  for (; i < M; i += 2) matmul_rows<2, NB, kAccumulate>(K, A + i * a_row, a_row, a_col, B, ldb, C + i * ldc, ldc);
}

// C (M x N) = or += A (M x K) B (K x N), B and C row-major, A(i, k) = A[i * a_row + k * a_col] (so A
// may be a transposed view: a_row = 1, a_col = its row stride). M must be a multiple of 4, N of 16.
template <bool kAccumulate, typename T>
void matmul_into(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_row, int64_t a_col, const T* B,
                 int64_t ldb, T* C, int64_t ldc) {
  int64_t n = 0;
  for (; n + 64 <= N; n += 64) matmul_panel<64, kAccumulate>(M, K, A, a_row, a_col, B + n, ldb, C + n, ldc);
  for (; n + 32 <= N; n += 32) matmul_panel<32, kAccumulate>(M, K, A, a_row, a_col, B + n, ldb, C + n, ldc);
  for (; n < N; n += 16) matmul_panel<16, kAccumulate>(M, K, A, a_row, a_col, B + n, ldb, C + n, ldc);
}

// C += A B and C = A B (the second never reads C, so it needs no zero-fill first).
template <typename T>
void matmul_acc(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_row, int64_t a_col, const T* B,
                int64_t ldb, T* C, int64_t ldc) {
  matmul_into<true>(M, N, K, A, a_row, a_col, B, ldb, C, ldc);
}
template <typename T>
void matmul_set(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_row, int64_t a_col, const T* B,
                int64_t ldb, T* C, int64_t ldc) {
  matmul_into<false>(M, N, K, A, a_row, a_col, B, ldb, C, ldc);
}

// e^x for x <= 0 in float, to a couple of ulp, in arithmetic the compiler can vectorise (a call to
// std::exp it cannot): x = n ln2 + r with |r| <= ln2 / 2, e^r from Cephes' expf polynomial, and
// 2^n written straight into the exponent bits. Below -87 (e^-87 ~ 1.6e-38) it returns 0, so masked
// scores (-inf) give exactly 0.
inline float exp_neg(float x) {
  const float n = std::floor(x * 1.44269504f + 0.5f);         // round(x / ln2)
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // x - n ln2, ln2 split in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float two_n = std::bit_cast<float>((static_cast<int32_t>(std::max(n, -127.0f)) + 127) << 23);
  return x < -87.0f ? 0.0f : p * two_n;
}
inline double exp_neg(double x) { return std::exp(x); }  // float64 is for gradcheck, not speed

}  // namespace minilm
