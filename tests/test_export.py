"""Deployment traces record PyTorch ops, not the fused op, and run without sanet.

``torch.jit.trace``, ``torch.export`` and ONNX export produce graphs that are loaded elsewhere
(a process without sanet, C++, an ONNX runtime); a graph holding ``sanet::sa_forward`` would
load only where sanet is imported. ``torch.compile`` keeps the op (tests/test_fused.py).
"""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import timm
import torch

import sanet  # noqa: F401  (registers the models)

MODEL = "sa_resnet_test"


def _model_and_inputs(seed: int = 0):
    torch.manual_seed(seed)
    model = timm.create_model(MODEL).eval()
    with torch.no_grad():  # gates away from their constant initial value, BN away from identity
        for name, p in model.named_parameters():
            if ".sa." in name or "bn" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model, torch.randn(2, 3, 32, 32)


def test_jit_trace_records_pytorch_ops_and_loads_without_sanet(tmp_path):
    model, x = _model_and_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trace's deprecation warnings
        traced = torch.jit.trace(model, x, check_trace=False)  # compared below, in another process
    assert "sanet::" not in traced.graph.str()
    path = tmp_path / "traced.pt"
    traced.save(str(path))
    torch.save({"x": x, "y": model(x).detach()}, tmp_path / "io.pt")
    check = (
        "import sys, torch\n"
        f"m = torch.jit.load({str(path)!r})\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)\n"
        "assert not any(k.startswith('sanet') for k in sys.modules), 'sanet was imported'\n"
        "torch.testing.assert_close(m(io['x']), io['y'], rtol=1e-5, atol=1e-5)\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", check], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_jit_trace_emits_no_tracer_warning():
    """check_sa_input compared a traced size with an int ("might not generalize"); the trace
    does generalise (test above), so tracing skips the Python-level check."""
    model, x = _model_and_inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(model, x)  # check_trace on: re-runs and compares the trace
    tracer = [str(w.message)[:120] + f" ({w.filename}:{w.lineno})" for w in caught
              if issubclass(w.category, torch.jit.TracerWarning)]
    assert not tracer, tracer
    x2 = torch.randn(3, 3, 48, 48)  # another batch and size: the trace generalises
    torch.testing.assert_close(traced(x2), model(x2), rtol=1e-5, atol=1e-5)


def test_torch_export_records_pytorch_ops():
    model, x = _model_and_inputs(1)
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    assert "sanet" not in str(ep.graph)
    for inp in (x, torch.randn(5, 3, 32, 32)):  # another batch size: not specialised to x's
        torch.testing.assert_close(ep.module()(inp), model(inp), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spatial", ["one Dim for both", "height only"])
def test_torch_export_dynamic_height_and_width(spatial):
    """SA behind a strided conv (a height of (h - 1) // 4 + 1, as in any backbone): the
    per-channel form once merged H and W into one dim and split it back, which put guards on
    the symbolic sizes that torch.export could not prove ("Constraints violated")."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, stride=4, padding=1),
                                sanet.ShuffleAttention(32, 4)).eval()
    size = torch.export.Dim("size", min=16, max=256)
    dims = {2: size, 3: size} if spatial == "one Dim for both" else {2: size}
    x = torch.randn(2, 3, 16, 16)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: None, **dims},))
    other = torch.randn(2, 3, 37, 37 if spatial == "one Dim for both" else 16)
    for inp in (x, other):
        torch.testing.assert_close(ep.module()(inp), model(inp), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dynamo,folding,opset,fresh", [
    (True, True, None, False), (False, True, None, False), (False, False, None, False), (False, True, 11, False),
    (True, True, None, True), (False, False, None, True)],
    ids=["dynamo-exporter", "torchscript-exporter", "torchscript-exporter-no-folding", "torchscript-opset-11",
         "dynamo-exporter-fresh-weights", "torchscript-exporter-no-folding-fresh-weights"])
def test_onnx_export_runs_in_onnxruntime(tmp_path, dynamo, folding, opset, fresh):
    """Both exporters with their defaults, the legacy one without constant folding (an
    earlier version of the export path lost the (1,)-shaped gate parameters of narrow SA
    layers, c = 1, to its folding) and at opset 11 (channel_shuffle used aten::unflatten,
    which has no export before opset 13), and freshly initialised weights (equal gate
    tensors: with the legacy exporter's folding, ONNX Runtime refuses that graph; README)."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    model, x = _model_and_inputs(2)
    if fresh:
        torch.manual_seed(2)
        model = timm.create_model(MODEL).eval()
    path = tmp_path / "model.onnx"
    kwargs = {"dynamo": dynamo} if folding else {"dynamo": dynamo, "do_constant_folding": False}
    if opset is not None:
        kwargs["opset_version"] = opset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), **kwargs)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), model(x).detach(), rtol=1e-4, atol=1e-5)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    # No 5-D reshape/transpose for converters that stop at 4-D (SA-NET.md section 4).
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    ranks = [len(v.type.tensor_type.shape.dim) for v in graph.value_info]
    assert ranks and max(ranks) == 4


def test_eager_and_compile_still_use_the_fused_op():
    from sanet.ops import fused_sa_supported, needs_pytorch_ops

    x = torch.randn(2, 32, 5, 5)
    if not fused_sa_supported(x):
        pytest.skip("no fused CPU kernel on this machine")
    assert not needs_pytorch_ops()
    seen = []

    def backend(gm, example_inputs):
        seen.append(str(gm.graph))
        return gm.forward

    sa = sanet.ShuffleAttention(32, groups=4)
    torch.compile(sa, backend=backend, fullgraph=True)(x)
    assert seen and "sanet.sa_forward" in seen[0]
