"""The authors' checkpoints: layout, strict loading and conversion (safety: test_checkpoint_safety.py).

An independent port of the authors' SA-ResNet (torchvision-style ResNet; the Bottleneck runs
bn3 -> sa -> += identity -> relu; their attribute names) is written here. A randomly
initialised SA-ResNet-50 of that port is saved the way their training script saves it
(SA-NET.md section 3), and sanet must load it strictly and reproduce its outputs.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import List

import pytest
import timm
import torch
from torch import Tensor, nn

import sanet
from sanet.checkpoint import load_state_dict_file, load_weights
from sanet.cli import main as cli_main
from sanet.models import AUTHORS_URL, AUTHORS_WEIGHTS, CheckpointMismatchError

from conftest import rel_err


# --------------------------------------------------------------------------- authors' port
class AuthorsSALayer(nn.Module):
    """The authors' ``sa_layer`` (G = 64), with their submodules and parameter names."""

    def __init__(self, channel: int, groups: int = 64) -> None:
        super().__init__()
        self.groups = groups
        c = channel // (2 * groups)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.cweight = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.cbias = nn.Parameter(torch.ones(1, c, 1, 1))
        self.sweight = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.sbias = nn.Parameter(torch.ones(1, c, 1, 1))
        self.sigmoid = nn.Sigmoid()
        self.gn = nn.GroupNorm(c, c)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        x = x.reshape(b * self.groups, -1, h, w)
        x_0, x_1 = x.chunk(2, dim=1)
        xn = x_0 * self.sigmoid(self.cweight * self.avg_pool(x_0) + self.cbias)
        xs = x_1 * self.sigmoid(self.sweight * self.gn(x_1) + self.sbias)
        out = torch.cat([xn, xs], dim=1).reshape(b, -1, h, w)
        out = out.reshape(b, 2, -1, h, w).permute(0, 2, 1, 3, 4)
        return out.reshape(b, -1, h, w)


class AuthorsBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)  # v1.5
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.sa = AuthorsSALayer(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.sa(self.bn3(self.conv3(out)))
        out += identity
        return self.relu(out)


class AuthorsResNet(nn.Module):
    def __init__(self, layers: List[int], num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * 4, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * 4))
        layers = [AuthorsBottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [AuthorsBottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


AUTHORS_LAYERS = {"sa_resnet50": [3, 4, 6, 3], "sa_resnet101": [3, 4, 23, 3], "sa_resnet152": [3, 8, 36, 3]}


@torch.no_grad()
def make_trained_looking(model: nn.Module) -> nn.Module:
    """Random BN statistics/affine and random SA parameters, as after training."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.num_batches_tracked.fill_(450450)
        elif isinstance(m, AuthorsSALayer):
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def save_like_the_authors(model: nn.Module, path: Path, layout: str = "imagenet_example") -> None:
    """``torch.save`` of the PyTorch ImageNet example's dict, DataParallel 'module.' keys,
    an SGD state with momentum buffers, best accuracy as a tensor."""
    dp = nn.DataParallel(model)  # on CPU only wraps: keys get the 'module.' prefix
    shadow = [p.detach().clone().requires_grad_() for p in dp.parameters()]  # model stays as is
    optimizer = torch.optim.SGD(shadow, 0.1, momentum=0.9, weight_decay=1e-4)
    for p in shadow:
        p.grad = torch.randn_like(p)
    optimizer.step()  # creates the momentum buffers
    if layout == "imagenet_example":  # SA-NET.md section 3
        state = {"epoch": 90, "arch": "sa_resnet50", "state_dict": dp.state_dict(),
                 "best_acc1": torch.tensor(77.882), "optimizer": optimizer.state_dict()}
    else:  # the authors' main.py variant: 'best_acc', no 'arch'
        state = {"epoch": 100, "state_dict": dp.state_dict(), "best_acc": torch.tensor(77.882),
                 "optimizer": optimizer.state_dict()}
    torch.save(state, path)


@pytest.fixture(scope="module")
def authors_r50(tmp_path_factory):
    """(authors' model in eval mode, path of its checkpoint)."""
    torch.manual_seed(0)
    model = make_trained_looking(AuthorsResNet(AUTHORS_LAYERS["sa_resnet50"])).eval()
    path = tmp_path_factory.mktemp("authors") / "sa_resnet50.pth.tar"
    save_like_the_authors(model, path)
    return model, path


def load_pretrained(name: str, file, **kwargs) -> nn.Module:
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), **kwargs)


# --------------------------------------------------------------------------- the authors' layout
def test_checkpoint_is_in_the_authors_layout(authors_r50):
    _, path = authors_r50
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"epoch", "arch", "state_dict", "best_acc1", "optimizer"}
    keys = list(ckpt["state_dict"])
    assert all(k.startswith("module.") for k in keys)
    for k in ("module.conv1.weight", "module.layer1.0.downsample.0.weight", "module.layer1.0.downsample.1.running_var",
              "module.layer4.2.sa.cweight", "module.layer4.2.sa.gn.bias", "module.fc.bias"):
        assert k in keys, k


@pytest.mark.parametrize("name", sorted(AUTHORS_LAYERS))
def test_authors_names_and_shapes_equal_ours(name):
    with torch.device("meta"):
        theirs = AuthorsResNet(AUTHORS_LAYERS[name]).state_dict()
    ours = timm.create_model(name, device="meta").state_dict()
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: tuple(v.shape) for k, v in ours.items()}


def test_pretrained_loads_the_authors_checkpoint_and_gives_their_outputs(authors_r50):
    theirs, path = authors_r50
    ours = load_pretrained("sa_resnet50", path).eval()
    expected = theirs.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, expected[k]), k
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(ours(x), theirs(x)) <= 1e-5
        # and with the layers run one by one (no fused block tail)
        plain = load_pretrained("sa_resnet50", path, sa_impl="reference").eval()
        assert rel_err(plain(x), theirs(x)) <= 1e-5


def test_pretrained_features_only(authors_r50):
    theirs, path = authors_r50
    ours = load_pretrained("sa_resnet50", path, features_only=True, out_indices=(4,)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(ours(x)[0], theirs.features(x)) <= 1e-5


def test_main_py_layout_also_loads(authors_r50, tmp_path):
    theirs, _ = authors_r50
    path = tmp_path / "model_best.pth.tar"
    save_like_the_authors(theirs, path, layout="main_py")
    ours = load_pretrained("sa_resnet50", path)
    assert torch.equal(ours.layer3[5].sa.sweight, theirs.layer3[5].sa.sweight)


def test_fine_tuning_num_classes_drops_only_the_classifier(authors_r50):
    theirs, path = authors_r50
    ours = load_pretrained("sa_resnet50", path, num_classes=10)
    assert ours.fc.weight.shape == (10, 2048)
    expected = theirs.state_dict()
    for k, v in ours.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, expected[k]), k


def test_in_chans_adapts_the_first_conv(authors_r50):
    theirs, path = authors_r50
    ours = load_pretrained("sa_resnet50", path, in_chans=1)
    torch.testing.assert_close(ours.conv1.weight, theirs.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(ours.layer1[0].sa.cbias, theirs.layer1[0].sa.cbias)


# --------------------------------------------------------------------------- strictness
def _mutated(authors_r50, tmp_path, mutate) -> Path:
    ckpt = torch.load(authors_r50[1], weights_only=True)
    mutate(ckpt["state_dict"])
    path = tmp_path / "mutated.pth.tar"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("mutate,expected", [
    (lambda sd: sd.pop("module.layer2.1.sa.cbias"), ["missing keys (1): layer2.1.sa.cbias"]),
    (lambda sd: sd.update({"module.layer5.0.conv1.weight": torch.zeros(1)}),
     ["unexpected keys (1): layer5.0.conv1.weight"]),
    (lambda sd: sd.update({"module.layer1.0.sa.cweight": torch.zeros(1, 4, 1, 1)}),
     ["shape mismatches (1): layer1.0.sa.cweight (1, 4, 1, 1) vs model (1, 2, 1, 1)"]),
    (lambda sd: (sd.pop("module.layer4.0.sa.gn.weight"), sd.update({"module.layer4.0.se.fc.weight": torch.zeros(2)})),
     ["missing keys (1): layer4.0.sa.gn.weight", "unexpected keys (1): layer4.0.se.fc.weight"]),
    # as many values in another shape: a mis-shaped key too, not PyTorch's copy error
    (lambda sd: sd.update({"module.layer1.0.sa.cweight": sd["module.layer1.0.sa.cweight"].reshape(-1)}),
     ["shape mismatches (1): layer1.0.sa.cweight (2,) vs model (1, 2, 1, 1)"]),
], ids=["missing", "unexpected", "shape", "missing+unexpected", "same-numel-shape"])
def test_strict_loading_lists_what_is_wrong(authors_r50, tmp_path, mutate, expected):
    path = _mutated(authors_r50, tmp_path, mutate)
    with pytest.raises(CheckpointMismatchError) as info:
        load_pretrained("sa_resnet50", path)
    msg = str(info.value)
    assert "does not match sa_resnet50" in msg
    for line in expected:
        assert line in msg
    with pytest.raises(CheckpointMismatchError, match="does not match"):  # sanet's own loader too
        load_weights(timm.create_model("sa_resnet50", device="meta"), path)


def test_headless_file_builds_a_headless_model_or_gets_the_num_classes_0_hint(authors_r50, tmp_path):
    """A file without classifier sets num_classes=0 as create_model's default (like the file's
    class count otherwise); loading it into a model with a classifier says to pass 0."""
    theirs, _ = authors_r50
    path = _mutated(authors_r50, tmp_path, lambda sd: (sd.pop("module.fc.weight"), sd.pop("module.fc.bias")))
    headless = load_pretrained("sa_resnet50", path)
    assert headless.num_classes == 0 and torch.equal(headless.layer4[2].sa.cweight, theirs.layer4[2].sa.cweight)
    features = load_pretrained("sa_resnet50", path, features_only=True, out_indices=(4,)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(features(x)[0], theirs.features(x)) <= 1e-5
    new_head = load_pretrained("sa_resnet50", path, num_classes=5)  # explicit: a new classifier
    assert new_head.num_classes == 5 and torch.equal(new_head.conv1.weight, theirs.conv1.weight)
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights(timm.create_model("sa_resnet50", device="meta"), path)
    assert "missing keys (2): fc.weight, fc.bias" in str(info.value) and "num_classes=0" in str(info.value)
    assert "another architecture" not in str(info.value)
    assert load_weights(timm.create_model("sa_resnet50", num_classes=0), path).num_classes == 0


def test_mismatch_hints_say_what_to_pass(tmp_path):
    """The hint names the likely cause: the classifier size, or the SA group count (read off
    the SA weights); a file without weights lists its top-level keys."""
    sd = timm.create_model("sa_resnet_test", num_classes=7).state_dict()
    torch.save(sd, tmp_path / "seven.pt")
    with pytest.raises(CheckpointMismatchError, match=r"classifier has 7 classes.*num_classes=7"):
        load_weights(timm.create_model("sa_resnet_test", num_classes=3), tmp_path / "seven.pt")
    torch.save(timm.create_model("sa_resnet_test", sa_groups=4).state_dict(), tmp_path / "g4.pt")
    with pytest.raises(CheckpointMismatchError, match=r"another group count.*sa_groups=4"):
        load_weights(timm.create_model("sa_resnet_test"), tmp_path / "g4.pt")
    model = load_weights(timm.create_model("sa_resnet_test", sa_groups=4), tmp_path / "g4.pt")
    assert sanet.models.sa_groups_of(model.state_dict(), timm.create_model("sa_resnet_test")) == 4
    # the other way: default weights (G fitted per layer up to 64) read by a G = 4 model ask
    # for the largest G of their layers, the sa_groups they were built with
    assert sanet.models.sa_groups_of(sd, timm.create_model("sa_resnet_test", sa_groups=4, device="meta")) == 64
    torch.save({"net": sd}, tmp_path / "nested.pt")
    with pytest.raises(RuntimeError, match=r"no weights found.*'net'"):
        load_state_dict_file(tmp_path / "nested.pt")


def test_deeper_checkpoint_into_shallower_model_is_a_clear_error():
    sd101 = {f"module.{k}": torch.zeros(v.shape) for k, v in
             timm.create_model("sa_resnet101", device="meta").state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        timm.create_model("sa_resnet50", pretrained=True,
                          pretrained_cfg_overlay=dict(state_dict={"state_dict": sd101}))
    msg = str(info.value)
    extra = 17 * 24  # 17 more blocks in layer3, 24 tensors each (3 conv, 3 BN x 5, 6 SA)
    assert f"unexpected keys ({extra}): layer3.6.conv1.weight" in msg
    line = next(row for row in msg.splitlines() if "unexpected keys" in row)
    shown, more = line.split(": ", 1)[1].split(", ... ")
    assert more == f"({extra - len(shown.split(', '))} more)"  # the keys not listed
    assert "another architecture or depth" in msg
    assert "missing keys" not in msg


def test_the_file_sets_the_default_classes_and_input_channels(tmp_path):
    """A 10-class, 1-channel file builds a 10-class, 1-channel model with its own head and
    stem; explicit kwargs still win: a new head, or a stem timm converts from 1 channel."""
    src = timm.create_model("sa_resnet_test", num_classes=10, in_chans=1)
    path = tmp_path / "digits.pth"
    torch.save(src.state_dict(), path)
    loaded = load_pretrained("sa_resnet_test", path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), src.state_dict().values()))
    assert loaded.pretrained_cfg["num_classes"] == 10 and loaded.pretrained_cfg["input_size"][0] == 1
    new_head = load_pretrained("sa_resnet_test", path, num_classes=4)
    assert new_head.fc.out_features == 4 and torch.equal(new_head.conv1.weight, src.conv1.weight)
    rgb = load_pretrained("sa_resnet_test", path, in_chans=3)  # timm spreads the channel over 3
    torch.testing.assert_close(rgb.conv1.weight.sum(1, keepdim=True), src.conv1.weight)
    headless = load_pretrained("sa_resnet_test", path, num_classes=0)  # a feature extractor
    assert headless.num_classes == 0 and torch.equal(headless.conv1.weight, src.conv1.weight)
    rgb_file = tmp_path / "rgb.pth"  # an explicit pretrained_cfg that contradicts the file
    torch.save(timm.create_model("sa_resnet_test").state_dict(), rgb_file)
    with pytest.raises(CheckpointMismatchError, match="fc.weight has 1000 classes, the model 7"):
        timm.create_model("sa_resnet_test", pretrained=True, num_classes=7,
                          pretrained_cfg_overlay=dict(file=str(rgb_file), num_classes=7))


def test_pretrained_cfg_does_not_keep_a_copy_of_the_weights(authors_r50):
    model = load_pretrained("sa_resnet50", authors_r50[1])
    assert "state_dict" not in model.pretrained_cfg and model.pretrained_cfg["file"] == str(authors_r50[1])


# --------------------------------------------------------------------------- no weights file
@pytest.mark.parametrize("name", sorted(AUTHORS_WEIGHTS))
def test_pretrained_without_a_file_says_where_the_weights_are(name):
    with pytest.raises(RuntimeError) as info:
        timm.create_model(name, pretrained=True)
    msg = str(info.value)
    assert AUTHORS_URL in msg and "https://github.com/wofmanaf/SA-Net" in msg
    assert f"sanet convert {name}.pth.tar {name}.safetensors --model {name}" in msg
    assert "pretrained_cfg_overlay=dict(file=" in msg
    assert {"sa_resnet50": "474p", "sa_resnet101": "6nxm"}[name] in msg and "https://pan.baidu.com/s/" in msg


@pytest.mark.parametrize("name", [n for n in sanet.SA_MODELS if n not in AUTHORS_WEIGHTS])
def test_pretrained_without_weights_for_other_models(name):
    with pytest.raises(RuntimeError, match="no pretrained weights exist .*sa_resnet50 and sa_resnet101"):
        timm.create_model(name, pretrained=True)


# --------------------------------------------------------------------------- sanet convert
def test_convert_round_trip(authors_r50, tmp_path, capsys):
    theirs, src = authors_r50
    out = tmp_path / "converted" / "sa_resnet50.safetensors"
    assert cli_main(["convert", str(src), str(out), "--model", "sa_resnet50", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    card = json.loads(out.with_suffix(".json").read_text())
    assert printed["card_file"] == str(out.with_suffix(".json"))
    assert card["model"] == "sa_resnet50"
    assert card["source_file"] == "sa_resnet50.pth.tar"
    assert card["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert card["weights_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert card["num_params"] == 25_557_740 and card["num_classes"] == 1000
    # the safetensors file holds exactly the model weights, under our names
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata()["model"] == "sa_resnet50"
        keys = set(f.keys())
    expected = theirs.state_dict()
    assert keys == set(expected)
    # and loads through timm and through sanet.checkpoint, identical weights and outputs
    ours = load_pretrained("sa_resnet50", out).eval()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, expected[k]), k
    via_sanet = load_weights(timm.create_model("sa_resnet50"), out).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = theirs(x)
        assert rel_err(ours(x), ref) <= 1e-5 and rel_err(via_sanet(x), ref) <= 1e-5
    # converting again gives the same bytes (safetensors writes metadata in hash-map order)
    again = tmp_path / "again" / "sa_resnet50.safetensors"
    assert cli_main(["convert", str(src), str(again), "--model", "sa_resnet50"]) == 0
    assert again.read_bytes() == out.read_bytes()
    assert json.loads(again.with_suffix(".json").read_text()) == card
    header = json.loads(out.read_bytes()[8:8 + int.from_bytes(out.read_bytes()[:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])


def test_convert_keeps_the_files_input_channels_and_classes(tmp_path, capsys):
    """A 1-channel, 7-class model in the authors' layout ('module.' keys): convert builds the
    model the file holds, and the result loads into create_model(in_chans=1, num_classes=7)."""
    theirs = timm.create_model("sa_resnet_test", in_chans=1, num_classes=7).eval()
    src = tmp_path / "gray.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in theirs.state_dict().items()}}, src)
    out = tmp_path / "gray.safetensors"
    assert cli_main(["convert", str(src), str(out), "--model", "sa_resnet_test", "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["in_chans"] == 1 and card["num_classes"] == 7
    ours = load_weights(timm.create_model("sa_resnet_test", in_chans=1, num_classes=7), out).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_convert_rejects_a_mismatching_model(authors_r50, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    # the authors' file names its architecture ('arch'): the error names it
    assert cli_main(["convert", str(authors_r50[1]), str(out), "--model", "sa_resnet101"]) == 2
    err = capsys.readouterr().err
    assert "says it holds sa_resnet50 weights; pass --model sa_resnet50" in err
    # without 'arch' (their main.py variant), the keys say it
    ckpt = torch.load(authors_r50[1], weights_only=True)
    del ckpt["arch"]
    torch.save(ckpt, tmp_path / "no_arch.pth.tar")
    assert cli_main(["convert", str(tmp_path / "no_arch.pth.tar"), str(out), "--model", "sa_resnet101"]) == 2
    err = capsys.readouterr().err
    assert "sanet convert: error:" in err and "does not match sa_resnet101" in err and "missing keys" in err
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_convert_requires_safetensors_output(authors_r50, tmp_path, capsys):
    assert cli_main(["convert", str(authors_r50[1]), str(tmp_path / "x.pth"), "--model", "sa_resnet50"]) == 2
    assert "must be a file name ending in .safetensors" in capsys.readouterr().err


def test_convert_missing_input(tmp_path, capsys):
    assert cli_main(["convert", str(tmp_path / "nope.pth"), str(tmp_path / "x.safetensors"),
                     "--model", "sa_resnet_test"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_own_checkpoint_formats_load(tmp_path):
    model = timm.create_model("sa_resnet_test")
    bare, wrapped = tmp_path / "bare.pth", tmp_path / "wrapped.pt"
    torch.save(model.state_dict(), bare)
    torch.save({"model": model.state_dict(), "epoch": 3}, wrapped)
    for path in (bare, wrapped):
        loaded = load_pretrained("sa_resnet_test", path)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
        assert set(load_state_dict_file(path)) == set(model.state_dict())

