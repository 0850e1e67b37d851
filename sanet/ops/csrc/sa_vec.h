// Vector helpers of the fused Shuffle Attention CPU kernels (see shuffle_attention.cpp):
// sigmoid, reciprocal, streaming stores, plane reductions and plane statistics.

#pragma once

#include "sa_io.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;
using at::vec::Vectorized;

// Outputs at least this large go around the cache: no read-for-ownership of lines that are
// overwritten anyway (the next layer reads them back at streaming speed).
constexpr int64_t kStreamBytes = 8 << 20;


// 1 / d. For float on AVX-512: the 14-bit hardware estimate plus one Newton step (relative
// error ~1e-7; saturated gates are checked by the tests), a fraction of a division's cost.
// d >= 1 and finite there (its caller clamps), so no zero, denormal or infinite cases.
template <typename T>
inline Vectorized<T> recip(const Vectorized<T>& d) {
  return Vectorized<T>(static_cast<T>(1)) / d;
}
#if defined(CPU_CAPABILITY_AVX512)
template <>
inline Vectorized<float> recip(const Vectorized<float>& d) {
  const __m512 r = _mm512_rcp14_ps(d);
  return Vectorized<float>(_mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f))));
}
#endif
// (No AVX2 estimate: _mm256_rcp_ps has 12 bits, and one Newton step need not give 1 / 1 == 1
// (from rcp(1) = 1 - 2^-12 it gives 1 - 2^-24). A saturated gate then had a spurious slope
// s (1 - s) that, times large gate weights, was 6e-4 relative error in sweight's gradient
// (measured; with a division, 3e-6 as the reference). Two Newton steps fix that but measured
// no faster than the division here (1.00x - 1.04x the forward's time, 8x1024x14x14). AVX2
// divides.)

// sigmoid(u). exp_u20 is ATen's polynomial exp (<= 20 ulp) for float and the exact exp for
// double; past u < -88 it is inf, and the division makes the gate 0 (an estimate-plus-Newton
// reciprocal would make it NaN: 0 * inf). A NaN u stays NaN: the AVX2 exp_u20 clamps its
// argument with max/min, which turn NaN into a finite number.
template <typename T>
inline Vectorized<T> vsigmoid(const Vectorized<T>& u) {
  const Vectorized<T> one(static_cast<T>(1));
  return Vectorized<T>::blendv(recip<T>(one + u.neg().exp_u20()), u, u != u);
}

template <typename T>
inline T ssigmoid(T u) { return T(1) / (T(1) + std::exp(-u)); }

// The centre m rounded to T, and B corrected for the rounding (in double): on a plane whose
// |mean| >> std, m's rounding is a visible fraction of the spread (3e-5 std at 1000 std).
template <typename T>
inline T centre(double m) { return static_cast<T>(m); }
template <typename T>
inline double recentred(double a, double b, double m) { return b + a * (double(centre<T>(m)) - m); }

// sigmoid(A * (x - m) + B) of a vector x, A, B and m fixed for a plane.
template <typename T>
struct SigmoidOfAffine {
  Vectorized<T> A, B, m;
  SigmoidOfAffine(double a, double b, double m_)
      : A(static_cast<T>(a)), B(static_cast<T>(recentred<T>(a, b, m_))), m(centre<T>(m_)) {}
  Vectorized<T> operator()(const Vectorized<T>& x) const { return centred(x - m); }
  Vectorized<T> centred(const Vectorized<T>& d) const { return vsigmoid<T>(at::vec::fmadd(d, A, B)); }
};

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// The degree-5 minimax polynomial of 2^f on [-1/2, 1/2], highest degree first.
constexpr float kExp2Poly[6] = {1.3280885586872855e-3f, 9.6770640621393900e-3f, 5.5507119869197630e-2f,
                                2.4022086700656310e-1f, 6.9314695653010520e-1f, 1.0000000797972342f};
#endif

#if defined(CPU_CAPABILITY_AVX512)
// Same, with 1 / (1 + 2^t), t = -(A (x - m) + B) log2(e) in one FMA, and
// 2^t = 2^round(t) * p(t - round(t)) by vscalefps; p is the degree-5 minimax polynomial of
// 2^f on [-1/2, 1/2] (relative error 8e-8, 2e-7 evaluated in float). About half the
// instructions of exp_u20.
template <>
struct SigmoidOfAffine<float> {
  __m512 A, B, m;
  SigmoidOfAffine(double a, double b, double m_)
      : A(_mm512_set1_ps(static_cast<float>(-a * M_LOG2E))),
        B(_mm512_set1_ps(static_cast<float>(-recentred<float>(a, b, m_) * M_LOG2E))),
        m(_mm512_set1_ps(centre<float>(m_))) {}
  Vectorized<float> operator()(const Vectorized<float>& x) const {
    return centred(Vectorized<float>(_mm512_sub_ps(x, m)));
  }
  Vectorized<float> centred(const Vectorized<float>& d) const {
    // Only the upper side is clamped (2^t must stay finite for recip's Newton step); below,
    // scalef underflows to 0 and the gate is exactly 1. t is finite: |x - m| <= sqrt(M) std.
    // min(126, t), not min(t, 126): vminps returns its second operand when either is NaN, and
    // a NaN must reach the output as the reference's would.
    const __m512 t = _mm512_min_ps(_mm512_set1_ps(126.f), _mm512_fmadd_ps(d, A, B));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(kExp2Poly[0]);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[1]));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[2]));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[3]));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[4]));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[5]));
    return recip<float>(Vectorized<float>(_mm512_add_ps(_mm512_scalef_ps(p, n), _mm512_set1_ps(1.f))));
  }
};
#elif defined(CPU_CAPABILITY_AVX2)
// The same on AVX2, which has no vscalefps: t is clamped to [-126, 126] on both sides and
// 2^round(t) is built in the exponent bits. Below -126 the gate is exactly 1 (1 + 2^-126
// rounds to 1), as exp_u20's would be. In place of exp_u20's range reduction and clamps:
// 0.87x - 0.93x the forward's time of an (8, 1024, 14, 14) layer (A/B of two builds, one process).
template <>
struct SigmoidOfAffine<float> {
  __m256 A, B, m;
  SigmoidOfAffine(double a, double b, double m_)
      : A(_mm256_set1_ps(static_cast<float>(-a * M_LOG2E))),
        B(_mm256_set1_ps(static_cast<float>(-recentred<float>(a, b, m_) * M_LOG2E))),
        m(_mm256_set1_ps(centre<float>(m_))) {}
  Vectorized<float> operator()(const Vectorized<float>& x) const {
    return centred(Vectorized<float>(_mm256_sub_ps(x, m)));
  }
  Vectorized<float> centred(const Vectorized<float>& d) const {
    // Constant first: vminps/vmaxps return their second operand when either is NaN, so a NaN
    // t stays NaN to the output (its exponent bits below come out as those of 1.0).
    __m256 t = _mm256_min_ps(_mm256_set1_ps(126.f), _mm256_fmadd_ps(d, A, B));
    t = _mm256_max_ps(_mm256_set1_ps(-126.f), t);
    const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(t, n);
    __m256 p = _mm256_set1_ps(kExp2Poly[0]);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[1]));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[2]));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[3]));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[4]));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[5]));
    const __m256 two_n = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
    return recip<float>(Vectorized<float>(_mm256_fmadd_ps(p, two_n, _mm256_set1_ps(1.f))));
  }
};
#endif

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i);
}

// out[i] = f(i, n) over one plane in vector chunks (n = lanes valid; f gives compute_t<S>
// lanes). With Stream, the head is peeled until out is vector-aligned, then stores bypass the
// cache.
template <typename S, bool Stream, typename F>
inline void map_plane(S* out, int64_t M, F&& f) {
  constexpr int64_t W = Vectorized<compute_t<S>>::size();
  int64_t i = 0;
  if constexpr (Stream) {
    const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out) / sizeof(S)) % W;
    if (mis) {
      i = std::min<int64_t>(W - mis, M);
      vstore(out, f(int64_t(0), i), i);
    }
    for (; i + W <= M; i += W) stream_store<S>(out + i, f(i, W));
  }
  for (; i < M; i += W) {
    const int64_t n = std::min<int64_t>(W, M - i);
    vstore(out + i, f(i, n), n);
  }
}

template <typename T>
inline double hsum(const Vectorized<T>& v) {
  return static_cast<double>(at::vec::vec_reduce_all<T>(
      [](const Vectorized<T>& a, const Vectorized<T>& b) { return a + b; }, v));
}
#if defined(CPU_CAPABILITY_AVX512)
template <>
inline double hsum(const Vectorized<float>& v) { return _mm512_reduce_add_ps(v); }
#endif

// A vector sum over a plane, moved into a double every kFlush additions. A float accumulator
// alone drifts by up to ~M/W ulps over a large plane (512x512: 1e-3 relative), which the
// cancelling gradient sums turn into visible errors; in blocks it stays near pairwise-sum
// accuracy, as PyTorch's reductions are.
template <typename T>
struct PlaneSum {
  static constexpr int kFlush = 64;
  Vectorized<T> v{static_cast<T>(0)};
  double total = 0;
  int count = 0;
  void add(const Vectorized<T>& x) {
    v += x;
    bump();
  }
  void fmadd(const Vectorized<T>& a, const Vectorized<T>& b) {
    v = at::vec::fmadd(a, b, v);
    bump();
  }
  double sum() const { return total + hsum<T>(v); }

 private:
  void bump() {
    if (++count == kFlush) {
      total += hsum<T>(v);
      v = Vectorized<T>(static_cast<T>(0));
      count = 0;
    }
  }
};

// Mean and population variance of one plane: two passes (the second hits L1). The last
// partial vector is loaded masked (zero-filled), and masked again where zeros would count.
// The first pass sums x - shift: T-lanes summing x itself lose the mean's low bits when
// |mean| >> std (1e-5 of std at mean/std = 1000 on a 64x64 plane), and the mean centres the
// gate. The shift is a per-channel constant, BatchNorm's running mean in eval (what x is
// normalised by), else 0: never a data element (an outlier there would be added to every
// lane, an inf there make the plane NaN). The second pass, which the variance needs anyway,
// also sums x - m (m: the first pass's mean, rounded to T) and corrects the mean with it.
// Without need_var (a channel-branch plane, which only pools) var is 0 and the first pass's
// mean is kept. (16-bit S: the sums are in float, as the float kernel's on the same values.)
template <typename S>
inline void plane_moments(const S* p, int64_t M, double& mean, double& var, bool need_var = true,
                          compute_t<S> shift = 0) {
  using T = compute_t<S>;
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V zero(static_cast<T>(0)), vs(shift);
  PlaneSum<T> a0, a1;
  int64_t i = 0;
  for (; i + 2 * W <= M; i += 2 * W) {
    a0.add(vload(p + i) - vs);
    a1.add(vload(p + i + W) - vs);
  }
  for (; i < M; i += W) {
    const int64_t n = std::min<int64_t>(W, M - i);
    a0.add(V::set(zero, vload(p + i, n) - vs, n));
  }
  mean = double(shift) + (a0.sum() + a1.sum()) / M;
  var = 0.0;
  if (!need_var) return;
  const V vm(static_cast<T>(mean));
  PlaneSum<T> q0, q1, s0;
  for (i = 0; i + 2 * W <= M; i += 2 * W) {
    const V d0 = vload(p + i) - vm, d1 = vload(p + i + W) - vm;
    q0.fmadd(d0, d0);
    q1.fmadd(d1, d1);
    s0.add(d0 + d1);
  }
  for (; i < M; i += W) {
    const int64_t n = std::min<int64_t>(W, M - i);
    const V d = V::set(zero, vload(p + i, n) - vm, n);
    q0.fmadd(d, d);
    s0.add(d);
  }
  const double correction = s0.sum() / M;  // mean - m
  if (std::isfinite(correction)) {
    mean = double(static_cast<T>(mean)) + correction;
    var = std::max(0.0, (q0.sum() + q1.sum()) / M - correction * correction);
  } else {  // inf or NaN in the plane: the first pass's mean says so already
    var = (q0.sum() + q1.sum()) / M;
  }
}

}  // namespace
