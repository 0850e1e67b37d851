"""Mutation round for the layer (``sanet/layers/shuffle_attention.py``), its functional forms
(``sanet/layers/sa_functional.py``), the op argument checks (``sanet/ops/arg_checks.py``) and
the Triton kernels (``sanet/ops/triton_sa.py``, ``triton_kernels.py``).

One-line mutants of those files that the rest of the suite let through; each test names the
mutants it kills. Values are judged against the paper-literal statement of SA-NET.md
section 1 in ``tests/sa_reference.py`` (in float64, on fresh random inputs and parameters),
never against stored numbers. The Triton mutants were all caught by ``tests/test_cuda.py``
under the interpreter except a GPU-only rounding guard, so no interpreter test is here.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from sanet import ShuffleAttention
from sanet.ops import triton_sa
from sanet.ops.arg_checks import check_op_args

from conftest import SA_PARAM_NAMES, randomize_sa_, rel_err, require_fused
from sa_reference import FP32_TOL, IMPLS, authors_sa_nd

HALF = [(torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11)]  # unit roundoff


def _exact(module: ShuffleAttention, x: torch.Tensor, grad_out: torch.Tensor):
    """Output and input gradient of the float64 reference with the module's parameter values."""
    p = {k: v.detach().double() for k, v in module.named_parameters()}
    x64 = x.detach().double().contiguous().requires_grad_()
    out = authors_sa_nd(x64, p, module.groups, module.gn.eps)
    (gx,) = torch.autograd.grad(out, x64, grad_out.double())
    return out, gx


# --------------------------------------------------------------------------- the gn-hook path
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape, layout", [((2, 64, 5, 7), torch.channels_last),
                                           ((2, 32, 3, 4, 5), torch.channels_last_3d)], ids=["2d", "3d"])
def test_gn_hook_path_keeps_channels_last(impl, shape, layout):
    """With a hook on gn (the path that calls the module), a channels_last input still gets a
    channels_last output, as on every other path, with the reference's values and gradient.
    Kills: shuffle_attention.py ``return y if recording else _keep_layout(x, y)`` -> ``return y``."""
    require_fused(impl)
    module = randomize_sa_(ShuffleAttention(shape[1], 4, impl=impl))
    seen = []
    module.gn.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(shape).to(memory_format=layout).requires_grad_()
    out = module(x)
    assert len(seen) == 1  # the hooked path ran
    assert out.is_contiguous(memory_format=layout) and not out.is_contiguous()
    grad_out = torch.randn(shape)
    out.backward(grad_out)
    want, want_gx = _exact(module, x, grad_out)
    assert rel_err(out, want) <= FP32_TOL and rel_err(x.grad, want_gx) <= FP32_TOL


@pytest.mark.parametrize("dtype,u", HALF, ids=["bf16", "fp16"])
def test_gn_hook_path_half_input_in_fp32_and_returned_in_its_dtype(dtype, u):
    """Half-precision input with a hook on gn: statistics and gates in fp32, output in the
    input dtype and within one rounding of the exact result on the same (rounded) input, as
    without the hook (test_layer.py's test_autocast_half_statistics_in_fp32).
    Kills: shuffle_attention.py ``channel_shuffle(y, 2).to(x.dtype)`` -> no cast (fp32 out),
    and ``xc = x.to(_compute_dtype(x))`` -> ``xc = x`` (pooled mean and gn output rounded)."""
    module = randomize_sa_(ShuffleAttention(64, 8))
    seen = []
    module.gn.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = (torch.randn(2, 64, 16, 16) * 3 + 1).to(dtype)
    with torch.autocast("cpu", dtype=dtype), torch.no_grad():
        out = module(x)
    assert seen and out.dtype == dtype and out.shape == x.shape
    exact = _exact(module, x, torch.zeros(x.shape))[0]
    ulps = ((out.double() - exact).abs() / (2 * u * exact.abs() + 1e-12)).max().item()
    assert ulps <= 1.0, f"{ulps:.2f} ulps from the exact result"
    # The exact result rounded once, but near a tie: ~1e-4 of the outputs computed in fp32
    # (seeds 0-4); ~10% where the pooled mean or gn's output was rounded to the input dtype.
    missed = (out != exact.to(dtype)).double().mean().item()
    assert missed <= 1e-3, f"{missed:.2%} of the outputs are not the exact result rounded once"


# --------------------------------------------------------------------------- recorded graphs
def _graph_texts(module: ShuffleAttention, x: torch.Tensor):
    """The graphs TorchScript (frozen: only the branch taken), jit.trace and torch.fx record."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)  # freeze's and trace's deprecation
        scripted = str(torch.jit.freeze(torch.jit.script(module)).graph)
        traced = str(torch.jit.trace(module, x).graph)
    fx_graph = torch.fx.symbolic_trace(module).graph
    fx_text = " ".join(getattr(n.target, "__name__", str(n.target)) for n in fx_graph.nodes)
    return {"script": scripted, "trace": traced, "fx": fx_text}


@pytest.mark.parametrize("impl", ["reference", "torch", "auto"])
def test_recorded_graphs_hold_the_chosen_formulation(impl):
    """impl='reference' is the authors' formulation (GroupNorm on the group view) in scripted,
    traced and fx graphs, as in eager; 'torch' and 'auto' record the per-channel form
    (var_mean). The values agree either way, so only the graphs tell.
    Kills: shuffle_attention.py ``if self.impl == "reference"`` (TorchScript branch) -> ``!=``,
    and ``_IMPL_FNS["reference" if impl == "reference" else "torch"]`` -> ``_IMPL_FNS["torch"]``."""
    want, other = ("group_norm", "var_mean") if impl == "reference" else ("var_mean", "group_norm")
    module = randomize_sa_(ShuffleAttention(16, 2, impl=impl)).eval()
    x = torch.randn(2, 16, 3, 5)
    for kind, text in _graph_texts(module, x).items():
        assert want in text and other not in text, (kind, text)
    p = {k: v.detach().double() for k, v in module.named_parameters()}
    with torch.no_grad():
        assert rel_err(torch.jit.script(module)(x), authors_sa_nd(x.double(), p, 2)) <= FP32_TOL


# --------------------------------------------------------------------------- op argument checks
@pytest.mark.parametrize("shape", [(24,), ()], ids=["1d", "0d"])
def test_op_checks_refuse_input_without_a_channel_dim(shape):
    """The Triton launchers (which the layer's checks do not guard: ``torch.ops.sanet`` is
    callable directly) refuse an x without a channel dim with the op's message, before a
    launch (no GPU or interpreter needed), instead of an IndexError from ``x.shape[1]``.
    Kills: arg_checks.py ``if x.dim() < 2`` -> ``if x.dim() < 1``."""
    x = torch.zeros(shape)
    params = [torch.zeros(3) for _ in SA_PARAM_NAMES]
    msg = r"x must be \(N, C, \*\) with channels in dim 1, got shape \[" + ", ".join(map(str, shape)) + r"\]"
    with pytest.raises(ValueError, match=f"sanet::sa_forward: {msg}"):
        triton_sa.triton_sa_forward(x, None, *params, 4, 1e-5)
    with pytest.raises(ValueError, match=f"sanet::sa_backward: {msg}"):
        triton_sa.triton_sa_backward(x, x, None, x, x, *params, 4, 1e-5)
    with pytest.raises(ValueError, match=f"shuffle_attention_fused: {msg}"):
        check_op_args("shuffle_attention_fused", x, None, params, 4)
