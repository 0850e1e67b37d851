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
// small. Per-plane statistics and all reductions are in double (plane sums in the compute
// type first); element-wise math is vectorised in the compute type: the input type for
// float and double, float for fp16/bf16, which are read and written as they are and rounded
// once on the way out (sa_io.h). Large outputs are written with streaming stores (no
// read-for-ownership).
//
// The pieces, one file each: sa_io.h (loads and stores per storage type), sa_vec.h (vector
// helpers, plane statistics), sa_plane.h (SA geometry and the gate), sa_forward.h,
// sa_backward.h; this file checks the arguments and dispatches. They form one translation
// unit, so the compiler inlines across them as before.

#include "sa_forward.h"
#include "sa_backward.h"

namespace {

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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sa_forward", [&] {
    const Fwd<scalar_t> f{Layout(x, groups), P, eps, x.data_ptr<scalar_t>(),
                          has_sc ? shortcut->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                          pmean.data_ptr<double>(), pvar.data_ptr<double>(), relu,
                          out.nbytes() >= kStreamBytes};
    if (!bn_train)
      f.planes(bn);
    else if (walk_channels<compute_t<scalar_t>>(plane_size(x)))
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

// Training BatchNorm's dL/dz between the backward passes (see Bwd::gz): gx itself, or for
// 16-bit gx a float tensor (in scratch) when it goes in two passes.
template <typename S>
compute_t<S>* dz_buffer(const Tensor& gx, bool two_phase, Tensor& scratch) {
  if constexpr (!is_16bit<S>) {
    return gx.data_ptr<S>();
  } else {
    if (!two_phase) return nullptr;  // the channel walk keeps it per thread
    scratch = at::empty(gx.sizes(), gx.options().dtype(at::kFloat));
    return scratch.data_ptr<float>();
  }
}

// Returns grad x, the gradient before the ReLU (the shortcut's; undefined without ReLU),
// the six gate parameters' gradients as one (6, c) tensor in float32 or a wider parameter dtype, and
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sa_backward", [&] {
    const bool walk = bn_train && walk_channels<compute_t<scalar_t>>(plane_size(x));
    Tensor gz_scratch;
    auto* gz = dz_buffer<scalar_t>(gx, bn_train && !walk, gz_scratch);
    const Bwd<scalar_t> b{Layout(x, groups), P, eps, grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                          pmean.data_ptr<double>(), pvar.data_ptr<double>(),
                          has_out ? out->data_ptr<scalar_t>() : nullptr, gx.data_ptr<scalar_t>(),
                          has_out ? gpre.data_ptr<scalar_t>() : nullptr, s1.data_ptr<double>(),
                          s2.data_ptr<double>(), has_bn ? sg.data_ptr<double>() : nullptr,
                          has_bn ? sgx.data_ptr<double>() : nullptr, gz, gx.nbytes() >= kStreamBytes};
    if (walk) {
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
  // float32 or a wider parameter dtype (sa_op.param_grads_dtype); Python casts each row to its
  // own parameter's dtype, so an fp32 gn.weight beside fp16 gates is not rounded through fp16.
  auto gp_dtype = at::kFloat;
  for (const Tensor* p : {&cw, &cb, &sw, &sb, &gw, &gb}) gp_dtype = at::promote_types(gp_dtype, p->scalar_type());
  return {gx, gpre, param_grads(s1, s2, P, groups).to(gp_dtype), dbn_w.to(bn_dtype), dbn_b.to(bn_dtype)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sanet fused Shuffle Attention CPU kernels";
  m.def("sa_forward", &sa_forward);
  m.def("sa_backward", &sa_backward);
}
