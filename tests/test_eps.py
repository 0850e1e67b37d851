"""A non-default epsilon reaches every implementation: the SA layer's GroupNorm eps, and in the
BN+SA fusion BatchNorm's eps and SA's eps, each to its own normalisation. Inputs have small
variances, where eps changes the result."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sanet import ShuffleAttention

from conftest import SA_PARAM_NAMES, randomize_sa_, rel_err, require_fused
from fused_utils import bn_sa_pair, rel, require_cpu_ext, run_bn_sa
from sa_reference import IMPLS, AuthorsSA, check_against


@pytest.mark.parametrize("impl", IMPLS)
def test_sa_eps_reaches_every_implementation(impl):
    require_fused(impl)
    gen = torch.Generator().manual_seed(11)
    module = randomize_sa_(ShuffleAttention(64, 4, eps=1e-2, impl=impl), gen)
    ref = AuthorsSA(64, 4)
    ref.load_state_dict(module.state_dict())
    ref.gn.eps = 1e-2
    x = torch.randn(2, 64, 5, 6, generator=gen) * 0.05 + 0.3  # plane variance ~2.5e-3
    check_against(module, ref, [dict(ref.named_parameters())[n] for n in SA_PARAM_NAMES], x)
    ref.gn.eps = 1e-5  # negative control: the default eps gives another result
    with torch.no_grad():
        assert rel_err(module(x), ref(x)) > 1e-3


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("hw", [(6, 7), (33, 35)])  # both of the kernels' plane-size paths
def test_bn_sa_fusion_uses_each_norms_own_eps(train, hw):
    require_cpu_ext()
    gen = torch.Generator().manual_seed(12)
    bn, sa, ref_bn, ref_sa = bn_sa_pair(64, 8, gen, torch.float64)
    bn.eps = ref_bn.eps = 1e-3
    sa.gn.eps = ref_sa.gn.eps = 1e-4
    with torch.no_grad():  # small BN outputs too, so SA's own eps matters
        bn.weight.mul_(0.05)
        ref_bn.weight.copy_(bn.weight)
    for m in (bn, ref_bn):
        m.train(train)
    x = torch.randn(3, 64, *hw, generator=gen, dtype=torch.float64) * 0.03 + 0.5
    sc = torch.randn(3, 64, *hw, generator=gen, dtype=torch.float64)
    (y, g), (y_ref, g_ref) = run_bn_sa(bn, sa, ref_bn, ref_sa, x, sc, True, gen)
    assert rel(y, y_ref) < 1e-12
    for a, b in zip(g, g_ref):
        assert rel(a, b) < 1e-10
    mean, var = (None, None) if train else (ref_bn.running_mean, ref_bn.running_var)
    for bn_eps, sa_eps in ((1e-5, 1e-4), (1e-3, 1e-5)):  # negative controls: one eps at its default
        ref_sa.gn.eps = sa_eps
        with torch.no_grad():
            z = F.batch_norm(x, mean, var, ref_bn.weight, ref_bn.bias, train, 0.0, bn_eps)
            assert rel(y.detach(), torch.relu(ref_sa(z) + sc)) > 1e-6, (bn_eps, sa_eps)
