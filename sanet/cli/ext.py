"""``sanet ext``: build (if needed) and report the fused CPU kernels."""
from __future__ import annotations

import argparse

from .common import add_json_flag, print_json


def add_parser(sub, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help="build and check the fused C++ kernels",
                       description="Build the fused Shuffle Attention CPU kernels (cached after the "
                                   "first time) and report whether they load. Exit status 1 if not (2, with the build's "
                                   "error, when SANET_REQUIRE_EXT=1 makes a failed build an error).")
    add_json_flag(p)
    return p


def run(args: argparse.Namespace) -> int:
    import warnings

    from sanet.ops import cpu_ext_status
    from sanet.ops.triton_sa import triton_available

    # A failed build warns once for library users; here the report below says it already.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="sanet: the fused CPU kernels could not be built")
        status = dict(cpu_ext_status(), triton_cuda=triton_available())
    if args.json:
        print_json(status)
    else:
        state = "loaded" if status["loaded"] else f"unavailable ({status['error']})"
        print(f"CPU kernels: {state}")
        if status["path"]:
            print(f"  built in: {status['path']}")
        print(f"  ISA: {status['isa']}")
        print(f"Triton CUDA kernels: {_triton_state(status['triton_cuda'])}")
    return 0 if status["loaded"] else 1


def _triton_state(available: bool) -> str:
    import torch

    if available:
        return "available"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return "unavailable: Triton does not import (CUDA tensors take the PyTorch fallback)"
