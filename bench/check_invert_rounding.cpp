// Checks csrc/zo_noise.h's invert_rounding against the spec's literal form (reference.invert_rounding written with
// the same header ops) for every bf16 and fp16 storage value w and, per w, a set of shifts d: random float32 of
// every magnitude that matters, and the adversarial ones that put y = w - d on or next to a rounding tie of every
// nearby storage value. Build and run (CPU, ~1 minute):
//   g++ -O2 -ffp-contract=off -fno-fast-math -std=c++17 -Icsrc bench/check_invert_rounding.cpp -o /tmp/cir && /tmp/cir
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "zo_noise.h"

using namespace mazo;

template <int DT>
float spec_invert_rounding(float w, float d) {  // reference.invert_rounding, op by op
  using S = Storage<DT>;
  using bits_t = typename S::bits_t;
  constexpr uint32_t SIGN = 0x8000u;
  const float y = fsub(w, d);
  const uint32_t b0 = S::rne(y);
  const float c0 = S::to_f32((bits_t)b0);
  if (!std::isfinite(c0) || y == c0) return c0;
  const bool mag_up = (y > c0) == (c0 > 0.f);
  const uint32_t b1 = c0 == 0.f ? ((y < 0.f ? SIGN : 0u) | 1u) : (mag_up ? b0 + 1u : b0 - 1u);
  const float c1 = S::to_f32((bits_t)b1);
  const uint32_t wb = S::rne(w);
  const bool ok0 = (uint32_t)S::rne(fadd(c0, d)) == wb;
  const bool ok1 = (uint32_t)S::rne(fadd(c1, d)) == wb;
  return (ok1 && (!ok0 || (b1 & 1u) == 0u)) ? c1 : c0;
}

template <int DT>
long long check(const char* name, int n_random) {
  using S = Storage<DT>;
  using bits_t = typename S::bits_t;
  std::mt19937_64 rng(12345 + DT);
  long long cases = 0, bad = 0;
  std::vector<float> ds;
  for (uint32_t wb = 0; wb < 65536u; ++wb) {
    const float w = S::to_f32((bits_t)wb);
    ds.clear();
    for (int i = 0; i < n_random; ++i) {  // |d| from 2^-40 to 2^20 (log-uniform), either sign, random mantissa
      const uint32_t e = 87u + (uint32_t)(rng() % 61u), m = (uint32_t)(rng() & 0x7FFFFFu), s = (uint32_t)(rng() & 1u);
      ds.push_back(u2f((s << 31) | (e << 23) | m));
    }
    if (std::isfinite(w)) {
      // y near every tie point and storage value within 40 steps of w (both directions): d = w - t, t and its
      // float32 neighbours, so that y = fl(w - d) hits or just misses the ties
      for (int k = -40; k <= 40; ++k) {
        const int64_t cb = (int64_t)wb + k;
        if (cb < 0 || cb > 0xFFFF) continue;
        const float c = S::to_f32((bits_t)cb), cn = S::to_f32((bits_t)(cb + 1 > 0xFFFF ? cb : cb + 1));
        if (!std::isfinite(c) || !std::isfinite(cn)) continue;
        const float mid = (float)(((double)c + (double)cn) / 2.0);
        for (float t : {c, mid}) {
          float tt = t;
          for (int j = 0; j < 3; ++j) tt = std::nextafter(tt, -INFINITY);
          for (int j = 0; j < 7; ++j, tt = std::nextafter(tt, INFINITY)) {
            ds.push_back((float)((double)w - (double)tt));
            ds.push_back(fsub(w, tt));
          }
        }
      }
    }
    for (float d : ds) {
      if (!std::isfinite(d)) continue;
      const float a = invert_rounding<DT>(w, d), b = spec_invert_rounding<DT>(w, d);
      ++cases;
      if (f2u(a) != f2u(b) && !(a != a && b != b)) {
        if (bad < 10) std::printf("%s MISMATCH w=%a d=%a new=%a spec=%a\n", name, w, d, a, b);
        ++bad;
      }
    }
  }
  std::printf("%s: %lld cases, %lld mismatches\n", name, cases, bad);
  return bad;
}

int main() {
  // fp16_hw: the device's fp16 form (NaN handled once, then NaN-free conversions), here on the spec's conversions
  // bf16_hw: the device's bf16 form (neighbour from the truncation), here on the spec's conversions
  long long bad = check<DT_BF16>("bf16", 200) + check<DT_BF16_HW>("bf16_hw", 200) + check<DT_F16>("fp16", 200) +
                  check<DT_F16_HW>("fp16_hw", 200);
  std::printf(bad ? "FAILED\n" : "OK\n");
  return bad ? 1 : 0;
}
