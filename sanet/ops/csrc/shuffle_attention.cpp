// Fused CPU kernels for Shuffle Attention (SA-Net, Zhang & Yang, ICASSP 2021).
//
// SA is a per-channel gate followed by a fixed permutation (SA-NET.md section 5):
//   y[n, P(c)] = z * sigmoid(A[n,c] * z + B[n,c]),   z = x[n, c]  (one (n, c) plane)
// so each plane is read once from memory for its statistics and then, while it is still
// in L1, again to write the output. Optionally a BatchNorm in front (z = a_c * x + b_c,
// batch or running statistics), a residual add and a ReLU behind are fused into the same
// passes: the tail of an SA-ResNet block (bn3 -> SA -> += shortcut -> ReLU).
//
// Threads (at::parallel_for, PyTorch's own pool) take planes in memory order, which keeps
// the hardware prefetcher streaming. Only training-mode BatchNorm, whose statistics are
// per channel over the batch, walks one channel's N planes at a time (they stay in L2;
// the next plane is prefetched by hand). Per-plane statistics and all reductions are in
// double (plane sums in the input type first); element-wise math is vectorised in the
// input type. Large outputs are written with streaming stores (no read-for-ownership).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;
using at::vec::Vectorized;

// Outputs at least this large go around the cache (they will not be re-read from it).
constexpr int64_t kStreamBytes = 16 << 20;

// ---------------------------------------------------------------- vector helpers

// 1 / d. For float: the hardware estimate plus one Newton step (relative error ~1e-7),
// a fraction of a division's cost. d >= 1 here, so no zero or denormal cases.
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
#elif defined(CPU_CAPABILITY_AVX2)
template <>
inline Vectorized<float> recip(const Vectorized<float>& d) {
  const __m256 r = _mm256_rcp_ps(d);
  return Vectorized<float>(_mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.f))));
}
#endif

// sigmoid(u). exp_u20 is ATen's polynomial exp (<= 20 ulp, saturating, no overflow) for
// float and the exact exp for double.
template <typename T>
inline Vectorized<T> vsigmoid(const Vectorized<T>& u) {
  const Vectorized<T> one(static_cast<T>(1));
  return recip<T>(one + u.neg().exp_u20());
}

template <typename T>
inline T ssigmoid(T u) { return T(1) / (T(1) + std::exp(-u)); }

template <typename T>
inline void stream_store(T* p, const Vectorized<T>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) _mm512_stream_ps(p, v); else _mm512_stream_pd(p, v);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) _mm256_stream_ps(p, v); else _mm256_stream_pd(p, v);
#else
  v.store(p);
#endif
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i);
}

// out[i] = f(i, n) over one plane in vector chunks (n = lanes valid). With Stream, the
// head is peeled until out is vector-aligned, then stores bypass the cache.
template <typename T, bool Stream, typename F>
inline void map_plane(T* out, int64_t M, F&& f) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  int64_t i = 0;
  if constexpr (Stream) {
    const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out) / sizeof(T)) % W;
    if (mis) {
      i = std::min<int64_t>(W - mis, M);
      f(int64_t(0), i).store(out, i);
    }
    for (; i + W <= M; i += W) stream_store<T>(out + i, f(i, W));
  }
  for (; i < M; i += W) {
    const int64_t n = std::min<int64_t>(W, M - i);
    f(i, n).store(out + i, n);
  }
}

template <typename T>
inline double hsum(const Vectorized<T>& v) {
  return static_cast<double>(at::vec::vec_reduce_all<T>(
      [](const Vectorized<T>& a, const Vectorized<T>& b) { return a + b; }, v));
}

// Mean and population variance of one plane: two passes (the second hits L1).
template <typename T>
inline void plane_moments(const T* p, int64_t M, double& mean, double& var) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  V a0(static_cast<T>(0)), a1(static_cast<T>(0));
  int64_t i = 0;
  for (; i + 2 * W <= M; i += 2 * W) {
    a0 += V::loadu(p + i);
    a1 += V::loadu(p + i + W);
  }
  for (; i + W <= M; i += W) a0 += V::loadu(p + i);
  double s = hsum<T>(a0 + a1);
  for (; i < M; ++i) s += p[i];
  mean = s / M;
  const V vm(static_cast<T>(mean));
  a0 = V(static_cast<T>(0));
  a1 = V(static_cast<T>(0));
  for (i = 0; i + 2 * W <= M; i += 2 * W) {
    const V d0 = V::loadu(p + i) - vm, d1 = V::loadu(p + i + W) - vm;
    a0 = at::vec::fmadd(d0, d0, a0);
    a1 = at::vec::fmadd(d1, d1, a1);
  }
  for (; i + W <= M; i += W) {
    const V d = V::loadu(p + i) - vm;
    a0 = at::vec::fmadd(d, d, a0);
  }
  double q = hsum<T>(a0 + a1);
  for (; i < M; ++i) q += (double(p[i]) - mean) * (double(p[i]) - mean);
  var = q / M;
}

// ---------------------------------------------------------------- SA geometry and gate

// G groups of 2c channels; the first c of a group are the channel branch, the last c the
// spatial branch; the 2-group shuffle sends input channel ch to out_channel(ch).
struct Layout {
  int64_t N, C, M, cg, cc, half;
  Layout(const Tensor& x, int64_t groups)
      : N(x.size(0)), C(x.size(1)), M(x.size(2)), cg(C / groups), cc(C / (2 * groups)), half(C / 2) {}
  int64_t out_channel(int64_t ch) const { return 2 * (ch % half) + ch / half; }
  int64_t param(int64_t ch) const { return (ch % cg) % cc; }
  bool spatial(int64_t ch) const { return (ch % cg) >= cc; }
};

// Rows of the (6, c) float64 parameter array.
struct Params {
  const double* p;
  int64_t cc;
  double cw(int64_t j) const { return p[j]; }
  double cb(int64_t j) const { return p[cc + j]; }
  double sw(int64_t j) const { return p[2 * cc + j]; }
  double sb(int64_t j) const { return p[3 * cc + j]; }
  double gw(int64_t j) const { return p[4 * cc + j]; }
  double gb(int64_t j) const { return p[5 * cc + j]; }
};

// Per-channel affine in front of SA: identity, or BatchNorm as z = a*x + b.
struct Affine {
  const double *w = nullptr, *b = nullptr, *mean = nullptr, *invstd = nullptr;
  bool active() const { return w != nullptr; }
  void at(int64_t ch, double& a, double& off) const {
    if (!w) { a = 1.0; off = 0.0; return; }
    a = w[ch] * invstd[ch];
    off = b[ch] - mean[ch] * a;
  }
};

// Gate of one plane: z = a*x + b, u = Az*z + Bz; Az == 0 means a constant gate.
struct Gate {
  double a, b, Az, Bz, rz, mz;
  double Ax() const { return Az * a; }
  double Bx() const { return Az * b + Bz; }
};

inline Gate plane_gate(const Layout& L, const Params& P, int64_t ch, double a, double b,
                       double mx, double vx, double eps) {
  const int64_t j = L.param(ch);
  Gate g{a, b, 0.0, 0.0, 0.0, a * mx + b};
  if (L.spatial(ch)) {
    // GroupNorm(c, c) of z normalises each plane; var(z) = a^2 var(x).
    g.rz = 1.0 / std::sqrt(a * a * vx + eps);
    g.Az = P.sw(j) * P.gw(j) * g.rz;
    g.Bz = P.sw(j) * (P.gb(j) - P.gw(j) * g.mz * g.rz) + P.sb(j);
  } else {
    g.Bz = P.cw(j) * g.mz + P.cb(j);  // global average pool of z
  }
  return g;
}

// ---------------------------------------------------------------- forward

// out = z * sigmoid(u) (+ shortcut) (ReLU) for one plane.
template <typename T, bool Stream>
void gate_plane(const T* x, T* out, const T* sc, int64_t M, const Gate& g, bool relu) {
  using V = Vectorized<T>;
  const V zero(static_cast<T>(0));
  auto finish = [&](V y, int64_t i, int64_t n) {
    if (sc) y = y + V::loadu(sc + i, n);
    return relu ? at::vec::maximum(y, zero) : y;
  };
  if (g.Az == 0.0) {  // channel branch, or sweight == 0: no exp per element
    const double s = ssigmoid(g.Bz);
    const V va(static_cast<T>(g.a * s)), vb(static_cast<T>(g.b * s));
    map_plane<T, Stream>(out, M, [&](int64_t i, int64_t n) {
      return finish(at::vec::fmadd(V::loadu(x + i, n), va, vb), i, n);
    });
    return;
  }
  const V va(static_cast<T>(g.a)), vb(static_cast<T>(g.b));
  const V vA(static_cast<T>(g.Ax())), vB(static_cast<T>(g.Bx()));
  map_plane<T, Stream>(out, M, [&](int64_t i, int64_t n) {
    const V xv = V::loadu(x + i, n);
    const V z = at::vec::fmadd(xv, va, vb);
    return finish(z * vsigmoid<T>(at::vec::fmadd(xv, vA, vB)), i, n);
  });
}

template <typename T>
struct Fwd {
  const Layout L;
  const Params P;
  const double eps;
  const T* x;
  const T* sc;
  T* out;
  double* pm;
  double* pv;
  bool relu, stream;

  void gate(int64_t n, int64_t ch, double a, double b) const {
    const int64_t k = n * L.C + ch;
    const Gate g = plane_gate(L, P, ch, a, b, pm[k], pv[k], eps);
    const int64_t dst = (n * L.C + L.out_channel(ch)) * L.M;
    const T* s = sc ? sc + dst : nullptr;
    if (stream)
      gate_plane<T, true>(x + k * L.M, out + dst, s, L.M, g, relu);
    else
      gate_plane<T, false>(x + k * L.M, out + dst, s, L.M, g, relu);
  }

  // Identity or given (running) statistics: every plane is independent.
  void planes(const Affine& bn) const {
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, L.M));
    at::parallel_for(0, L.N * L.C, grain, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t n = k / L.C, ch = k % L.C;
        plane_moments(x + k * L.M, L.M, pm[k], pv[k]);
        double a, b;
        bn.at(ch, a, b);
        gate(n, ch, a, b);
      }
      if (stream) stream_fence();
    });
  }

  // Training BatchNorm: one channel's N planes, statistics first, then the gates.
  void channels(const double* w, const double* bias, double bn_eps, double* bmean, double* bvar) const {
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, L.N * L.M));
    at::parallel_for(0, L.C, grain, [&](int64_t c0, int64_t c1) {
      for (int64_t ch = c0; ch < c1; ++ch) {
        for (int64_t n = 0; n < L.N; ++n) {
          const int64_t k = n * L.C + ch;
          if (n + 1 < L.N) prefetch(x + (k + L.C) * L.M, L.M * sizeof(T));
          plane_moments(x + k * L.M, L.M, pm[k], pv[k]);
        }
        // Batch statistics: exact merge of N equal-size planes.
        double s = 0, m2 = 0;
        for (int64_t n = 0; n < L.N; ++n) s += pm[n * L.C + ch];
        const double mean = s / L.N;
        for (int64_t n = 0; n < L.N; ++n) {
          const double d = pm[n * L.C + ch] - mean;
          m2 += pv[n * L.C + ch] + d * d;
        }
        bmean[ch] = mean;
        bvar[ch] = m2 / L.N;
        const double a = w[ch] / std::sqrt(bvar[ch] + bn_eps);
        for (int64_t n = 0; n < L.N; ++n) gate(n, ch, a, bias[ch] - mean * a);
      }
      if (stream) stream_fence();
    });
  }
};

// ---------------------------------------------------------------- backward

// Per-plane SA backward. go: gradient at the SA output (after the ReLU mask when fused).
// Returns dL/dz via writer(i, n, gz) and the sums the parameters need:
//   S1 = sum(gu), S2 = sum(gu * zhat) (spatial) or S1 * mean(z) (channel),
// with gu = dL/du = go * z * s * (1 - s), u the gate argument.
template <typename T>
struct PlaneGrad {
  double S1, S2;
};

template <typename T, typename Writer>
PlaneGrad<T> sa_plane_backward(const Layout& L, const Params& P, int64_t ch, const Gate& g,
                               const T* xr, const T* go, T* sig, Writer&& write) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const int64_t M = L.M;
  const V va(static_cast<T>(g.a)), vb(static_cast<T>(g.b)), one(static_cast<T>(1));
  const bool spatial = L.spatial(ch);
  const int64_t j = L.param(ch);
  double S1 = 0, Sgz = 0;
  const bool const_gate = g.Az == 0.0;
  const double s_const = const_gate ? ssigmoid(g.Bz) : 0.0;
  // Pass A: the sums (and the sigmoid, kept for pass B).
  {
    V acc1(static_cast<T>(0)), acc2(static_cast<T>(0));
    const V vA(static_cast<T>(g.Ax())), vB(static_cast<T>(g.Bx()));
    int64_t i = 0;
    if (const_gate) {
      // gu = go * z * s(1-s) with constant s: sum go*z (and go*z*z for the spatial branch).
      for (; i + W <= M; i += W) {
        const V gz = V::loadu(go + i) * at::vec::fmadd(V::loadu(xr + i), va, vb);
        acc1 += gz;
        acc2 = at::vec::fmadd(gz, at::vec::fmadd(V::loadu(xr + i), va, vb), acc2);
      }
      double s1 = hsum<T>(acc1), s2 = hsum<T>(acc2);
      for (; i < M; ++i) {
        const double z = g.a * xr[i] + g.b;
        s1 += double(go[i]) * z;
        s2 += double(go[i]) * z * z;
      }
      S1 = s_const * (1 - s_const) * s1;
      Sgz = s_const * (1 - s_const) * s2;
    } else {
      for (; i + W <= M; i += W) {
        const V xv = V::loadu(xr + i);
        const V z = at::vec::fmadd(xv, va, vb);
        const V s = vsigmoid<T>(at::vec::fmadd(xv, vA, vB));
        s.store(sig + i);
        const V gu = V::loadu(go + i) * z * s * (one - s);
        acc1 += gu;
        acc2 = at::vec::fmadd(gu, z, acc2);
      }
      S1 = hsum<T>(acc1);
      Sgz = hsum<T>(acc2);
      for (; i < M; ++i) {
        const double z = g.a * xr[i] + g.b;
        const double s = ssigmoid<double>(g.Ax() * xr[i] + g.Bx());
        sig[i] = static_cast<T>(s);
        const double gu = double(go[i]) * z * s * (1 - s);
        S1 += gu;
        Sgz += gu * z;
      }
    }
  }
  // dL/dz = go*s + Kgu*gu + K0 + Kz*z: the gate's own derivative plus the statistics'.
  double K0, Kgu = 0, Kz = 0, S2;
  if (spatial) {
    S2 = g.rz * (Sgz - g.mz * S1);  // sum(gu * zhat)
    Kgu = P.sw(j) * P.gw(j) * g.rz;  // == Az: GroupNorm backward with gzhat = gu*sw*gw
    K0 = -Kgu * S1 / M + Kgu * S2 * g.rz * g.mz / M;
    Kz = -Kgu * S2 * g.rz / M;
  } else {
    S2 = S1 * g.mz;
    K0 = P.cw(j) * S1 / M;  // the mean's gradient is uniform over the plane
  }
  // Pass B.
  const V vK0(static_cast<T>(K0)), vKgu(static_cast<T>(Kgu)), vKz(static_cast<T>(Kz));
  if (const_gate) {  // Kgu == Az == 0, hence Kz == 0
    const V vs(static_cast<T>(s_const));
    write([&](int64_t i, int64_t n) { return at::vec::fmadd(V::loadu(go + i, n), vs, vK0); });
  } else {
    write([&](int64_t i, int64_t n) {
      const V gv = V::loadu(go + i, n), s = V::loadu(sig + i, n);
      const V z = at::vec::fmadd(V::loadu(xr + i, n), va, vb);
      const V gu = gv * z * s * (one - s);
      return at::vec::fmadd(gv, s, at::vec::fmadd(vKgu, gu, at::vec::fmadd(vKz, z, vK0)));
    });
  }
  return {S1, S2};
}

template <typename T>
struct Bwd {
  const Layout L;
  const Params P;
  const double eps;
  const T* grad;
  const T* x;
  const double* pmean;
  const double* pvar;
  const T* out;  // saved output when the ReLU is fused (its mask), else null
  T* gx;
  T* gpre;       // gradient before the ReLU (= shortcut's), when fused
  double* S1;
  double* S2;
  double* Sg;    // per-plane sum(gz), sum(gz * x) for BatchNorm (or null)
  double* Sgx;
  bool stream;

  // Gradient at the SA output of plane (n, ch): through the recomputed ReLU mask.
  const T* sa_grad(int64_t n, int64_t ch) const {
    using V = Vectorized<T>;
    const int64_t dst = (n * L.C + L.out_channel(ch)) * L.M;
    if (!out) return grad + dst;
    const V zero(static_cast<T>(0));
    map_plane<T, false>(gpre + dst, L.M, [&](int64_t i, int64_t k) {
      return V::blendv(zero, V::loadu(grad + dst + i, k), V::loadu(out + dst + i, k) > zero);
    });
    return gpre + dst;
  }

  // One plane; writes scale * dL/dz (Stream: around the cache) and the BatchNorm sums.
  template <bool Stream>
  void plane(int64_t n, int64_t ch, double a, double b, double scale, T* sig) const {
    using V = Vectorized<T>;
    const int64_t k = n * L.C + ch;
    const Gate g = plane_gate(L, P, ch, a, b, pmean[k], pvar[k], eps);
    const T* xr = x + k * L.M;
    T* gxr = gx + k * L.M;
    V accg(static_cast<T>(0)), accgx(static_cast<T>(0));
    const V vscale(static_cast<T>(scale));
    const bool sums = Sg != nullptr;
    const auto r = sa_plane_backward<T>(L, P, ch, g, xr, sa_grad(n, ch), sig, [&](auto&& gz_at) {
      map_plane<T, Stream>(gxr, L.M, [&](int64_t i, int64_t m) {
        const V gz = gz_at(i, m);
        if (sums) {
          const V gzm = m == V::size() ? gz : V::set(V(static_cast<T>(0)), gz, m);  // drop padding
          accg += gzm;
          accgx = at::vec::fmadd(gzm, V::loadu(xr + i, m), accgx);
        }
        return gz * vscale;
      });
    });
    S1[k] = r.S1;
    S2[k] = r.S2;
    if (sums) {
      Sg[k] = hsum<T>(accg);
      Sgx[k] = hsum<T>(accgx);
    }
  }

  // Identity or fixed statistics: independent planes; gx = a * dL/dz.
  void planes(const Affine& bn) const {
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, L.M));
    at::parallel_for(0, L.N * L.C, grain, [&](int64_t k0, int64_t k1) {
      std::vector<T> sig(L.M);
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t n = k / L.C, ch = k % L.C;
        double a, b;
        bn.at(ch, a, b);
        if (stream) plane<true>(n, ch, a, b, a, sig.data());
        else plane<false>(n, ch, a, b, a, sig.data());
      }
      if (stream) stream_fence();
    });
  }

  // Training BatchNorm: dL/dz of the channel's N planes, then BatchNorm's backward
  //   gx = a * (gz - mean(gz) - xhat * mean(gz * xhat))  over the N*M values (in L2).
  void channels(const Affine& bn, double* dw, double* db) const {
    using V = Vectorized<T>;
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, L.N * L.M));
    at::parallel_for(0, L.C, grain, [&](int64_t c0, int64_t c1) {
      std::vector<T> sig(L.M);
      for (int64_t ch = c0; ch < c1; ++ch) {
        double a, b;
        bn.at(ch, a, b);
        double sg = 0, sgx = 0;
        for (int64_t n = 0; n < L.N; ++n) {
          if (n + 1 < L.N) prefetch(x + ((n + 1) * L.C + ch) * L.M, L.M * sizeof(T));
          plane<false>(n, ch, a, b, 1.0, sig.data());
          sg += Sg[n * L.C + ch];
          sgx += Sgx[n * L.C + ch];
        }
        const double mean = bn.mean[ch], invstd = bn.invstd[ch];
        const double sgxh = invstd * (sgx - mean * sg);  // sum(gz * xhat)
        db[ch] = sg;
        dw[ch] = sgxh;
        const double NM = double(L.N) * L.M;
        const V va(static_cast<T>(a));
        const V vK1(static_cast<T>(-a * sg / NM + a * invstd * sgxh / NM * mean));
        const V vK2(static_cast<T>(-a * invstd * sgxh / NM));
        for (int64_t n = 0; n < L.N; ++n) {
          const int64_t off = (n * L.C + ch) * L.M;
          T* g = gx + off;
          const T* xr = x + off;
          auto f = [&](int64_t i, int64_t m) {
            return at::vec::fmadd(V::loadu(xr + i, m), vK2, at::vec::fmadd(V::loadu(g + i, m), va, vK1));
          };
          if (stream) map_plane<T, true>(g, L.M, f); else map_plane<T, false>(g, L.M, f);
        }
      }
      if (stream) stream_fence();
    });
  }
};

// ---------------------------------------------------------------- entry points

void check_planes(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3 && t.is_contiguous() && t.device().is_cpu(), name,
              " must be a contiguous CPU tensor of shape (N, C, M)");
}

void check_params(const Tensor& params, const Tensor& x, int64_t groups) {
  TORCH_CHECK(groups > 0 && x.size(1) % (2 * groups) == 0, "channels must be divisible by 2 * groups");
  TORCH_CHECK(params.scalar_type() == at::kDouble && params.is_contiguous() && params.dim() == 2 &&
                  params.size(0) == 6 && params.size(1) * 2 * groups == x.size(1),
              "params must be a (6, C / (2 * groups)) float64 array");
}

const double* opt_ptr(const std::optional<Tensor>& t) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kDouble && t->is_contiguous(), "per-channel tensors must be contiguous float64");
  return t->data_ptr<double>();
}

// Returns out, per-plane mean and variance of x (N, C) and, with training BatchNorm,
// the batch mean and biased variance (C).
std::vector<Tensor> sa_forward(const Tensor& x, const std::optional<Tensor>& shortcut,
                               const Tensor& params, int64_t groups, double eps,
                               const std::optional<Tensor>& bn_w, const std::optional<Tensor>& bn_b,
                               const std::optional<Tensor>& bn_mean,
                               const std::optional<Tensor>& bn_invstd, bool bn_train,
                               double bn_eps, bool relu) {
  check_planes(x, "x");
  check_params(params, x, groups);
  const bool has_sc = shortcut.has_value() && shortcut->defined();
  if (has_sc) {
    check_planes(*shortcut, "shortcut");
    TORCH_CHECK(shortcut->sizes() == x.sizes() && shortcut->scalar_type() == x.scalar_type(),
                "shortcut must match x");
  }
  const Affine bn{opt_ptr(bn_w), opt_ptr(bn_b), opt_ptr(bn_mean), opt_ptr(bn_invstd)};
  TORCH_CHECK(!bn_train || (bn.w && bn.b), "training BatchNorm needs its weight and bias");
  TORCH_CHECK(bn_train || !bn.w || (bn.mean && bn.invstd), "BatchNorm in eval needs mean and invstd");
  auto out = at::empty_like(x);
  auto dopt = x.options().dtype(at::kDouble);
  auto pmean = at::empty({x.size(0), x.size(1)}, dopt);
  auto pvar = at::empty({x.size(0), x.size(1)}, dopt);
  auto bmean = at::empty({bn_train ? x.size(1) : 0}, dopt);
  auto bvar = at::empty({bn_train ? x.size(1) : 0}, dopt);
  const Params P{params.data_ptr<double>(), params.size(1)};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sa_forward", [&] {
    const Fwd<scalar_t> f{Layout(x, groups), P, eps, x.data_ptr<scalar_t>(),
                          has_sc ? shortcut->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                          pmean.data_ptr<double>(), pvar.data_ptr<double>(), relu,
                          out.nbytes() >= kStreamBytes};
    if (bn_train)
      f.channels(bn.w, bn.b, bn_eps, bmean.data_ptr<double>(), bvar.data_ptr<double>());
    else
      f.planes(bn);
  });
  return {out, pmean, pvar, bmean, bvar};
}

// Returns grad x, the gradient before the ReLU (the shortcut's; undefined without ReLU),
// the per-plane sums S1, S2 for the gate parameters, and BatchNorm's dweight, dbias.
std::vector<Tensor> sa_backward(const Tensor& grad, const Tensor& x, const std::optional<Tensor>& out,
                                const Tensor& pmean, const Tensor& pvar, const Tensor& params,
                                int64_t groups, double eps, const std::optional<Tensor>& bn_w,
                                const std::optional<Tensor>& bn_b, const std::optional<Tensor>& bn_mean,
                                const std::optional<Tensor>& bn_invstd, bool bn_train) {
  check_planes(x, "x");
  check_planes(grad, "grad");
  check_params(params, x, groups);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(), "grad must match x");
  const bool has_out = out.has_value() && out->defined();
  if (has_out) check_planes(*out, "out");
  const Affine bn{opt_ptr(bn_w), opt_ptr(bn_b), opt_ptr(bn_mean), opt_ptr(bn_invstd)};
  TORCH_CHECK(!bn.w || (bn.b && bn.mean && bn.invstd), "BatchNorm needs weight, bias, mean and invstd");
  auto gx = at::empty_like(x);
  Tensor gpre = has_out ? at::empty_like(x) : Tensor();
  auto dopt = x.options().dtype(at::kDouble);
  const int64_t N = x.size(0), C = x.size(1);
  auto s1 = at::empty({N, C}, dopt);
  auto s2 = at::empty({N, C}, dopt);
  auto sg = at::empty({bn.w ? N : 0, C}, dopt);
  auto sgx = at::empty({bn.w ? N : 0, C}, dopt);
  auto dbn_w = at::empty({bn.w ? C : 0}, dopt);
  auto dbn_b = at::empty({bn.w ? C : 0}, dopt);
  const Params P{params.data_ptr<double>(), params.size(1)};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sa_backward", [&] {
    const Bwd<scalar_t> b{Layout(x, groups), P, eps, grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                          pmean.data_ptr<double>(), pvar.data_ptr<double>(),
                          has_out ? out->data_ptr<scalar_t>() : nullptr, gx.data_ptr<scalar_t>(),
                          has_out ? gpre.data_ptr<scalar_t>() : nullptr, s1.data_ptr<double>(),
                          s2.data_ptr<double>(), bn.w ? sg.data_ptr<double>() : nullptr,
                          bn.w ? sgx.data_ptr<double>() : nullptr, gx.nbytes() >= kStreamBytes};
    if (bn_train) {
      b.channels(bn, dbn_w.data_ptr<double>(), dbn_b.data_ptr<double>());
    } else {
      b.planes(bn);
      if (bn.w) {  // BatchNorm parameters: dbeta = sum(gz), dgamma = sum(gz * xhat)
        const double *g = sg.data_ptr<double>(), *gxs = sgx.data_ptr<double>();
        double *dw = dbn_w.data_ptr<double>(), *db = dbn_b.data_ptr<double>();
        for (int64_t ch = 0; ch < C; ++ch) {
          double a = 0, q = 0;
          for (int64_t n = 0; n < N; ++n) {
            a += g[n * C + ch];
            q += gxs[n * C + ch];
          }
          db[ch] = a;
          dw[ch] = bn.invstd[ch] * (q - bn.mean[ch] * a);
        }
      }
    }
  });
  return {gx, gpre, s1, s2, dbn_w, dbn_b};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sanet fused Shuffle Attention CPU kernels";
  m.def("sa_forward", &sa_forward);
  m.def("sa_backward", &sa_backward);
}
