"""GPU microbenchmark of the gated-MLP product h = act(g)·u (SiLU and tanh-GELU), forward and forward+backward.

Compared in the same run, same inputs (bf16, M tokens × I intermediate):
    eager     F.silu(g) * u / F.gelu(g, approximate="tanh") * u with autograd (what HF's MLPs run)
    pyflex    pyflex.layers.gated_mlp.gated_act (Triton kernels of pyflex.kernels.gated_act; saves g and u only)
    liger     liger-kernel's LigerSiLUMulFunction / LigerGELUMulFunction, when importable

    python bench/bench_gpu_gated_act.py --out gated_act.json
    python -m pytest bench/bench_gpu_gated_act.py --benchmark-enable -q

Median ms of triton.testing.do_bench; GB/s counts the bytes the eager version must move at least (fwd: read g, u,
write h; fwd+bwd: that plus read dh, g, u and write dg, du).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys

import pytest
import torch

if __name__ != "__main__" and not torch.cuda.is_available():
    pytest.skip("GPU benchmarks need CUDA", allow_module_level=True)

import triton.testing  # noqa: E402

from step_fns import step_fn  # noqa: E402  (bench/ is on sys.path as the script's or pytest's rootdir folder)

SHAPES = [(8192, 5632), (8192, 11008), (16384, 14336)]
IMPLS = ("eager", "pyflex", "liger")
ACTS = ("silu", "gelu_tanh")


def _liger(act):
    try:
        if act == "silu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction as function
        else:
            from liger_kernel.ops.geglu import LigerGELUMulFunction as function
    except ImportError:
        return None
    return function


def build(impl, M, N, train, act="silu", dtype=torch.bfloat16):
    """(fn, grad leaves) or None when the implementation is not available."""
    from pyflex.layers import gated_mlp

    g0 = torch.Generator(device="cuda").manual_seed(0)
    g = torch.randn(M, N, device="cuda", dtype=dtype, generator=g0).requires_grad_(train)
    u = torch.randn(M, N, device="cuda", dtype=dtype, generator=g0).requires_grad_(train)
    dh = torch.randn(M, N, device="cuda", dtype=dtype, generator=g0)
    module = torch.nn.SiLU() if act == "silu" else torch.nn.GELU(approximate="tanh")
    if impl == "eager":
        def fwd():
            return module(g) * u
    elif impl == "pyflex":
        def fwd():
            return gated_mlp.gated_act(g, u, module)
    elif impl == "liger":
        function = _liger(act)
        if function is None:
            return None

        def fwd():
            return function.apply(g, u)
    else:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    return step_fn(fwd, dh, train, [g, u])


def run_all():
    rows = []
    for act, (M, N), train in itertools.product(ACTS, SHAPES, (False, True)):
        base = None
        for impl in IMPLS:
            built = build(impl, M, N, train, act)
            if built is None:
                continue
            fn, leaves = built
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=leaves or None, return_mode="median")
            base = ms if impl == "eager" else base
            bytes_moved = M * N * 2 * (3 + (5 if train else 0))
            row = dict(act=act, M=M, N=N, pass_="fwd+bwd" if train else "fwd", impl=impl, ms=ms,
                       gb_s=bytes_moved / ms / 1e6, x_eager=ms / base)
            rows.append(row)
            print(f"{act:<9} {M:>6} {N:>6} {row['pass_']:<8} {impl:<7} {ms:8.3f} ms {row['gb_s']:7.0f} GB/s "
                  f"{row['x_eager']:5.2f}× eager", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark", file=sys.stderr)
        return 1
    rows = run_all()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
    return 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("train", [False, True], ids=["fwd", "fwdbwd"])
@pytest.mark.parametrize("M,N", SHAPES[:1])
def test_gated_act(benchmark, M, N, train, act, impl):
    built = build(impl, M, N, train, act)
    if built is None:
        pytest.skip(f"{impl} is not installed")
    fn, leaves = built

    def step():
        for leaf in leaves:
            leaf.grad = None
        fn()
        torch.cuda.synchronize()
    benchmark(step)


if __name__ == "__main__":
    sys.exit(main())
