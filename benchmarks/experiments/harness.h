// The inputs of the C++ harnesses (isa_clones.cc, stages.cc), included after solve.cc: the
// command line DIR N REPS BATCH, the kernels' attributes DIR/attrs.txt (the log and exp
// polynomials and the power's tiers, as polynomial.kernel_attributes writes them: a count, then
// the values, per line) and the blocks DIR/x1_N.bin, DIR/x2_N.bin (BATCH float32 blocks of N x N
// raw parameters), as isa_clones.py's _inputs writes them.
#include <xmmintrin.h>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

namespace {  // as solve.cc's PolyParams

struct HarnessInputs {
  int n = 0, reps = 0;
  int64_t batch = 0;
  std::vector<double> lc, ec, pr, pw;  // pp points into these
  PolyParams pp;
  std::vector<float> x1, x2;
};

std::vector<double> ReadValues(std::ifstream& f) {
  int n = 0;
  f >> n;
  std::vector<double> v(n);
  for (auto& x : v) f >> x;
  return v;
}

// False (with a message) where the attributes do not parse. Also sets flush-to-zero and
// denormals-are-zero, as XLA does.
bool LoadInputs(char** argv, const char* who, HarnessInputs* in) {
  _mm_setcsr(_mm_getcsr() | 0x8040);
  const std::string dir = argv[1];
  in->n = std::atoi(argv[2]);
  in->reps = std::atoi(argv[3]);
  in->batch = std::atoll(argv[4]);
  std::ifstream fa(dir + "/attrs.txt");
  in->lc = ReadValues(fa);
  in->ec = ReadValues(fa);
  in->pr = ReadValues(fa);
  in->pw = ReadValues(fa);
  if (ReadPoly(who, in->lc, in->ec, in->pr, in->pw, &in->pp).failure()) {
    std::fprintf(stderr, "%s: %s/attrs.txt does not hold the kernels' attributes\n", who, dir.c_str());
    return false;
  }
  const int64_t size = in->batch * in->n * in->n;
  for (auto [name, v] : {std::pair{"x1", &in->x1}, std::pair{"x2", &in->x2}}) {
    v->resize(size);
    std::ifstream f(dir + "/" + name + "_" + std::to_string(in->n) + ".bin", std::ios::binary);
    f.read(reinterpret_cast<char*>(v->data()), v->size() * sizeof(float));
  }
  return true;
}

}  // namespace
