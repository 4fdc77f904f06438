// The XLA FFI side of the compiled CPU kernels (built as orthofuse_jax._native._kernels; the
// Python side is orthofuse_jax/_native/__init__.py and geometry/_linalg.py: solve_pd, cayley_map):
// batched Cayley-type maps and solves without pivoting, and the exact merge and sweep.
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
// Five kernels, each an FFI handler per dtype (ORTHOFUSE_HANDLERS at the end of this file):
//   orthofuse_solve_{f32,f64}(A, B) -> A^{-1} B
//   orthofuse_cayley_{f32,f64}(X1, X2, C) -> (I - q S^2 - c S)^{-1} (I - q S^2 + c S) per block, and
//     per block whether it holds an inf or a NaN (the merges' "bad" flag),
//     S = c1 skew(X1) + c2 skew(X2), (c1, c2, q, c) = C[..., 0:4], q in {0, 1}: the Cayley map
//     (q = 0: one in-place inversion) and the fast merge with its restoration (q = 1, c = 2 eta:
//     two), from the raw inputs to the result in one pass.
//   orthofuse_point_{f32,f64}(A, B, V, CS, C) -> a point of a decomposed geodesic with its polar
//     step and, if C[..., 1] != 0, the curve_over_id restoration Cay(C[..., 0] Y) (PointBlocks).
//   orthofuse_geodesic_{f32,f64}(X1, X2, C; log_coef, exp_coef, params, power) -> (Y, bad, ok): the exact
//     merge with products only, U1 expm(t log(U1^T U2)) and its restoration, from the inputs to the
//     result in one pass per block (GeodesicBlocks), C[..., 0:5] = (t, f, restore, orth1, orth2).
//   orthofuse_sweep_{f32,f64}(X1, X2, P; log_coef, exp_coef, params, power, flags) -> (Y, bad, ok): the same
//     at every t of P[..., T, 2] = (t, f): the log once per block, then the geodesic's Taylor
//     coefficients and per t a Horner pass and the restoration (SweepBlocks).
//
// Blocks are independent, so a large call splits its batch over the CPUs the process may run on
// (ParallelFor; ORTHOFUSE_JAX_THREADS=N sets the number), in threads of its own: XLA's CPU pool is kept at
// one thread (orthofuse_jax/_runtime.py), and these threads never call back into XLA.
//
// The kernels themselves are in kernels.inc, compiled twice (see "The builds" below): for
// AVX-512 and for AVX2 with FMA; every call runs the build the CPU has. This file holds what is
// the same for both: threads, work space, page faults, the power's coefficients, and the FFI
// handlers (shape checks, then the kernel of the build that runs here over the batch).
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <string>
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

// Every helper of kernels.inc is inlined into its build's entry points, so that it is compiled
// for that build's instruction set.
#if defined(__GNUC__)
#define ORTHOFUSE_INLINE __attribute__((always_inline)) inline
#pragma GCC diagnostic ignored "-Wpsabi"  // vector arguments of inlined helpers: no ABI crosses
#else
#define ORTHOFUSE_INLINE inline
#endif

constexpr int64_t kMaxW = 8;  // doubles per vector of the widest build (AVX-512)

// n rounded up to a multiple of w.
constexpr int64_t RoundUp(int64_t n, int64_t w) { return (n + w - 1) / w * w; }

// Work space per thread: the [A | B] buffer, or for the Cayley maps the block and S.
double* Workspace(size_t doubles) {
  thread_local std::vector<double> work;
  if (work.size() < doubles + kMaxW) work.resize(doubles + kMaxW);
  const uintptr_t p = reinterpret_cast<uintptr_t>(work.data());
  return reinterpret_cast<double*>((p + 63) / 64 * 64);
}

// Faults in the pages of an output range in one system call (MADV_POPULATE_WRITE, Linux 5.14+),
// before a kernel fills it. XLA hands over fresh memory, and filled 4 KB page by page it takes a
// trap per page: on this project's machine (a virtual one) a 16-point sweep of the SDXL adapters
// (4.8 GB) spent 2.5-2.9 s of system time in 1.2 million of them and sometimes 20% more wall time;
// faulted in up front, about 1.5 s and no slow runs (docs/performance.md). Only whole pages inside the
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

// The exact merge's direct power W^t = a_t(P) + K b_t(P) (PowerBlock in kernels.inc): per tier,
// interpolants in y = (P - c0 I) / h0 of degree terms - 1 on the angles up to theta_max
// (orthofuse_jax.geometry.polynomial.POWER_TIERS), for t in [t_lo, t_hi].
constexpr int kMaxPowerTiers = 4;
constexpr int64_t kMaxPowerTerms = 32;
struct PowerTier {
  double c0, h0;
  int64_t terms;
};
struct PowerParams {
  double t_lo, t_hi, margin, lower;  // lower: the smallest eigenvalue of Y a tier accepts
  int64_t tiers;  // 0: no power path (log and exp only)
  PowerTier tier[kMaxPowerTiers];
};

// The monomial coefficients in y of a_t(c) = cos(t phi) and b_t(c) = sin(t phi) / sin(phi),
// phi = arccos(c), c = c0 + h0 y, interpolated at the Chebyshev points of the first kind on
// [-1 - margin, 1] (as polynomial._power_coefficients): values at the nodes and the Chebyshev
// coefficients in x (a DCT, its cosines T_m(x_j) by their recurrence) in double, then the series
// expanded in powers of y (x = alpha y + beta) by the recurrence of the T_m, in long double: the
// expansion's coefficients grow like 2^degree and cancel (in double ~1e-8 was lost at degree 23,
// as much as the interpolation error itself). 5n transcendental functions and O(n^2) products:
// 1.8 us at 12 terms, 9.8 at 32 (one core of the AMD EPYC of docs/performance.md).
void PowerCoefficients(const PowerTier& tier, double margin, double t, double* a, double* b) {
  typedef long double L;
  const int64_t n = tier.terms;
  const double pi = 3.141592653589793;
  double x[kMaxPowerTerms], fa[kMaxPowerTerms], fb[kMaxPowerTerms], ca[kMaxPowerTerms] = {}, cb[kMaxPowerTerms] = {};
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::cos(pi * (static_cast<double>(j) + 0.5) / static_cast<double>(n));
    const double y = -1.0 - margin + (2.0 + margin) * (x[j] + 1.0) / 2.0;
    const double phi = std::acos(std::min(std::max(tier.c0 + tier.h0 * y, -1.0), 1.0));
    fa[j] = std::cos(t * phi);
    fb[j] = phi > 0 ? std::sin(t * phi) / std::sin(phi) : t;
  }
  for (int64_t j = 0; j < n; ++j) {  // c_m = (2 - [m = 0]) / n sum_j f_j T_m(x_j)
    double prev = 1.0, cur = x[j];
    ca[0] += fa[j];
    cb[0] += fb[j];
    for (int64_t m = 1; m < n; ++m) {
      ca[m] += fa[j] * cur;
      cb[m] += fb[j] * cur;
      const double next = 2.0 * x[j] * cur - prev;
      prev = cur;
      cur = next;
    }
  }
  for (int64_t m = 0; m < n; ++m) {
    const double scale = (m == 0 ? 1.0 : 2.0) / static_cast<double>(n);
    ca[m] *= scale;
    cb[m] *= scale;
  }
  const L alpha = 2.0L / (2.0L + margin), beta = static_cast<L>(margin) / (2.0L + margin);
  L prev[kMaxPowerTerms + 1] = {1.0L}, cur[kMaxPowerTerms + 1] = {beta, alpha}, next[kMaxPowerTerms + 1];
  L sa[kMaxPowerTerms] = {}, sb[kMaxPowerTerms] = {};
  sa[0] = ca[0];
  sb[0] = cb[0];
  for (int64_t m = 1; m < n; ++m) {  // cur = T_m(alpha y + beta): coefficients of y^0 .. y^m
    for (int64_t k = 0; k <= m; ++k) {
      sa[k] += ca[m] * cur[k];
      sb[k] += cb[m] * cur[k];
    }
    for (int64_t k = 0; k <= m + 1; ++k)
      next[k] = 2.0L * beta * cur[k] + (k > 0 ? 2.0L * alpha * cur[k - 1] : 0.0L) - (k < m ? prev[k] : 0.0L);
    for (int64_t k = 0; k <= m + 1; ++k) {
      prev[k] = cur[k];
      cur[k] = next[k];
    }
  }
  for (int64_t k = 0; k < n; ++k) {
    a[k] = static_cast<double>(sa[k]);
    b[k] = static_cast<double>(sb[k]);
  }
}

// The power's coefficients per tier for the last kPowerSlots values of t asked (a merge's blocks
// mostly share one t; a sweep's exact restoration asks for its points' f in turn, block after
// block), replaced in turn. On the heap: 16 KB a tier.
constexpr int kPowerSlots = 32;
class PowerCache {
 public:
  PowerCache() : coef_(static_cast<size_t>(kMaxPowerTiers) * kPowerSlots * 2 * kMaxPowerTerms) {
    for (auto& tier : t_)
      for (double& v : tier) v = std::numeric_limits<double>::quiet_NaN();
  }
  // a_t's coefficients (b_t's follow at +kMaxPowerTerms) for tier k.
  const double* Get(const PowerParams& pw, int k, double t) {
    double* slots = coef_.data() + static_cast<size_t>(k) * kPowerSlots * 2 * kMaxPowerTerms;
    for (int i = 0; i < kPowerSlots; ++i)
      if (t_[k][i] == t) return slots + i * 2 * kMaxPowerTerms;
    const int i = next_[k];
    next_[k] = (i + 1) % kPowerSlots;
    double* c = slots + i * 2 * kMaxPowerTerms;
    PowerCoefficients(pw.tier[k], pw.margin, t, c, c + kMaxPowerTerms);
    t_[k][i] = t;
    return c;
  }

 private:
  std::vector<double> coef_;
  double t_[kMaxPowerTiers][kPowerSlots];
  int next_[kMaxPowerTiers] = {};
};

// The exact merge's polynomials and limits (PolyParams in kernels.inc describes its algorithm).
struct PolyParams {
  const double* log_coef;  // arccos(c) / sin(arccos(c)) = sum_k log_coef[k] y^k, c = c0 + h0 y
  int64_t log_terms;
  const double* exp_coef;  // 1 / k!, k = 0 .. the Taylor degree
  int64_t exp_terms;
  double c0, h0, radius;
  double lower;  // the smallest eigenvalue of Y = (sym(W) - c0 I) / h0 the interpolant accepts
  int64_t max_squarings;
  PowerParams power;
};

constexpr int kGeodesicBuffers = 11;  // the geodesic kernel's buffers of the compute type (and 3 of double)
constexpr int64_t kSweepTerms = 31;  // the sweep's most series terms (SweepBlocks)
constexpr int kSweepBatch = 4;  // the sweep's points per Horner pass

// Doubles of work space for the geodesic kernel's n x n blocks of T, in a build of w doubles per
// vector (2 w floats). A wider build needs more, so the handlers ask for kMaxW's.
template <typename T>
constexpr size_t GeodesicWorkspace(int64_t n, int64_t w) {
  const int64_t lanes = w * 8 / static_cast<int64_t>(sizeof(T));
  return static_cast<size_t>(3 * n * RoundUp(n, w) + (kGeodesicBuffers * n * RoundUp(n, lanes) * sizeof(T) + 7) / 8);
}

// Doubles of work space for the sweep kernel: the geodesic kernel's, X, the M_k and the Horner
// pass's outputs.
template <typename T>
constexpr size_t SweepWorkspace(int64_t n, int64_t w) {
  return RoundUp(GeodesicWorkspace<T>(n, w), w) +
         static_cast<size_t>((kSweepTerms + kSweepBatch + 1) * n * RoundUp(n, w));
}

// ---- The builds ----
// On x86-64 with GCC the kernels are compiled twice, for AVX-512 ("wide") and for AVX2 with FMA
// ("narrow"), and every call picks one by the CPU (Isa). Elsewhere one portable build serves
// both names (for other CPUs it is untuned: Python uses it only with ORTHOFUSE_JAX_NATIVE=force).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ORTHOFUSE_TWO_BUILDS 1
#pragma GCC push_options
#pragma GCC target("avx512f")
#endif
namespace wide {
#define ORTHOFUSE_KW 8
#include "kernels.inc"
#undef ORTHOFUSE_KW
}  // namespace wide
#if defined(ORTHOFUSE_TWO_BUILDS)
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace narrow {
#define ORTHOFUSE_KW 4
#include "kernels.inc"
#undef ORTHOFUSE_KW
}  // namespace narrow
#pragma GCC pop_options
#else
namespace narrow = wide;
#endif

// Which build runs here: 2 the AVX-512 one, 1 the AVX2 one (also on an AVX-512 CPU when
// ORTHOFUSE_JAX_ISA=avx2, read at every call: tests and benchmarks compare the two), 0 none (an
// x86-64 CPU without AVX2 and FMA), -1 the portable one (not x86-64 with GCC).
int Isa() {
#if defined(ORTHOFUSE_TWO_BUILDS)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* want = std::getenv("ORTHOFUSE_JAX_ISA");
  const bool narrow_wanted = want != nullptr && std::strcmp(want, "avx2") == 0;
  if (__builtin_cpu_supports("avx512f") && !narrow_wanted) return 2;
  return avx2 ? 1 : 0;
#else
  return -1;
#endif
}

// The kernel of the build that runs here, or null where none does.
template <typename F>
F* Pick(F* wide_kernel, F* narrow_kernel) {
  const int isa = Isa();
  return isa == 2 || isa == -1 ? wide_kernel : isa == 1 ? narrow_kernel : nullptr;
}

ffi::Error NoBuild() {
  return ffi::Error::Internal(
      "orthofuse kernels: built for AVX-512F and for AVX2 with FMA, and this CPU has neither");
}

template <ffi::DataType DT, typename TIn = ffi::NativeType<DT>>
ffi::Error Solve(ffi::Buffer<DT> a, ffi::Buffer<DT> b, ffi::ResultBuffer<DT> x,
                 void (*kernel)(const TIn*, const TIn*, TIn*, int64_t, int64_t, int64_t, double*)) {
  if (kernel == nullptr) return NoBuild();
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
           end - begin, n, m, Workspace(static_cast<size_t>(n * RoundUp(n + m, kMaxW))));
  });
  return ffi::Error::Success();
}

template <ffi::DataType DT, typename TIn = ffi::NativeType<DT>>
ffi::Error Cayley(ffi::Buffer<DT> x1, ffi::Buffer<DT> x2, ffi::Buffer<DT> coef, ffi::ResultBuffer<DT> y,
                  ffi::ResultBuffer<ffi::PRED> bad,
                  void (*kernel)(const TIn*, const TIn*, const TIn*, TIn*, bool*, int64_t, int64_t, double*)) {
  if (kernel == nullptr) return NoBuild();
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
           Workspace(static_cast<size_t>(n * RoundUp(n, kMaxW))));
  });
  return ffi::Error::Success();
}

template <ffi::DataType DT, typename TIn = ffi::NativeType<DT>>
ffi::Error Point(ffi::Buffer<DT> a, ffi::Buffer<DT> b, ffi::Buffer<DT> v, ffi::Buffer<DT> cs, ffi::Buffer<DT> coef,
                 ffi::ResultBuffer<DT> y,
                 void (*kernel)(const TIn*, const TIn*, const TIn*, const TIn*, const TIn*, TIn*, int64_t, int64_t,
                                int64_t, int64_t, double*)) {
  if (kernel == nullptr) return NoBuild();
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
           end, blocks, n, Workspace(static_cast<size_t>(4 * n * RoundUp(n, kMaxW))));
  });
  return ffi::Error::Success();
}

// The polynomials' attributes as PolyParams (polynomial.kernel_attributes): log_coef, exp_coef,
// params = (c0, h0, radius, lower, max_squarings), power = (t_lo, t_hi, margin, lower, tiers,
// then c0, h0, terms per tier).
ffi::Error ReadPoly(const char* who, ffi::Span<const double> log_coef, ffi::Span<const double> exp_coef,
                    ffi::Span<const double> params, ffi::Span<const double> power, PolyParams* pp) {
  const bool sizes = log_coef.size() >= 1 && exp_coef.size() >= 1 && params.size() == 5 && power.size() >= 5;
  const int64_t tiers = sizes ? static_cast<int64_t>(power[4]) : -1;
  if (!sizes || tiers < 0 || tiers > kMaxPowerTiers || static_cast<int64_t>(power.size()) != 5 + 3 * tiers)
    return ffi::Error::InvalidArgument(std::string(who) +
                                       ": log_coef, exp_coef, params [5] and power [5 + 3 tiers] (at most 4) needed");
  *pp = PolyParams{log_coef.begin(), static_cast<int64_t>(log_coef.size()), exp_coef.begin(),
                   static_cast<int64_t>(exp_coef.size()), params[0], params[1], params[2], params[3],
                   static_cast<int64_t>(params[4]), PowerParams{power[0], power[1], power[2], power[3], tiers, {}}};
  for (int64_t q = 0; q < tiers; ++q) {
    const double* tq = power.begin() + 5 + 3 * q;
    const int64_t terms = static_cast<int64_t>(tq[2]);
    if (terms < 1 || terms > kMaxPowerTerms)
      return ffi::Error::InvalidArgument(std::string(who) + ": a power tier has 1 to 32 terms");
    pp->power.tier[q] = PowerTier{tq[0], tq[1], terms};
  }
  return ffi::Error::Success();
}

template <ffi::DataType DT, typename TIn = ffi::NativeType<DT>>
ffi::Error Geodesic(ffi::Buffer<DT> x1, ffi::Buffer<DT> x2, ffi::Buffer<DT> coef, ffi::Span<const double> log_coef,
                    ffi::Span<const double> exp_coef, ffi::Span<const double> params, ffi::Span<const double> power,
                    ffi::ResultBuffer<DT> y,
                    ffi::ResultBuffer<ffi::PRED> bad, ffi::ResultBuffer<ffi::PRED> ok,
                    void (*kernel)(const TIn*, const TIn*, const TIn*, TIn*, bool*, bool*, int64_t, int64_t,
                                   const PolyParams&, double*)) {
  if (kernel == nullptr) return NoBuild();
  auto d1 = x1.dimensions();
  auto d2 = x2.dimensions();
  auto dc = coef.dimensions();
  const size_t rank = d1.size();
  const char* shapes = "orthofuse_geodesic: x1, x2 [..., n, n] and coef [..., 5] needed";
  if (rank < 2 || d2.size() != rank || dc.size() != rank - 1) return ffi::Error::InvalidArgument(shapes);
  const int64_t n = d1[rank - 1];
  if (d1[rank - 2] != n || d2[rank - 2] != n || d2[rank - 1] != n || dc[rank - 2] != 5)
    return ffi::Error::InvalidArgument(shapes);
  PolyParams pp;
  if (ffi::Error e = ReadPoly("orthofuse_geodesic", log_coef, exp_coef, params, power, &pp); e.failure()) return e;
  int64_t batch = 1;
  for (size_t i = 0; i + 2 < rank; ++i) {
    if (d1[i] != d2[i] || d1[i] != dc[i]) return ffi::Error::InvalidArgument("orthofuse_geodesic: batch shapes differ");
    batch *= d1[i];
  }
  if (batch == 0 || n == 0) return ffi::Error::Success();
  ParallelFor(batch, 12 * n * n * n, [&](int64_t begin, int64_t end) {
    Prefault(y->typed_data() + begin * n * n, static_cast<size_t>((end - begin) * n * n) * sizeof(TIn));
    kernel(x1.typed_data() + begin * n * n, x2.typed_data() + begin * n * n, coef.typed_data() + 5 * begin,
           y->typed_data() + begin * n * n, bad->typed_data() + begin, ok->typed_data() + begin, end - begin, n, pp,
           Workspace(GeodesicWorkspace<TIn>(n, kMaxW)));
  });
  return ffi::Error::Success();
}

template <ffi::DataType DT, typename TIn = ffi::NativeType<DT>>
ffi::Error Sweep(ffi::Buffer<DT> x1, ffi::Buffer<DT> x2, ffi::Buffer<DT> pts, ffi::Span<const double> log_coef,
                 ffi::Span<const double> exp_coef, ffi::Span<const double> params, ffi::Span<const double> power,
                 ffi::Span<const double> flags, ffi::ResultBuffer<DT> y, ffi::ResultBuffer<ffi::PRED> bad, ffi::ResultBuffer<ffi::PRED> ok,
                 void (*kernel)(const TIn*, const TIn*, const TIn*, TIn*, bool*, bool*, int64_t, int64_t, int64_t,
                                int64_t, int64_t, int, bool, bool, const PolyParams&, double*)) {
  if (kernel == nullptr) return NoBuild();
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
  if (flags.size() != 3) return ffi::Error::InvalidArgument("orthofuse_sweep: flags [3] needed");
  PolyParams pp;
  if (ffi::Error e = ReadPoly("orthofuse_sweep", log_coef, exp_coef, params, power, &pp); e.failure()) return e;
  if (groups * per * nt == 0 || n == 0) return ffi::Error::Success();
  const int restore = static_cast<int>(flags[0]);
  ParallelFor(groups * per, (28 + 2 * nt) * n * n * n, [&](int64_t begin, int64_t end) {
    kernel(x1.typed_data(), x2.typed_data(), pts.typed_data(), y->typed_data(), bad->typed_data(), ok->typed_data(),
           begin, end, per, nt, n, restore, flags[1] != 0, flags[2] != 0, pp,
           Workspace(SweepWorkspace<TIn>(n, kMaxW)));
  });
  return ffi::Error::Success();
}

}  // namespace

// ---- The FFI handlers ----
// Each kernel's arguments, attributes and results for the dtype DT: ORTHOFUSE_BIND_<Kernel>(DT).
#define ORTHOFUSE_BIND_Solve(DT) \
  ffi::Ffi::Bind().Arg<ffi::Buffer<DT>>().Arg<ffi::Buffer<DT>>().Ret<ffi::Buffer<DT>>()
#define ORTHOFUSE_BIND_Cayley(DT)  \
  ffi::Ffi::Bind()                 \
      .Arg<ffi::Buffer<DT>>()      \
      .Arg<ffi::Buffer<DT>>()      \
      .Arg<ffi::Buffer<DT>>()      \
      .Ret<ffi::Buffer<DT>>()      \
      .Ret<ffi::Buffer<ffi::PRED>>()
#define ORTHOFUSE_BIND_Point(DT) \
  ffi::Ffi::Bind()               \
      .Arg<ffi::Buffer<DT>>()    \
      .Arg<ffi::Buffer<DT>>()    \
      .Arg<ffi::Buffer<DT>>()    \
      .Arg<ffi::Buffer<DT>>()    \
      .Arg<ffi::Buffer<DT>>()    \
      .Ret<ffi::Buffer<DT>>()
// The geodesic kernels' arguments: X1, X2, the coefficients / points, and the polynomials; their
// results: Y, bad, ok.
#define ORTHOFUSE_POLY_ARGS(DT)                  \
  ffi::Ffi::Bind()                               \
      .Arg<ffi::Buffer<DT>>()                    \
      .Arg<ffi::Buffer<DT>>()                    \
      .Arg<ffi::Buffer<DT>>()                    \
      .Attr<ffi::Span<const double>>("log_coef") \
      .Attr<ffi::Span<const double>>("exp_coef") \
      .Attr<ffi::Span<const double>>("params")   \
      .Attr<ffi::Span<const double>>("power")
#define ORTHOFUSE_Y_BAD_OK(DT) .Ret<ffi::Buffer<DT>>().Ret<ffi::Buffer<ffi::PRED>>().Ret<ffi::Buffer<ffi::PRED>>()
#define ORTHOFUSE_BIND_Geodesic(DT) ORTHOFUSE_POLY_ARGS(DT) ORTHOFUSE_Y_BAD_OK(DT)
#define ORTHOFUSE_BIND_Sweep(DT) \
  ORTHOFUSE_POLY_ARGS(DT).Attr<ffi::Span<const double>>("flags") ORTHOFUSE_Y_BAD_OK(DT)

// The handler Orthofuse<Kernel><D>, D = F32 or F64 (the name ffi::D shares with the kernels'
// entry points in kernels.inc): <Kernel><ffi::D> above on the decoded arguments and the entry
// point <Kernel><D> of the build that runs here (Pick, at every call), bound by
// ORTHOFUSE_BIND_<Kernel>(ffi::D). ORTHOFUSE_HANDLERS(Kernel) defines both dtypes' handlers.
#define ORTHOFUSE_HANDLER(Kernel, D)                                                          \
  namespace {                                                                                 \
  constexpr auto Kernel##D##Impl = [](auto... args) {                                         \
    return Kernel<ffi::D>(args..., Pick(wide::Kernel##D, narrow::Kernel##D));                 \
  };                                                                                          \
  }                                                                                           \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(Orthofuse##Kernel##D, Kernel##D##Impl, ORTHOFUSE_BIND_##Kernel(ffi::D))
#define ORTHOFUSE_HANDLERS(Kernel) \
  ORTHOFUSE_HANDLER(Kernel, F32);  \
  ORTHOFUSE_HANDLER(Kernel, F64)

ORTHOFUSE_HANDLERS(Solve);
ORTHOFUSE_HANDLERS(Cayley);
ORTHOFUSE_HANDLERS(Point);
ORTHOFUSE_HANDLERS(Geodesic);
ORTHOFUSE_HANDLERS(Sweep);

// Which build of the kernels runs on this CPU (Isa): 2 AVX-512, 1 AVX2, 0 none, -1 the portable
// one. Python registers the kernels where it is 1 or 2 (orthofuse_jax._native.isa).
extern "C" __attribute__((visibility("default"))) int OrthofuseIsa() { return Isa(); }
