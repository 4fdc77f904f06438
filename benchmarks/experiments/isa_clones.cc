// Times the compiled fast merge (CayleyF32) and exact merge (GeodesicF32) per block on one core,
// built from orthofuse_jax/_native/solve.cc or a copy the driver (isa_clones.py) edited (SRC),
// calling the build BUILD (wide: AVX-512, narrow: AVX2). Inputs: as harness.h reads them; an
// optional fifth argument "log_exp" switches the direct power off.
#include SRC
#ifndef BUILD
#define BUILD wide
#endif
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "harness.h"

int main(int argc, char** argv) {
  HarnessInputs in;
  if (!LoadInputs(argv, "isa_clones", &in)) return 1;
  const int n = in.n, reps = in.reps;
  const int64_t batch = in.batch;
  PolyParams pp = in.pp;
  // argv[5] == "log_exp": the exact merge without its direct power (the log and the exponential)
  if (argc > 5 && std::string(argv[5]) == "log_exp") pp.power.tiers = 0;
  const std::vector<float>& x1 = in.x1;
  const std::vector<float>& x2 = in.x2;
  // fast: Cay(f/2 Cay((1-t) S1 + t S2)) at t = 0.6 (f = 1.96); exact: the same t and restoration
  std::vector<float> cc(4 * batch), cg(5 * batch);
  for (int64_t g = 0; g < batch; ++g) {
    float* c = &cc[4 * g];
    c[0] = 0.4f, c[1] = 0.6f, c[2] = 1, c[3] = 1.96f;
    float* e = &cg[5 * g];
    e[0] = 0.6f, e[1] = 1.96f, e[2] = 1, e[3] = 0, e[4] = 0;
  }
  std::vector<float> y(batch * n * n);
  std::vector<char> bad(batch), ok(batch);
  std::vector<double> work(SweepWorkspace<float>(n, kMaxW) + 64);
  double fast = 1e9, exact = 1e9;
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    BUILD::CayleyF32(x1.data(), x2.data(), cc.data(), y.data(), (bool*)bad.data(), batch, n, work.data());
    auto t1 = std::chrono::steady_clock::now();
    BUILD::GeodesicF32(x1.data(), x2.data(), cg.data(), y.data(), (bool*)bad.data(), (bool*)ok.data(), batch, n, pp,
                work.data());
    auto t2 = std::chrono::steady_clock::now();
    fast = std::min(fast, std::chrono::duration<double>(t1 - t0).count());
    exact = std::min(exact, std::chrono::duration<double>(t2 - t1).count());
  }
  int declined = 0;
  for (char c : ok) declined += !c;
  std::printf("{\"n\": %d, \"fast_us\": %.3f, \"exact_us\": %.3f, \"declined\": %d}\n", n, fast * 1e6 / batch,
              exact * 1e6 / batch, declined);
}
