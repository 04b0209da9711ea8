"""GPU microbenchmarks of the τ-masked LoRA linear (pyflex.flex_lora, Triton backend) against baselines.

Compared in the same run, on the same inputs:
    base        frozen F.linear (cuBLAS): forward (+ dX with W0 frozen)
    eager       eager LoRA in PyTorch (τ-masked as PEFT_S when τ is on), bf16 adapters
    addmm       cuBLAS + addmm LoRA with a hand-written autograd.Function backward (τ off only)
    peft        HF PEFT LoRA layer (its default: adapters kept in fp32), when peft imports (τ off only)
    pyflex      pyflex.flex_lora (the op, with its validation and autograd)
    kernels     pyflex.kernels.flex_lora.lora_forward/lora_backward called directly (no op overhead)
    kernels_nosplit   the same with GPU_CONFIG["modes"]["split_dots"] off (A/B of the bf16 hi+lo dots)

Run as a script (prints a table, writes JSON):
    python bench/bench_gpu_flex_lora.py --out results.json [--quick | --sweep]
or everything on a GPU machine (tests first): OUT=dir bash bench/run_gpu.sh
or as pytest-benchmark microbenchmarks:
    python -m pytest bench/bench_gpu_flex_lora.py --benchmark-enable -q

Times: median ms of triton.testing.do_bench (warm-up included, grads reset between runs); decode rows use
CUDA graphs (do_bench_cudagraph) so that they measure GPU time rather than Python launch overhead, and
also report the eager (launch-bound) time. TFLOP/s counts the base work only (2·M·N·K forward,
4·M·N·K forward + dX), so it is comparable across implementations. τ-on inputs use τ = the median
ratio of the inputs (~50% sparsity).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import pytest
import torch
import torch.nn.functional as F

if __name__ != "__main__" and not torch.cuda.is_available():
    pytest.skip("GPU benchmarks need CUDA", allow_module_level=True)

import triton  # noqa: E402
import triton.testing  # noqa: E402

import pyflex  # noqa: E402
from pyflex.lora import reference  # noqa: E402
from pyflex.kernels import flex_lora as fk  # noqa: E402
from step_fns import step_fn  # noqa: E402  (bench/ is on sys.path as the script's or pytest's rootdir folder)

TRAIN_SHAPES = [(8192, 4096, 4096), (8192, 4096, 11008), (8192, 11008, 4096)]
DECODE_SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (64, 4096, 4096), (16, 4096, 11008)]
RANKS = [16, 64]


# --------------------------------------------------------------------------------------------------
# inputs and implementations
# --------------------------------------------------------------------------------------------------
def make_case(M, K, N, r, dtype=torch.bfloat16, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(M, K, device=device, dtype=dtype, generator=g)
    W = torch.randn(N, K, device=device, dtype=dtype, generator=g) * K ** -0.5
    A = torch.randn(r, K, device=device, dtype=dtype, generator=g) * K ** -0.5
    # nonzero B so that the mask is meaningful (PEFT starts B at 0)
    B = torch.randn(N, r, device=device, dtype=dtype, generator=g) * 0.05
    gy = torch.randn(M, N, device=device, dtype=dtype, generator=g)
    scale = 2.0
    return dict(x=x, W=W, A=A, B=B, gy=gy, scale=scale)


def median_tau(c):
    cs = torch.full((c["x"].shape[0],), c["scale"], device=c["x"].device, dtype=torch.float32)
    ratio = reference.lora_forward(c["x"], c["W"], None, c["A"], c["B"], c["x"], cs, 0.0).ratio
    return float(ratio.median())


class AddmmLoRA(torch.autograd.Function):
    """cuBLAS + addmm LoRA with a hand-written backward (the Unsloth approach); W0 frozen."""

    @staticmethod
    def forward(ctx, x, W, A, B, s):
        xa = x @ A.t()
        y = torch.addmm(x @ W.t(), xa, B.t(), alpha=s)
        ctx.save_for_backward(x, W, A, B, xa)
        ctx.s = s
        return y

    @staticmethod
    def backward(ctx, gy):
        x, W, A, B, xa = ctx.saved_tensors
        s = ctx.s
        gyb = (gy @ B) * s                       # (M, r)
        dx = (gy @ W).addmm_(gyb, A)
        dA = gyb.t() @ x
        dB = (gy.t() @ xa) * s
        return dx, None, dA, dB, None


def eager_lora(x, W, A, B, s, tau):
    y0 = F.linear(x, W)
    d = (x @ A.t()) @ B.t() * s
    if tau is None:
        return y0 + d
    with torch.no_grad():
        ratio = d.float().norm(dim=-1) / y0.float().norm(dim=-1).clamp_min(reference.NORM_EPS)
        m = (ratio >= tau).to(d.dtype)[:, None]
    return y0 + d * m


def make_peft_layer(K, N, r, dtype):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(K, N, bias=False)

    model = One().to(device="cuda", dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], lora_dropout=0.0))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.05)
    return layer


def build(impl, c, tau, train):
    """Return (fn, grad_leaves) running forward (+ backward with gy when train)."""
    x0, W, A0, B0, gy, s = c["x"], c["W"], c["A"], c["B"], c["gy"], c["scale"]
    x = x0.detach().clone().requires_grad_(train)
    A = A0.detach().clone().requires_grad_(train)
    B = B0.detach().clone().requires_grad_(train)
    M = x.shape[0]
    if impl == "base":
        def fwd():
            return F.linear(x, W)
        leaves = [x]
    elif impl == "eager":
        def fwd():
            return eager_lora(x, W, A, B, s, tau)
        leaves = [x, A, B]
    elif impl == "addmm":
        if tau is not None:
            return None
        def fwd():
            return AddmmLoRA.apply(x, W, A, B, s)
        leaves = [x, A, B]
    elif impl == "peft":
        if tau is not None:
            return None
        layer = make_peft_layer(x.shape[1], W.shape[0], A.shape[0], x.dtype)
        if layer is None:
            return None
        with torch.no_grad():
            layer.base_layer.weight.copy_(W)
        layer.base_layer.weight.requires_grad_(False)
        def fwd():
            return layer(x)
        leaves = [x] + [p for p in layer.parameters() if p.requires_grad]
    elif impl == "pyflex":
        t = None if tau is None else torch.tensor([tau], device=x.device, requires_grad=train)
        def fwd():
            return pyflex.flex_lora(x, W, None, A, B, s, tau=t)
        leaves = [x, A, B] + ([t] if t is not None else [])
    elif impl == "kernels_nosplit":  # A/B of GPU_CONFIG["modes"]["split_dots"]
        inner, _ = build("kernels", c, tau, train)
        modes = dict(fk.GPU_CONFIG["modes"], split_dots=False)
        return (lambda: _with_config("modes", modes, inner)), []
    elif impl == "kernels":
        cs = torch.full((M,), s, device=x.device, dtype=torch.float32)
        xd, Ad, Bd = x.detach(), A.detach(), B.detach()
        if not train:
            def run():
                return fk.lora_forward(xd, W, None, Ad, Bd, xd, cs, tau).y
            return run, []
        def run():
            res = fk.lora_forward(xd, W, None, Ad, Bd, xd, cs, tau)
            return fk.lora_backward(gy, xd, W, Ad, Bd, xd, res.z, cs, res.mask, need_dx=True,
                                    need_dweight=False, need_dbias=False, need_adapter=True,
                                    need_uz=tau is not None)
        return run, []
    else:
        raise ValueError(f"impl={impl!r} is not one of base, eager, addmm, peft, pyflex, kernels")
    return step_fn(fwd, gy, train, leaves)


def time_ms(fn, leaves, graph=False):
    if graph:
        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
    return triton.testing.do_bench(fn, warmup=25, rep=80, grad_to_none=leaves or None, return_mode="median")


def sparsity_of(c, tau):
    if tau is None:
        return 0.0
    cs = torch.full((c["x"].shape[0],), c["scale"], device="cuda", dtype=torch.float32)
    res = fk.lora_forward(c["x"], c["W"], None, c["A"], c["B"], c["x"], cs, tau)
    return 1.0 - res.mask.float().mean().item()


# --------------------------------------------------------------------------------------------------
# script
# --------------------------------------------------------------------------------------------------
def run_all(quick=False, decode_only=False):
    rows = []
    impls = ["base", "eager", "addmm", "peft", "pyflex", "kernels", "kernels_nosplit"]
    train_shapes = TRAIN_SHAPES[:1] if quick else TRAIN_SHAPES
    ranks = RANKS[:1] if quick else RANKS
    if not decode_only:
        for (M, K, N) in train_shapes:
            for r in ranks:
                c = make_case(M, K, N, r)
                for masked in (False, True):
                    tau = median_tau(c) if masked else None
                    sp = sparsity_of(c, tau)
                    for section, train in (("fwd+bwd", True), ("fwd", False)):
                        flops = (4 if train else 2) * M * N * K
                        base_ms = None
                        for impl in impls:
                            built = build(impl, c, tau, train)
                            if built is None:
                                continue
                            try:
                                ms = time_ms(*built)
                            except Exception as exc:  # one failing baseline must not lose the run
                                print(f"# {section} {impl} {M}x{K}->{N} r={r} failed: {exc!r}", file=sys.stderr)
                                continue
                            if impl == "base":
                                base_ms = ms
                            rows.append(dict(section=section, M=M, K=K, N=N, r=r, tau=tau, sparsity=sp, impl=impl,
                                             ms=ms, tflops=flops / ms * 1e-9,
                                             x_base=ms / base_ms if base_ms else math.nan))
                            print(fmt(rows[-1]), flush=True)
                del c
                torch.cuda.empty_cache()
    for (M, K, N) in DECODE_SHAPES:
        r = 16
        c = make_case(M, K, N, r)
        for masked in (False, True):
            tau = median_tau(c) if masked else None
            sp = sparsity_of(c, tau)
            flops = 2 * M * N * K
            for graph in (True, False):
                section = "decode(graph)" if graph else "decode(eager)"
                base_ms = None
                for impl in (["base", "kernels"] if graph else ["base", "eager", "pyflex", "kernels"]):
                    built = build(impl, c, tau, False)
                    try:
                        ms = time_ms(*built, graph=graph)
                    except Exception as exc:
                        print(f"# {section} {impl} M={M} failed: {exc!r}", file=sys.stderr)
                        continue
                    if impl == "base":
                        base_ms = ms
                    rows.append(dict(section=section, M=M, K=K, N=N, r=r, tau=tau, sparsity=sp, impl=impl, ms=ms,
                                     tflops=flops / ms * 1e-9, x_base=ms / base_ms if base_ms else math.nan,
                                     gbps=(N * K * 2) / ms * 1e-6))
                    print(fmt(rows[-1]), flush=True)
    return rows


# --------------------------------------------------------------------------------------------------
# block-size sweep of the Triton kernels (how GPU_CONFIG in kernels/flex_lora.py was chosen)
# --------------------------------------------------------------------------------------------------
def _with_config(key, cfg, fn):
    old = fk.GPU_CONFIG.get(key)
    fk.GPU_CONFIG[key] = cfg
    try:
        return fn()
    finally:
        if old is None:
            del fk.GPU_CONFIG[key]
        else:
            fk.GPU_CONFIG[key] = old


def sweep(M=8192, K=4096, N=4096):
    rows = []

    def record(**row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    def bench(fn, graph=False):
        try:
            return time_ms(fn, [], graph=graph)
        except Exception as exc:  # e.g. out of shared memory for a config
            return f"{type(exc).__name__}: {str(exc)[:120]}"

    for r in (16, 64):
        c = make_case(M, K, N, r)
        x, W, A, B, gy = c["x"], c["W"], c["A"], c["B"], c["gy"]
        cs = torch.full((M,), c["scale"], device="cuda", dtype=torch.float32)
        tau = median_tau(c)
        RP = fk._rank_pad(r)
        res = fk.lora_forward(x, W, None, A, B, x, cs, tau)
        record(kind="stage", r=r, what="F.linear", ms=bench(lambda: F.linear(x, W)))
        record(kind="stage", r=r, what="dx gemm", ms=bench(lambda: gy @ W))
        record(kind="stage", r=r, what="fwd tau off", ms=bench(lambda: fk.lora_forward(x, W, None, A, B, x, cs, None)))
        record(kind="stage", r=r, what="fwd tau on", ms=bench(lambda: fk.lora_forward(x, W, None, A, B, x, cs, tau)))

        def bwd(uz=True, adapter=True, dx=True):
            return lambda: fk.lora_backward(gy, x, W, A, B, x, res.z, cs, res.mask, need_dx=dx, need_dweight=False,
                                            need_dbias=False, need_adapter=adapter, need_uz=uz)
        record(kind="stage", r=r, what="bwd dx only", ms=bench(bwd(False, False, True)))
        record(kind="stage", r=r, what="bwd full", ms=bench(bwd()))
        ones = torch.ones(M, dtype=torch.bool, device="cuda")

        def bwd_off():
            return fk.lora_backward(gy, x, W, A, B, x, res.z, cs, ones, need_dx=True, need_dweight=False,
                                    need_dbias=False, need_adapter=True, need_uz=False)
        record(kind="stage", r=r, what="bwd tau off", ms=bench(bwd_off))
        for modes in (dict(fwd_addmm=True, dx_addmm=True),):
            fn_f = lambda: bench(lambda: fk.lora_forward(x, W, None, A, B, x, cs, None))  # noqa: E731
            record(kind="modes", r=r, modes=modes, what="fwd tau off", ms=_with_config("modes", modes, fn_f))
            record(kind="modes", r=r, modes=modes, what="bwd tau off",
                   ms=_with_config("modes", modes, lambda: bench(bwd_off)))
            record(kind="modes", r=r, modes=modes, what="bwd full", ms=_with_config("modes", modes, lambda: bench(bwd())))
        v = torch.randn(M, RP, device="cuda") * res.mask[:, None]
        m8 = res.mask.view(torch.int8)
        record(kind="stage", r=r, what="rank_reduce x", ms=bench(lambda: fk._rank_reduce(v, x, m8, r)))

        full = r == 16
        for BM in ((16, 32) if full else (16,)):
            for BN in ((64, 128, 256) if full else (64, 128)):
                for nw in (4, 8):
                    cfg = dict(BM=BM, BN=BN, BK=128, num_warps=nw)
                    ms = _with_config(("fwd_rows", RP), cfg,
                                      lambda: bench(lambda: fk.lora_forward(x, W, None, A, B, x, cs, tau)))
                    record(kind="fwd_rows", r=r, cfg=cfg, ms=ms)
                    ms = _with_config(("bwd_rows", RP), dict(cfg, BK=BN), lambda: bench(bwd(True, False, True)))
                    record(kind="bwd_rows", r=r, cfg=dict(cfg, BK=BN), ms=ms)
        for BM in ((32, 64, 128) if full else (64,)):
            for BD in (64, 128, 256):
                for nw in (4, 8):
                    cfg = dict(BM=BM, BD=BD, num_warps=nw)
                    ms = _with_config(("rank_reduce", RP), cfg, lambda: bench(lambda: fk._rank_reduce(v, x, m8, r)))
                    record(kind="rank_reduce", r=r, cfg=cfg, ms=ms)
        del c, x, W, A, B, gy, res, v
        torch.cuda.empty_cache()

    base_cfg = dict(fk.GPU_CONFIG["decode"])
    for (Md, Kd, Nd) in [(1, 4096, 4096), (16, 4096, 4096), (64, 4096, 4096)]:
        c = make_case(Md, Kd, Nd, 16)
        x, W, A, B = c["x"], c["W"], c["A"], c["B"]
        cs = torch.full((Md,), c["scale"], device="cuda", dtype=torch.float32)
        tau = median_tau(c)
        record(kind="decode_base", M=Md, ms=bench(lambda: F.linear(x, W), graph=True))
        for BN in (16, 32, 64):
            for BK in (128, 256):
                for stages in (3, 4):
                    cfg = dict(base_cfg, BN=BN, BN_TAU=BN, BK=BK, BK_SMALL_M=BK, num_stages=stages)
                    for t in (None, tau):
                        ms = _with_config("decode", cfg,
                                          lambda: bench(lambda: fk.lora_forward(x, W, None, A, B, x, cs, t), graph=True))
                        record(kind="decode", M=Md, tau=t is not None, cfg=dict(BN=BN, BK=BK, stages=stages), ms=ms)
    return rows


def fmt(row):
    tau = "off" if row["tau"] is None else f"{row['tau']:.3g}"
    return (f"{row['section']:14s} M={row['M']:<5d} {row['K']:>5d}->{row['N']:<5d} r={row['r']:<3d} tau={tau:8s} "
            f"sp={row['sparsity']:.2f} {row['impl']:8s} {row['ms']:8.4f} ms {row['tflops']:7.1f} TFLOP/s "
            f"x_base={row['x_base']:.3f}")


def environment():
    import importlib

    env = dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
               device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
               cuda=torch.version.cuda)
    for mod in ("transformers", "peft"):
        try:
            env[mod] = importlib.import_module(mod).__version__
        except ImportError:
            env[mod] = None
    return env


def trace(out_dir, M=8192, K=4096, N=4096, r=16, iters=5):
    """Where the op's time goes against the kernels alone: a torch.profiler CUDA trace of fwd+bwd for each (τ off and
    on), its per-kernel GPU totals and the GPU-busy fraction of the wall time (gaps mean the CPU side could not keep
    up). Chrome traces go to ``out_dir``; returns one row per (impl, τ)."""
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(out_dir, exist_ok=True)
    c = make_case(M, K, N, r)
    rows = []
    for tau in (None, median_tau(c)):
        for impl in ("kernels", "pyflex"):
            fn, leaves = build(impl, c, tau, True)
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                start = time.perf_counter()
                for _ in range(iters):
                    for leaf in leaves:
                        leaf.grad = None
                    fn()
                torch.cuda.synchronize()
                wall_ms = 1000.0 * (time.perf_counter() - start) / iters
            name = f"{impl}_{'tau_on' if tau is not None else 'tau_off'}"
            prof.export_chrome_trace(os.path.join(out_dir, f"trace_{name}.json"))
            kernels = {}
            for e in prof.key_averages():
                gpu_us = getattr(e, "device_time_total", 0.0) or 0.0
                if gpu_us > 0 and e.device_type == torch.autograd.DeviceType.CUDA:
                    kernels[e.key] = gpu_us / iters / 1000.0
            gpu_ms = sum(kernels.values())
            rows.append(dict(impl=name, wall_ms=wall_ms, gpu_ms=gpu_ms, gpu_busy=gpu_ms / wall_ms,
                             kernels_ms=dict(sorted(kernels.items(), key=lambda kv: -kv[1]))))
            top = ", ".join(f"{k[:40]} {v:.3f}" for k, v in list(rows[-1]["kernels_ms"].items())[:6])
            print(f"{name:<16} wall {wall_ms:7.3f} ms/iter  GPU {gpu_ms:7.3f} ms ({gpu_ms / wall_ms:5.1%})  {top}",
                  flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the rows and the environment as JSON here")
    ap.add_argument("--quick", action="store_true", help="one training shape, r=16 only")
    ap.add_argument("--decode-only", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="time block-size variants of the Triton kernels")
    ap.add_argument("--trace", default=None, metavar="DIR",
                    help="profile the op against the kernels alone at 8192×4096→4096 (CUDA traces into DIR)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark", file=sys.stderr)
        return 1
    env = environment()
    print(json.dumps(env))
    if args.trace:
        rows = trace(args.trace)
    elif args.sweep:
        rows = sweep()
    else:
        rows = run_all(quick=args.quick, decode_only=args.decode_only)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(environment=env, rows=rows), f, indent=1)
    return 0


# --------------------------------------------------------------------------------------------------
# pytest-benchmark
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["base", "eager", "addmm", "peft", "pyflex"])
@pytest.mark.parametrize("masked", [False, True], ids=["tau_off", "tau_on"])
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("M,K,N", TRAIN_SHAPES[:1])
@pytest.mark.parametrize("train", [True, False], ids=["fwdbwd", "fwd"])
def test_flex_lora_linear(benchmark, M, K, N, r, masked, impl, train):
    c = make_case(M, K, N, r)
    tau = median_tau(c) if masked else None
    built = build(impl, c, tau, train)
    if built is None:
        pytest.skip(f"{impl} does not serve tau={tau}")
    fn, leaves = built

    def step():
        for t in leaves:
            t.grad = None
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(step, warmup_rounds=5, rounds=30, iterations=1)


@pytest.mark.parametrize("impl", ["base", "kernels"])
@pytest.mark.parametrize("masked", [False, True], ids=["tau_off", "tau_on"])
@pytest.mark.parametrize("M", [1, 16, 64])
def test_flex_lora_decode(benchmark, M, masked, impl):
    c = make_case(M, 4096, 4096, 16)
    tau = median_tau(c) if masked else None
    fn, _ = build(impl, c, tau, False)

    def step():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(step, warmup_rounds=10, rounds=100, iterations=1)


if __name__ == "__main__":
    sys.exit(main())
