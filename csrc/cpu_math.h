// The two pieces of math every CPU kernel in csrc/ is built from, written as plain loops that the
// compiler vectorises (setup.py compiles with -O3 -march=native -fno-trapping-math):
//   matmul_acc   C += A B on small tiles, register-blocked: 4 rows of C stay in vector registers;
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

// C (4 x NB, row stride ldc) += A (4 x K) B (K x NB): the 4 x NB accumulators stay in vector
// registers while k runs, and every row of B loaded from cache feeds four multiply-adds.
template <int NB, typename T>
inline void matmul_4rows(int64_t K, const T* A, int64_t a_row, int64_t a_col, const T* B, int64_t ldb,
                         T* C, int64_t ldc) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::kLanes, NV = NB / L;
  V acc[4][NV], b[NV];
  for (int r = 0; r < 4; r++)
    for (int n = 0; n < NV; n++) std::memcpy(&acc[r][n], C + r * ldc + n * L, sizeof(V));
  for (int64_t k = 0; k < K; k++) {
    for (int n = 0; n < NV; n++) std::memcpy(&b[n], B + k * ldb + n * L, sizeof(V));
    for (int r = 0; r < 4; r++) {
      const T a = A[r * a_row + k * a_col];
      for (int n = 0; n < NV; n++) acc[r][n] += a * b[n];
    }
  }
  for (int r = 0; r < 4; r++)
    for (int n = 0; n < NV; n++) std::memcpy(C + r * ldc + n * L, &acc[r][n], sizeof(V));
}

// C (M x N) += A (M x K) B (K x N), B and C row-major, A(i, k) = A[i * a_row + k * a_col] (so A may
// be a transposed view: a_row = 1, a_col = its row stride). M must be a multiple of 4, N of 16.
template <typename T>
void matmul_acc(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_row, int64_t a_col, const T* B,
                int64_t ldb, T* C, int64_t ldc) {
  for (int64_t i = 0; i < M; i += 4) {
    const T* a = A + i * a_row;
    T* c = C + i * ldc;
    int64_t n = 0;
    for (; n + 64 <= N; n += 64) matmul_4rows<64>(K, a, a_row, a_col, B + n, ldb, c + n, ldc);
    for (; n + 32 <= N; n += 32) matmul_4rows<32>(K, a, a_row, a_col, B + n, ldb, c + n, ldc);
    for (; n < N; n += 16) matmul_4rows<16>(K, a, a_row, a_col, B + n, ldb, c + n, ldc);
  }
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
