"""Helpers shared by subcommands: JSON output, model-name validation."""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any


def add_json_flag(p: argparse.ArgumentParser, *, what: str = "one JSON object") -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} instead of text")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def print_json(obj: Any) -> None:
    """One line of strict JSON: NaN and infinities (a diverged model's loss) become null."""
    json.dump(_strict(obj), sys.stdout, indent=None, sort_keys=False, allow_nan=False)
    sys.stdout.write("\n")
    sys.stdout.flush()


def _strict(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def check_model_name(name: str) -> str:
    """A registered timm model name, or a ValueError listing the SA models."""
    import timm

    import sanet  # noqa: F401  (registers the SA models)

    if not timm.is_model(name):  # also accepts pretrained tags: sa_resnet50.authors_in1k
        from sanet.models import SA_MODELS

        raise ValueError(f"unknown model {name!r}; SA models: {', '.join(SA_MODELS)} "
                         "(any timm model name also works)")
    arch, tag = timm.models.split_model_name_tag(name)
    if tag:  # is_model ignores the tag; create_model would raise on an unknown one
        tagged = [n for n in timm.models.get_arch_pretrained_cfgs(arch) if "." in n]
        if name not in tagged:
            known = f"its names with tags: {', '.join(tagged)} (or {arch} alone)" if tagged else \
                f"it has none: use {arch}"
            raise ValueError(f"{arch} has no pretrained tag {tag!r}; {known}")
    return name
