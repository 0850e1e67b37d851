// Forward passes of the fused Shuffle Attention CPU kernels (see shuffle_attention.cpp).

#pragma once

#include "sa_plane.h"

namespace {

// out = z * sigmoid(u) (+ shortcut) (ReLU) for one plane, computed in compute_t<S>.
template <typename S, bool Stream>
void gate_plane(const S* x, S* out, const S* sc, int64_t M, const Gate& g, bool relu) {
  using T = compute_t<S>;
  using V = Vectorized<T>;
  const V zero(static_cast<T>(0));
  auto finish = [&](V y, int64_t i, int64_t n) {
    if (sc) y = y + vload(sc + i, n);
    return relu ? at::vec::maximum(y, zero) : y;
  };
  if (g.Az == 0.0) {  // channel branch, or sweight == 0: no exp per element
    const CentredZ<T> zs(g, ssigmoid(g.Bc));  // z * s
    map_plane<S, Stream>(out, M, [&](int64_t i, int64_t n) {
      const V xv = vload(x + i, n);
      return finish(zs(xv, xv - zs.m), i, n);
    });
    return;
  }
  const SigmoidOfAffine<T> sigmoid(g.Ax(), g.Bc, g.mx);
  if (g.a == 1.0 && g.b == 0.0) {  // no BatchNorm in front: z = x
    map_plane<S, Stream>(out, M, [&](int64_t i, int64_t n) {
      const V xv = vload(x + i, n);
      return finish(xv * sigmoid(xv), i, n);
    });
    return;
  }
  const CentredZ<T> z(g);
  map_plane<S, Stream>(out, M, [&](int64_t i, int64_t n) {
    const V xv = vload(x + i, n), d = xv - z.m;
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
// (16-bit input decides as float does, by its compute type: its channel walk keeps dL/dz in a
// float buffer per thread, which the two passes would need for the whole tensor.)
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

template <typename S>
struct Fwd {
  using T = compute_t<S>;
  const Layout L;
  const Params& P;
  const double eps;
  const S* x;
  const S* sc;
  S* out;
  double* pm;
  double* pv;
  bool relu, stream;

  void gate(int64_t n, int64_t ch, const Gate& g) const {
    const int64_t k = n * L.C + ch;
    const int64_t dst = (n * L.C + L.out_channel(ch)) * L.M;
    const S* s = sc ? sc + dst : nullptr;
    if (stream)
      gate_plane<S, true>(x + k * L.M, out + dst, s, L.M, g, relu);
    else
      gate_plane<S, false>(x + k * L.M, out + dst, s, L.M, g, relu);
  }

  // Identity or given (running) statistics: every plane is independent.
  void planes(const Affine& bn, bool moments_done = false) const {
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, L.M));
    const int64_t B = batch_planes<S>(L.M);
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
          if (i < b.next_cnt) prefetch(x + (b.next_ns[i] * L.C + b.next_chs[i]) * L.M, L.M * sizeof(S));
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
          if (n + 1 < L.N) prefetch(x + (k + L.C) * L.M, L.M * sizeof(S));
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

}  // namespace
