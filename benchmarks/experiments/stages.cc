// Where a block's time goes in the compiled fast merge (CayleyBlocks) and exact merge
// (GeodesicBlocks, float32 input, the direct power, curve_over_id) of the AVX-512 build: the same
// steps, in the same order and buffers, with a clock read between them; and, as units, one
// inversion in double (GaussJordan), one float product (MulOut) and the range check (AboveLower)
// alone. Driven by stages.py; its inputs as harness.h reads them.
#include SRC
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "harness.h"

using Clock = std::chrono::steady_clock;

// Seconds since *t0, and *t0 <- now.
static inline double Lap(Clock::time_point* t0) {
  const auto t1 = Clock::now();
  const double s = std::chrono::duration<double>(t1 - *t0).count();
  *t0 = t1;
  return s;
}

enum Stage {
  kFastMix, kFastInv1, kFastInv2, kFastOut,  // the fast merge
  kCopyIn, kMaps, kRelW, kShifted, kPowers, kSeries, kKh, kU1E, kPolar, kRestorePrep, kRestoreInv, kOut,
  kUnitInv, kUnitMul, kUnitCheck, kStages
};
static const char* kNames[kStages] = {
    "fast: mix and I - S", "fast: inversion 1 (double)", "fast: skew, inversion 2 (double)",
    "fast: 2N - I out", "exact: copy in", "exact: 2 Cayley maps (double inversions)",
    "exact: W = U1^T U2 (copy, 1 product)", "exact: y, K and the LDL^T check",
    "exact: y^2, y^3, y^4 (3 products)", "exact: a_t, b_t series (4 products)",
    "exact: K b_t + a_t (1 product)", "exact: U1 W^t (1 product)", "exact: polar step (2 products)",
    "exact: restoration's I - f/2 skew(Y)", "exact: restoration's inversion (double)",
    "exact: 2N - I out", "unit: one inversion, double", "unit: one float product",
    "unit: the LDL^T check alone (AboveLower)"};

using namespace wide;

__attribute__((target("avx512f"), noinline)) void Run(const float* x1, const float* x2, float* y, int64_t batch,
                                                       int64_t n, const PolyParams& pp, double* work, double* acc) {
  typedef float T;
  const int64_t np = RoundW(n), nq = RoundLanes<T>(n), nn = n * nq;
  double* ud = work;
  double* vd2 = ud + n * np;
  double* sd = vd2 + n * np;
  T* u = reinterpret_cast<T*>(sd + n * np);
  T* v = u + nn;
  T* w = v + nn;
  T* r = w + nn;
  T* s[7];
  for (int i = 0; i < 7; ++i) s[i] = r + (i + 1) * nn;
  PowerCache cache;
  const double t = 0.6, f = 1.96;
  const PowerParams& pw = pp.power;
  auto t0 = Clock::now();
  for (int64_t g = 0; g < batch; ++g) {  // the fast merge, Cay(f/2 Cay(0.4 S1 + 0.6 S2))
    const float* a = x1 + g * n * n;
    const float* b = x2 + g * n * n;
    double* tt = ud;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) tt[i * np + j] = 0.4 * double(a[i * n + j]) + 0.6 * double(b[i * n + j]);
      for (int64_t j = n; j < np; ++j) tt[i * np + j] = 0;
    }
    IMinusSkew(tt, 1.0, n, np);
    acc[kFastMix] += Lap(&t0);
    GaussJordan<true>(tt, n, np);
    acc[kFastInv1] += Lap(&t0);
    IMinusSkew(tt, f, n, np);
    GaussJordan<true>(tt, n, np);
    acc[kFastInv2] += Lap(&t0);
    CayleyStreamOut(tt, n, np, y + g * n * n);
    acc[kFastOut] += Lap(&t0);
  }
  int declined = 0;
  for (int64_t g = 0; g < batch; ++g) {  // the exact merge, as GeodesicBlocks with restore = 1
    CopyBlock(x1 + g * n * n, n, ud, np, n);
    CopyBlock(x2 + g * n * n, n, vd2, np, n);
    acc[kCopyIn] += Lap(&t0);
    CayleyInPlace(ud, sd, 1.0, n, np);
    CayleyInPlace(vd2, sd, 1.0, n, np);
    acc[kMaps] += Lap(&t0);
    CopyBlock(ud, np, u, nq, n);
    CopyBlock(vd2, np, v, nq, n);
    MulTNOut(static_cast<const T*>(u), static_cast<const T*>(v), w, n, nq);
    acc[kRelW] += Lap(&t0);
    T *y1 = s[0], *y2 = s[1], *y3 = s[2], *y4 = s[3], *k = s[4], *tmp = s[6];
    int tier = 0;
    while (tier < pw.tiers && !ShiftedParts(static_cast<const T*>(w), y1, k, tmp, pw.tier[tier].c0, pw.tier[tier].h0,
                                            pw.lower, n, nq))
      ++tier;
    if (tier == pw.tiers) {
      ++declined;
      continue;
    }
    const double* ca = cache.Get(pw, tier, t);
    const double* cb = ca + kMaxPowerTerms;
    const int64_t terms = pw.tier[tier].terms;
    acc[kShifted] += Lap(&t0);
    MulOut(y1, y1, y2, n, nq);
    MulOut(y2, y1, y3, n, nq);
    MulOut(y2, y2, y4, n, nq);
    acc[kPowers] += Lap(&t0);
    const T* baby[4] = {nullptr, y1, y2, y3};
    const double* coef[2] = {ca, cb};
    T *h[2] = {r, s[5]}, *o[2] = {tmp, v};
    PatersonStockmeyer<2>(coef, terms, baby, 4, static_cast<const T*>(y4), h, o, n, nq);
    acc[kSeries] += Lap(&t0);
    MulOut(static_cast<const T*>(k), static_cast<const T*>(h[1]), r, n, nq, static_cast<const T*>(h[0]));
    acc[kKh] += Lap(&t0);
    MulOut(u, r, s[2], n, nq);
    acc[kU1E] += Lap(&t0);
    PolarBlock(s[2], r, s, n, nq);
    acc[kPolar] += Lap(&t0);
    CopyBlock(r, nq, ud, np, n);
    IMinusSkewVia(ud, sd, 0.5 * f, n, np);
    acc[kRestorePrep] += Lap(&t0);
    GaussJordan<true>(ud, n, np);
    acc[kRestoreInv] += Lap(&t0);
    CayleyStreamOut(ud, n, np, y + g * n * n);
    acc[kOut] += Lap(&t0);
  }
  for (int64_t g = 0; g < batch; ++g) {  // units
    CopyBlock(x1 + g * n * n, n, ud, np, n);
    IMinusSkew(ud, 1.0, n, np);
    Lap(&t0);
    GaussJordan<true>(ud, n, np);
    acc[kUnitInv] += Lap(&t0);
    CopyBlock(x1 + g * n * n, n, u, nq, n);
    CopyBlock(x2 + g * n * n, n, v, nq, n);
    Lap(&t0);
    MulOut(u, v, w, n, nq);
    acc[kUnitMul] += Lap(&t0);
    // the check on I + sym(w) / ||w||_F, whose eigenvalues are in [0, 2]: it runs to the end
    Transpose(w, s[0], n, nq);
    const float sc = 0.5f / std::sqrt(static_cast<float>(SumSquares(w, n, nq)));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < nq; ++j) s[1][i * nq + j] = j < n ? sc * (w[i * nq + j] + s[0][i * nq + j]) + (i == j) : 0;
    Lap(&t0);
    if (!AboveLower(s[1], -2.0, n, nq)) ++declined;
    acc[kUnitCheck] += Lap(&t0);
  }
  if (declined) std::fprintf(stderr, "%d blocks declined\n", declined);
}

int main(int, char** argv) {
  HarnessInputs in;
  if (!LoadInputs(argv, "stages", &in)) return 1;
  const int n = in.n, reps = in.reps;
  const int64_t batch = in.batch;
  const PolyParams& pp = in.pp;
  const std::vector<float>& x1 = in.x1;
  const std::vector<float>& x2 = in.x2;
  std::vector<float> y(batch * n * n);
  std::vector<double> work(GeodesicWorkspace<float>(n, kMaxW) + 64);
  double* wk = reinterpret_cast<double*>((reinterpret_cast<uintptr_t>(work.data()) + 63) / 64 * 64);
  // the minimum over repetitions of each stage's total, per block
  std::vector<double> best(kStages, 1e9);
  for (int rep = 0; rep < reps; ++rep) {
    std::vector<double> acc(kStages, 0.0);
    Run(x1.data(), x2.data(), y.data(), batch, n, pp, wk, acc.data());
    for (int i = 0; i < kStages; ++i) best[i] = std::min(best[i], acc[i] / batch);
  }
  std::printf("{\"n\": %d, \"us\": {", n);
  for (int i = 0; i < kStages; ++i) std::printf("%s\"%s\": %.4f", i ? ", " : "", kNames[i], best[i] * 1e6);
  std::printf("}}\n");
}
