"""Compile every Triton kernel of pyflex for real GPU targets, on a machine without a GPU.

The interpreter (how the tests run kernels on CPU) is lenient where the compiler is not (types, constexpr use,
layouts), so a kernel can pass every interpreter test and still fail to compile on the GPU. This script drives the
real launchers (``pyflex.kernels.flex_lora``, ``pyflex.kernels.gated_act``, ``pyflex.kernels.nf4``) with CPU tensors, in the configurations
they use on a GPU (GPU_CONFIG, not the interpreter's), but replaces Triton's launch by an ahead-of-time
``triton.compile`` of the same kernel, signature and constexprs for each target: nothing runs, everything compiles
down to a cubin with the ptxas that ships with Triton.

    python tests/kernels/aot_compile_kernels.py [--targets 90,80]

Must run without TRITON_INTERPRET (tests/kernels/test_kernels_compile.py starts it in a clean subprocess). Prints one line
per compiled variant and exits 1 on the first failure.
"""
from __future__ import annotations

import argparse
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1: this script compiles kernels instead of interpreting them")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8",
           torch.uint8: "u8", torch.bool: "i1", torch.int32: "i32", torch.int64: "i64"}
# compile options a launch may pass; enable_fp_fusion=False keeps the NF4 dequantizer's multiply and add apart (no FMA)
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion")
# shared memory a block may use (opt-in maximum): H100 227 KiB, A100 163 KiB, RTX 30/40 99 KiB
SHARED_LIMIT = {90: 232448, 80: 166912, 86: 101376, 89: 101376}
TARGETS = [90]
compiled = []
_seen = set()


def _signature(fn: JITFunction, args, kwargs):
    bound = dict(zip(fn.arg_names, args))
    bound.update(kwargs)
    options = {k: bound.pop(k) for k in _LAUNCH_OPTIONS if k in bound}
    signature, constexprs = {}, {}
    for param in fn.params:
        value = bound[param.name]
        if param.is_constexpr or value is None:
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _DTYPES[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i64" if abs(value) >= 2**31 else "i32"
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {param.name}={value!r} has no Triton type here")
    return signature, constexprs, options


def _compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
    signature, constexprs, options = _signature(self, args, kwargs)
    key = (self.fn.__name__, tuple(signature.items()), tuple(sorted(constexprs.items(), key=str)),
           tuple(sorted(options.items())))
    if key in _seen:
        return
    _seen.add(key)
    for capability in TARGETS:
        kernel = triton.compile(ASTSource(self, signature, constexprs), target=GPUTarget("cuda", capability, 32),
                                options=options)
        shared = kernel.metadata.shared
        if shared > SHARED_LIMIT.get(capability, 101376):
            raise RuntimeError(f"{self.fn.__name__} needs {shared} B of shared memory on sm_{capability}, over the "
                               f"{SHARED_LIMIT.get(capability, 101376)} B a block can have; constexprs {constexprs}, "
                               f"options {options}")
    dtypes = sorted({v for k, v in signature.items() if v.startswith("*")})
    flags = {k: v for k, v in constexprs.items() if isinstance(v, bool) and v}
    compiled.append(self.fn.__name__)
    print(f"ok  {self.fn.__name__:<22} sm_{'/'.join(map(str, TARGETS))}  {' '.join(dtypes)}  {sorted(flags)}",
          flush=True)


def drive_launchers():
    """Call every launcher path once per configuration a GPU run takes (dtypes, τ, bias, decode, ranks, flags)."""
    from pyflex.kernels import flex_lora as fk
    from pyflex.kernels import gated_act as ga
    from pyflex.kernels import nf4
    from pyflex.lora.nf4 import NF4_CODE, NF4Weight

    assert not fk.INTERPRET
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for r in (16, 64):                 # r = 64 takes the bf16 hi/lo split dots
            K, N = 96, 80
            w, b = torch.randn(N, K, dtype=dtype), torch.randn(N, dtype=dtype)
            A, B = torch.randn(r, K, dtype=dtype), torch.randn(N, r, dtype=dtype)
            # rows path, and the decode path at its three row-block sizes (M = 5, 33 and 64 tokens)
            for x in (torch.randn(M, K, dtype=dtype) for M in (200, 5, 33, 64)):
                M = x.shape[0]
                cs = torch.ones(M)
                for tau, bias in ((None, None), (0.5, b), (torch.tensor(0.5), None)):
                    res = fk.lora_forward(x, w, bias, A, B, x, cs, tau)
                    mask = torch.ones(M, dtype=torch.bool) if tau is None else res.mask
                    fk.lora_backward(torch.randn(M, N, dtype=dtype), x, w, A, B, x, res.z, cs, mask,
                                     need_dx=True, need_dweight=False, need_dbias=False, need_adapter=True,
                                     need_uz=tau is not None, dropout_scale=torch.ones_like(x) if bias is None
                                     else None)
        fk.tau_gradient(torch.randn(300), torch.ones(300), torch.ones(300, dtype=torch.bool), 0.1)
        for act in ga.ACTIVATIONS:
            g, u = torch.randn(6, 40, dtype=dtype), torch.randn(6, 40, dtype=dtype)
            ga.gated_mul(g, u, act)
            ga.gated_mul_backward(u, g, u, act)
        for nested in (False, True):       # the NF4 (QLoRA) base's dequantization pass, into each dtype
            n, k, blocks = 96, 128, 96 * 128 // 64
            extra = dict(absmax=torch.randint(0, 256, (blocks,), dtype=torch.uint8), absmax_code=torch.randn(256),
                         absmax_scale=torch.rand(1), absmax_offset=torch.tensor(0.1)) if nested else \
                dict(absmax=torch.rand(blocks))
            w = NF4Weight(packed=torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8), code=NF4_CODE, shape=(n, k),
                          dtype=dtype, **extra)
            nf4.nf4_dequantize(**w.kernel_args(), dtype=dtype)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="90", help="comma list of CUDA compute capabilities (default 90: H100)")
    args = ap.parse_args(argv)
    TARGETS[:] = [int(t) for t in args.targets.split(",")]
    JITFunction.run = _compile_instead_of_launch
    drive_launchers()
    names = sorted(set(compiled))
    print(f"compiled {len(compiled)} variants of {len(names)} kernels: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
