/* Experiment (benchmarks/experiments/c_solve.py): how fast can the merges' small solves be on a CPU?

   solve_f32 solves A X = B for a batch of n x n A and n x m B (row-major, float32) without
   pivoting, which every matrix the Cayley maps invert allows (its symmetric part is positive
   definite). 16 blocks at a time are copied into an interleaved buffer t[n][n + m][16], so that
   the 16 blocks are the SIMD lanes, and reduced by Gauss-Jordan elimination in panels of P pivot
   rows: each other row gets one rank-P update per panel, so it passes through the cache n / P
   times instead of n. t needs n (n + m) 16 floats. Not used by the library. */
#include <stddef.h>
#define L 16
#ifndef P
#define P 4
#endif
__attribute__((target_clones("avx512f","avx2","default")))
void solve_f32(const float* a, const float* b, float* x, long batch, long n, long m, float* t) {
    const long w = n + m;
    for (long g = 0; g < batch; g += L) {
        const long lanes = batch - g < L ? batch - g : L;
        const float* as[L]; const float* bs[L];
        for (long l = 0; l < L; l++) {
            const long src = g + (l < lanes ? l : 0);
            as[l] = a + src * n * n; bs[l] = b + src * n * m;
        }
        for (long i = 0; i < n; i++) {
            float* ti = t + i * w * L;
            for (long l = 0; l < L; l++) {
                const float* ar = as[l] + i * n; const float* br = bs[l] + i * m;
                for (long j = 0; j < n; j++) ti[j * L + l] = ar[j];
                for (long j = 0; j < m; j++) ti[(n + j) * L + l] = br[j];
            }
        }
        for (long k0 = 0; k0 < n; k0 += P) {
            const long kp = n - k0 < P ? n - k0 : P;
            /* panel: Gauss-Jordan among rows k0..k0+kp-1 */
            for (long p = 0; p < kp; p++) {
                const long k = k0 + p;
                float* rk = t + k * w * L;
                float inv[L];
                for (long l = 0; l < L; l++) inv[l] = 1.0f / rk[k * L + l];
                for (long j = k + 1; j < w; j++)
                    for (long l = 0; l < L; l++) rk[j * L + l] *= inv[l];
                for (long q = 0; q < kp; q++) {
                    if (q == p) continue;
                    float* rq = t + (k0 + q) * w * L;
                    float f[L];
                    for (long l = 0; l < L; l++) f[l] = rq[k * L + l];
                    for (long j = k + 1; j < w; j++)
                        for (long l = 0; l < L; l++) rq[j * L + l] -= f[l] * rk[j * L + l];
                }
            }
            /* every other row: rank-kp update of the columns right of the panel */
            const long j0 = k0 + kp;
            for (long i = 0; i < n; i++) {
                if (i >= k0 && i < j0) continue;
                float* ri = t + i * w * L;
                float f[P][L];
                for (long p = 0; p < kp; p++)
                    for (long l = 0; l < L; l++) f[p][l] = ri[(k0 + p) * L + l];
                if (kp == P) {
                    for (long j = j0; j < w; j++) {
                        float acc[L];
                        for (long l = 0; l < L; l++) acc[l] = ri[j * L + l];
                        for (long p = 0; p < P; p++) {
                            const float* rp = t + ((k0 + p) * w + j) * L;
                            for (long l = 0; l < L; l++) acc[l] -= f[p][l] * rp[l];
                        }
                        for (long l = 0; l < L; l++) ri[j * L + l] = acc[l];
                    }
                } else {
                    for (long j = j0; j < w; j++)
                        for (long p = 0; p < kp; p++) {
                            const float* rp = t + ((k0 + p) * w + j) * L;
                            for (long l = 0; l < L; l++) ri[j * L + l] -= f[p][l] * rp[l];
                        }
                }
            }
        }
        if (lanes == L) {
            float* xs[L];
            for (long l = 0; l < L; l++) xs[l] = x + (g + l) * n * m;
            for (long i = 0; i < n; i++) {
                const float* ti = t + (i * w + n) * L;
                for (long l = 0; l < L; l++) {
                    float* xr = xs[l] + i * m;
                    for (long j = 0; j < m; j++) xr[j] = ti[j * L + l];
                }
            }
        } else {
            for (long l = 0; l < lanes; l++) {
                float* xp = x + (g + l) * n * m;
                for (long i = 0; i < n; i++)
                    for (long j = 0; j < m; j++) xp[i * m + j] = t[(i * w + n + j) * L + l];
            }
        }
    }
}
