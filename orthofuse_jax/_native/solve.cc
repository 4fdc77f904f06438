// Batched solves A X = B without pivoting, for the CPU (an XLA FFI custom call; the Python side is
// orthofuse_jax/_native/__init__.py and geometry/_linalg.py: solve_pd).
//
// Only for matrices whose symmetric part is positive definite -- every matrix the Cayley maps
// solve against: I - S (symmetric part I), I - S^2 - 2 eta S (symmetric part I + S^T S). For
// them Gaussian elimination needs no pivoting: every pivot is at least the smallest eigenvalue of
// the symmetric part (here >= 1).
//
// Why: jaxlib's CPU solve is one LAPACK getrf + two trsm per block, and OpenBLAS's trsm kernel
// is slow for the merges' 20x20 to 64x64 blocks. Here kLanes = 8 blocks at a time are copied into
// an interleaved buffer t[n][n + m][8] of doubles, so that the blocks are the SIMD lanes, and
// reduced by Gauss-Jordan elimination in panels of kPanel pivot rows (each other row takes one
// rank-kPanel update per panel, so it passes through the cache n / kPanel times). float32 input
// is eliminated in double and rounded once at the end: 3e-8 from float64 for 64x64 Cayley
// blocks, where an all-float32 elimination (and LAPACK's float32 solve, 3.4e-7) lose more.
#include <algorithm>#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 4;

// TIn: the buffers' type; T: the type the elimination runs in (double for float32 input too: the
// result is then float32-rounded once, about 3e-8 from float64 instead of 1e-6 for an all-float32
// elimination of 64x64 blocks, at about twice the kernel time).
template <typename TIn, typename T, int64_t LANES>
#if defined(__GNUC__)
__attribute__((always_inline))
#endif
inline void SolveGroups(const TIn* a, const TIn* b, TIn* x, int64_t batch, int64_t n, int64_t m, T* t) {
  const int64_t w = n + m;
  for (int64_t g = 0; g < batch; g += LANES) {
    const int64_t lanes = std::min<int64_t>(LANES, batch - g);
    const TIn* as[LANES];
    const TIn* bs[LANES];
    for (int64_t l = 0; l < LANES; ++l) {
      const int64_t src = g + (l < lanes ? l : 0);  // idle lanes repeat the first block
      as[l] = a + src * n * n;
      bs[l] = b + src * n * m;
    }
    for (int64_t i = 0; i < n; ++i) {
      T* ti = t + i * w * LANES;
      for (int64_t l = 0; l < LANES; ++l) {
        const TIn* ar = as[l] + i * n;
        const TIn* br = bs[l] + i * m;
        for (int64_t j = 0; j < n; ++j) ti[j * LANES + l] = ar[j];
        for (int64_t j = 0; j < m; ++j) ti[(n + j) * LANES + l] = br[j];
      }
    }
    for (int64_t k0 = 0; k0 < n; k0 += kPanel) {
      const int64_t kp = std::min<int64_t>(kPanel, n - k0);
      // The panel: Gauss-Jordan among its own rows.
      for (int64_t p = 0; p < kp; ++p) {
        const int64_t k = k0 + p;
        T* rk = t + k * w * LANES;
        T inv[LANES];
        for (int64_t l = 0; l < LANES; ++l) inv[l] = T(1) / rk[k * LANES + l];
        for (int64_t j = k + 1; j < w; ++j)
          for (int64_t l = 0; l < LANES; ++l) rk[j * LANES + l] *= inv[l];
        for (int64_t q = 0; q < kp; ++q) {
          if (q == p) continue;
          T* rq = t + (k0 + q) * w * LANES;
          T f[LANES];
          for (int64_t l = 0; l < LANES; ++l) f[l] = rq[k * LANES + l];
          for (int64_t j = k + 1; j < w; ++j)
            for (int64_t l = 0; l < LANES; ++l) rq[j * LANES + l] -= f[l] * rk[j * LANES + l];
        }
      }
      // Every other row: one rank-kp update of the columns right of the panel.
      const int64_t j0 = k0 + kp;
      for (int64_t i = 0; i < n; ++i) {
        if (i >= k0 && i < j0) continue;
        T* ri = t + i * w * LANES;
        T f[kPanel][LANES];
        for (int64_t p = 0; p < kp; ++p)
          for (int64_t l = 0; l < LANES; ++l) f[p][l] = ri[(k0 + p) * LANES + l];
        if (kp == kPanel) {
          for (int64_t j = j0; j < w; ++j) {
            T acc[LANES];
            for (int64_t l = 0; l < LANES; ++l) acc[l] = ri[j * LANES + l];
            for (int64_t p = 0; p < kPanel; ++p) {
              const T* rp = t + ((k0 + p) * w + j) * LANES;
              for (int64_t l = 0; l < LANES; ++l) acc[l] -= f[p][l] * rp[l];
            }
            for (int64_t l = 0; l < LANES; ++l) ri[j * LANES + l] = acc[l];
          }
        } else {
          for (int64_t j = j0; j < w; ++j)
            for (int64_t p = 0; p < kp; ++p) {
              const T* rp = t + ((k0 + p) * w + j) * LANES;
              for (int64_t l = 0; l < LANES; ++l) ri[j * LANES + l] -= f[p][l] * rp[l];
            }
        }
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      const T* ti = t + (i * w + n) * LANES;
      for (int64_t l = 0; l < lanes; ++l) {
        TIn* xr = x + (g + l) * n * m + i * m;
        for (int64_t j = 0; j < m; ++j) xr[j] = static_cast<TIn>(ti[j * LANES + l]);
      }
    }
  }
}

// One copy per instruction set, picked at load time (x86-64 with GCC or Clang).
#if defined(__x86_64__) && defined(__GNUC__)
#define ORTHOFUSE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ORTHOFUSE_CLONES
#endif

constexpr int64_t kLanes = 8;  // 8 doubles: one AVX-512 register

ORTHOFUSE_CLONES void SolveF32(const float* a, const float* b, float* x, int64_t batch, int64_t n,
                               int64_t m, double* t) {
  SolveGroups<float, double, kLanes>(a, b, x, batch, n, m, t);
}

ORTHOFUSE_CLONES void SolveF64(const double* a, const double* b, double* x, int64_t batch, int64_t n,
                               int64_t m, double* t) {
  SolveGroups<double, double, kLanes>(a, b, x, batch, n, m, t);
}

template <ffi::DataType DT, typename TIn>
ffi::Error Solve(ffi::Buffer<DT> a, ffi::Buffer<DT> b, ffi::ResultBuffer<DT> x,
                 void (*kernel)(const TIn*, const TIn*, TIn*, int64_t, int64_t, int64_t, double*)) {
  auto ad = a.dimensions();
  auto bd = b.dimensions();
  const size_t rank = ad.size();
  if (rank < 2 || bd.size() != rank)
    return ffi::Error::InvalidArgument("orthofuse_solve: a and b need the same rank >= 2");
  const int64_t n = ad[rank - 1], m = bd[rank - 1];
  if (ad[rank - 2] != n || bd[rank - 2] != n)
    return ffi::Error::InvalidArgument("orthofuse_solve: a must be [..., n, n] and b [..., n, m]");
  int64_t batch = 1;
  for (size_t i = 0; i + 2 < rank; ++i) {
    if (ad[i] != bd[i]) return ffi::Error::InvalidArgument("orthofuse_solve: batch shapes differ");
    batch *= ad[i];
  }
  if (batch == 0 || n == 0 || m == 0) return ffi::Error::Success();
  thread_local std::vector<double> work;
  work.resize(static_cast<size_t>(n * (n + m) * kLanes));
  kernel(a.typed_data(), b.typed_data(), x->typed_data(), batch, n, m, work.data());
  return ffi::Error::Success();
}

ffi::Error SolveF32Impl(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> x) {
  return Solve<ffi::F32, float>(a, b, x, SolveF32);
}

ffi::Error SolveF64Impl(ffi::Buffer<ffi::F64> a, ffi::Buffer<ffi::F64> b, ffi::ResultBuffer<ffi::F64> x) {
  return Solve<ffi::F64, double>(a, b, x, SolveF64);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OrthofuseSolveF32, SolveF32Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(OrthofuseSolveF64, SolveF64Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F64>>()
                                  .Arg<ffi::Buffer<ffi::F64>>()
                                  .Ret<ffi::Buffer<ffi::F64>>());
