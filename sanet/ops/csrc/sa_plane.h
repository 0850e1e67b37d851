// SA geometry (groups, branches, the channel shuffle) and the per-plane gate of the fused
// Shuffle Attention CPU kernels (see shuffle_attention.cpp).

#pragma once

#include "sa_vec.h"

namespace {

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

}  // namespace
