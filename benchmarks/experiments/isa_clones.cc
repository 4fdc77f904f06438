// Times the compiled fast merge (CayleyF32) and exact merge (GeodesicF32) per block on one core,
// built from orthofuse_jax/_native/solve.cc or a copy the driver (isa_clones.py) edited (SRC),
// calling the build BUILD (wide: AVX-512, narrow: AVX2). Inputs: DIR/attrs.txt (the log and
// exp polynomials and the power's tiers, as polynomial.kernel_attributes), DIR/x1_N.bin and
// DIR/x2_N.bin (B float32 blocks of N x N raw parameters).
#include <xmmintrin.h>
#include SRC
#ifndef BUILD
#define BUILD wide
#endif
#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

static std::vector<double> Read(std::ifstream& f) {
  int n;
  f >> n;
  std::vector<double> v(n);
  for (auto& x : v) f >> x;
  return v;
}

int main(int argc, char** argv) {
  _mm_setcsr(_mm_getcsr() | 0x8040);  // flush-to-zero and denormals-are-zero, as XLA sets them
  const std::string dir = argv[1];
  const int n = std::atoi(argv[2]), reps = std::atoi(argv[3]);
  const int64_t batch = std::atoll(argv[4]);
  std::ifstream fa(dir + "/attrs.txt");
  auto lc = Read(fa), ec = Read(fa), pr = Read(fa), pw = Read(fa);
  // argv[5] == "log_exp": the exact merge without its direct power (the log and the exponential)
  const bool log_exp = argc > 5 && std::string(argv[5]) == "log_exp";
  PolyParams pp;
  if (ReadPoly("isa_clones", lc, ec, pr, pw, &pp).failure()) return 1;
  if (log_exp) pp.power.tiers = 0;
  std::vector<float> x1(batch * n * n), x2(batch * n * n);
  for (auto [name, v] : {std::pair{"x1", &x1}, std::pair{"x2", &x2}}) {
    std::ifstream f(dir + "/" + name + "_" + std::to_string(n) + ".bin", std::ios::binary);
    f.read(reinterpret_cast<char*>(v->data()), v->size() * sizeof(float));
  }
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
