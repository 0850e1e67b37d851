// Fused CPU kernels for Shuffle Attention (SA-Net, Zhang & Yang, ICASSP 2021).
//
// SA is a per-channel gate followed by a fixed permutation (SA-NET.md section 5):
//   y[n, P(c)] = z * sigmoid(A[n,c] * z + B[n,c]),   z = x[n, c]  (one (n, c) plane)
// so each plane is read once from memory for its statistics and then, while it is still
// in L1, again to write the output. Optionally a BatchNorm in front (z = a_c * x + b_c,
// batch or running statistics), a residual add and a ReLU behind are fused into the same
// passes: the tail of an SA-ResNet block (bn3 -> SA -> += shortcut -> ReLU).
//
// Threads (at::parallel_for, PyTorch's own pool) take planes in output order, in small
// batches (statistics, then gate coefficients, then element-wise passes), so reads and
// writes stream and small planes overlap their serial work. Training-mode BatchNorm, whose
// statistics are per channel over the batch, walks one channel's N planes at a time when
// planes are large (they stay in L2) and uses two passes in memory order when they are
// small. Per-plane statistics and all reductions are in double (plane sums in the input
// type first); element-wise math is vectorised in the input type. Large outputs are
// written with streaming stores (no read-for-ownership).
#include <torch/extension.h>

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

// ---------------------------------------------------------------- vector helpers

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
// (measured; with a division, 3e-6 as the reference). AVX2 divides.)

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
    __m512 p = _mm512_set1_ps(1.3280885586872855e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6770640621393900e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5507119869197630e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022086700656310e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314695653010520e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000000797972342f));
    return recip<float>(Vectorized<float>(_mm512_add_ps(_mm512_scalef_ps(p, n), _mm512_set1_ps(1.f))));
  }
};
#endif

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
// mean is kept.
template <typename T>
inline void plane_moments(const T* p, int64_t M, double& mean, double& var, bool need_var = true,
                          T shift = T(0)) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V zero(static_cast<T>(0)), vs(shift);
  PlaneSum<T> a0, a1;
  int64_t i = 0;
  for (; i + 2 * W <= M; i += 2 * W) {
    a0.add(V::loadu(p + i) - vs);
    a1.add(V::loadu(p + i + W) - vs);
  }
  for (; i < M; i += W) {
    const int64_t n = std::min<int64_t>(W, M - i);
    a0.add(V::set(zero, V::loadu(p + i, n) - vs, n));
  }
  mean = double(shift) + (a0.sum() + a1.sum()) / M;
  var = 0.0;
  if (!need_var) return;
  const V vm(static_cast<T>(mean));
  PlaneSum<T> q0, q1, s0;
  for (i = 0; i + 2 * W <= M; i += 2 * W) {
    const V d0 = V::loadu(p + i) - vm, d1 = V::loadu(p + i + W) - vm;
    q0.fmadd(d0, d0);
    q1.fmadd(d1, d1);
    s0.add(d0 + d1);
  }
  for (; i < M; i += W) {
    const int64_t n = std::min<int64_t>(W, M - i);
    const V d = V::set(zero, V::loadu(p + i, n) - vm, n);
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

// ---------------------------------------------------------------- SA geometry and gate

// Elements per (n, c) plane of a contiguous (N, C, *) tensor.
int64_t plane_size(const Tensor& x) {
  const int64_t planes = x.size(0) * x.size(1);
  return planes > 0 ? x.numel() / planes : 0;
}

// G groups of 2c channels; the first c of a group are the channel branch, the last c the
// spatial branch; the 2-group shuffle sends input channel ch to out_channel(ch).
// Tabulated once per call: integer divisions per plane are a visible cost on small planes.
struct Layout {
  int64_t N, C, M;
  std::vector<int64_t> oc, ic, j;
  std::vector<char> sp;
  Layout(const Tensor& x, int64_t groups)
      : N(x.size(0)), C(x.size(1)), M(plane_size(x)), oc(C), ic(C), j(C), sp(C) {
    const int64_t cg = C / groups, cc = C / (2 * groups), half = C / 2;
    for (int64_t ch = 0; ch < C; ++ch) {
      oc[ch] = 2 * (ch % half) + ch / half;
      ic[oc[ch]] = ch;
      j[ch] = (ch % cg) % cc;
      sp[ch] = (ch % cg) >= cc;
    }
  }
  int64_t out_channel(int64_t ch) const { return oc[ch]; }
  int64_t in_channel(int64_t o) const { return ic[o]; }
  int64_t param(int64_t ch) const { return j[ch]; }
  bool spatial(int64_t ch) const { return sp[ch]; }
};

// A small floating tensor (any dtype, any shape) as doubles.
std::vector<double> to_doubles(const Tensor& t) {
  const Tensor c = t.contiguous();
  std::vector<double> v(c.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "to_doubles", [&] {
    const scalar_t* d = c.data_ptr<scalar_t>();
    for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<double>(d[i]);
  });
  return v;
}

// The six gate parameters (cweight, cbias, sweight, sbias, gn.weight, gn.bias), as doubles.
struct Params {
  std::vector<double> p;
  int64_t cc;
  Params(const std::vector<Tensor>& ts, int64_t cc_) : p(6 * cc_), cc(cc_) {
    for (size_t i = 0; i < 6; ++i) {
      TORCH_CHECK(ts[i].numel() == cc, "SA parameter ", i, " has ", ts[i].numel(), " values, expected ", cc);
      const auto v = to_doubles(ts[i]);
      std::copy(v.begin(), v.end(), p.begin() + i * cc);
    }
  }
  double cw(int64_t j) const { return p[j]; }
  double cb(int64_t j) const { return p[cc + j]; }
  double sw(int64_t j) const { return p[2 * cc + j]; }
  double sb(int64_t j) const { return p[3 * cc + j]; }
  double gw(int64_t j) const { return p[4 * cc + j]; }
  double gb(int64_t j) const { return p[5 * cc + j]; }
};

// BatchNorm in front of SA as z = a*x + b per channel (or the identity when off).
// mean/invstd are the statistics used: given (running, or saved batch statistics), or
// filled in by the training forward pass.
struct Affine {
  bool on = false;
  std::vector<double> w, b, mean, invstd;
  Affine() = default;
  Affine(int64_t C, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
         const std::optional<Tensor>& mean_, const std::optional<Tensor>& var, double eps)
      : on(true), w(C, 1.0), b(C, 0.0) {
    if (weight.has_value() && weight->defined()) w = to_doubles(*weight);
    if (bias.has_value() && bias->defined()) b = to_doubles(*bias);
    TORCH_CHECK(int64_t(w.size()) == C && int64_t(b.size()) == C, "BatchNorm parameters must have C values");
    if (mean_.has_value() && mean_->defined()) {
      mean = to_doubles(*mean_);
      invstd = to_doubles(*var);
      TORCH_CHECK(int64_t(mean.size()) == C && int64_t(invstd.size()) == C, "BatchNorm statistics must have C values");
      for (auto& v : invstd) v = 1.0 / std::sqrt(v + eps);
    }
  }
  void at(int64_t ch, double& a, double& off) const {
    if (!on) { a = 1.0; off = 0.0; return; }
    a = w[ch] * invstd[ch];
    off = b[ch] - mean[ch] * a;
  }
};

// Gate of one plane: z = a*x + b and the gate argument u = Az*(z - mz) + Bc, i.e.
// u = Ax()*(x - mx) + Bc. Centring before scaling matters: on tiny planes (1x1) the
// spatial branch's A*x and B are huge (1/sqrt(eps)) and cancel in A*x + B.
// Az == 0 means a constant gate.
struct Gate {
  double a, b, Az, Bc, rz, mz, mx;
  double Ax() const { return Az * a; }
};

// z = a*x + b of one plane (times a scale) from x and d = x - m, m the plane mean rounded to
// T. With BatchNorm in front, as a*d + z(m): b = beta - mean*a is large next to z's spread
// when |mean| >> std, and rounding b to T would shift the whole plane (1e-4 relative at
// mean/std = 1000). Without (a = 1, b = 0), z is x itself, exactly as in the reference: x*s
// keeps zeros zero and each element's own precision, where d*s + m*s would round to m's.
template <typename T>
struct CentredZ {
  Vectorized<T> m, a, zm;
  bool identity;
  explicit CentredZ(const Gate& g, double scale = 1.0)
      : m(centre<T>(g.mx)), a(static_cast<T>(g.a * scale)),
        zm(static_cast<T>((g.a * double(centre<T>(g.mx)) + g.b) * scale)),
        identity(g.a == 1.0 && g.b == 0.0) {}
  Vectorized<T> operator()(const Vectorized<T>& x, const Vectorized<T>& d) const {
    return identity ? x * a : at::vec::fmadd(d, a, zm);
  }
};

inline Gate plane_gate(const Layout& L, const Params& P, int64_t ch, double a, double b,
                       double mx, double vx, double eps) {
  const int64_t j = L.param(ch);
  Gate g{a, b, 0.0, 0.0, 0.0, a * mx + b, mx};
  if (L.spatial(ch)) {
    // GroupNorm(c, c) of z normalises each plane; var(z) = a^2 var(x).
    // u = sw * (gw * (z - mz) * rz + gb) + sb
    g.rz = 1.0 / std::sqrt(a * a * vx + eps);
    g.Az = P.sw(j) * P.gw(j) * g.rz;
    g.Bc = P.sw(j) * P.gb(j) + P.sb(j);
  } else {
    g.Bc = P.cw(j) * g.mz + P.cb(j);  // global average pool of z
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
    const CentredZ<T> zs(g, ssigmoid(g.Bc));  // z * s
    map_plane<T, Stream>(out, M, [&](int64_t i, int64_t n) {
      const V xv = V::loadu(x + i, n);
      return finish(zs(xv, xv - zs.m), i, n);
    });
    return;
  }
  const SigmoidOfAffine<T> sigmoid(g.Ax(), g.Bc, g.mx);
  if (g.a == 1.0 && g.b == 0.0) {  // no BatchNorm in front: z = x
    map_plane<T, Stream>(out, M, [&](int64_t i, int64_t n) {
      const V xv = V::loadu(x + i, n);
      return finish(xv * sigmoid(xv), i, n);
    });
    return;
  }
  const CentredZ<T> z(g);
  map_plane<T, Stream>(out, M, [&](int64_t i, int64_t n) {
    const V xv = V::loadu(x + i, n), d = xv - z.m;
    return finish(z(xv, d) * sigmoid.centred(d), i, n);
  });
}

// Planes are processed in small batches: statistics of every plane, then every gate's
// coefficients, then the element-wise passes. A plane's own chain (reduce, horizontal sum,
// sqrt, divide, gate) is serial; batching lets independent planes overlap it, which is
// what makes 7x7 and 14x14 planes fast. Batches stay in L1/L2.
constexpr int64_t kMaxBatch = 32;

template <typename T>
inline int64_t batch_planes(int64_t M) {
  return std::clamp<int64_t>(16384 / std::max<int64_t>(1, M * int64_t(sizeof(T))), 1, kMaxBatch);
}

// Backward reads two planes and keeps a third (the gates) per plane, so its batches are
// smaller: 2 KiB of each plane stream (measured 1.1x - 1.2x on cold 14x14 and 28x28 input
// against the forward's 16 KiB), except planes of 7x7 and below, which keep the forward's
// batches because their serial per-plane work needs the overlap.
template <typename T>
inline int64_t backward_batch_planes(int64_t M) {
  const int64_t bytes = std::max<int64_t>(1, M * int64_t(sizeof(T)));
  return bytes <= 256 ? batch_planes<T>(M) : std::clamp<int64_t>(2048 / bytes, 1, kMaxBatch);
}

// Training BatchNorm walks a channel's N planes together when a plane is large enough for
// the hardware prefetcher to stream it; smaller planes go in two passes in memory order.
template <typename T>
inline bool walk_channels(int64_t M) { return M * int64_t(sizeof(T)) >= 8192; }

// (n, ch) of consecutive planes k, without a division per plane.
struct PlaneCursor {
  int64_t n, ch, C;
  PlaneCursor(int64_t k, int64_t C_) : n(k / C_), ch(k % C_), C(C_) {}
  void next() {
    if (++ch == C) { ch = 0; ++n; }
  }
};

// Planes [o0, o1) in output order, B at a time, as (sample, input channel) pairs. Each batch
// also knows the next one, so the forward pass can prefetch the next batch's planes while it
// writes this batch's outputs: reads then overlap writes instead of waiting for the
// statistics pass of the next batch (1.2x on cold (8, 1024, 14, 14) input; the same in
// backward, which reads three planes per plane, measured no gain).
struct OutputOrderBatches {
  const Layout& L;
  const int64_t o1, B;
  int64_t o, cnt = 0, next_cnt = 0;
  int64_t ns[kMaxBatch], chs[kMaxBatch], next_ns[kMaxBatch], next_chs[kMaxBatch];
  PlaneCursor c;
  OutputOrderBatches(const Layout& L_, int64_t o0, int64_t o1_, int64_t B_)
      : L(L_), o1(o1_), B(B_), o(o0), c(o0, L_.C) {
    fill(next_ns, next_chs, next_cnt);
  }
  // Advances to the next batch; false when done.
  bool next() {
    cnt = next_cnt;
    std::copy(next_ns, next_ns + cnt, ns);
    std::copy(next_chs, next_chs + cnt, chs);
    fill(next_ns, next_chs, next_cnt);
    return cnt > 0;
  }

 private:
  void fill(int64_t* n, int64_t* ch, int64_t& k) {
    k = std::min(o1 - o, B);
    for (int64_t i = 0; i < k; ++i, c.next()) {
      n[i] = c.n;
      ch[i] = L.in_channel(c.ch);
    }
    o += k;
  }
};

template <typename T>
struct Fwd {
  const Layout L;
  const Params& P;
  const double eps;
  const T* x;
  const T* sc;
  T* out;
  double* pm;
  double* pv;
  bool relu, stream;

  void gate(int64_t n, int64_t ch, const Gate& g) const {
    const int64_t k = n * L.C + ch;
    const int64_t dst = (n * L.C + L.out_channel(ch)) * L.M;
    const T* s = sc ? sc + dst : nullptr;
    if (stream)
      gate_plane<T, true>(x + k * L.M, out + dst, s, L.M, g, relu);
    else
      gate_plane<T, false>(x + k * L.M, out + dst, s, L.M, g, relu);
  }

  // Identity or given (running) statistics: every plane is independent.
  void planes(const Affine& bn, bool moments_done = false) const {
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, L.M));
    const int64_t B = batch_planes<T>(L.M);
    // Planes in output order: the writes form one sequential stream (the shuffle would
    // otherwise scatter them over every other plane) and the reads two.
    at::parallel_for(0, L.N * L.C, grain, [&](int64_t o0, int64_t o1) {
      Gate g[kMaxBatch];
      OutputOrderBatches b(L, o0, o1, B);
      while (b.next()) {
        if (!moments_done)
          for (int64_t i = 0; i < b.cnt; ++i) {
            const int64_t k = b.ns[i] * L.C + b.chs[i];
            plane_moments(x + k * L.M, L.M, pm[k], pv[k], L.spatial(b.chs[i]),
                          bn.on ? static_cast<T>(bn.mean[b.chs[i]]) : T(0));
          }
        for (int64_t i = 0; i < b.cnt; ++i) {
          const int64_t k = b.ns[i] * L.C + b.chs[i];
          double a, off;
          bn.at(b.chs[i], a, off);
          g[i] = plane_gate(L, P, b.chs[i], a, off, pm[k], pv[k], eps);
        }
        for (int64_t i = 0; i < b.cnt; ++i) {
          if (i < b.next_cnt) prefetch(x + (b.next_ns[i] * L.C + b.next_chs[i]) * L.M, L.M * sizeof(T));
          gate(b.ns[i], b.chs[i], g[i]);
        }
      }
      if (stream) stream_fence();
    });
  }

  // Training BatchNorm, small planes: statistics of every plane in memory order, the batch
  // statistics per channel, then the gates in memory order (x is read twice, but as two
  // streams; walking a channel's N small planes would wait on memory at every plane).
  void two_phase(const Affine& bn, double bn_eps, double* bmean, double* bvar) const {
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, L.M));
    at::parallel_for(0, L.N * L.C, grain, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) plane_moments(x + k * L.M, L.M, pm[k], pv[k]);
    });
    Affine stats = bn;
    stats.mean.resize(L.C);
    stats.invstd.resize(L.C);
    for (int64_t ch = 0; ch < L.C; ++ch) {
      merge_batch_stats(ch, bmean[ch], bvar[ch]);
      stats.mean[ch] = bmean[ch];
      stats.invstd[ch] = 1.0 / std::sqrt(bvar[ch] + bn_eps);
    }
    planes(stats, true);
  }

  // Batch statistics of channel ch: exact merge of N equal-size planes.
  void merge_batch_stats(int64_t ch, double& mean, double& var) const {
    double s = 0, m2 = 0;
    for (int64_t n = 0; n < L.N; ++n) s += pm[n * L.C + ch];
    mean = s / L.N;
    for (int64_t n = 0; n < L.N; ++n) {
      const double d = pm[n * L.C + ch] - mean;
      m2 += pv[n * L.C + ch] + d * d;
    }
    var = m2 / L.N;
  }

  // Training BatchNorm, large planes: one channel's N planes at a time (they stay in L2),
  // statistics first, then the gates.
  void channels(const Affine& bn, double bn_eps, double* bmean, double* bvar) const {
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, L.N * L.M));
    at::parallel_for(0, L.C, grain, [&](int64_t c0, int64_t c1) {
      Gate g[kMaxBatch];
      for (int64_t ch = c0; ch < c1; ++ch) {
        for (int64_t n = 0; n < L.N; ++n) {
          const int64_t k = n * L.C + ch;
          if (n + 1 < L.N) prefetch(x + (k + L.C) * L.M, L.M * sizeof(T));
          plane_moments(x + k * L.M, L.M, pm[k], pv[k]);
        }
        merge_batch_stats(ch, bmean[ch], bvar[ch]);
        const double a = bn.w[ch] / std::sqrt(bvar[ch] + bn_eps), b = bn.b[ch] - bmean[ch] * a;
        for (int64_t nb = 0; nb < L.N; nb += kMaxBatch) {
          const int64_t ne = std::min(L.N, nb + kMaxBatch);
          for (int64_t n = nb; n < ne; ++n)
            g[n - nb] = plane_gate(L, P, ch, a, b, pm[n * L.C + ch], pv[n * L.C + ch], eps);
          for (int64_t n = nb; n < ne; ++n) gate(n, ch, g[n - nb]);
        }
      }
      if (stream) stream_fence();
    });
  }
};

// ---------------------------------------------------------------- backward

// What pass B of a plane needs, from pass A: dL/dz = go*s + Kgu*gu + K0 + Kz*z (the gate's
// own derivative plus its statistics'), and the sums for the gate parameters:
//   S1 = sum(gu), S2 = sum(gu * zhat) (spatial) or S1 * mean(z) (channel),
// with gu = dL/du = go * z * s * (1 - s), u the gate argument.
struct PlaneBwd {
  double S1, S2, K0, Kgu, Kz, s_const;
  bool const_gate;
};

// Pass A: the sums (and the sigmoid, kept in sig for pass B). Sgz = sum(gu * (z - mean z))
// is accumulated centred, as a * (x - mean x): uncentred sums cancel when |mean z| >> std z.
template <typename T>
PlaneBwd bwd_pass_a(const Layout& L, const Params& P, int64_t ch, const Gate& g, const T* xr,
                    const T* go, T* sig) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const int64_t M = L.M;
  const CentredZ<T> zc(g);
  const V va(static_cast<T>(g.a)), vmx = zc.m, one(static_cast<T>(1));
  const double mxt = double(centre<T>(g.mx));
  PlaneBwd r{0, 0, 0, 0, 0, 0, g.Az == 0.0};
  if (M == 0) return r;  // no pixels: no gradient (the statistics are 0/0)
  double Sgz = 0;
  PlaneSum<T> acc1, acc2;
  int64_t i = 0;
  if (r.const_gate) {
    // gu = go * z * s(1-s) with constant s: sum go*z (and go*z*(z - mean z) for the spatial branch).
    r.s_const = ssigmoid(g.Bc);
    for (; i + W <= M; i += W) {
      const V xv = V::loadu(xr + i), d = xv - vmx;
      const V gz = V::loadu(go + i) * zc(xv, d);
      acc1.add(gz);
      acc2.fmadd(gz, d * va);
    }
    double s1 = acc1.sum(), s2 = acc2.sum();
    for (; i < M; ++i) {
      const double z = g.a * xr[i] + g.b;
      s1 += double(go[i]) * z;
      s2 += double(go[i]) * z * (g.a * (xr[i] - mxt));
    }
    s2 += g.a * (mxt - g.mx) * s1;  // the sums were centred on mxt, not the mean
    r.S1 = r.s_const * (1 - r.s_const) * s1;
    Sgz = r.s_const * (1 - r.s_const) * s2;
  } else {
    const SigmoidOfAffine<T> sigmoid(g.Ax(), g.Bc, g.mx);
    for (; i + W <= M; i += W) {
      const V xv = V::loadu(xr + i), d = xv - vmx;
      const V z = zc(xv, d);
      const V s = sigmoid.centred(d);
      s.store(sig + i);
      const V gu = V::loadu(go + i) * z * s * (one - s);
      acc1.add(gu);
      acc2.fmadd(gu, d * va);
    }
    r.S1 = acc1.sum();
    Sgz = acc2.sum();
    for (; i < M; ++i) {
      const double z = g.a * xr[i] + g.b;
      const double s = ssigmoid<double>(g.Ax() * (xr[i] - g.mx) + g.Bc);
      sig[i] = static_cast<T>(s);
      const double gu = double(go[i]) * z * s * (1 - s);
      r.S1 += gu;
      Sgz += gu * (g.a * (xr[i] - mxt));
    }
    Sgz += g.a * (mxt - g.mx) * r.S1;  // the sums were centred on mxt, not the mean
  }
  const int64_t j = L.param(ch);
  if (L.spatial(ch)) {
    r.S2 = g.rz * Sgz;  // sum(gu * zhat)
    // GroupNorm backward with gzhat = gu*sw*gw: Kgu * (gu - mean(gu) - zhat * mean(gu*zhat)).
    // On a one-pixel plane that is exactly 0 (gu equals its mean), but as a difference of
    // terms scaled by 1/sqrt(eps) it would only be 0 up to rounding.
    r.Kgu = M > 1 ? P.sw(j) * P.gw(j) * g.rz : 0.0;
    r.K0 = -r.Kgu * r.S1 / M + r.Kgu * r.S2 * g.rz * g.mz / M;
    r.Kz = -r.Kgu * r.S2 * g.rz / M;
  } else {
    r.S2 = r.S1 * g.mz;
    r.K0 = P.cw(j) * r.S1 / M;  // the mean's gradient is uniform over the plane
  }
  return r;
}

// Pass B: dL/dz of lanes [i, i+n) of a plane.
template <typename T>
struct GradZ {
  CentredZ<T> zc;
  Vectorized<T> vK0, vKgu, vKzd, vs, one;
  const T *xr, *go, *sig;
  bool const_gate;
  // Kz * z + K0 = (Kz * a) * (x - m) + (Kz * z(m) + K0): the two terms of the left side
  // cancel when |mean z| >> std z.
  GradZ(const Gate& g, const PlaneBwd& r, const T* xr_, const T* go_, const T* sig_)
      : zc(g), vK0(static_cast<T>(r.K0 + r.Kz * (g.a * double(centre<T>(g.mx)) + g.b))),
        vKgu(static_cast<T>(r.Kgu)), vKzd(static_cast<T>(r.Kz * g.a)), vs(static_cast<T>(r.s_const)),
        one(static_cast<T>(1)), xr(xr_), go(go_), sig(sig_), const_gate(r.const_gate) {}
  Vectorized<T> operator()(int64_t i, int64_t n) const {
    using V = Vectorized<T>;
    const V gv = V::loadu(go + i, n);
    if (const_gate) return at::vec::fmadd(gv, vs, vK0);  // Az == 0, hence Kgu == Kz == 0
    const V s = V::loadu(sig + i, n);
    const V xv = V::loadu(xr + i, n), d = xv - zc.m;
    const V gu = gv * zc(xv, d) * s * (one - s);
    return at::vec::fmadd(gv, s, at::vec::fmadd(vKgu, gu, at::vec::fmadd(vKzd, d, vK0)));
  }
};

template <typename T>
struct Bwd {
  const Layout L;
  const Params& P;
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
  double* Sg;    // per-plane sum(gz), sum(gz * (x - plane mean)) for BatchNorm (or null)
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

  // Pass B of plane (n, ch): writes scale * dL/dz (Stream: around the cache) and the sums.
  template <bool Stream>
  void pass_b(int64_t n, int64_t ch, const Gate& g, const PlaneBwd& r, const T* go, const T* sig,
              double scale) const {
    using V = Vectorized<T>;
    const int64_t k = n * L.C + ch;
    const T* xr = x + k * L.M;
    const GradZ<T> gz_at(g, r, xr, go, sig);
    const V vscale(static_cast<T>(scale));
    S1[k] = r.S1;
    S2[k] = r.S2;
    if (!Sg) {
      map_plane<T, Stream>(gx + k * L.M, L.M, [&](int64_t i, int64_t m) { return gz_at(i, m) * vscale; });
      return;
    }
    PlaneSum<T> accg, accgx;
    map_plane<T, Stream>(gx + k * L.M, L.M, [&](int64_t i, int64_t m) {
      const V gz = gz_at(i, m);
      const V gzm = m == V::size() ? gz : V::set(V(static_cast<T>(0)), gz, m);  // drop padding
      accg.add(gzm);
      accgx.fmadd(gzm, V::loadu(xr + i, m) - gz_at.zc.m);  // centred: see centred_sums
      return gz * vscale;
    });
    Sg[k] = accg.sum();
    Sgx[k] = accgx.sum();
  }

  // A batch of planes: gates and pass A for all, then pass B for all.
  template <bool Stream>
  void batch(const int64_t* ns, const int64_t* chs, int64_t cnt, const Affine& bn, bool scale_by_a,
             T* sig) const {
    Gate g[kMaxBatch];
    PlaneBwd r[kMaxBatch];
    const T* go[kMaxBatch];
    for (int64_t i = 0; i < cnt; ++i) {
      const int64_t k = ns[i] * L.C + chs[i];
      double a, b;
      bn.at(chs[i], a, b);
      g[i] = plane_gate(L, P, chs[i], a, b, pmean[k], pvar[k], eps);
      go[i] = sa_grad(ns[i], chs[i]);
      r[i] = bwd_pass_a<T>(L, P, chs[i], g[i], x + k * L.M, go[i], sig + i * L.M);
    }
    for (int64_t i = 0; i < cnt; ++i)
      pass_b<Stream>(ns[i], chs[i], g[i], r[i], go[i], sig + i * L.M, scale_by_a ? g[i].a : 1.0);
  }

  // Independent planes: gx = a * dL/dz (identity or fixed statistics), or dL/dz itself
  // for the training-BatchNorm finish to transform (scale_by_a false).
  void planes(const Affine& bn, bool scale_by_a = true) const {
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, L.M));
    const int64_t B = backward_batch_planes<T>(L.M);
    at::parallel_for(0, L.N * L.C, grain, [&](int64_t k0, int64_t k1) {
      // Output order, as in the forward pass: the incoming gradient and the ReLU mask are
      // read, and the pre-ReLU gradient written, as sequential streams.
      std::vector<T> sig(B * L.M);
      OutputOrderBatches b(L, k0, k1, B);
      while (b.next()) {
        if (stream && scale_by_a) batch<true>(b.ns, b.chs, b.cnt, bn, true, sig.data());
        else batch<false>(b.ns, b.chs, b.cnt, bn, scale_by_a, sig.data());
      }
      if (stream) stream_fence();
    });
  }

  // Channel ch's sum(gz) and sum(gz * (x - mean)) from the planes' sums. The planes' sums
  // of gz * x are centred on their own (T-rounded) means, so the shift to the channel's
  // mean is small: sum(gz * x) - mean * sum(gz) would cancel when |mean| >> std.
  void centred_sums(int64_t ch, double mean, double& sg, double& sgxc) const {
    sg = sgxc = 0;
    for (int64_t n = 0; n < L.N; ++n) {
      const int64_t k = n * L.C + ch;
      sg += Sg[k];
      sgxc += Sgx[k] + (double(centre<T>(pmean[k])) - mean) * Sg[k];
    }
  }

  // BatchNorm's backward of channel ch once its sums are known:
  //   gx = a * (gz - mean(gz) - xhat * mean(gz * xhat)) = a * gz + K1 + K2 * (x - mean),
  // with dbeta = sum(gz), dgamma = sum(gz * xhat).
  void bn_coeffs(const Affine& bn, int64_t ch, double* dw, double* db, double& a, double& K1,
                 double& K2) const {
    double b, sg, sgxc;
    bn.at(ch, a, b);
    const double mean = bn.mean[ch], invstd = bn.invstd[ch];
    centred_sums(ch, mean, sg, sgxc);
    const double sgxh = invstd * sgxc;  // sum(gz * xhat)
    db[ch] = sg;
    dw[ch] = sgxh;
    const double NM = double(L.N) * L.M;
    K1 = -a * sg / NM;
    K2 = -a * invstd * sgxh / NM;
  }

  // gx = a * gz + K1 + K2 * (x - mean) of plane k, as K2 * (x - m) + (K1 + K2 * (m - mean))
  // about the plane's own mean m, for the reason of CentredZ.
  template <bool Stream>
  void bn_finish_plane(int64_t k, double a, double K1, double K2, double mean) const {
    using V = Vectorized<T>;
    const T m = centre<T>(pmean[k]);
    const V vm(m), va(static_cast<T>(a)), vK1(static_cast<T>(K1 + K2 * (double(m) - mean))),
        vK2(static_cast<T>(K2));
    T* g = gx + k * L.M;
    const T* xr = x + k * L.M;
    map_plane<T, Stream>(g, L.M, [&](int64_t i, int64_t n) {
      return at::vec::fmadd(V::loadu(xr + i, n) - vm, vK2, at::vec::fmadd(V::loadu(g + i, n), va, vK1));
    });
  }

  // Training BatchNorm, small planes: dL/dz of every plane in memory order, the sums per
  // channel, then BatchNorm's backward in memory order.
  void two_phase(const Affine& bn, double* dw, double* db) const {
    planes(bn, false);
    std::vector<double> A(L.C), K1(L.C), K2(L.C);
    for (int64_t ch = 0; ch < L.C; ++ch) bn_coeffs(bn, ch, dw, db, A[ch], K1[ch], K2[ch]);
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, L.M));
    at::parallel_for(0, L.N * L.C, grain, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t ch = k % L.C;
        if (stream) bn_finish_plane<true>(k, A[ch], K1[ch], K2[ch], bn.mean[ch]);
        else bn_finish_plane<false>(k, A[ch], K1[ch], K2[ch], bn.mean[ch]);
      }
      if (stream) stream_fence();
    });
  }

  // Training BatchNorm, large planes: dL/dz of the channel's N planes, then BatchNorm's
  // backward over them while they are in L2.
  void channels(const Affine& bn, double* dw, double* db) const {
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, L.N * L.M));
    const int64_t B = std::min<int64_t>(L.N, kMaxBatch);
    at::parallel_for(0, L.C, grain, [&](int64_t c0, int64_t c1) {
      std::vector<T> sig(B * L.M);
      int64_t ns[kMaxBatch], chs[kMaxBatch];
      for (int64_t ch = c0; ch < c1; ++ch) {
        for (int64_t nb = 0; nb < L.N; nb += B) {
          const int64_t cnt = std::min(L.N - nb, B);
          for (int64_t i = 0; i < cnt; ++i) {
            ns[i] = nb + i;
            chs[i] = ch;
          }
          batch<false>(ns, chs, cnt, bn, false, sig.data());
        }
        double a, K1, K2;
        bn_coeffs(bn, ch, dw, db, a, K1, K2);
        for (int64_t n = 0; n < L.N; ++n) {
          if (stream) bn_finish_plane<true>(n * L.C + ch, a, K1, K2, bn.mean[ch]);
          else bn_finish_plane<false>(n * L.C + ch, a, K1, K2, bn.mean[ch]);
        }
      }
      if (stream) stream_fence();
    });
  }
};

// ---------------------------------------------------------------- entry points

void check_planes(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() >= 2 && t.is_contiguous() && t.device().is_cpu(), name,
              " must be a contiguous CPU tensor of shape (N, C, *)");
}

void check_groups(const Tensor& x, int64_t groups) {
  TORCH_CHECK(groups > 0 && x.size(1) % (2 * groups) == 0, "channels must be divisible by 2 * groups");
}

bool defined(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// Returns out, per-plane mean and variance of x (N, C) and, with training BatchNorm,
// the batch mean and biased variance (C). BatchNorm is fused when bn_train or when
// bn_mean/bn_var (its running statistics) are given.
std::vector<Tensor> sa_forward(const Tensor& x, const std::optional<Tensor>& shortcut,
                               const Tensor& cw, const Tensor& cb, const Tensor& sw, const Tensor& sb,
                               const Tensor& gw, const Tensor& gb, int64_t groups, double eps,
                               const std::optional<Tensor>& bn_w, const std::optional<Tensor>& bn_b,
                               const std::optional<Tensor>& bn_mean, const std::optional<Tensor>& bn_var,
                               bool bn_train, double bn_eps, bool relu) {
  check_planes(x, "x");
  check_groups(x, groups);
  const bool has_sc = defined(shortcut);
  if (has_sc) {
    check_planes(*shortcut, "shortcut");
    TORCH_CHECK(shortcut->sizes() == x.sizes() && shortcut->scalar_type() == x.scalar_type(),
                "shortcut must match x");
  }
  const int64_t C = x.size(1);
  const Params P({cw, cb, sw, sb, gw, gb}, C / (2 * groups));
  const bool has_bn = bn_train || defined(bn_mean);
  const Affine bn = has_bn ? Affine(C, bn_w, bn_b, bn_train ? std::nullopt : bn_mean, bn_var, bn_eps) : Affine();
  auto out = at::empty_like(x);
  auto dopt = x.options().dtype(at::kDouble);
  auto pmean = at::empty({x.size(0), C}, dopt);
  auto pvar = at::empty({x.size(0), C}, dopt);
  auto bmean = at::empty({bn_train ? C : 0}, dopt);
  auto bvar = at::empty({bn_train ? C : 0}, dopt);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sa_forward", [&] {
    const Fwd<scalar_t> f{Layout(x, groups), P, eps, x.data_ptr<scalar_t>(),
                          has_sc ? shortcut->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                          pmean.data_ptr<double>(), pvar.data_ptr<double>(), relu,
                          out.nbytes() >= kStreamBytes};
    if (!bn_train)
      f.planes(bn);
    else if (walk_channels<scalar_t>(plane_size(x)))
      f.channels(bn, bn_eps, bmean.data_ptr<double>(), bvar.data_ptr<double>());
    else
      f.two_phase(bn, bn_eps, bmean.data_ptr<double>(), bvar.data_ptr<double>());
  });
  return {out, pmean, pvar, bmean, bvar};
}

// Gradients of the six gate parameters (rows: cweight, cbias, sweight, sbias, gn.weight,
// gn.bias) from the per-plane sums S1, S2, summed over samples and groups.
Tensor param_grads(const Tensor& s1, const Tensor& s2, const Params& P, int64_t groups) {
  const int64_t N = s1.size(0), C = s1.size(1), cc = P.cc, cg = C / groups;
  std::vector<double> t1c(cc, 0.0), t2c(cc, 0.0), t1s(cc, 0.0), t2s(cc, 0.0);
  const double *a1 = s1.data_ptr<double>(), *a2 = s2.data_ptr<double>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t j = 0; j < cc; ++j) {
        const int64_t k = n * C + g * cg + j;  // channel branch; spatial branch at k + cc
        t1c[j] += a1[k];
        t2c[j] += a2[k];
        t1s[j] += a1[k + cc];
        t2s[j] += a2[k + cc];
      }
  auto gp = at::empty({6, cc}, s1.options());
  double* o = gp.data_ptr<double>();
  for (int64_t j = 0; j < cc; ++j) {
    o[j] = t2c[j];                                 // cweight: sum(gu) * mean
    o[cc + j] = t1c[j];                            // cbias
    o[2 * cc + j] = P.gw(j) * t2s[j] + P.gb(j) * t1s[j];  // sweight: sum(gu * gn(z))
    o[3 * cc + j] = t1s[j];                        // sbias
    o[4 * cc + j] = P.sw(j) * t2s[j];              // gn.weight
    o[5 * cc + j] = P.sw(j) * t1s[j];              // gn.bias
  }
  return gp;
}

// Returns grad x, the gradient before the ReLU (the shortcut's; undefined without ReLU),
// the six gate parameters' gradients as one (6, c) tensor in cweight's dtype, and
// BatchNorm's dweight, dbias in its weight's dtype (float32 without weight).
// BatchNorm is part of the op when bn_mean/bn_var (the statistics forward used) are given.
std::vector<Tensor> sa_backward(const Tensor& grad, const Tensor& x, const std::optional<Tensor>& out,
                                const Tensor& pmean, const Tensor& pvar, const Tensor& cw,
                                const Tensor& cb, const Tensor& sw, const Tensor& sb, const Tensor& gw,
                                const Tensor& gb, int64_t groups, double eps,
                                const std::optional<Tensor>& bn_w, const std::optional<Tensor>& bn_b,
                                const std::optional<Tensor>& bn_mean, const std::optional<Tensor>& bn_var,
                                bool bn_train, double bn_eps) {
  check_planes(x, "x");
  check_planes(grad, "grad");
  check_groups(x, groups);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(), "grad must match x");
  const bool has_out = defined(out);
  if (has_out) check_planes(*out, "out");
  const int64_t N = x.size(0), C = x.size(1);
  const Params P({cw, cb, sw, sb, gw, gb}, C / (2 * groups));
  const bool has_bn = defined(bn_mean);
  const Affine bn = has_bn ? Affine(C, bn_w, bn_b, bn_mean, bn_var, bn_eps) : Affine();
  auto gx = at::empty_like(x);
  Tensor gpre = has_out ? at::empty_like(x) : Tensor();
  auto dopt = x.options().dtype(at::kDouble);
  auto s1 = at::empty({N, C}, dopt);
  auto s2 = at::empty({N, C}, dopt);
  auto sg = at::empty({has_bn ? N : 0, C}, dopt);
  auto sgx = at::empty({has_bn ? N : 0, C}, dopt);
  auto dbn_w = at::empty({has_bn ? C : 0}, dopt);
  auto dbn_b = at::empty({has_bn ? C : 0}, dopt);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sa_backward", [&] {
    const Bwd<scalar_t> b{Layout(x, groups), P, eps, grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                          pmean.data_ptr<double>(), pvar.data_ptr<double>(),
                          has_out ? out->data_ptr<scalar_t>() : nullptr, gx.data_ptr<scalar_t>(),
                          has_out ? gpre.data_ptr<scalar_t>() : nullptr, s1.data_ptr<double>(),
                          s2.data_ptr<double>(), has_bn ? sg.data_ptr<double>() : nullptr,
                          has_bn ? sgx.data_ptr<double>() : nullptr, gx.nbytes() >= kStreamBytes};
    if (bn_train && walk_channels<scalar_t>(plane_size(x))) {
      b.channels(bn, dbn_w.data_ptr<double>(), dbn_b.data_ptr<double>());
    } else if (bn_train) {
      b.two_phase(bn, dbn_w.data_ptr<double>(), dbn_b.data_ptr<double>());
    } else {
      b.planes(bn);
      if (has_bn) {  // BatchNorm parameters: dbeta = sum(gz), dgamma = sum(gz * xhat)
        double *dw = dbn_w.data_ptr<double>(), *db = dbn_b.data_ptr<double>();
        for (int64_t ch = 0; ch < C; ++ch) {
          double sgc, sgxc;
          b.centred_sums(ch, bn.mean[ch], sgc, sgxc);
          db[ch] = sgc;
          dw[ch] = bn.invstd[ch] * sgxc;
        }
      }
    }
  });
  const auto bn_dtype = defined(bn_w) ? bn_w->scalar_type() : at::kFloat;
  return {gx, gpre, param_grads(s1, s2, P, groups).to(cw.scalar_type()), dbn_w.to(bn_dtype),
          dbn_b.to(bn_dtype)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sanet fused Shuffle Attention CPU kernels";
  m.def("sa_forward", &sa_forward);
  m.def("sa_backward", &sa_backward);
}
