"""sanet.engine.predict's helpers on their own: the eval transform's settings, class-folder
matching and its message, path checks, reading images and ranking outputs."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from torchvision.transforms import InterpolationMode

import sanet  # noqa: F401  (registers the SA models)
from sanet.engine.predict import check_image_paths, eval_transform, target_map_for, topk_predictions


@pytest.fixture(scope="module")
def model():
    return timm.create_model("sa_resnet_test", device="meta")


def _resize(transform):
    return transform.transforms[0]


def test_eval_transform_takes_the_runs_interpolation(model):
    assert model.pretrained_cfg["interpolation"] == "bilinear"
    t = eval_transform(model, {"interpolation": "bicubic", "img_size": 40, "crop_pct": 0.5})
    assert _resize(t).interpolation == InterpolationMode.BICUBIC
    assert _resize(t).size == 80 and t.transforms[1].size == (40, 40)  # 40 / 0.5
    # the flags override the run's settings
    t = eval_transform(model, {"img_size": 40, "crop_pct": 0.5}, img_size=24, crop_pct=1.0)
    assert _resize(t).interpolation == InterpolationMode.BILINEAR
    assert _resize(t).size == 24 and t.transforms[1].size == (24, 24)


@pytest.mark.parametrize("size", [1, 7])
def test_eval_transform_refuses_images_below_8_pixels(model, size):
    with pytest.raises(ValueError, match=f"--img-size must be at least 8 pixels, got {size}"):
        eval_transform(model, {}, img_size=size)
    assert _resize(eval_transform(model, {}, img_size=8)).size == 8


def test_unknown_class_folders_are_counted_and_named():
    with pytest.raises(ValueError) as info:
        target_map_for(["a", "b", "x", "y"], ["a", "b", "c"], 3)
    message = str(info.value)
    assert message.startswith("2 of the data's 4 class folders are not classes of this model")
    assert "(e.g. ['x', 'y'];" in message  # the unknown ones, not the first folders
    assert "the model's classes, e.g. ['a', 'b', 'c']" in message


def test_a_dangling_link_is_named_as_one(tmp_path):
    link = tmp_path / "img.png"
    link.symlink_to(tmp_path / "gone.png")
    with pytest.raises(FileNotFoundError, match="a symbolic link to a missing file"):
        check_image_paths([link])
    with pytest.raises(FileNotFoundError) as info:
        check_image_paths([tmp_path / "plain.png"])
    assert str(info.value) == f"image not found: {tmp_path / 'plain.png'}"  # no hint for a plain missing file


class Fixed(nn.Module):
    """A "model" whose outputs are the given logits, one row per image."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, images):
        return self.logits[: images.shape[0]]


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_single_non_finite_output_is_refused(bad):
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, bad, 1.0]])
    with pytest.raises(ValueError, match="outputs hold NaN or inf"):
        topk_predictions(Fixed(logits), torch.zeros(2, 3, 8, 8), 2, None)


def test_probabilities_of_low_precision_outputs_are_computed_in_float32():
    """bf16 logits (an autocast model): softmax in bf16 keeps ~3 digits; the ranking reports fp32."""
    logits = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.bfloat16)
    expected = logits.float().softmax(-1)[0].tolist()
    top = topk_predictions(Fixed(logits), torch.zeros(1, 3, 8, 8), 3, ["a", "b", "c"])[0]
    assert [p["label"] for p in top] == ["c", "b", "a"] and [p["index"] for p in top] == [2, 1, 0]
    assert [p["prob"] for p in top] == pytest.approx(expected[::-1], abs=1e-7)
