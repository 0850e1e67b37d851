"""Differentiating through the fused op beyond first-order backward: double backward
(``create_graph=True``: gradient penalties, Hessian-vector products) and ``torch.func`` /
forward-mode AD, against the reference formulation."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import sanet
from sanet.ops import bn_shuffle_attention

from fused_utils import bn_sa_pair, fused_and_unfused_models, grads, randomize, rel, require_cpu_ext

require_cpu_ext()


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("relu", [False, True])
def test_second_order_gradients_fp64(train, relu):
    """backward(create_graph=True) through the fused op (SA alone, and BN -> SA -> add -> ReLU)
    gives differentiable gradients: gradgradcheck against finite differences."""
    from torch.autograd import gradgradcheck

    gen = torch.Generator().manual_seed(11)
    bn, sa, _, _ = bn_sa_pair(16, 2, gen, torch.float64)
    bn.train(train)
    x = torch.randn(2, 16, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    sc = torch.randn(2, 16, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert gradgradcheck(lambda x: sa(x), (x,))
    assert gradgradcheck(lambda x, sc: bn_shuffle_attention(x, bn, sa, sc if relu else None, relu=relu), (x, sc))


def test_second_order_with_only_the_shortcut_requiring_grad():
    gen = torch.Generator().manual_seed(14)
    bn, sa, _, _ = bn_sa_pair(16, 2, gen, torch.float64)
    for p in [*bn.parameters(), *sa.parameters()]:
        p.requires_grad_(False)
    x = torch.randn(2, 16, 3, 4, generator=gen, dtype=torch.float64)
    sc = torch.randn(2, 16, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    y = bn_shuffle_attention(x, bn, sa, sc, relu=True)
    (g,) = torch.autograd.grad(y.square().sum(), sc, create_graph=True)
    torch.testing.assert_close(g, 2 * y)  # relu(z + sc): d/dsc of sum(y^2) = 2y where y > 0, else 0
    assert g.requires_grad


@pytest.mark.parametrize("train", [True, False])
def test_batched_gradients_match_reference_model_fp64(train):
    """autograd.grad(is_grads_batched=True) and jacobian(vectorize=True) send a vmap-batched
    gradient into the op's backward, which the kernels can't read (they failed with "Cannot
    access data pointer"): the PyTorch-ops backward takes it, in train and eval mode."""
    gen = torch.Generator().manual_seed(15)
    fused, unfused = fused_and_unfused_models(4, gen)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=gen)  # layer4 at 2x2, as in the next test
    g_out = torch.randn(3, 2, 4, dtype=torch.float64, generator=gen)  # 3 output gradients at once
    results = []
    for model in (fused, unfused):
        model.train(train)
        xi = x.clone().requires_grad_(True)
        results.append(torch.autograd.grad(model(xi), [xi, *model.parameters()], g_out, is_grads_batched=True))
    for name, a, b in zip(["input"] + [n for n, _ in fused.named_parameters()], *results):
        assert a.shape[0] == 3 and rel(a, b) < 1e-8, name
    sa = fused.layer1[0].sa
    xs = torch.randn(2, sa.channels, 3, 3, dtype=torch.float64, generator=gen)
    reference = copy.deepcopy(sa)
    reference.impl = "reference"
    jac = torch.autograd.functional.jacobian(sa, xs, vectorize=True)
    assert rel(jac, torch.autograd.functional.jacobian(reference, xs)) < 1e-10


def test_gradient_penalty_matches_reference_model_fp64():
    """An input-gradient penalty (R1-style) through a whole fused model: every parameter's
    gradient equals the op-by-op reference model's (second-order terms of SA and BN)."""
    gen = torch.Generator().manual_seed(12)
    fused, unfused = fused_and_unfused_models(4, gen)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=gen)  # layer4 at 2x2 (1x1 planes: 0 vs 1e-12)
    results = []
    for model in (fused, unfused):
        xi = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(model(xi).logsumexp(1).sum(), xi, create_graph=True)
        results.append(grads(gx.square().sum(), list(model.parameters()), torch.tensor(1.0, dtype=x.dtype)))
    for (name, _), a, b in zip(fused.named_parameters(), *results):
        assert rel(a, b) < 1e-8, name


def test_torch_func_and_forward_ad_match_the_reference():
    """torch.func (grad, vmap, jvp: per-sample gradients) and forward-mode AD run the default
    layer and model (through PyTorch ops: the kernels have no batching or jvp rule)."""
    from torch.autograd import forward_ad as fwAD
    from torch.func import functional_call, grad, jvp, vmap

    gen = torch.Generator().manual_seed(13)
    sa = sanet.ShuffleAttention(32, 4)
    randomize(sa, gen)
    ref = copy.deepcopy(sa)
    ref.impl = "reference"
    x, t = torch.randn(3, 32, 5, 6, generator=gen), torch.randn(3, 32, 5, 6, generator=gen)
    for fn in (lambda m: vmap(grad(lambda xi: m(xi[None]).square().sum()))(x),
               lambda m: jvp(m, (x,), (t,))[1]):
        torch.testing.assert_close(fn(sa), fn(ref), rtol=1e-5, atol=1e-6)
    with fwAD.dual_level():
        tangents = [fwAD.unpack_dual(m(fwAD.make_dual(x, t))).tangent for m in (sa, ref)]
    torch.testing.assert_close(*tangents, rtol=1e-5, atol=1e-6)

    model = timm.create_model("sa_resnet_test", num_classes=3).eval()  # per-sample gradients
    params = {k: v.detach() for k, v in model.named_parameters()}
    imgs, labels = torch.randn(4, 3, 32, 32, generator=gen), torch.tensor([0, 1, 2, 0])

    def loss(p, img, label):
        return nn.functional.cross_entropy(functional_call(model, p, (img[None],)), label[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, imgs, labels)
    first = torch.autograd.grad(loss(dict(model.named_parameters()), imgs[0], labels[0]), list(model.parameters()))
    for (name, _), g in zip(model.named_parameters(), first):
        torch.testing.assert_close(per_sample[name][0], g, rtol=1e-4, atol=1e-6)
