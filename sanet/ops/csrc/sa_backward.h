// Backward passes of the fused Shuffle Attention CPU kernels (see shuffle_attention.cpp).

#pragma once

#include "sa_plane.h"

namespace {

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
template <typename S, typename T = compute_t<S>>
PlaneBwd bwd_pass_a(const Layout& L, const Params& P, int64_t ch, const Gate& g, const S* xr,
                    const S* go, T* sig) {
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
      const V xv = vload(xr + i), d = xv - vmx;
      const V gz = vload(go + i) * zc(xv, d);
      acc1.add(gz);
      acc2.fmadd(gz, d * va);
    }
    double s1 = acc1.sum(), s2 = acc2.sum();
    for (; i < M; ++i) {
      const double z = g.a * double(xr[i]) + g.b;
      s1 += double(go[i]) * z;
      s2 += double(go[i]) * z * (g.a * (double(xr[i]) - mxt));
    }
    s2 += g.a * (mxt - g.mx) * s1;  // the sums were centred on mxt, not the mean
    r.S1 = r.s_const * (1 - r.s_const) * s1;
    Sgz = r.s_const * (1 - r.s_const) * s2;
  } else {
    const SigmoidOfAffine<T> sigmoid(g.Ax(), g.Bc, g.mx);
    for (; i + W <= M; i += W) {
      const V xv = vload(xr + i), d = xv - vmx;
      const V z = zc(xv, d);
      const V s = sigmoid.centred(d);
      s.store(sig + i);
      const V gu = vload(go + i) * z * s * (one - s);
      acc1.add(gu);
      acc2.fmadd(gu, d * va);
    }
    r.S1 = acc1.sum();
    Sgz = acc2.sum();
    for (; i < M; ++i) {
      const double z = g.a * double(xr[i]) + g.b;
      const double s = ssigmoid<double>(g.Ax() * (double(xr[i]) - g.mx) + g.Bc);
      sig[i] = static_cast<T>(s);
      const double gu = double(go[i]) * z * s * (1 - s);
      r.S1 += gu;
      Sgz += gu * (g.a * (double(xr[i]) - mxt));
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
template <typename S, typename T = compute_t<S>>
struct GradZ {
  CentredZ<T> zc;
  Vectorized<T> vK0, vKgu, vKzd, vs, one;
  const S *xr, *go;
  const T* sig;
  bool const_gate;
  // Kz * z + K0 = (Kz * a) * (x - m) + (Kz * z(m) + K0): the two terms of the left side
  // cancel when |mean z| >> std z.
  GradZ(const Gate& g, const PlaneBwd& r, const S* xr_, const S* go_, const T* sig_)
      : zc(g), vK0(static_cast<T>(r.K0 + r.Kz * (g.a * double(centre<T>(g.mx)) + g.b))),
        vKgu(static_cast<T>(r.Kgu)), vKzd(static_cast<T>(r.Kz * g.a)), vs(static_cast<T>(r.s_const)),
        one(static_cast<T>(1)), xr(xr_), go(go_), sig(sig_), const_gate(r.const_gate) {}
  Vectorized<T> operator()(int64_t i, int64_t n) const {
    using V = Vectorized<T>;
    const V gv = vload(go + i, n);
    if (const_gate) return at::vec::fmadd(gv, vs, vK0);  // Az == 0, hence Kgu == Kz == 0
    const V s = V::loadu(sig + i, n);
    const V xv = vload(xr + i, n), d = xv - zc.m;
    const V gu = gv * zc(xv, d) * s * (one - s);
    return at::vec::fmadd(gv, s, at::vec::fmadd(vKgu, gu, at::vec::fmadd(vKzd, d, vK0)));
  }
};

template <typename S>
struct Bwd {
  using T = compute_t<S>;
  const Layout L;
  const Params& P;
  const double eps;
  const S* grad;
  const S* x;
  const double* pmean;
  const double* pvar;
  const S* out;  // saved output when the ReLU is fused (its mask), else null
  S* gx;
  S* gpre;       // gradient before the ReLU (= shortcut's), when fused
  double* S1;
  double* S2;
  double* Sg;    // per-plane sum(gz), sum(gz * (x - plane mean)) for BatchNorm (or null)
  double* Sgx;
  // Training BatchNorm's dL/dz of every plane, between pass B and BatchNorm's backward, in
  // compute_t<S>: gx itself for float and double; a float tensor for 16-bit gx in two_phase
  // (rounding dL/dz to 16 bits there would be a second rounding of gx). channels keeps it
  // per thread instead.
  T* gz;
  bool stream;

  // Gradient at the SA output of plane (n, ch): through the recomputed ReLU mask.
  const S* sa_grad(int64_t n, int64_t ch) const {
    using V = Vectorized<T>;
    const int64_t dst = (n * L.C + L.out_channel(ch)) * L.M;
    if (!out) return grad + dst;
    const V zero(static_cast<T>(0));
    map_plane<S, false>(gpre + dst, L.M, [&](int64_t i, int64_t k) {
      return V::blendv(zero, vload(grad + dst + i, k), vload(out + dst + i, k) > zero);
    });
    return gpre + dst;
  }

  // Pass B of plane (n, ch): writes scale * dL/dz to dst (Stream: around the cache) and the sums.
  template <bool Stream, typename D>
  void pass_b(int64_t n, int64_t ch, const Gate& g, const PlaneBwd& r, const S* go, const T* sig,
              double scale, D* dst) const {
    using V = Vectorized<T>;
    const int64_t k = n * L.C + ch;
    const S* xr = x + k * L.M;
    const GradZ<S> gz_at(g, r, xr, go, sig);
    const V vscale(static_cast<T>(scale));
    S1[k] = r.S1;
    S2[k] = r.S2;
    if (!Sg) {
      map_plane<D, Stream>(dst, L.M, [&](int64_t i, int64_t m) { return gz_at(i, m) * vscale; });
      return;
    }
    PlaneSum<T> accg, accgx;
    map_plane<D, Stream>(dst, L.M, [&](int64_t i, int64_t m) {
      const V gz = gz_at(i, m);
      const V gzm = m == V::size() ? gz : V::set(V(static_cast<T>(0)), gz, m);  // drop padding
      accg.add(gzm);
      accgx.fmadd(gzm, vload(xr + i, m) - gz_at.zc.m);  // centred: see centred_sums
      return gz * vscale;
    });
    Sg[k] = accg.sum();
    Sgx[k] = accgx.sum();
  }

  // A batch of planes: gates and pass A for all, then pass B for all; plane i's result goes
  // to dst(i) (gx, or training BatchNorm's dL/dz).
  template <bool Stream, typename Dst>
  void batch(const int64_t* ns, const int64_t* chs, int64_t cnt, const Affine& bn, bool scale_by_a,
             T* sig, Dst&& dst) const {
    Gate g[kMaxBatch];
    PlaneBwd r[kMaxBatch];
    const S* go[kMaxBatch];
    for (int64_t i = 0; i < cnt; ++i) {
      const int64_t k = ns[i] * L.C + chs[i];
      double a, b;
      bn.at(chs[i], a, b);
      g[i] = plane_gate(L, P, chs[i], a, b, pmean[k], pvar[k], eps);
      go[i] = sa_grad(ns[i], chs[i]);
      r[i] = bwd_pass_a<S>(L, P, chs[i], g[i], x + k * L.M, go[i], sig + i * L.M);
    }
    for (int64_t i = 0; i < cnt; ++i)
      pass_b<Stream>(ns[i], chs[i], g[i], r[i], go[i], sig + i * L.M, scale_by_a ? g[i].a : 1.0, dst(i));
  }

  // Independent planes: gx = a * dL/dz (identity or fixed statistics), or dL/dz itself into
  // gz for the training-BatchNorm finish to transform (scale_by_a false).
  void planes(const Affine& bn, bool scale_by_a = true) const {
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, L.M));
    const int64_t B = backward_batch_planes<S>(L.M);
    at::parallel_for(0, L.N * L.C, grain, [&](int64_t k0, int64_t k1) {
      // Output order, as in the forward pass: the incoming gradient and the ReLU mask are
      // read, and the pre-ReLU gradient written, as sequential streams.
      std::vector<T> sig(B * L.M);
      OutputOrderBatches b(L, k0, k1, B);
      const auto to_gx = [&](int64_t i) { return gx + (b.ns[i] * L.C + b.chs[i]) * L.M; };
      const auto to_gz = [&](int64_t i) { return gz + (b.ns[i] * L.C + b.chs[i]) * L.M; };
      while (b.next()) {
        if (!scale_by_a) batch<false>(b.ns, b.chs, b.cnt, bn, false, sig.data(), to_gz);
        else if (stream) batch<true>(b.ns, b.chs, b.cnt, bn, true, sig.data(), to_gx);
        else batch<false>(b.ns, b.chs, b.cnt, bn, true, sig.data(), to_gx);
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

  // gx = a * gz + K1 + K2 * (x - mean) of plane k (gz: its dL/dz), as
  // K2 * (x - m) + (K1 + K2 * (m - mean)) about the plane's own mean m, for the reason of CentredZ.
  template <bool Stream>
  void bn_finish_plane(int64_t k, const T* gzk, double a, double K1, double K2, double mean) const {
    using V = Vectorized<T>;
    const T m = centre<T>(pmean[k]);
    const V vm(m), va(static_cast<T>(a)), vK1(static_cast<T>(K1 + K2 * (double(m) - mean))),
        vK2(static_cast<T>(K2));
    const S* xr = x + k * L.M;
    map_plane<S, Stream>(gx + k * L.M, L.M, [&](int64_t i, int64_t n) {
      return at::vec::fmadd(vload(xr + i, n) - vm, vK2, at::vec::fmadd(V::loadu(gzk + i, n), va, vK1));
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
        if (stream) bn_finish_plane<true>(k, gz + k * L.M, A[ch], K1[ch], K2[ch], bn.mean[ch]);
        else bn_finish_plane<false>(k, gz + k * L.M, A[ch], K1[ch], K2[ch], bn.mean[ch]);
      }
      if (stream) stream_fence();
    });
  }

  // Training BatchNorm, large planes: dL/dz of the channel's N planes, then BatchNorm's
  // backward over them while they are in L2 (16-bit gx: dL/dz in a float buffer per thread).
  void channels(const Affine& bn, double* dw, double* db) const {
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, L.N * L.M));
    const int64_t B = std::min<int64_t>(L.N, kMaxBatch);
    at::parallel_for(0, L.C, grain, [&](int64_t c0, int64_t c1) {
      std::vector<T> sig(B * L.M), own(is_16bit<S> ? L.N * L.M : 0);
      int64_t ns[kMaxBatch], chs[kMaxBatch];
      for (int64_t ch = c0; ch < c1; ++ch) {
        const auto gz_of = [&](int64_t n) { return is_16bit<S> ? own.data() + n * L.M : gz + (n * L.C + ch) * L.M; };
        for (int64_t nb = 0; nb < L.N; nb += B) {
          const int64_t cnt = std::min(L.N - nb, B);
          for (int64_t i = 0; i < cnt; ++i) {
            ns[i] = nb + i;
            chs[i] = ch;
          }
          batch<false>(ns, chs, cnt, bn, false, sig.data(), [&](int64_t i) { return gz_of(ns[i]); });
        }
        double a, K1, K2;
        bn_coeffs(bn, ch, dw, db, a, K1, K2);
        for (int64_t n = 0; n < L.N; ++n) {
          if (stream) bn_finish_plane<true>(n * L.C + ch, gz_of(n), a, K1, K2, bn.mean[ch]);
          else bn_finish_plane<false>(n * L.C + ch, gz_of(n), a, K1, K2, bn.mean[ch]);
        }
      }
      if (stream) stream_fence();
    });
  }
};

}  // namespace
