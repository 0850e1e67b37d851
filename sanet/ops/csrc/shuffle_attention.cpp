// Fused CPU kernels for Shuffle Attention (SA-Net, Zhang & Yang, ICASSP 2021).
//
// SA is a per-channel gate followed by a fixed permutation (SA-NET.md section 5):
//   y[n, P(c)] = z * sigmoid(A[n,c] * z + B[n,c]),   z = x[n, c]  (per plane)
// so one (n, c) plane is read for its statistics and read again to write the output while
// it is still in cache. Optionally a BatchNorm in front (z = a_c * x + b_c, with batch or
// running statistics), a residual add and a ReLU behind are fused into the same passes;
// that is the tail of an SA-ResNet block (bn3 -> SA -> += shortcut -> ReLU).
//
// Work is split over channels (at::parallel_for, i.e. PyTorch's own thread pool); each task
// walks the N planes of its channel, which is what BatchNorm's batch statistics need.
// Statistics and reductions accumulate in double; element-wise math runs in the input type
// with ATen's vectorised exp.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <optional>
#include <vector>

namespace {

using at::Tensor;
using at::vec::Vectorized;

// Channel layout of SA: G groups of 2c channels; first c of a group are the channel
// branch, last c the spatial branch; the 2-group shuffle sends c to out_channel(c).
struct Layout {
  int64_t N, C, M, G, cg, cc, half;
  Layout(const Tensor& x, int64_t groups)
      : N(x.size(0)), C(x.size(1)), M(x.size(2)), G(groups), cg(C / groups), cc(C / (2 * groups)),
        half(C / 2) {}
  int64_t out_channel(int64_t c) const { return 2 * (c % half) + c / half; }
  int64_t param(int64_t c) const { return (c % cg) % cc; }
  bool spatial(int64_t c) const { return (c % cg) >= cc; }
};

// Gate parameters, rows of a (6, c) double tensor: cweight, cbias, sweight, sbias, gn.w, gn.b.
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

template <typename T>
double hsum(const Vectorized<T>& v) {
  T buf[Vectorized<T>::size()];
  v.store(buf);
  double s = 0;
  for (int64_t k = 0; k < Vectorized<T>::size(); ++k) s += buf[k];
  return s;
}

// Sum of p[i] (two vector accumulators for latency; tail scalar so padding never counts).
template <typename T>
double plane_sum(const T* p, int64_t M) {
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
  return s;
}

// Sum of (p[i] - mean)^2: the second pass of a two-pass variance (the plane is in cache).
template <typename T>
double plane_sq_dev(const T* p, int64_t M, T mean) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V vm(mean);
  V a0(static_cast<T>(0)), a1(static_cast<T>(0));
  int64_t i = 0;
  for (; i + 2 * W <= M; i += 2 * W) {
    V d0 = V::loadu(p + i) - vm, d1 = V::loadu(p + i + W) - vm;
    a0 = at::vec::fmadd(d0, d0, a0);
    a1 = at::vec::fmadd(d1, d1, a1);
  }
  for (; i + W <= M; i += W) {
    V d = V::loadu(p + i) - vm;
    a0 = at::vec::fmadd(d, d, a0);
  }
  double s = hsum<T>(a0 + a1);
  for (; i < M; ++i) s += (double(p[i]) - mean) * (double(p[i]) - mean);
  return s;
}

// Gate of one plane: z = a*x + b, u = Ax*x + Bx (u is the gate argument in x terms).
struct Gate {
  double a, b, Az, Bz, rz, mz;  // Az, Bz: coefficients on z; rz, mz: z's plane rstd/mean
  double Ax() const { return Az * a; }
  double Bx() const { return Az * b + Bz; }
};

inline Gate plane_gate(const Layout& L, const Params& P, int64_t c, double a, double b,
                       double mx, double vx, double eps) {
  const int64_t j = L.param(c);
  Gate g{a, b, 0.0, 0.0, 0.0, a * mx + b};
  if (L.spatial(c)) {
    // GroupNorm(c, c) of z: per-plane normalisation; z's variance is a^2 times x's.
    g.rz = 1.0 / std::sqrt(a * a * vx + eps);
    g.Az = P.sw(j) * P.gw(j) * g.rz;
    g.Bz = P.sw(j) * (P.gb(j) - P.gw(j) * g.mz * g.rz) + P.sb(j);
  } else {
    g.Bz = P.cw(j) * g.mz + P.cb(j);  // global average pool of z
  }
  return g;
}

template <typename T>
inline T sigmoid_scalar(T u) { return T(1) / (T(1) + std::exp(-u)); }

// out = z * sigmoid(u) (+ shortcut) (ReLU), for one plane.
template <typename T>
void gate_plane(const T* x, T* out, const T* sc, int64_t M, const Gate& g, bool relu) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V zero(static_cast<T>(0)), one(static_cast<T>(1));
  auto finish = [&](V y, int64_t i, int64_t n) {
    if (sc) y = y + V::loadu(sc + i, n);
    if (relu) y = at::vec::maximum(y, zero);
    y.store(out + i, n);
  };
  if (g.Az == 0.0) {
    // Constant gate over the plane (channel branch, or sweight == 0): no exp per element.
    const double s = sigmoid_scalar(g.Bz);
    const V va(static_cast<T>(g.a * s)), vb(static_cast<T>(g.b * s));
    for (int64_t i = 0; i < M; i += W) {
      const int64_t n = std::min<int64_t>(W, M - i);
      finish(at::vec::fmadd(V::loadu(x + i, n), va, vb), i, n);
    }
    return;
  }
  const V va(static_cast<T>(g.a)), vb(static_cast<T>(g.b)), vA(static_cast<T>(g.Ax())), vB(static_cast<T>(g.Bx()));
  for (int64_t i = 0; i < M; i += W) {
    const int64_t n = std::min<int64_t>(W, M - i);
    const V xv = V::loadu(x + i, n);
    const V z = at::vec::fmadd(xv, va, vb);
    const V u = at::vec::fmadd(xv, vA, vB);
    finish(z / (one + u.neg().exp()), i, n);
  }
}

template <typename T>
void forward_kernel(const Tensor& x, const Tensor* shortcut, const Params& P, int64_t groups,
                    double eps, const double* bn_w, const double* bn_b, const double* bn_mean,
                    const double* bn_invstd, bool bn_train, double bn_eps, bool relu, Tensor& out,
                    Tensor& pmean, Tensor& pvar, Tensor& bmean, Tensor& bvar) {
  const Layout L(x, groups);
  const T* xp = x.data_ptr<T>();
  const T* sp = shortcut ? shortcut->data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  double* pm = pmean.data_ptr<double>();
  double* pv = pvar.data_ptr<double>();
  double* bm = bn_train ? bmean.data_ptr<double>() : nullptr;
  double* bv = bn_train ? bvar.data_ptr<double>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, L.N * L.M));

  at::parallel_for(0, L.C, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      // Pass 1: per-plane mean and variance of x (two passes over an L1-resident plane).
      for (int64_t n = 0; n < L.N; ++n) {
        const T* p = xp + (n * L.C + c) * L.M;
        const double m = plane_sum(p, L.M) / L.M;
        pm[n * L.C + c] = m;
        pv[n * L.C + c] = plane_sq_dev(p, L.M, T(m)) / L.M;
      }
      // BatchNorm in front: z = a*x + b, from batch statistics (exact merge of equal-size
      // planes) or from the given running statistics.
      double a = 1.0, b = 0.0;
      if (bn_w) {
        double mean, invstd;
        if (bn_train) {
          double s = 0;
          for (int64_t n = 0; n < L.N; ++n) s += pm[n * L.C + c];
          mean = s / L.N;
          double m2 = 0;
          for (int64_t n = 0; n < L.N; ++n) {
            const double d = pm[n * L.C + c] - mean;
            m2 += pv[n * L.C + c] + d * d;
          }
          const double var = m2 / L.N;
          bm[c] = mean;
          bv[c] = var;
          invstd = 1.0 / std::sqrt(var + bn_eps);
        } else {
          mean = bn_mean[c];
          invstd = bn_invstd[c];
        }
        a = bn_w[c] * invstd;
        b = bn_b[c] - mean * a;
      }
      // Pass 2: gate each plane while it is warm; write to the shuffled channel.
      const int64_t oc = L.out_channel(c);
      for (int64_t n = 0; n < L.N; ++n) {
        const Gate g = plane_gate(L, P, c, a, b, pm[n * L.C + c], pv[n * L.C + c], eps);
        const int64_t src = (n * L.C + c) * L.M, dst = (n * L.C + oc) * L.M;
        gate_plane<T>(xp + src, op + dst, sp ? sp + dst : nullptr, L.M, g, relu);
      }
    }
  });
}

template <typename T>
void backward_kernel(const Tensor& grad, const Tensor& x, const Tensor* out, const Tensor& pmean,
                     const Tensor& pvar, const Params& P, int64_t groups, double eps,
                     const double* bn_w, const double* bn_b, const double* bn_mean,
                     const double* bn_invstd, bool bn_train, Tensor& gx, Tensor* gpre, Tensor& s1,
                     Tensor& s2, Tensor& dbn_w, Tensor& dbn_b) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const Layout L(x, groups);
  const T* gp_in = grad.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const T* outp = out ? out->data_ptr<T>() : nullptr;
  T* gxp = gx.data_ptr<T>();
  T* gprep = gpre ? gpre->data_ptr<T>() : nullptr;
  const double* pm = pmean.data_ptr<double>();
  const double* pv = pvar.data_ptr<double>();
  double* S1 = s1.data_ptr<double>();
  double* S2 = s2.data_ptr<double>();
  double* dw = bn_w ? dbn_w.data_ptr<double>() : nullptr;
  double* db = bn_w ? dbn_b.data_ptr<double>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, L.N * L.M));
  const V zero(static_cast<T>(0)), one(static_cast<T>(1));

  at::parallel_for(0, L.C, grain, [&](int64_t c0, int64_t c1) {
    std::vector<T> sig(L.M);  // sigmoid of the current plane, reused by pass B
    for (int64_t c = c0; c < c1; ++c) {
      double a = 1.0, b = 0.0, mean = 0.0, invstd = 1.0;
      if (bn_w) {
        mean = bn_mean[c];
        invstd = bn_invstd[c];
        a = bn_w[c] * invstd;
        b = bn_b[c] - mean * a;
      }
      const int64_t oc = L.out_channel(c);
      const int64_t j = L.param(c);
      const bool spatial = L.spatial(c);
      const V va(static_cast<T>(a)), vb(static_cast<T>(b));
      double sum_gz = 0, sum_gzx = 0;  // BatchNorm reductions over the channel
      for (int64_t n = 0; n < L.N; ++n) {
        const Gate g = plane_gate(L, P, c, a, b, pm[n * L.C + c], pv[n * L.C + c], eps);
        const int64_t src = (n * L.C + c) * L.M, dst = (n * L.C + oc) * L.M;
        const T* xr = xp + src;
        // Gradient at the SA output: through the ReLU mask (recomputed from the saved
        // output) when fused; stored since it is also the shortcut's gradient.
        const T* go = gp_in + dst;
        if (outp) {
          const T* orow = outp + dst;
          T* pre = gprep + dst;
          for (int64_t i = 0; i < L.M; i += W) {
            const int64_t k = std::min<int64_t>(W, L.M - i);
            const V gv = V::loadu(go + i, k);
            V::blendv(zero, gv, V::loadu(orow + i, k) > zero).store(pre + i, k);
          }
          go = pre;
        }
        // Pass A: sigmoid, and the sums the statistics' gradients need:
        //   S1 = sum(gu), Sgz = sum(gu * z), gu = dL/du = go * z * s * (1 - s).
        const bool const_gate = g.Az == 0.0;
        double S1v = 0, Sgz = 0;
        if (const_gate) {
          const double s = sigmoid_scalar(g.Bz);
          V acc(static_cast<T>(0));
          int64_t i = 0;
          for (; i + W <= L.M; i += W)
            acc = at::vec::fmadd(V::loadu(go + i), at::vec::fmadd(V::loadu(xr + i), va, vb), acc);
          double gzs = hsum<T>(acc);
          for (; i < L.M; ++i) gzs += double(go[i]) * (a * xr[i] + b);
          S1v = s * (1 - s) * gzs;
          if (spatial) {
            V acc2(static_cast<T>(0));
            i = 0;
            for (; i + W <= L.M; i += W) {
              const V z = at::vec::fmadd(V::loadu(xr + i), va, vb);
              acc2 = at::vec::fmadd(V::loadu(go + i) * z, z, acc2);
            }
            double gzz = hsum<T>(acc2);
            for (; i < L.M; ++i) {
              const double z = a * xr[i] + b;
              gzz += double(go[i]) * z * z;
            }
            Sgz = s * (1 - s) * gzz;
          }
        } else {
          const V vA(static_cast<T>(g.Ax())), vB(static_cast<T>(g.Bx()));
          V acc1(static_cast<T>(0)), acc2(static_cast<T>(0));
          int64_t i = 0;
          for (; i + W <= L.M; i += W) {
            const V xv = V::loadu(xr + i);
            const V z = at::vec::fmadd(xv, va, vb);
            const V s = one / (one + at::vec::fmadd(xv, vA, vB).neg().exp());
            s.store(sig.data() + i);
            const V gu = V::loadu(go + i) * z * s * (one - s);
            acc1 += gu;
            acc2 = at::vec::fmadd(gu, z, acc2);
          }
          S1v = hsum<T>(acc1);
          Sgz = hsum<T>(acc2);
          for (; i < L.M; ++i) {
            const T z = T(a * xr[i] + b);
            const T s = sigmoid_scalar<T>(T(g.Ax() * xr[i] + g.Bx()));
            sig[i] = s;
            const double gu = double(go[i]) * z * s * (1 - s);
            S1v += gu;
            Sgz += gu * z;
          }
        }
        // Sums for the gate parameters' gradients (reduced over n and groups in Python):
        // channel branch: dcweight += S1 * mean(z), dcbias += S1;
        // spatial branch: S2 = sum(gu * zhat), zhat the GroupNorm output before its affine.
        S1[n * L.C + c] = S1v;
        const double M = double(L.M);
        double K0, Kgu = 0, Kz = 0;  // dL/dz = go*s + Kgu*gu + K0 + Kz*z
        if (spatial) {
          const double Szh = g.rz * (Sgz - g.mz * S1v);
          S2[n * L.C + c] = Szh;
          Kgu = P.sw(j) * P.gw(j) * g.rz;  // GroupNorm backward, with gzhat = gu * sw * gw
          K0 = -Kgu * S1v / M + Kgu * Szh * g.rz * g.mz / M;
          Kz = -Kgu * Szh * g.rz / M;
        } else {
          S2[n * L.C + c] = S1v * g.mz;
          K0 = P.cw(j) * S1v / M;  // mean's gradient is uniform over the plane
        }
        // Pass B: dL/dz; then BatchNorm's chain (eval: scale; train: finished in pass C).
        T* gxr = gxp + src;
        const bool store_gz = bn_train;
        const double scale = bn_w && !bn_train ? a : 1.0;
        const V vK0(static_cast<T>(K0)), vKgu(static_cast<T>(Kgu)), vKz(static_cast<T>(Kz)), vscale(static_cast<T>(scale));
        V accg(static_cast<T>(0)), accgx(static_cast<T>(0));
        const double s_const = const_gate ? sigmoid_scalar(g.Bz) : 0.0;
        const V vs_const(static_cast<T>(s_const));
        int64_t i = 0;
        for (; i + W <= L.M; i += W) {
          const V xv = V::loadu(xr + i);
          const V gv = V::loadu(go + i);
          V gz;
          if (const_gate) {
            gz = at::vec::fmadd(gv, vs_const, vK0);  // Kgu == Az == 0, hence Kz == 0
          } else {
            const V s = V::loadu(sig.data() + i);
            const V z = at::vec::fmadd(xv, va, vb);
            const V gu = gv * z * s * (one - s);
            gz = at::vec::fmadd(gv, s, at::vec::fmadd(vKgu, gu, at::vec::fmadd(vKz, z, vK0)));
          }
          if (bn_w) {
            accg += gz;
            accgx = at::vec::fmadd(gz, xv, accgx);
          }
          (store_gz ? gz : gz * vscale).store(gxr + i);
        }
        if (bn_w) {
          sum_gz += hsum<T>(accg);
          sum_gzx += hsum<T>(accgx);
        }
        for (; i < L.M; ++i) {
          const double z = a * xr[i] + b;
          const double s = const_gate ? s_const : double(sig[i]);
          const double gu = double(go[i]) * z * s * (1 - s);
          const double gz = double(go[i]) * s + Kgu * gu + K0 + Kz * z;
          if (bn_w) {
            sum_gz += gz;
            sum_gzx += gz * xr[i];
          }
          gxr[i] = T(store_gz ? gz : gz * scale);
        }
      }
      if (!bn_w) continue;
      // BatchNorm parameters: dbeta = sum(gz), dgamma = sum(gz * xhat).
      const double sum_gz_xhat = invstd * (sum_gzx - mean * sum_gz);
      db[c] = sum_gz;
      dw[c] = sum_gz_xhat;
      if (!bn_train) continue;
      // Pass C (train): gx = a * (gz - mean(gz) - xhat * mean(gz * xhat)), over N*M values.
      const double NM = double(L.N) * L.M;
      const double K1 = -a * sum_gz / NM + a * invstd * sum_gz_xhat / NM * mean;
      const double K2 = -a * invstd * sum_gz_xhat / NM;
      const V vK1(static_cast<T>(K1)), vK2(static_cast<T>(K2));
      for (int64_t n = 0; n < L.N; ++n) {
        const int64_t src = (n * L.C + c) * L.M;
        const T* xr = xp + src;
        T* gxr = gxp + src;
        for (int64_t i = 0; i < L.M; i += W) {
          const int64_t k = std::min<int64_t>(W, L.M - i);
          const V gz = V::loadu(gxr + i, k);
          at::vec::fmadd(V::loadu(xr + i, k), vK2, at::vec::fmadd(gz, va, vK1)).store(gxr + i, k);
        }
      }
    }
  });
}

void check_3d(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3 && t.is_contiguous() && t.device().is_cpu(), name,
              " must be a contiguous CPU tensor of shape (N, C, M)");
}

const double* opt_ptr(const std::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<double>() : nullptr;
}

// Returns out, per-plane mean and variance of x (N, C) and, with training BatchNorm,
// the batch mean and biased variance (C).
std::vector<Tensor> sa_forward(const Tensor& x, const std::optional<Tensor>& shortcut,
                               const Tensor& params, int64_t groups, double eps,
                               const std::optional<Tensor>& bn_w, const std::optional<Tensor>& bn_b,
                               const std::optional<Tensor>& bn_mean,
                               const std::optional<Tensor>& bn_invstd, bool bn_train,
                               double bn_eps, bool relu) {
  check_3d(x, "x");
  TORCH_CHECK(params.scalar_type() == at::kDouble && params.is_contiguous(), "params: (6, c) float64");
  TORCH_CHECK(x.size(1) % (2 * groups) == 0, "channels must be divisible by 2 * groups");
  const Tensor* sc = nullptr;
  if (shortcut.has_value() && shortcut->defined()) {
    check_3d(*shortcut, "shortcut");
    TORCH_CHECK(shortcut->sizes() == x.sizes() && shortcut->scalar_type() == x.scalar_type(),
                "shortcut must match x");
    sc = &shortcut.value();
  }
  auto out = at::empty_like(x);
  auto dopt = x.options().dtype(at::kDouble);
  auto pmean = at::empty({x.size(0), x.size(1)}, dopt);
  auto pvar = at::empty({x.size(0), x.size(1)}, dopt);
  auto bmean = at::empty({bn_train ? x.size(1) : 0}, dopt);
  auto bvar = at::empty({bn_train ? x.size(1) : 0}, dopt);
  const Params P{params.data_ptr<double>(), params.size(1)};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sa_forward", [&] {
    forward_kernel<scalar_t>(x, sc, P, groups, eps, opt_ptr(bn_w), opt_ptr(bn_b), opt_ptr(bn_mean),
                             opt_ptr(bn_invstd), bn_train, bn_eps, relu, out, pmean, pvar, bmean,
                             bvar);
  });
  return {out, pmean, pvar, bmean, bvar};
}

// Returns grad_x, grad at the pre-ReLU sum (the shortcut's gradient; empty without ReLU),
// the per-plane sums S1 and S2 for the gate parameters, and BatchNorm's dweight, dbias.
std::vector<Tensor> sa_backward(const Tensor& grad, const Tensor& x, const std::optional<Tensor>& out,
                                const Tensor& pmean, const Tensor& pvar, const Tensor& params,
                                int64_t groups, double eps, const std::optional<Tensor>& bn_w,
                                const std::optional<Tensor>& bn_b, const std::optional<Tensor>& bn_mean,
                                const std::optional<Tensor>& bn_invstd, bool bn_train) {
  check_3d(x, "x");
  check_3d(grad, "grad");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(), "grad must match x");
  const Tensor* o = nullptr;
  if (out.has_value() && out->defined()) {
    check_3d(*out, "out");
    o = &out.value();
  }
  auto gx = at::empty_like(x);
  Tensor gpre = o ? at::empty_like(x) : Tensor();
  auto dopt = x.options().dtype(at::kDouble);
  auto s1 = at::empty({x.size(0), x.size(1)}, dopt);
  auto s2 = at::empty({x.size(0), x.size(1)}, dopt);
  const bool has_bn = bn_w.has_value() && bn_w->defined();
  auto dbn_w = at::empty({has_bn ? x.size(1) : 0}, dopt);
  auto dbn_b = at::empty({has_bn ? x.size(1) : 0}, dopt);
  const Params P{params.data_ptr<double>(), params.size(1)};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sa_backward", [&] {
    backward_kernel<scalar_t>(grad, x, o, pmean, pvar, P, groups, eps, opt_ptr(bn_w), opt_ptr(bn_b),
                              opt_ptr(bn_mean), opt_ptr(bn_invstd), bn_train, gx, o ? &gpre : nullptr,
                              s1, s2, dbn_w, dbn_b);
  });
  return {gx, gpre, s1, s2, dbn_w, dbn_b};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sanet fused Shuffle Attention CPU kernels";
  m.def("sa_forward", &sa_forward);
  m.def("sa_backward", &sa_backward);
}
