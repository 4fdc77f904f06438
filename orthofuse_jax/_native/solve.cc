// Batched Cayley-type maps and solves without pivoting, for the CPU (XLA FFI custom calls; the
// Python side is orthofuse_jax/_native/__init__.py and geometry/_linalg.py: solve_pd, cayley_map).
//
// Only for matrices whose symmetric part is positive definite -- every matrix the Cayley maps
// solve against: I - S (symmetric part I), I - S^2 - 2 eta S (symmetric part I + S^T S). For
// them Gaussian elimination needs no pivoting: every pivot is at least the smallest eigenvalue of
// the symmetric part (here >= 1).
//
// Why: jaxlib's CPU solve is one LAPACK getrf + two trsm per block, and OpenBLAS's trsm kernel
// is slow for the merges' 20x20 to 64x64 blocks; and around it, XLA's small fusions (the skew
// part's transposes, I - S^2 +- c S) and temporaries cost as much again. Here each block is
// copied into a row-major buffer of doubles (n x round8(n + m) for [A | B], n x round8(n) for
// an inversion) that stays in the L1/L2 cache, and reduced by Gauss-Jordan elimination in panels
// of kPanel pivot rows, four rows at a time (every row takes one rank-kPanel update per panel;
// columns are the SIMD lanes). float32 input is computed in double and rounded once at the end:
// 3e-8 from float64 for 64x64 Cayley blocks, where an all-float32 elimination (and LAPACK's
// float32 solve, 3.4e-7) lose more.
//
// Five entry points:
//   orthofuse_solve_{f32,f64}(A, B) -> A^{-1} B
//   orthofuse_cayley_{f32,f64}(X1, X2, C) -> (I - q S^2 - c S)^{-1} (I - q S^2 + c S) per block, and
//     per block whether it holds an inf or a NaN (the merges' "bad" flag),
//     S = c1 skew(X1) + c2 skew(X2), (c1, c2, q, c) = C[..., 0:4], q in {0, 1}: the Cayley map
//     (q = 0: one in-place inversion) and the fast merge with its restoration (q = 1, c = 2 eta:
//     two), from the raw inputs to the result in one pass.
//   orthofuse_point_{f32,f64}(A, B, V, CS, C) -> a point of a decomposed geodesic with its polar
//     step and, if C[..., 1] != 0, the curve_over_id restoration Cay(C[..., 0] Y) (PointBlocks).
//   orthofuse_geodesic_{f32,f64}(X1, X2, C; log_coef, exp_coef, params) -> (Y, bad, ok): the exact
//     merge with products only, U1 expm(t log(U1^T U2)) and its restoration, from the inputs to the
//     result in one pass per block (GeodesicBlocks), C[..., 0:5] = (t, f, restore, orth1, orth2).
//   orthofuse_sweep_{f32,f64}(X1, X2, P; log_coef, exp_coef, params, flags) -> (Y, bad, ok): the same
//     at every t of P[..., T, 2] = (t, f): the log once per block, then the geodesic's Taylor
//     coefficients and per t a Horner pass and the restoration (SweepBlocks).
//
// Blocks are independent, so a large call splits its batch over the CPUs the process may run on
// (ParallelFor; ORTHOFUSE_JAX_THREADS=N sets the number), in threads of its own: XLA's CPU pool is kept at
// one thread (orthofuse_jax/_runtime.py), and these threads never call back into XLA.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#include <sys/mman.h>
#endif
#if defined(__x86_64__)
#include <emmintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Every helper is inlined into the per-instruction-set entry points below (target_clones), so
// that it is compiled for AVX-512 / AVX2 there instead of for the baseline x86-64.
#if defined(__GNUC__)
#define ORTHOFUSE_INLINE __attribute__((always_inline)) inline
#pragma GCC diagnostic ignored "-Wpsabi"  // vector arguments of inlined helpers: no ABI crosses
#else
#define ORTHOFUSE_INLINE inline
#endif

constexpr int64_t kPanel = 4;
constexpr int64_t kW = 8;  // doubles per SIMD vector (one AVX-512 register; two AVX2 ones)

typedef double vd __attribute__((vector_size(kW * sizeof(double))));
ORTHOFUSE_INLINE vd Load(const double* p) {
  vd v;
  std::memcpy(&v, p, sizeof(vd));
  return v;
}
ORTHOFUSE_INLINE void Store(double* p, vd v) { std::memcpy(p, &v, sizeof(vd)); }
ORTHOFUSE_INLINE vd Splat(double s) { return vd{} + s; }  // {s, s, ...} or s - vd{}: GCC builds it lane by lane
ORTHOFUSE_INLINE int64_t Round8(int64_t n) { return (n + kW - 1) / kW * kW; }

// The same for a generic element type (the geodesic kernel's products run in float for float32
// input: 16 lanes per vector).
template <typename T>
struct Simd;
template <>
struct Simd<double> {
  typedef vd V;
  static constexpr int64_t kLanes = kW;
};
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(64)));
  static constexpr int64_t kLanes = 16;
};
template <typename T>
using VecOf = typename Simd<T>::V;
template <typename T>
ORTHOFUSE_INLINE VecOf<T> LoadV(const T* p) {
  VecOf<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
ORTHOFUSE_INLINE void StoreV(T* p, VecOf<T> v) {
  std::memcpy(p, &v, sizeof(v));
}
template <typename T>
ORTHOFUSE_INLINE VecOf<T> SplatV(T s) {
  return VecOf<T>{} + s;
}
template <typename T>
ORTHOFUSE_INLINE int64_t RoundLanes(int64_t n) {
  return (n + Simd<T>::kLanes - 1) / Simd<T>::kLanes * Simd<T>::kLanes;
}

// Rows rows[0..R) of t (row length w) -= sum_p f[q][p] t[k0 + p], f[q][p] = t[rows[q]][k0 + p]:
// one rank-kPanel update with the panel rows' vectors loaded once per R rows, over the columns
// [j0, w). In place (an inversion, whose columns k hold the inverse's instead of A's), the
// entries f are taken as the zeros of the identity's columns. kPanel must divide kW.
template <int R, bool kInPlace>
ORTHOFUSE_INLINE void UpdateRows(double* t, const int64_t* rows, int64_t k0, int64_t j0, int64_t w) {
  double* r[R];
  vd f[R][kPanel];
  const double* pr = t + k0 * w;
  for (int q = 0; q < R; ++q) {
    r[q] = t + rows[q] * w;
    for (int p = 0; p < kPanel; ++p) f[q][p] = Splat(r[q][k0 + p]);
  }
  auto update = [&](int64_t j, vd keep) {
    vd acc[R];
    for (int q = 0; q < R; ++q) acc[q] = kInPlace ? Load(r[q] + j) * keep : Load(r[q] + j);
    for (int p = 0; p < kPanel; ++p) {
      const vd b = Load(pr + p * w + j);
      for (int q = 0; q < R; ++q) acc[q] -= f[q][p] * b;
    }
    for (int q = 0; q < R; ++q) Store(r[q] + j, acc[q]);
  };
  const vd ones = Splat(1.0);
  if (!kInPlace) {
    for (int64_t j = j0; j < w; j += kW) update(j, ones);
    return;
  }
  // The vector holding the panel's columns starts from zeros there (the identity's columns):
  // multiplied by a 0/1 mask instead of R * kPanel scalar stores (the store port is the limit).
  const int64_t jp = k0 / kW * kW;
  vd keep = ones;
  for (int64_t p = 0; p < kPanel; ++p) keep[k0 + p - jp] = 0;
  for (int64_t j = j0; j < jp; j += kW) update(j, ones);
  update(jp, keep);
  for (int64_t j = jp + kW; j < w; j += kW) update(j, ones);
}

// Gauss-Jordan elimination of the row-major buffer t[n][w] (w a multiple of kW), in panels of
// kPanel pivot rows: each panel is first reduced among its own rows, then every other row takes
// one rank-kPanel update, four rows at a time (21 vector registers; on a 64x64 block 1.3x faster
// than two at a time, and 1.5x than panels of 8).
//   kInPlace = false: t = [A | B | 0]; afterwards its columns [n, n + m) hold A^{-1} B. Columns left
//     of the current panel are never read again, so updates start at its vector boundary.
//   kInPlace = true: t = [A | 0] (n columns of A); afterwards t holds A^{-1} (n^3 multiply-adds,
//     against 1.5 n^3 for solving against B = I).
template <bool kInPlace>
ORTHOFUSE_INLINE void GaussJordan(double* t, int64_t n, int64_t w) {
  for (int64_t k0 = 0; k0 < n; k0 += kPanel) {
    const int64_t kp = std::min<int64_t>(kPanel, n - k0);
    for (int64_t p = 0; p < kp; ++p) {
      const int64_t k = k0 + p, jk = k / kW * kW, js = kInPlace ? 0 : jk;
      double* rk = t + k * w;
      const vd inv = Splat(1.0 / rk[k]);
      // In place, column k of row k starts as 1 and of the other rows as 0 (the identity's
      // column): set in registers by a 0/1 mask, since a scalar store followed by a vector load
      // of the same line stalls (no store forwarding).
      vd keep = Splat(1.0), unit = vd{};
      keep[k - jk] = 0;
      unit[k - jk] = 1;
      for (int64_t j = js; j < w; j += kW) {
        const vd v = Load(rk + j);
        Store(rk + j, (kInPlace && j == jk ? v * keep + unit : v) * inv);
      }
      for (int64_t q = 0; q < kp; ++q) {
        if (q == p) continue;
        double* rq = t + (k0 + q) * w;
        const vd f = Splat(rq[k]);
        for (int64_t j = js; j < w; j += kW) {
          const vd v = Load(rq + j);
          Store(rq + j, (kInPlace && j == jk ? v * keep : v) - f * Load(rk + j));
        }
      }
    }
    const int64_t end = k0 + kp, j0 = kInPlace ? 0 : end / kW * kW;
    int64_t rows[4];
    int nr = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (i >= k0 && i < end) continue;
      if (kp < kPanel) {  // the last, narrower panel: row by row
        double* ri = t + i * w;
        vd f[kPanel];
        for (int64_t p = 0; p < kp; ++p) f[p] = Splat(ri[k0 + p]);
        if (kInPlace)
          for (int64_t p = 0; p < kp; ++p) ri[k0 + p] = 0;  // rare: one panel per block
        for (int64_t p = 0; p < kp; ++p)
          for (int64_t j = j0; j < w; j += kW) Store(ri + j, Load(ri + j) - f[p] * Load(t + (k0 + p) * w + j));
        continue;
      }
      rows[nr++] = i;
      if (nr == 4) {
        UpdateRows<4, kInPlace>(t, rows, k0, j0, w);
        nr = 0;
      }
    }
    for (int q = 0; q < nr; ++q) UpdateRows<1, kInPlace>(t, rows + q, k0, j0, w);
  }
}

// c[i][:] = sum_k a[i][k] b[k][:] for n x n blocks stored row-major with row length np (a
// multiple of the vector length, b's padding columns zero), in tiles of R rows x V vectors held
// in registers; T is double or float.
template <typename T, int R, int V>
ORTHOFUSE_INLINE void MulTile(const T* a, const T* b, T* c, int64_t i0, int64_t j0, int64_t n, int64_t np) {
  typedef VecOf<T> vt;
  constexpr int64_t L = Simd<T>::kLanes;
  vt acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = vt{};
  for (int64_t k = 0; k < n; ++k) {
    vt bv[V];
    for (int v = 0; v < V; ++v) bv[v] = LoadV(b + k * np + j0 + v * L);
    for (int r = 0; r < R; ++r) {
      const vt x = SplatV(a[(i0 + r) * np + k]);
      for (int v = 0; v < V; ++v) acc[r][v] += x * bv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) StoreV(c + (i0 + r) * np + j0 + v * L, acc[r][v]);
}

template <typename T, int R>
ORTHOFUSE_INLINE void MulRows(const T* a, const T* b, T* c, int64_t i0, int64_t n, int64_t np) {
  constexpr int64_t L = Simd<T>::kLanes;
  if (R == 4 && np == 5 * L) {  // double, n = 33..40 (the SDXL 40x40 blocks): one 4 x 5 tile, 20
    MulTile<T, R, 5>(a, b, c, i0, 0, n, np);  // accumulators, where 4 + 1 vectors ran a broadcast-bound 4 x 1 tile
    return;
  }
  int64_t j = 0;
  for (; j + 4 * L <= np; j += 4 * L) MulTile<T, R, 4>(a, b, c, i0, j, n, np);
  switch ((np - j) / L) {
    case 3: MulTile<T, R, 3>(a, b, c, i0, j, n, np); break;
    case 2: MulTile<T, R, 2>(a, b, c, i0, j, n, np); break;
    case 1: MulTile<T, R, 1>(a, b, c, i0, j, n, np); break;
    default: break;
  }
}

template <typename T>
ORTHOFUSE_INLINE void Mul(const T* a, const T* b, T* c, int64_t n, int64_t np) {
  int64_t i = 0;
  constexpr int64_t L = Simd<T>::kLanes;
  if (np <= 3 * L) {  // rows of at most 3 vectors: tiles of 8 rows (up to 24 accumulators)
    for (; i + 8 <= n; i += 8) {
      if (np == 3 * L) MulTile<T, 8, 3>(a, b, c, i, 0, n, np);
      else if (np == 2 * L) MulTile<T, 8, 2>(a, b, c, i, 0, n, np);
      else MulTile<T, 8, 1>(a, b, c, i, 0, n, np);
    }
  }
  for (; i + 4 <= n; i += 4) MulRows<T, 4>(a, b, c, i, n, np);
  for (; i < n; ++i) MulRows<T, 1>(a, b, c, i, n, np);
}

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define ORTHOFUSE_SHUFFLE 1
#endif
#endif

#ifdef ORTHOFUSE_SHUFFLE
// The 8 x 8 tile at s (row length np) transposed into d, in registers: three rounds of two-input
// shuffles (pairs, then pairs of pairs, then halves).
ORTHOFUSE_INLINE void Transpose8(const double* s, double* d, int64_t np) {
  vd r[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = Load(s + i * np);
  for (int i = 0; i < 8; i += 2) {
    u[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 2, 10, 4, 12, 6, 14);
    u[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  }
  for (int h = 0; h < 8; h += 4) {  // u[h + c] holds rows h..h+3 of columns c and c + 4 (c < 4)
    r[h] = __builtin_shufflevector(u[h], u[h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    r[h + 2] = __builtin_shufflevector(u[h], u[h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    r[h + 1] = __builtin_shufflevector(u[h + 1], u[h + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    r[h + 3] = __builtin_shufflevector(u[h + 1], u[h + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int c = 0; c < 4; ++c) {
    Store(d + c * np, __builtin_shufflevector(r[c], r[c + 4], 0, 1, 2, 3, 8, 9, 10, 11));
    Store(d + (c + 4) * np, __builtin_shufflevector(r[c], r[c + 4], 4, 5, 6, 7, 12, 13, 14, 15));
  }
}
#endif

// d = s^T (n x n, row length np); for doubles in 8 x 8 tiles when n is a multiple of 8 (then np = n).
template <typename T>
ORTHOFUSE_INLINE void Transpose(const T* s, T* d, int64_t n, int64_t np) {
#ifdef ORTHOFUSE_SHUFFLE
  if constexpr (std::is_same<T, double>::value) {
    if (n % kW == 0) {
      for (int64_t i = 0; i < n; i += kW)
        for (int64_t j = 0; j < n; j += kW) Transpose8(s + i * np + j, d + j * np + i, np);
      return;
    }
  }
#endif
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) d[j * np + i] = s[i * np + j];
}

// Work space per thread: the [A | B] buffer, or for the Cayley maps the block and S.
double* Workspace(size_t doubles) {
  thread_local std::vector<double> work;
  if (work.size() < doubles + kW) work.resize(doubles + kW);
  const uintptr_t p = reinterpret_cast<uintptr_t>(work.data());
  return reinterpret_cast<double*>((p + 63) / 64 * 64);
}

// Faults in the pages of an output range in one system call (MADV_POPULATE_WRITE, Linux 5.14+),
// before a kernel fills it. XLA hands over fresh memory, and filled 4 KB page by page it takes a
// trap per page: on this project's machine (a virtual one) a 16-point sweep of the SDXL adapters
// (4.8 GB) spent 2.5-2.9 s of system time in 1.2 million of them and sometimes 20% more wall time;
// faulted in up front, about 1.5 s and no slow runs (benchmarks/RESULTS.md). Only whole pages inside the
// range; a hint: failure (an older kernel) is ignored, and the contents are not changed.
void Prefault(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
  constexpr uintptr_t kPage = 4096;
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(p) + kPage - 1) & ~(kPage - 1);
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kPage - 1);
  if (hi >= lo + 16 * kPage) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_POPULATE_WRITE);
#else
  (void)p;
  (void)bytes;
#endif
}

// dst[a n + b] = scale h[a np + b] for an n x n block (row length np), converted to T, in one pass
// that also returns whether any entry is inf or NaN (the kernels' last pass over a block). The
// output is written once and never read back by the kernel: where dst's rows are whole 16-byte
// vectors (float: n a multiple of 4, as in SDXL; double: n even) they go past the caches by
// non-temporal stores (SSE2, in every x86-64 clone), which need no read-for-ownership of their
// lines and leave the sweep's series terms in the cache (the SDXL sweep: 4% faster, 0.45 s less
// CPU time than cached stores; one pass instead of a check, a conversion into a staging block
// and a streamed copy: 2-7% less per 16-point sweep of a block; the merges: unchanged).
template <typename T>
ORTHOFUSE_INLINE bool ScaledStreamOut(const double* h, int64_t n, int64_t np, double scale, T* dst) {
#if defined(__x86_64__)
  constexpr int64_t kPer = 16 / sizeof(T);  // entries per 16-byte store
  if (n % kPer == 0 && (reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    typedef double v2d __attribute__((vector_size(16)));
    typedef double v4d __attribute__((vector_size(32)));
    typedef float v4f __attribute__((vector_size(16)));
    typedef typename std::conditional<std::is_same<T, float>::value, v4d, v2d>::type vh;  // kPer doubles
    typedef typename std::conditional<std::is_same<T, float>::value, v4f, v2d>::type vt;  // 16 bytes of T
    const vh sv = vh{} + scale;
    vh acc{};
    for (int64_t a = 0; a < n; ++a) {
      for (int64_t b = 0; b < n; b += kPer) {
        vh v;
        std::memcpy(&v, h + a * np + b, sizeof(v));
        v *= sv;
        acc += v - v;  // NaN from an inf or a NaN
        const vt o = __builtin_convertvector(v, vt);
        if constexpr (std::is_same<T, float>::value) {
          __m128 m;
          std::memcpy(&m, &o, sizeof(m));
          _mm_stream_ps(dst + a * n + b, m);
        } else {
          __m128d m;
          std::memcpy(&m, &o, sizeof(m));
          _mm_stream_pd(dst + a * n + b, m);
        }
      }
    }
    bool bad = false;
    for (int64_t l = 0; l < kPer; ++l) bad |= !(acc[l] == 0);
    return bad;
  }
#endif
  bool bad = false;
  for (int64_t a = 0; a < n; ++a)
    for (int64_t b = 0; b < n; ++b) {
      const double v = scale * h[a * np + b];
      bad |= !std::isfinite(v);
      dst[a * n + b] = static_cast<T>(v);
    }
  return bad;
}

// dst = 2 t - I (a Cayley map from t = (I - c S)^{-1}; t's diagonal is changed) by ScaledStreamOut;
// whether any entry is inf or NaN (an inf or NaN on the diagonal stays one: inf - 0.5).
template <typename T>
ORTHOFUSE_INLINE bool CayleyStreamOut(double* t, int64_t n, int64_t np, T* dst) {
  for (int64_t i = 0; i < n; ++i) t[i * np + i] -= 0.5;  // 2 t - I = 2 (t - I / 2)
  return ScaledStreamOut(t, n, np, 2.0, dst);
}

// Threads for a call: ORTHOFUSE_JAX_THREADS if set to N >= 1, else the CPUs this process may run on
// (its affinity mask, read per call: `taskset -c 1` or os.sched_setaffinity give one).
int64_t MaxThreads() {
  if (const char* s = std::getenv("ORTHOFUSE_JAX_THREADS")) {
    const long v = std::strtol(s, nullptr, 10);
    if (v >= 1) return v;
  }
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

// Run body(begin, end) over contiguous pieces of [0, batch), one per thread, the first piece on the
// calling thread. `cost` is the multiply-adds of one block: a call below about 4M in all (1 ms of
// one core) stays on one thread, where starting threads would cost more than they save.
template <typename Body>
void ParallelFor(int64_t batch, int64_t cost, const Body& body) {
  constexpr int64_t kMinWork = int64_t{1} << 22;
  const int64_t by_work = std::max<int64_t>(1, batch * std::max<int64_t>(cost, 1) / kMinWork);
  const int64_t threads = std::min({MaxThreads(), batch, by_work});
  std::vector<std::thread> pool;
  int64_t begin = batch;  // what the calling thread does: [0, begin)
  for (int64_t k = threads - 1; k >= 1; --k) {
    const int64_t lo = batch * k / threads, hi = begin;
    try {
      pool.emplace_back([&body, lo, hi] { body(lo, hi); });
      begin = lo;
    } catch (const std::system_error&) {  // no thread to be had: the calling thread does the rest
      break;
    }
  }
  body(0, begin);
  for (auto& t : pool) t.join();
}

template <typename TIn>
ORTHOFUSE_INLINE void SolveBlocks(const TIn* a, const TIn* b, TIn* x, int64_t batch, int64_t n, int64_t m, double* t) {
  const int64_t wp = Round8(n + m);
  for (int64_t g = 0; g < batch; ++g) {
    const TIn* ag = a + g * n * n;
    const TIn* bg = b + g * n * m;
    for (int64_t i = 0; i < n; ++i) {
      double* ti = t + i * wp;
      for (int64_t j = 0; j < n; ++j) ti[j] = ag[i * n + j];
      for (int64_t j = 0; j < m; ++j) ti[n + j] = bg[i * m + j];
      for (int64_t j = n + m; j < wp; ++j) ti[j] = 0;
    }
    GaussJordan<false>(t, n, wp);
    TIn* xg = x + g * n * m;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j) xg[i * m + j] = static_cast<TIn>(t[i * wp + n + j]);
  }
}

// t <- I - c (t - t^T) / 2 in place (n x n, row length np): the matrix a Cayley map inverts.
ORTHOFUSE_INLINE void IMinusSkew(double* t, double c, int64_t n, int64_t np) {
  for (int64_t i = 0; i < n; ++i) {
    t[i * np + i] = 1;
    for (int64_t j = i + 1; j < n; ++j) {
      const double s = 0.5 * c * (t[i * np + j] - t[j * np + i]);
      t[i * np + j] = -s;
      t[j * np + i] = s;
    }
  }
}

// Whether an n x np buffer holds an inf or a NaN (v - v is 0 for every finite v): the merges'
// "bad block" flag, read here from the cache instead of by a second pass over the output. The
// results are rounded to float32 afterwards, which cannot overflow: the Cayley maps' blocks have
// norm at most 3 (2 N - I with ||N|| <= 1, the symmetric part of I - c S being >= I).
template <typename T>
ORTHOFUSE_INLINE bool AnyNotFinite(const T* t, int64_t n, int64_t np) {
  typedef VecOf<T> vt;
  constexpr int64_t L = Simd<T>::kLanes;
  const int64_t m = n * np;
  vt a0{}, a1{}, a2{}, a3{};
  int64_t j = 0;
  for (; j + 4 * L <= m; j += 4 * L) {
    const vt v0 = LoadV(t + j), v1 = LoadV(t + j + L), v2 = LoadV(t + j + 2 * L), v3 = LoadV(t + j + 3 * L);
    a0 += v0 - v0;
    a1 += v1 - v1;
    a2 += v2 - v2;
    a3 += v3 - v3;
  }
  for (; j < m; j += L) {
    const vt v = LoadV(t + j);
    a0 += v - v;
  }
  const vt s = (a0 + a1) + (a2 + a3);
  bool bad = false;
  for (int64_t l = 0; l < L; ++l) bad |= !(s[l] == 0);
  return bad;
}

// y = (B - cS)^{-1} (B + cS) per block, S = c1 skew(x1) + c2 skew(x2), B = I - q S^2 for a flag
// q in {0, 1}, (c1, c2, q, c) = coef[4 g .. 4 g + 4). With q = 0 it is the Cayley map
// 2 (I - cS)^{-1} - I: one in-place inversion (n^3 multiply-adds, against 1.5 n^3 for a solve).
// With q = 1 it is Cay(eta Cay(S)), eta = c / 2 (orthofuse_jax.fusion.merge.cayley_restored),
// computed as two Cayley maps: Cay(S) = 2 N - I with N = (I - S)^{-1}, whose skew part is
// N - N^T, and then Cay(eta (N - N^T)): two inversions (2 n^3) instead of S^2 and a solve
// (2.5 n^3). Everything happens in one n x round8(n) buffer (32 KB at n = 64: the L1 cache).
template <typename TIn>
ORTHOFUSE_INLINE void CayleyBlocks(const TIn* x1, const TIn* x2, const TIn* coef, TIn* y, bool* bad, int64_t batch,
                                   int64_t n, double* t) {
  const int64_t np = Round8(n);
  for (int64_t g = 0; g < batch; ++g) {
    const TIn* a = x1 + g * n * n;
    const TIn* b = x2 + g * n * n;
    const double c1 = coef[4 * g], c2 = coef[4 * g + 1];
    const bool square = coef[4 * g + 2] != 0;
    const double c = coef[4 * g + 3];
    for (int64_t i = 0; i < n; ++i) {  // U = c1 X1 + c2 X2, rows first (vectorized)
      double* ti = t + i * np;
      const TIn* ai = a + i * n;
      const TIn* bi = b + i * n;
      if (c2 != 0.0) {
        for (int64_t j = 0; j < n; ++j) ti[j] = c1 * static_cast<double>(ai[j]) + c2 * static_cast<double>(bi[j]);
      } else {
        for (int64_t j = 0; j < n; ++j) ti[j] = c1 * static_cast<double>(ai[j]);
      }
      for (int64_t j = n; j < np; ++j) ti[j] = 0;
    }
    // skew(U) reads only U's off-diagonal entries; an inf or NaN on the diagonal makes the skew
    // part (inf - inf) / 2 undefined, as in the XLA formula: poison the block with it.
    double diag = 0;
    for (int64_t i = 0; i < n; ++i) diag += t[i * np + i] * 0;
    if (square) {
      IMinusSkew(t, 1.0, n, np);  // I - S
      t[0] += diag;
      GaussJordan<true>(t, n, np);  // N; skew(Cay(S)) = skew(2 N) = (2N - 2N^T) / 2
      IMinusSkew(t, c, n, np);      // I - (c / 2) skew(2 N) = I - eta skew(Cay(S))
    } else {
      IMinusSkew(t, c, n, np);  // I - c S
      t[0] += diag;
    }
    GaussJordan<true>(t, n, np);
    bad[g] = CayleyStreamOut(t, n, np, y + g * n * n);
  }
}

// A point of a geodesic evaluated from its decomposition (orthofuse_jax.geometry.GeodesicPath.at)
// and, optionally, restored by curve_over_id, per block:
//   X = A diag(cs[0]) + B diag(cs[1]),  Y = X V^T,  Y <- Y (3 I - Y^T Y) / 2  (one Newton-Schulz
//   polar step), then if coef[1] != 0: Y <- Cay(coef[0] Y) = 2 (I - coef[0] skew(Y))^{-1} - I.
// Three products and an inversion, in double, where XLA ran four float32 programs (1.8-1.9x
// faster on whole SDXL stacks; but inside the exact merge's 0.5 MB chunks XLA's float32 products
// were as fast, so only the sweep uses it, benchmarks/RESULTS.md). Point g uses
// block g % blocks of a, b and v: their batch shape may be a suffix of the points' (a sweep).
template <typename TIn>
ORTHOFUSE_INLINE void PointBlocks(const TIn* a, const TIn* b, const TIn* v, const TIn* cs, const TIn* coef, TIn* y,
                                  int64_t begin, int64_t end, int64_t blocks, int64_t n, double* work) {
  const int64_t np = Round8(n), nn = n * np;
  double* x = work;
  double* w = x + nn;
  double* p = w + nn;
  double* q = p + nn;
  for (int64_t i = 0; i < 4 * nn; ++i) work[i] = 0;  // padding columns stay zero
  for (int64_t g = begin; g < end; ++g) {
    const int64_t h = g % blocks;  // a, b, v may be shared by several points (a sweep over t)
    const TIn* ag = a + h * n * n;
    const TIn* bg = b + h * n * n;
    const TIn* vg = v + h * n * n;
    const TIn* c0 = cs + g * 2 * n;
    const TIn* c1 = c0 + n;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        x[i * np + j] = static_cast<double>(ag[i * n + j]) * c0[j] + static_cast<double>(bg[i * n + j]) * c1[j];
        w[j * np + i] = vg[i * n + j];  // V^T
      }
    Mul(x, w, p, n, np);  // p = Y = X V^T
    Transpose(p, w, n, np);
    Mul(w, p, q, n, np);  // q = Y^T Y, then 3 I - Y^T Y
    for (int64_t i = 0; i < nn; ++i) q[i] = -q[i];
    for (int64_t i = 0; i < n; ++i) q[i * np + i] += 3;
    Mul(p, q, x, n, np);  // x = Y (3 I - Y^T Y) = 2 polar step
    TIn* yg = y + g * n * n;
    if (coef[2 * g + 1] != 0) {
      IMinusSkew(x, 0.5 * coef[2 * g], n, np);  // I - eta skew(Y), Y = x / 2
      GaussJordan<true>(x, n, np);                // Cay(eta Y) = 2 x - I
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < n; ++j) yg[i * n + j] = static_cast<TIn>(2 * x[i * np + j]);
        yg[i * n + i] = static_cast<TIn>(2 * x[i * np + i] - 1);
      }
    } else {
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j) yg[i * n + j] = static_cast<TIn>(0.5 * x[i * np + j]);
    }
  }
}

// Out-of-line products for the geodesic kernel, one copy per instruction set (target_clones
// dispatch at load time): inlined at its ~30 call sites for two types and three instruction
// sets, Mul's tiles made GCC's compile time explode.
#if defined(__x86_64__) && defined(__GNUC__)
#define ORTHOFUSE_CLONES_EARLY __attribute__((target_clones("avx512f", "avx2", "default"), noinline))
#else
#define ORTHOFUSE_CLONES_EARLY __attribute__((noinline))
#endif
ORTHOFUSE_CLONES_EARLY void MulOut(const double* a, const double* b, double* c, int64_t n, int64_t np) {
  Mul(a, b, c, n, np);
}
ORTHOFUSE_CLONES_EARLY void MulOut(const float* a, const float* b, float* c, int64_t n, int64_t np) {
  Mul(a, b, c, n, np);
}

// ---- The exact merge with products only (orthofuse_jax.fusion.merge, algorithm "matmul") ----
// Per block: U1 = Cay(X1), U2 = Cay(X2) (or the blocks themselves, if already orthogonal),
// W = U1^T U2, X = log W by the interpolant of orthofuse_jax.geometry.polynomial.log_polynomial,
// E = exp(t X) by its Taylor series with scaling and squaring (expm_skew_taylor; only the
// squarings a block needs, where XLA's unrolled loop pays for all of them), Y = U1 E, then the
// restoration: none, Cay(f/2 Y) (curve_over_id), or exp(f log Y).
// The Cayley maps invert in double, as everywhere in this file. The products (16 of them, and
// the exponential's squarings) run in the input's precision: float32 input gets 16-lane float
// products, twice the double ones' rate, and then, like the XLA path, a Newton-Schulz polar
// step after each exponential (two products); in double, Y is orthogonal to about 1e-11 (the
// Taylor series) and that step is left out. The work space holds 3 double buffers and 11 of the
// compute type (at n = 64 in float: 272 KB, the L2 cache). The coefficients come from Python (FFI
// attributes): the polynomials are defined once, in polynomial.py.
struct PolyParams {
  const double* log_coef;  // arccos(c) / sin(arccos(c)) = sum_k log_coef[k] y^k, c = c0 + h0 y
  int64_t log_terms;
  const double* exp_coef;  // 1 / k!, k = 0 .. the Taylor degree
  int64_t exp_terms;
  double c0, h0, radius;
  double lower;  // the smallest eigenvalue of Y = (sym(W) - c0 I) / h0 the interpolant accepts
  int64_t max_squarings;
};

constexpr int kGeodesicBuffers = 11;  // of the compute type, and 3 of double

// out = base + coef[0] I + sum_{0 < i < cnt} coef[i] baby[i] (base may be null: zero).
template <typename T>
ORTHOFUSE_INLINE void Combo(T* out, const T* base, const T* const* baby, const double* coef, int64_t cnt, int64_t n,
                            int64_t np) {
  const int64_t nn = n * np;
  if (base != nullptr) {
    for (int64_t k = 0; k < nn; ++k) out[k] = base[k];
  } else {
    for (int64_t k = 0; k < nn; ++k) out[k] = 0;
  }
  for (int64_t i = 1; i < cnt; ++i) {
    const T c = static_cast<T>(coef[i]);
    const T* b = baby[i];
    for (int64_t k = 0; k < nn; ++k) out[k] += c * b[k];
  }
  for (int64_t i = 0; i < n; ++i) out[i * np + i] += static_cast<T>(coef[0]);
}

// h = sum_k coef[k] Y^k (terms coefficients) by Paterson-Stockmeyer: baby[i] = Y^i for 0 < i < m,
// giant = Y^m, Horner in the giant step (polynomial._paterson_stockmeyer); tmp: scratch.
template <typename T>
ORTHOFUSE_INLINE void PatersonStockmeyer(const double* coef, int64_t terms, const T* const* baby, int64_t m,
                                         const T* giant, T* h, T* tmp, int64_t n, int64_t np) {
  const int64_t d = terms - 1, top = d / m;
  Combo(h, static_cast<const T*>(nullptr), baby, coef + top * m, std::min<int64_t>(m, d - top * m + 1), n, np);
  for (int64_t j = top - 1; j >= 0; --j) {
    MulOut(h, giant, tmp, n, np);
    Combo(h, static_cast<const T*>(tmp), baby, coef + j * m, m, n, np);
  }
}

// The sum of squares of an n x np buffer, in vectors (a scalar sum is a chain of dependent adds,
// which the compiler may not reorder), accumulated in double.
template <typename T>
ORTHOFUSE_INLINE double SumSquares(const T* a, int64_t n, int64_t np) {
  typedef VecOf<T> vt;
  constexpr int64_t L = Simd<T>::kLanes;
  vt s0{}, s1{};
  int64_t k = 0;
  for (; k + 2 * L <= n * np; k += 2 * L) {
    const vt v0 = LoadV(a + k), v1 = LoadV(a + k + L);
    s0 += v0 * v0;
    s1 += v1 * v1;
  }
  for (; k < n * np; k += L) {
    const vt v = LoadV(a + k);
    s0 += v * v;
  }
  s0 += s1;
  double s = 0;
  for (int64_t l = 0; l < L; ++l) s += s0[l];
  return s;
}

// Whether the symmetric a - lower I (n x np) is positive definite: Gaussian elimination without
// pivoting (LDL^T), every pivot positive; a is overwritten. n^3 / 3 multiply-adds.
template <typename T>
ORTHOFUSE_INLINE bool AboveLower(T* a, double lower, int64_t n, int64_t np) {
  for (int64_t i = 0; i < n; ++i) a[i * np + i] -= static_cast<T>(lower);
  for (int64_t k = 0; k < n; ++k) {
    const T p = a[k * np + k];
    if (!(p > 0)) return false;  // also NaN
    const T inv = 1 / p;
    const T* rk = a + k * np;
    for (int64_t i = k + 1; i < n; ++i) {
      T* ri = a + i * np;
      const T f = ri[k] * inv;
      for (int64_t j = k + 1; j < n; ++j) ri[j] -= f * rk[j];
    }
  }
  return true;
}

// x = log w for an orthogonal block w (polynomial.log_polynomial); false where the interpolant
// does not apply (a rotation angle above about 2.4 rad, or an inf / NaN). s: 7 scratch buffers.
template <typename T>
ORTHOFUSE_INLINE bool LogBlock(const T* w, T* x, T* const* s, const PolyParams& pp, int64_t n, int64_t np) {
  T *y1 = s[0], *y2 = s[1], *y3 = s[2], *y4 = s[3], *k = s[4], *h = s[5], *tmp = s[6];
  const int64_t nn = n * np;
  Transpose(w, tmp, n, np);
  const T inv_h0 = static_cast<T>(1.0 / pp.h0), half = static_cast<T>(0.5);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      const T a = w[i * np + j], b = tmp[i * np + j];
      y1[i * np + j] = half * (a + b) * inv_h0;
      k[i * np + j] = half * (a - b);
    }
    for (int64_t j = n; j < np; ++j) y1[i * np + j] = k[i * np + j] = 0;
  }
  for (int64_t i = 0; i < n; ++i) y1[i * np + i] -= static_cast<T>(pp.c0 / pp.h0);
  // The interpolant holds on the eigenvalues of Y in [pp.lower, 1] (W orthogonal: none above 1).
  // XLA checks ||T_16(Y)||_F^2 <= n (which bounds them to within ~0.013 of [-1, 1], with two
  // products); here the smallest eigenvalue itself, by an LDL^T factorization of Y - lower I.
  std::memcpy(tmp, y1, sizeof(T) * nn);
  if (AnyNotFinite(w, n, np) || !AboveLower(tmp, pp.lower, n, np)) return false;
  MulOut(y1, y1, y2, n, np);
  MulOut(y2, y1, y3, n, np);
  MulOut(y2, y2, y4, n, np);
  const T* baby[4] = {nullptr, y1, y2, y3};
  PatersonStockmeyer(pp.log_coef, pp.log_terms, baby, 4, static_cast<const T*>(y4), h, tmp, n, np);
  MulOut(k, h, tmp, n, np);
  Transpose(tmp, y1, n, np);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) x[i * np + j] = half * (tmp[i * np + j] - y1[i * np + j]);
    for (int64_t j = n; j < np; ++j) x[i * np + j] = 0;
  }
  return true;
}

// e = exp(x) for a skew block x (overwritten by its scaled copy), as polynomial._expm_taylor_with_ok:
// false where more than max_squarings squarings would be needed. s: 3 scratch buffers.
template <typename T>
ORTHOFUSE_INLINE bool ExpBlock(T* x, T* e, T* const* s, const PolyParams& pp, int64_t n, int64_t np) {
  T *x2 = s[0], *x3 = s[1], *tmp = s[2];
  const int64_t nn = n * np;
  MulOut(x, x, x2, n, np);
  // ||X||_2^2 = ||X^2||_2 <= ||X^2||_F / sqrt(2)
  const double bound = std::sqrt(std::sqrt(SumSquares(x2, n, np) / 2.0));
  const double need = std::max(std::ceil(std::log2(bound / pp.radius)), 0.0);
  if (!(need <= static_cast<double>(pp.max_squarings))) return false;  // also NaN
  const int sq = static_cast<int>(need);
  const T scale = static_cast<T>(std::ldexp(1.0, -sq)), scale2 = scale * scale;  // powers of two: exact
  for (int64_t i = 0; i < nn; ++i) {
    x[i] *= scale;
    x2[i] *= scale2;
  }
  MulOut(x2, x, x3, n, np);
  const T* baby[3] = {nullptr, x, x2};
  PatersonStockmeyer(pp.exp_coef, pp.exp_terms, baby, 3, static_cast<const T*>(x3), e, tmp, n, np);
  T *cur = e, *nxt = tmp;
  for (int i = 0; i < sq; ++i) {
    MulOut(cur, cur, nxt, n, np);
    std::swap(cur, nxt);
  }
  if (cur != e) std::memcpy(e, cur, sizeof(T) * nn);
  return true;
}

// out = y (3 I - y^T y) / 2, one Newton-Schulz step towards the polar factor (spectral._polar_step);
// s: 2 scratch buffers.
template <typename T>
ORTHOFUSE_INLINE void PolarBlock(const T* y, T* out, T* const* s, int64_t n, int64_t np) {
  T *yt = s[0], *q = s[1];
  Transpose(y, yt, n, np);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = n; j < np; ++j) yt[i * np + j] = 0;
  MulOut(yt, y, q, n, np);
  for (int64_t i = 0; i < n * np; ++i) q[i] = -q[i];
  for (int64_t i = 0; i < n; ++i) q[i * np + i] += 3;
  MulOut(y, q, out, n, np);
  for (int64_t i = 0; i < n * np; ++i) out[i] *= static_cast<T>(0.5);
}

// t <- h (t - t^T), padding columns zero, through the transpose in scratch (whose padding columns
// are never written or read): whole rows, vectorized where the transpose is. An inf or NaN on the
// diagonal poisons the block (inf - inf), as in the XLA formula.
ORTHOFUSE_INLINE void ScaledSkewVia(double* t, double* scratch, double h, int64_t n, int64_t np) {
  Transpose(t, scratch, n, np);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) t[i * np + j] = h * (t[i * np + j] - scratch[i * np + j]);
    for (int64_t j = n; j < np; ++j) t[i * np + j] = 0;
  }
}

// t <- I - c (t - t^T) / 2 (IMinusSkew) through the transpose in scratch (ScaledSkewVia).
ORTHOFUSE_INLINE void IMinusSkewVia(double* t, double* scratch, double c, int64_t n, int64_t np) {
  ScaledSkewVia(t, scratch, -0.5 * c, n, np);
  for (int64_t i = 0; i < n; ++i) t[i * np + i] += 1;
}

// t <- Cay(c t) = 2 (I - c skew(t))^{-1} - I in place (scratch: one buffer).
ORTHOFUSE_INLINE void CayleyInPlace(double* t, double* scratch, double c, int64_t n, int64_t np) {
  IMinusSkewVia(t, scratch, c, n, np);
  GaussJordan<true>(t, n, np);
  for (int64_t i = 0; i < n * np; ++i) t[i] *= 2;
  for (int64_t i = 0; i < n; ++i) t[i * np + i] -= 1;
}

// d (n x nd, padding zero) = s (n x ns), converted.
template <typename TD, typename TS>
ORTHOFUSE_INLINE void CopyBlock(const TS* s, int64_t ns, TD* d, int64_t nd, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) d[i * nd + j] = static_cast<TD>(s[i * ns + j]);
    for (int64_t j = n; j < nd; ++j) d[i * nd + j] = 0;
  }
}

// The exact merge's t-independent half for one block: ud = U1 = Cay(x1) (or x1 itself if
// orthogonal; double, row length round8(n)), u = U1 and v = X = log(U1^T U2) in the compute type
// (row length RoundLanes<T>(n)); false where the interpolant declines the block. vd2, sd: double
// scratch; w, s[0..7): scratch of the compute type.
template <typename T>
ORTHOFUSE_INLINE bool RelativeLog(const T* x1, const T* x2, bool orth1, bool orth2, double* ud, double* vd2, double* sd,
                                  T* u, T* v, T* w, T* const* s, const PolyParams& pp, int64_t n) {
  const int64_t np = Round8(n), nq = RoundLanes<T>(n);
  CopyBlock(x1, n, ud, np, n);
  CopyBlock(x2, n, vd2, np, n);
  if (!orth1) CayleyInPlace(ud, sd, 1.0, n, np);
  if (!orth2) CayleyInPlace(vd2, sd, 1.0, n, np);
  CopyBlock(ud, np, u, nq, n);
  CopyBlock(vd2, np, v, nq, n);
  Transpose(u, s[0], n, nq);
  MulOut(s[0], v, w, n, nq);  // W = U1^T U2 (s[0]'s padding columns are never read)
  return LogBlock(w, v, s, pp, n, nq);  // v = log W
}

// r <- exp(f log r) (the exact restoration; for float with its polar step); false where the log
// or the exponential declines the block. v, w, s[0..7): scratch.
template <typename T>
ORTHOFUSE_INLINE bool RestoreExact(T* r, T* v, T* w, T* const* s, const PolyParams& pp, double f, int64_t n) {
  const int64_t nq = RoundLanes<T>(n), nn = n * nq;
  bool good = LogBlock(static_cast<const T*>(r), v, s, pp, n, nq);
  if (good) {
    for (int64_t i = 0; i < nn; ++i) v[i] *= static_cast<T>(f);
    good = ExpBlock(v, w, s, pp, n, nq);
  }
  if (good && std::is_same<T, double>::value) std::memcpy(r, w, sizeof(T) * nn);  // orthogonal to double round-off
  else if (good) PolarBlock(static_cast<const T*>(w), r, s, n, nq);
  return good;
}

// coef[5 g .. 5 g + 5) = (t, f, restore, orthogonal1, orthogonal2); restore 0: none, 1: Cay(f/2 Y),
// 2: exp(f log Y). ok[g] False: the products-only path declined the block (its y is NaN, the
// caller redoes it with eigh); bad[g]: the result holds an inf or a NaN. T: the input's type, in
// which the products run.
template <typename T>
ORTHOFUSE_INLINE void GeodesicBlocks(const T* x1, const T* x2, const T* coef, T* y, bool* bad, bool* ok,
                                     int64_t batch, int64_t n, const PolyParams& pp, double* work) {
  constexpr bool kPolar = !std::is_same<T, double>::value;
  const int64_t np = Round8(n), nq = RoundLanes<T>(n), nn = n * nq;
  double* ud = work;  // the double buffers: the Cayley maps' inversions
  double* vd2 = ud + n * np;
  double* sd = vd2 + n * np;
  T* u = reinterpret_cast<T*>(sd + n * np);  // the compute-type buffers (n * nq * sizeof(T): a multiple of 64 bytes)
  T* v = u + nn;
  T* w = v + nn;
  T* r = w + nn;
  T* s[7];
  for (int i = 0; i < 7; ++i) s[i] = r + (i + 1) * nn;
  for (int64_t g = 0; g < batch; ++g) {
    const T* c = coef + 5 * g;
    const double t = c[0], f = c[1];
    const int restore = static_cast<int>(c[2]);
    bool good = RelativeLog(x1 + g * n * n, x2 + g * n * n, c[3] != 0, c[4] != 0, ud, vd2, sd, u, v, w, s, pp, n);
    if (good) {
      for (int64_t i = 0; i < nn; ++i) v[i] *= static_cast<T>(t);
      good = ExpBlock(v, w, s, pp, n, nq);  // w = exp(t log W)
    }
    const T* out = r;
    if (good) {
      if (kPolar) {
        MulOut(u, w, s[2], n, nq);
        PolarBlock(s[2], r, s, n, nq);  // r = the geodesic's point
      } else {
        MulOut(u, w, r, n, nq);  // orthogonal to double round-off: no polar step
      }
      if (restore == 1) {
        CopyBlock(r, nq, ud, np, n);
        IMinusSkewVia(ud, sd, 0.5 * f, n, np);  // Cay(f/2 Y) = 2 ud - I, written out below
        GaussJordan<true>(ud, n, np);
      } else if (restore == 2) {
        good = RestoreExact(r, v, w, s, pp, f, n);
      }
    }
    ok[g] = good;
    T* yg = y + g * n * n;
    if (!good) {
      bad[g] = true;
      for (int64_t i = 0; i < n * n; ++i) yg[i] = std::numeric_limits<T>::quiet_NaN();
    } else if (restore == 1) {
      bad[g] = CayleyStreamOut(ud, n, np, yg);
    } else {
      bad[g] = AnyNotFinite(out, n, nq);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j) yg[i * n + j] = out[i * nq + j];
    }
  }
}

// Doubles of work space for the geodesic kernel's n x n blocks of T.
template <typename T>
size_t GeodesicWorkspace(int64_t n) {
  return static_cast<size_t>(3 * n * Round8(n) + (kGeodesicBuffers * n * RoundLanes<T>(n) * sizeof(T) + 7) / 8);
}

// ---- A sweep of the exact merge over many t (orthofuse_jax.fusion.merge.sweep, algorithm "matmul") ----
// Per block, once: U1 and X = log(U1^T U2) as in GeodesicBlocks, then in double the Taylor
// coefficients of the whole geodesic,
//   gamma(t) = U1 exp(t X) = sum_k t^k M_k,   M_0 = U1,  M_k = M_{k-1} X / k,
// one product each, until the series' tail is below the output's round-off for every t of the
// sweep. The tail is bounded without a norm estimate: ||X^k||_F = k! ||M_k||_F (U1 orthogonal)
// is at least theta^k, theta the largest rotation angle (||X||_2), so with
// rho_k = max|t| (k! ||M_k||_F)^(1/k) >= max|t| theta the terms after k sum to at most
//   rho_k^(k+1) / (k+1)! / (1 - rho_k / (k+2)),
// and (k! ||M_k||_F)^(1/k) <= n^(1/2k) theta tightens as k grows (at the SDXL adapters' angles,
// about 1.5 rad, 13-14 terms; the small ones multiply in float for float32 input). Then per t: gamma(t) by Horner's rule (an n^2 pass per term),
// and the restoration: none; Cay(f/2 gamma(t)), which needs only skew(gamma(t)) = sum_k t^k
// skew(M_k), so the M_k are replaced by their skew parts once and every t costs the Horner pass
// and one inversion; or exp(f log gamma(t)) (RestoreExact). One exponential per t of the single
// merge's kernel would be 8-12 products and a polar step; here a t costs about as much as the
// fast merge's inversion. In double, gamma(t) is orthogonal to round-off: no polar step.
// A block whose series would need more than kSweepTerms terms (|t| times the largest angle
// above about 6) is declined like one the log declines (ok False, the caller redoes it with eigh).
constexpr int64_t kSweepTerms = 31;
constexpr int kSweepBatch = 4;  // points per Horner pass

// Doubles of work space for the sweep kernel: the geodesic kernel's, X, the M_k and the Horner
// pass's outputs.
template <typename T>
size_t SweepWorkspace(int64_t n) {
  return Round8(GeodesicWorkspace<T>(n)) + static_cast<size_t>((kSweepTerms + kSweepBatch + 1) * n * Round8(n));
}

// out[c] = scale[c] sum_k t[c]^k m[k] for C values of t at once (terms buffers of nd doubles, nd a multiple
// of kW), by Horner's rule: each m[k] vector is loaded once for all C, two vectors at a time (2 C
// independent chains of multiply-adds). The m[k] (13-14 x 12.8 KB at n = 40) come from the L2 cache,
// whose bandwidth one t at a time would be the limit.
template <int C>
ORTHOFUSE_INLINE void HornerBlocks(const double* m, int64_t terms, int64_t nd, const double* t, const double* scale,
                                   double* const* out) {
  vd tv[C], sv[C];
  for (int c = 0; c < C; ++c) {
    tv[c] = Splat(t[c]);
    sv[c] = Splat(scale[c]);
  }
  const double* top = m + (terms - 1) * nd;
  int64_t q = 0;
  for (; q + 2 * kW <= nd; q += 2 * kW) {
    vd a[C][2];
    for (int c = 0; c < C; ++c) {
      a[c][0] = Load(top + q);
      a[c][1] = Load(top + q + kW);
    }
    for (int64_t j = terms - 2; j >= 0; --j) {
      const vd m0 = Load(m + j * nd + q), m1 = Load(m + j * nd + q + kW);
      for (int c = 0; c < C; ++c) {
        a[c][0] = a[c][0] * tv[c] + m0;
        a[c][1] = a[c][1] * tv[c] + m1;
      }
    }
    for (int c = 0; c < C; ++c) {
      Store(out[c] + q, a[c][0] * sv[c]);
      Store(out[c] + q + kW, a[c][1] * sv[c]);
    }
  }
  for (; q < nd; q += kW) {
    vd a[C];
    for (int c = 0; c < C; ++c) a[c] = Load(top + q);
    for (int64_t j = terms - 2; j >= 0; --j) {
      const vd mj = Load(m + j * nd + q);
      for (int c = 0; c < C; ++c) a[c] = a[c] * tv[c] + mj;
    }
    for (int c = 0; c < C; ++c) Store(out[c] + q, a[c] * sv[c]);
  }
}


// Blocks [begin, end) of a sweep: x1, x2 [groups * per, n, n]; pts [groups, nt, 2] = (t, f) per
// point; y [groups, nt, per, n, n], bad and ok [groups, nt, per]. flags: restore (0: none,
// 1: Cay(f/2 Y), 2: exp(f log Y)), and whether x1 and x2 are orthogonal already.
template <typename T>
ORTHOFUSE_INLINE void SweepBlocks(const T* x1, const T* x2, const T* pts, T* y, bool* bad, bool* ok, int64_t begin,
                                  int64_t end, int64_t per, int64_t nt, int64_t n, int restore, bool orth1,
                                  bool orth2, const PolyParams& pp, double* work) {
  const int64_t np = Round8(n), nq = RoundLanes<T>(n), nn = n * nq, nd = n * np;
  const double tol = std::numeric_limits<T>::epsilon() / 16;
  double* ud = work;
  double* vd2 = ud + nd;
  double* sd = vd2 + nd;
  T* u = reinterpret_cast<T*>(sd + nd);
  T* v = u + nn;
  T* w = v + nn;
  T* r = w + nn;
  T* s[7];
  for (int i = 0; i < 7; ++i) s[i] = r + (i + 1) * nn;
  double* xd = work + Round8(GeodesicWorkspace<T>(n));
  double* m = xd + nd;  // M_k = m + k nd
  for (int64_t gq = begin / per; gq <= (end - 1) / per; ++gq) {  // this piece's outputs: per group and t
    const int64_t lo = std::max(begin, gq * per) - gq * per, hi = std::min(end, (gq + 1) * per) - gq * per;
    for (int64_t k = 0; k < nt; ++k)
      Prefault(y + ((gq * nt + k) * per + lo) * n * n, static_cast<size_t>((hi - lo) * n * n) * sizeof(T));
  }
  for (int64_t g = begin; g < end; ++g) {
    const int64_t grp = g / per, i = g % per;
    const T* p = pts + grp * nt * 2;
    double tmax = 0;
    for (int64_t k = 0; k < nt; ++k) tmax = std::max(tmax, std::fabs(static_cast<double>(p[2 * k])));
    bool good = RelativeLog(x1 + g * n * n, x2 + g * n * n, orth1, orth2, ud, vd2, sd, u, v, w, s, pp, n);
    int64_t terms = 1;
    if (good) {
      CopyBlock(v, nq, xd, np, n);
      std::memcpy(m, ud, sizeof(double) * nd);  // M_0 = U1, in double
      double fact = 1, tk = 1;  // k!, tmax^k
      bool low = false;  // the remaining terms' products in T (float: 16 lanes) instead of double
      T *mf = u, *mf2 = w;  // (u and w are free after RelativeLog)
      good = false;
      for (int64_t k = 1; k < kSweepTerms && !good; ++k) {
        double* mk = m + k * nd;
        const double inv = 1.0 / static_cast<double>(k);
        if (low) {
          MulOut(mf, v, mf2, n, nq);
          for (int64_t q = 0; q < nn; ++q) mf2[q] *= static_cast<T>(inv);
          std::swap(mf, mf2);
          CopyBlock(mf, nq, mk, np, n);
        } else {
          MulOut(mk - nd, xd, mk, n, np);
          for (int64_t q = 0; q < nd; ++q) mk[q] *= inv;
        }
        terms = k + 1;
        fact *= static_cast<double>(k);
        tk *= tmax;
        const double norm = std::sqrt(SumSquares(mk, n, np));  // ||M_k||_F
        // 1.0001: U1 (given orthogonal, in float) may be orthogonal only to the input's round-off
        const double rho = 1.0001 * tmax * std::pow(fact * norm, 1.0 / k);
        // Once the terms shrink (rho < k + 1) from one below 2^-6 (|t|^k ||M_k||, the orthogonal
        // gamma(t) having norm 1), float32 products' rounding, relative to each term, adds at most
        // about 2^-5 of an ulp: the rest of the series in T (for float32 input: twice the rate).
        if (!std::is_same<T, double>::value && !low && tk * norm <= 1.0 / 64 && rho < k + 1) {
          low = true;
          CopyBlock(mk, np, mf, nq, n);
        }
        if (rho == 0) {
          good = true;
        } else if (rho < k + 2) {  // (false for NaN)
          const double tail = std::exp((k + 1) * std::log(rho) - std::lgamma(k + 2.0)) / (1 - rho / (k + 2));
          good = tail <= tol;
        }
      }
    }
    if (good && restore == 1)  // only skew(gamma(t)) is needed: M_k <- skew(M_k)
      for (int64_t k = 0; k < terms; ++k) ScaledSkewVia(m + k * nd, sd, 0.5, n, np);
    for (int64_t k0 = 0; k0 < nt; k0 += kSweepBatch) {
      const int cnt = static_cast<int>(std::min<int64_t>(kSweepBatch, nt - k0));
      double tb[kSweepBatch], sb[kSweepBatch];
      double* hb[kSweepBatch];
      for (int c = 0; c < cnt; ++c) {
        tb[c] = p[2 * (k0 + c)];
        sb[c] = restore == 1 ? -0.5 * static_cast<double>(p[2 * (k0 + c) + 1]) : 1.0;
        hb[c] = m + (kSweepTerms + c) * nd;
      }
      if (good) {  // hb[c] = gamma(t), or for restore 1: -f/2 skew(gamma(t))
        switch (cnt) {
          case 4: HornerBlocks<4>(m, terms, nd, tb, sb, hb); break;
          case 3: HornerBlocks<3>(m, terms, nd, tb, sb, hb); break;
          case 2: HornerBlocks<2>(m, terms, nd, tb, sb, hb); break;
          default: HornerBlocks<1>(m, terms, nd, tb, sb, hb); break;
        }
      }
      for (int64_t k = k0; k < k0 + cnt; ++k) {
        const int64_t at = (grp * nt + k) * per + i;
        T* yk = y + at * n * n;
        bool gk = good;
        const double f = p[2 * k + 1];
        double* h = hb[k - k0];
        if (gk && restore == 1) {  // Cay(f/2 gamma(t)) = 2 (I - f/2 skew(gamma(t)))^{-1} - I
          for (int64_t a = 0; a < n; ++a) h[a * np + a] += 1;
          GaussJordan<true>(h, n, np);
          bad[at] = CayleyStreamOut(h, n, np, yk);
        } else if (gk && restore == 0) {
          bad[at] = ScaledStreamOut(h, n, np, 1.0, yk);
        } else if (gk) {
          CopyBlock(h, np, r, nq, n);
          gk = RestoreExact(r, v, w, s, pp, f, n);
          if (gk) {
            bad[at] = AnyNotFinite(r, n, nq);
            for (int64_t a = 0; a < n; ++a)
              for (int64_t b = 0; b < n; ++b) yk[a * n + b] = r[a * nq + b];
          }
        }
        ok[at] = gk;
        if (!gk) {
          bad[at] = true;
          for (int64_t q = 0; q < n * n; ++q) yk[q] = std::numeric_limits<T>::quiet_NaN();
        }
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

ORTHOFUSE_CLONES void SolveF32(const float* a, const float* b, float* x, int64_t batch, int64_t n, int64_t m,
                               double* t) {
  SolveBlocks<float>(a, b, x, batch, n, m, t);
}

ORTHOFUSE_CLONES void SolveF64(const double* a, const double* b, double* x, int64_t batch, int64_t n,
                               int64_t m, double* t) {
  SolveBlocks<double>(a, b, x, batch, n, m, t);
}

ORTHOFUSE_CLONES void CayleyF32(const float* x1, const float* x2, const float* coef, float* y, bool* bad,
                                int64_t batch, int64_t n, double* work) {
  CayleyBlocks<float>(x1, x2, coef, y, bad, batch, n, work);
}

ORTHOFUSE_CLONES void CayleyF64(const double* x1, const double* x2, const double* coef, double* y, bool* bad,
                                int64_t batch, int64_t n, double* work) {
  CayleyBlocks<double>(x1, x2, coef, y, bad, batch, n, work);
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
  ParallelFor(batch, n * n * (n + m), [&](int64_t begin, int64_t end) {
    kernel(a.typed_data() + begin * n * n, b.typed_data() + begin * n * m, x->typed_data() + begin * n * m,
           end - begin, n, m, Workspace(static_cast<size_t>(n * Round8(n + m))));
  });
  return ffi::Error::Success();
}

ffi::Error SolveF32Impl(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> x) {
  return Solve<ffi::F32, float>(a, b, x, SolveF32);
}

ffi::Error SolveF64Impl(ffi::Buffer<ffi::F64> a, ffi::Buffer<ffi::F64> b, ffi::ResultBuffer<ffi::F64> x) {
  return Solve<ffi::F64, double>(a, b, x, SolveF64);
}

ORTHOFUSE_CLONES void PointF32(const float* a, const float* b, const float* v, const float* cs, const float* coef,
                               float* y, int64_t begin, int64_t end, int64_t blocks, int64_t n, double* work) {
  PointBlocks<float>(a, b, v, cs, coef, y, begin, end, blocks, n, work);
}

ORTHOFUSE_CLONES void PointF64(const double* a, const double* b, const double* v, const double* cs,
                               const double* coef, double* y, int64_t begin, int64_t end, int64_t blocks, int64_t n,
                               double* work) {
  PointBlocks<double>(a, b, v, cs, coef, y, begin, end, blocks, n, work);
}

template <ffi::DataType DT, typename TIn>
ffi::Error Cayley(ffi::Buffer<DT> x1, ffi::Buffer<DT> x2, ffi::Buffer<DT> coef, ffi::ResultBuffer<DT> y,
                  ffi::ResultBuffer<ffi::PRED> bad,
                  void (*kernel)(const TIn*, const TIn*, const TIn*, TIn*, bool*, int64_t, int64_t, double*)) {
  auto d1 = x1.dimensions();
  auto d2 = x2.dimensions();
  auto dc = coef.dimensions();
  const size_t rank = d1.size();
  if (rank < 2 || d2.size() != rank || dc.size() != rank - 1)
    return ffi::Error::InvalidArgument("orthofuse_cayley: x1, x2 [..., n, n] and coef [..., 4] needed");
  const int64_t n = d1[rank - 1];
  if (d1[rank - 2] != n || d2[rank - 2] != n || d2[rank - 1] != n || dc[rank - 2] != 4)
    return ffi::Error::InvalidArgument("orthofuse_cayley: x1, x2 must be [..., n, n] and coef [..., 4]");
  int64_t batch = 1;
  for (size_t i = 0; i + 2 < rank; ++i) {
    if (d1[i] != d2[i] || d1[i] != dc[i]) return ffi::Error::InvalidArgument("orthofuse_cayley: batch shapes differ");
    batch *= d1[i];
  }
  if (batch == 0 || n == 0) return ffi::Error::Success();
  ParallelFor(batch, 2 * n * n * n, [&](int64_t begin, int64_t end) {
    Prefault(y->typed_data() + begin * n * n, static_cast<size_t>((end - begin) * n * n) * sizeof(TIn));
    kernel(x1.typed_data() + begin * n * n, x2.typed_data() + begin * n * n, coef.typed_data() + 4 * begin,
           y->typed_data() + begin * n * n, bad->typed_data() + begin, end - begin, n,
           Workspace(static_cast<size_t>(n * Round8(n))));
  });
  return ffi::Error::Success();
}

ffi::Error CayleyF32Impl(ffi::Buffer<ffi::F32> x1, ffi::Buffer<ffi::F32> x2, ffi::Buffer<ffi::F32> c,
                         ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::PRED> bad) {
  return Cayley<ffi::F32, float>(x1, x2, c, y, bad, CayleyF32);
}

ffi::Error CayleyF64Impl(ffi::Buffer<ffi::F64> x1, ffi::Buffer<ffi::F64> x2, ffi::Buffer<ffi::F64> c,
                         ffi::ResultBuffer<ffi::F64> y, ffi::ResultBuffer<ffi::PRED> bad) {
  return Cayley<ffi::F64, double>(x1, x2, c, y, bad, CayleyF64);
}

template <ffi::DataType DT, typename TIn>
ffi::Error Point(ffi::Buffer<DT> a, ffi::Buffer<DT> b, ffi::Buffer<DT> v, ffi::Buffer<DT> cs, ffi::Buffer<DT> coef,
                 ffi::ResultBuffer<DT> y,
                 void (*kernel)(const TIn*, const TIn*, const TIn*, const TIn*, const TIn*, TIn*, int64_t, int64_t,
                                int64_t, int64_t, double*)) {
  // a, b, v: [..., n, n], all the same shape; cs [P..., 2, n], coef [P..., 2], y [P..., n, n], where
  // the points' batch P... ends with the blocks' batch (it may have more leading dimensions).
  auto da = a.dimensions();
  auto dc = cs.dimensions();
  auto dk = coef.dimensions();
  const size_t ra = da.size(), rc = dc.size();
  const char* shapes = "orthofuse_point: a, b, v [..., n, n], cs [P..., 2, n], coef [P..., 2] needed";
  if (ra < 2 || rc < ra || dk.size() != rc - 1) return ffi::Error::InvalidArgument(shapes);
  const int64_t n = da[ra - 1];
  for (auto d : {b.dimensions(), v.dimensions()}) {
    if (d.size() != ra) return ffi::Error::InvalidArgument(shapes);
    for (size_t i = 0; i < ra; ++i)
      if (d[i] != da[i]) return ffi::Error::InvalidArgument("orthofuse_point: a, b and v differ in shape");
  }
  if (da[ra - 2] != n || dc[rc - 2] != 2 || dc[rc - 1] != n || dk[rc - 2] != 2) return ffi::Error::InvalidArgument(shapes);
  int64_t blocks = 1, batch = 1;
  for (size_t i = 0; i + 2 < ra; ++i) {
    if (dc[rc - ra + i] != da[i]) return ffi::Error::InvalidArgument("orthofuse_point: batch shapes differ");
    blocks *= da[i];
  }
  for (size_t i = 0; i + 2 < rc; ++i) {
    if (dk[i] != dc[i]) return ffi::Error::InvalidArgument("orthofuse_point: batch shapes differ");
    batch *= dc[i];
  }
  if (batch == 0 || n == 0) return ffi::Error::Success();
  ParallelFor(batch, 3 * n * n * n, [&](int64_t begin, int64_t end) {
    kernel(a.typed_data(), b.typed_data(), v.typed_data(), cs.typed_data(), coef.typed_data(), y->typed_data(), begin,
           end, blocks, n, Workspace(static_cast<size_t>(4 * n * Round8(n))));
  });
  return ffi::Error::Success();
}

ffi::Error PointF32Impl(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> v,
                        ffi::Buffer<ffi::F32> cs, ffi::Buffer<ffi::F32> coef, ffi::ResultBuffer<ffi::F32> y) {
  return Point<ffi::F32, float>(a, b, v, cs, coef, y, PointF32);
}

ffi::Error PointF64Impl(ffi::Buffer<ffi::F64> a, ffi::Buffer<ffi::F64> b, ffi::Buffer<ffi::F64> v,
                        ffi::Buffer<ffi::F64> cs, ffi::Buffer<ffi::F64> coef, ffi::ResultBuffer<ffi::F64> y) {
  return Point<ffi::F64, double>(a, b, v, cs, coef, y, PointF64);
}


ORTHOFUSE_CLONES void GeodesicF32(const float* x1, const float* x2, const float* coef, float* y, bool* bad, bool* ok,
                                  int64_t batch, int64_t n, const PolyParams& pp, double* work) {
  GeodesicBlocks<float>(x1, x2, coef, y, bad, ok, batch, n, pp, work);
}

ORTHOFUSE_CLONES void GeodesicF64(const double* x1, const double* x2, const double* coef, double* y, bool* bad,
                                  bool* ok, int64_t batch, int64_t n, const PolyParams& pp, double* work) {
  GeodesicBlocks<double>(x1, x2, coef, y, bad, ok, batch, n, pp, work);
}

template <ffi::DataType DT, typename TIn>
ffi::Error Geodesic(ffi::Buffer<DT> x1, ffi::Buffer<DT> x2, ffi::Buffer<DT> coef, ffi::Span<const double> log_coef,
                    ffi::Span<const double> exp_coef, ffi::Span<const double> params, ffi::ResultBuffer<DT> y,
                    ffi::ResultBuffer<ffi::PRED> bad, ffi::ResultBuffer<ffi::PRED> ok,
                    void (*kernel)(const TIn*, const TIn*, const TIn*, TIn*, bool*, bool*, int64_t, int64_t,
                                   const PolyParams&, double*)) {
  auto d1 = x1.dimensions();
  auto d2 = x2.dimensions();
  auto dc = coef.dimensions();
  const size_t rank = d1.size();
  const char* shapes = "orthofuse_geodesic: x1, x2 [..., n, n] and coef [..., 5] needed";
  if (rank < 2 || d2.size() != rank || dc.size() != rank - 1) return ffi::Error::InvalidArgument(shapes);
  const int64_t n = d1[rank - 1];
  if (d1[rank - 2] != n || d2[rank - 2] != n || d2[rank - 1] != n || dc[rank - 2] != 5)
    return ffi::Error::InvalidArgument(shapes);
  if (log_coef.size() < 1 || exp_coef.size() < 1 || params.size() != 5)
    return ffi::Error::InvalidArgument("orthofuse_geodesic: log_coef, exp_coef and params [5] needed");
  int64_t batch = 1;
  for (size_t i = 0; i + 2 < rank; ++i) {
    if (d1[i] != d2[i] || d1[i] != dc[i]) return ffi::Error::InvalidArgument("orthofuse_geodesic: batch shapes differ");
    batch *= d1[i];
  }
  if (batch == 0 || n == 0) return ffi::Error::Success();
  const PolyParams pp{log_coef.begin(), static_cast<int64_t>(log_coef.size()), exp_coef.begin(),
                      static_cast<int64_t>(exp_coef.size()), params[0], params[1], params[2], params[3],
                      static_cast<int64_t>(params[4])};
  ParallelFor(batch, 12 * n * n * n, [&](int64_t begin, int64_t end) {
    Prefault(y->typed_data() + begin * n * n, static_cast<size_t>((end - begin) * n * n) * sizeof(TIn));
    kernel(x1.typed_data() + begin * n * n, x2.typed_data() + begin * n * n, coef.typed_data() + 5 * begin,
           y->typed_data() + begin * n * n, bad->typed_data() + begin, ok->typed_data() + begin, end - begin, n, pp,
           Workspace(GeodesicWorkspace<TIn>(n)));
  });
  return ffi::Error::Success();
}

ffi::Error GeodesicF32Impl(ffi::Buffer<ffi::F32> x1, ffi::Buffer<ffi::F32> x2, ffi::Buffer<ffi::F32> c,
                           ffi::Span<const double> log_coef, ffi::Span<const double> exp_coef,
                           ffi::Span<const double> params, ffi::ResultBuffer<ffi::F32> y,
                           ffi::ResultBuffer<ffi::PRED> bad, ffi::ResultBuffer<ffi::PRED> ok) {
  return Geodesic<ffi::F32, float>(x1, x2, c, log_coef, exp_coef, params, y, bad, ok, GeodesicF32);
}

ffi::Error GeodesicF64Impl(ffi::Buffer<ffi::F64> x1, ffi::Buffer<ffi::F64> x2, ffi::Buffer<ffi::F64> c,
                           ffi::Span<const double> log_coef, ffi::Span<const double> exp_coef,
                           ffi::Span<const double> params, ffi::ResultBuffer<ffi::F64> y,
                           ffi::ResultBuffer<ffi::PRED> bad, ffi::ResultBuffer<ffi::PRED> ok) {
  return Geodesic<ffi::F64, double>(x1, x2, c, log_coef, exp_coef, params, y, bad, ok, GeodesicF64);
}

ORTHOFUSE_CLONES void SweepF32(const float* x1, const float* x2, const float* pts, float* y, bool* bad, bool* ok,
                               int64_t begin, int64_t end, int64_t per, int64_t nt, int64_t n, int restore, bool o1,
                               bool o2, const PolyParams& pp, double* work) {
  SweepBlocks<float>(x1, x2, pts, y, bad, ok, begin, end, per, nt, n, restore, o1, o2, pp, work);
}

ORTHOFUSE_CLONES void SweepF64(const double* x1, const double* x2, const double* pts, double* y, bool* bad, bool* ok,
                               int64_t begin, int64_t end, int64_t per, int64_t nt, int64_t n, int restore, bool o1,
                               bool o2, const PolyParams& pp, double* work) {
  SweepBlocks<double>(x1, x2, pts, y, bad, ok, begin, end, per, nt, n, restore, o1, o2, pp, work);
}

template <ffi::DataType DT, typename TIn>
ffi::Error Sweep(ffi::Buffer<DT> x1, ffi::Buffer<DT> x2, ffi::Buffer<DT> pts, ffi::Span<const double> log_coef,
                 ffi::Span<const double> exp_coef, ffi::Span<const double> params, ffi::Span<const double> flags,
                 ffi::ResultBuffer<DT> y, ffi::ResultBuffer<ffi::PRED> bad, ffi::ResultBuffer<ffi::PRED> ok,
                 void (*kernel)(const TIn*, const TIn*, const TIn*, TIn*, bool*, bool*, int64_t, int64_t, int64_t,
                                int64_t, int64_t, int, bool, bool, const PolyParams&, double*)) {
  // x1, x2 [G..., B..., n, n]; pts [G..., T, 2]: every group of blocks (G: empty, or the axes a
  // vmap added) has its own T points; y [G..., T, B..., n, n], bad and ok [G..., T, B...].
  auto d1 = x1.dimensions();
  auto d2 = x2.dimensions();
  auto dp = pts.dimensions();
  const size_t rank = d1.size(), rp = dp.size();
  const char* shapes = "orthofuse_sweep: x1, x2 [G..., B..., n, n] and pts [G..., T, 2] needed";
  if (rank < 2 || d2.size() != rank || rp < 2 || rp > rank || dp[rp - 1] != 2) return ffi::Error::InvalidArgument(shapes);
  const int64_t n = d1[rank - 1];
  for (size_t i = 0; i < rank; ++i)
    if (d1[i] != d2[i]) return ffi::Error::InvalidArgument("orthofuse_sweep: x1 and x2 differ in shape");
  if (d1[rank - 2] != n) return ffi::Error::InvalidArgument(shapes);
  int64_t groups = 1, per = 1;
  for (size_t i = 0; i + 2 < rp; ++i) {
    if (dp[i] != d1[i]) return ffi::Error::InvalidArgument("orthofuse_sweep: batch shapes differ");
    groups *= dp[i];
  }
  for (size_t i = rp - 2; i + 2 < rank; ++i) per *= d1[i];
  const int64_t nt = dp[rp - 2];
  if (log_coef.size() < 1 || exp_coef.size() < 1 || params.size() != 5 || flags.size() != 3)
    return ffi::Error::InvalidArgument("orthofuse_sweep: log_coef, exp_coef, params [5] and flags [3] needed");
  if (groups * per * nt == 0 || n == 0) return ffi::Error::Success();
  const PolyParams pp{log_coef.begin(), static_cast<int64_t>(log_coef.size()), exp_coef.begin(),
                      static_cast<int64_t>(exp_coef.size()), params[0], params[1], params[2], params[3],
                      static_cast<int64_t>(params[4])};
  const int restore = static_cast<int>(flags[0]);
  ParallelFor(groups * per, (28 + 2 * nt) * n * n * n, [&](int64_t begin, int64_t end) {
    kernel(x1.typed_data(), x2.typed_data(), pts.typed_data(), y->typed_data(), bad->typed_data(), ok->typed_data(),
           begin, end, per, nt, n, restore, flags[1] != 0, flags[2] != 0, pp, Workspace(SweepWorkspace<TIn>(n)));
  });
  return ffi::Error::Success();
}

ffi::Error SweepF32Impl(ffi::Buffer<ffi::F32> x1, ffi::Buffer<ffi::F32> x2, ffi::Buffer<ffi::F32> pts,
                        ffi::Span<const double> log_coef, ffi::Span<const double> exp_coef,
                        ffi::Span<const double> params, ffi::Span<const double> flags, ffi::ResultBuffer<ffi::F32> y,
                        ffi::ResultBuffer<ffi::PRED> bad, ffi::ResultBuffer<ffi::PRED> ok) {
  return Sweep<ffi::F32, float>(x1, x2, pts, log_coef, exp_coef, params, flags, y, bad, ok, SweepF32);
}

ffi::Error SweepF64Impl(ffi::Buffer<ffi::F64> x1, ffi::Buffer<ffi::F64> x2, ffi::Buffer<ffi::F64> pts,
                        ffi::Span<const double> log_coef, ffi::Span<const double> exp_coef,
                        ffi::Span<const double> params, ffi::Span<const double> flags, ffi::ResultBuffer<ffi::F64> y,
                        ffi::ResultBuffer<ffi::PRED> bad, ffi::ResultBuffer<ffi::PRED> ok) {
  return Sweep<ffi::F64, double>(x1, x2, pts, log_coef, exp_coef, params, flags, y, bad, ok, SweepF64);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(OrthofuseCayleyF32, CayleyF32Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::PRED>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(OrthofuseCayleyF64, CayleyF64Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F64>>()
                                  .Arg<ffi::Buffer<ffi::F64>>()
                                  .Arg<ffi::Buffer<ffi::F64>>()
                                  .Ret<ffi::Buffer<ffi::F64>>()
                                  .Ret<ffi::Buffer<ffi::PRED>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(OrthofusePointF32, PointF32Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(OrthofusePointF64, PointF64Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F64>>()
                                  .Arg<ffi::Buffer<ffi::F64>>()
                                  .Arg<ffi::Buffer<ffi::F64>>()
                                  .Arg<ffi::Buffer<ffi::F64>>()
                                  .Arg<ffi::Buffer<ffi::F64>>()
                                  .Ret<ffi::Buffer<ffi::F64>>());

// The geodesic kernels' arguments: X1, X2, the coefficients / points, and the polynomials.
#define ORTHOFUSE_POLY_ARGS(DT)                              \
  ffi::Ffi::Bind()                                           \
      .Arg<ffi::Buffer<DT>>()                                \
      .Arg<ffi::Buffer<DT>>()                                \
      .Arg<ffi::Buffer<DT>>()                                \
      .Attr<ffi::Span<const double>>("log_coef")             \
      .Attr<ffi::Span<const double>>("exp_coef")             \
      .Attr<ffi::Span<const double>>("params")
#define ORTHOFUSE_Y_BAD_OK(DT) .Ret<ffi::Buffer<DT>>().Ret<ffi::Buffer<ffi::PRED>>().Ret<ffi::Buffer<ffi::PRED>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(OrthofuseGeodesicF32, GeodesicF32Impl,
                              ORTHOFUSE_POLY_ARGS(ffi::F32) ORTHOFUSE_Y_BAD_OK(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(OrthofuseGeodesicF64, GeodesicF64Impl,
                              ORTHOFUSE_POLY_ARGS(ffi::F64) ORTHOFUSE_Y_BAD_OK(ffi::F64));
XLA_FFI_DEFINE_HANDLER_SYMBOL(OrthofuseSweepF32, SweepF32Impl,
                              ORTHOFUSE_POLY_ARGS(ffi::F32).Attr<ffi::Span<const double>>("flags")
                                  ORTHOFUSE_Y_BAD_OK(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(OrthofuseSweepF64, SweepF64Impl,
                              ORTHOFUSE_POLY_ARGS(ffi::F64).Attr<ffi::Span<const double>>("flags")
                                  ORTHOFUSE_Y_BAD_OK(ffi::F64));

// Whether this CPU runs the kernels' vectors as written: 64-byte vectors (8 doubles, 16 floats)
// and tiles sized for 32 vector registers, i.e. AVX-512. Built for AVX2 alone (16 registers of
// 32 bytes) GCC splits those vectors and spills the tiles: per 40x40 block the fast merge took
// 76 us instead of 11 and the exact merge 1330 us instead of 60, where XLA's own code takes 38
// and 134 us (benchmarks/experiments/isa_clones.py: the avx2 clone forced on an AVX-512 CPU,
// session 11). Python registers the kernels only where this returns 1 (orthofuse_jax._native).
extern "C" __attribute__((visibility("default"))) int OrthofuseVectorsNative() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") ? 1 : 0;
#else
  return 0;
#endif
}
