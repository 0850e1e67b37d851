"""``sanet models``: the SA family table."""
from __future__ import annotations

import argparse
from typing import Any, Dict, List

from .common import add_json_flag, print_json


def add_parser(sub, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help="list the SA model family",
                       description="List the registered SA models: parameters, default input size, "
                                   "block type and whether the authors published weights.")
    add_json_flag(p, what="one JSON array, one object per model")
    return p


def family_table() -> List[Dict[str, Any]]:
    import timm

    from sanet.analysis import count_params
    from sanet.models import AUTHORS_WEIGHTS, SA_MODELS

    rows = []
    for name, args in SA_MODELS.items():
        model = timm.create_model(name, device="meta")
        rows.append({
            "model": name,
            **count_params(model),
            "input_size": list(model.pretrained_cfg["input_size"]),
            "block": args["block"].__name__,
            "layers": list(args["layers"]),
            "authors_weights": name in AUTHORS_WEIGHTS,
        })
    return rows


def run(args: argparse.Namespace) -> int:
    rows = family_table()
    if args.json:
        print_json(rows)
        return 0
    print(f"{'model':<22}{'params':>13}{'SA params':>11}  {'input':<12}{'block':<14}authors' weights")
    for r in rows:
        size = "x".join(str(s) for s in r["input_size"])
        print(f"{r['model']:<22}{r['params']:>13,}{r['sa_params']:>11,}  {size:<12}{r['block']:<14}"
              f"{'yes (see sanet info)' if r['authors_weights'] else '-'}")
    print("\nSA params: what the released code has (708 on ResNet-50; the paper's abstract says 300).")
    return 0
