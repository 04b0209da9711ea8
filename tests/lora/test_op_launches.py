"""What one training call of the op costs, op by op: the tensor operations and Triton launches of a forward and a
backward (Triton backend; on CPU its kernels run under the interpreter), listed and compared with the list below, so
that adding a launch, a GEMM, an allocation or a host read fails here before it shows up in a GPU profile.

Targets (issue #16): forward = base GEMM + one fused kernel; backward = dX GEMM + at most two kernels; no allocation
that is not an output or a saved tensor; no host-device sync. Where today's list is above the target, the comment on
the expected list says so (and what would remove it).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pyflex

# metadata-only ops (no kernel, no memory): left out of the lists
_METADATA = {"view", "detach", "t", "slice", "_unsafe_view", "as_strided", "expand", "reshape", "alias"}
_ALLOCATIONS = {"empty", "zeros", "ones", "full", "empty_like", "zeros_like", "new_empty", "new_zeros", "new_full",
                "new_empty_strided", "empty_strided"}
_SYNCS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal"}


class _Recorder(TorchDispatchMode):
    """Records aten ops by name; Triton launches are recorded by :func:`_count_launches` (and the interpreter's own
    tensor work inside a launch is not recorded)."""

    def __init__(self):
        super().__init__()
        self.ops, self.paused = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused and name not in _METADATA:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


class _Launches:
    """Stands in for a @triton.jit kernel object: ``kernel[grid](...)`` records the launch, then runs it."""

    def __init__(self, kernel, name, recorder_box):
        self.kernel, self.name, self.box = kernel, name, recorder_box

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            recorder = self.box[0]
            if recorder is None:
                return launch(*args, **kwargs)
            recorder.ops.append(f"triton:{self.name}")
            recorder.paused = True
            try:
                return launch(*args, **kwargs)
            finally:
                recorder.paused = False
        return run


@pytest.fixture
def trace(monkeypatch):
    fk = pytest.importorskip("pyflex.kernels.flex_lora")
    if not torch.cuda.is_available():
        from pyflex.lora.backends import triton_interpreting
        if not triton_interpreting():
            pytest.skip("the Triton interpreter is off (tests/conftest.py turns it on before triton is imported)")
    box = [None]
    for name in dir(fk):
        if name.startswith("_") and name.endswith("_kernel"):
            monkeypatch.setattr(fk, name, _Launches(getattr(fk, name), name.strip("_"), box))

    def run(fn):
        box[0] = recorder = _Recorder()
        try:
            with recorder:
                fn()
        finally:
            box[0] = None
        return recorder.ops
    return run


def _one_training_call(trace, tau_on: bool):
    """Forward and backward op lists of one call: 80 tokens (the rows path, above the decode limit), 64→64, r = 8,
    W0 frozen, x and the adapters require grad."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 64, generator=g).to(device).requires_grad_()
    w = torch.randn(64, 64, generator=g).to(device)
    A = (torch.randn(8, 64, generator=g) * 0.1).to(device).requires_grad_()
    B = (torch.randn(64, 8, generator=g) * 0.1).to(device).requires_grad_()
    tau = torch.tensor(0.05, device=device, requires_grad=True) if tau_on else None
    with pyflex.use_backend("triton"):
        pyflex.flex_lora(x, w, None, A, B, 2.0, tau=tau).sum().backward()  # warm-up: dispatch cache, compilation
        for t in (x, A, B, tau):
            if t is not None:
                t.grad = None
        out = {}
        out["forward"] = trace(lambda: out.__setitem__("y", pyflex.flex_lora(x, w, None, A, B, 2.0, tau=tau)))
        gy = torch.randn_like(out["y"])
        out["backward"] = trace(lambda: out["y"].backward(gy))
    return out["forward"], out["backward"]


# The lists as the op runs today under the interpreter's launcher settings (fwd_addmm/dx_addmm off there: on a GPU
# y0 and dX are one addmm onto the kernel's output instead of an mm the kernel then updates).
EXPECTED = {
    False: dict(
        # cscale (saved), y0 GEMM (output), z and mask (outputs), one fused rows kernel: at the target
        forward=["full", "mm", "empty", "empty", "triton:fwd_rows_kernel"],
        # dX GEMM, u/v scratch (2 × M×r), the rows kernel, dA and dB as two split-M reductions (each a partial buffer
        # + a sum): 3 kernels where the target is 2 — vA in the dX GEMM's epilogue would remove one. dB is produced
        # transposed, so AccumulateGrad copies it into lora_B's layout (new_empty_strided + copy_).
        backward=["mm", "empty", "empty", "triton:bwd_rows_kernel", "empty", "triton:rank_reduce_kernel", "sum",
                  "empty", "triton:rank_reduce_kernel", "sum", "new_empty_strided", "copy_"],
    ),
    True: dict(
        # + τ read on the host (CPU only: on CUDA the kernels read τ on the device, no sync), the ratio buffer (the
        # backend's output, unused by the op), Σy0² needs the bias-free GEMM, the r×r Gram BᵀB, τ as a 1-element
        # device tensor for the kernel
        forward=["full", "_local_scalar_dense", "mm", "empty", "empty", "empty", "mm", "full",
                 "triton:fwd_rows_kernel"],
        # + uz buffer, and τ's gradient in one launch
        backward=["mm", "empty", "empty", "empty", "triton:bwd_rows_kernel", "empty", "triton:rank_reduce_kernel",
                  "sum", "empty", "triton:rank_reduce_kernel", "sum", "empty", "triton:tau_grad_kernel",
                  "new_empty_strided", "copy_"],
    ),
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the lists are the interpreter's; the GPU runs test_no_sync")
@pytest.mark.parametrize("tau_on", [False, True], ids=["tau_off", "tau_on"])
def test_training_call_makes_exactly_these_ops(trace, tau_on):
    forward, backward = _one_training_call(trace, tau_on)
    assert forward == EXPECTED[tau_on]["forward"]
    assert backward == EXPECTED[tau_on]["backward"]
    # no host read besides τ's on CPU, and none at all in backward
    assert [op for op in forward if op in _SYNCS] == (["_local_scalar_dense"] if tau_on else [])
    assert not [op for op in backward if op in _SYNCS]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU bookkeeping check")
def test_unrequested_gradients_allocate_nothing(trace):
    """Frozen adapters, no τ, x needs grad: the backward is dX = gy W0 + the LoRA term — the GEMM and the rows kernel,
    with no scratch buffers and no adapter reductions."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(80, 64, generator=g).requires_grad_()
    w, A, B = torch.randn(64, 64, generator=g), torch.randn(8, 64, generator=g), torch.randn(64, 8, generator=g)
    with pyflex.use_backend("triton"):
        y = pyflex.flex_lora(x, w, None, A, B, 2.0)
        gy = torch.ones_like(y)
        ops = trace(lambda: y.backward(gy))
    assert ops == ["mm", "triton:bwd_rows_kernel"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tau_on", [False, True], ids=["tau_off", "tau_on"])
def test_no_sync(tau_on):
    """On CUDA a training call of the op never waits for the device (τ's finiteness is checked once per change)."""
    from pyflex.lora.autograd import verify_taus
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(80, 64, device="cuda", generator=g, requires_grad=True)
    w = torch.randn(64, 64, device="cuda", generator=g)
    A = (torch.randn(8, 64, device="cuda", generator=g) * 0.1).requires_grad_()
    B = (torch.randn(64, 8, device="cuda", generator=g) * 0.1).requires_grad_()
    tau = torch.tensor(0.05, device="cuda", requires_grad=True) if tau_on else None
    if tau is not None:
        verify_taus([tau])
    pyflex.flex_lora(x, w, None, A, B, 2.0, tau=tau).sum().backward()   # warm-up (compilation may sync)
    torch.cuda.set_sync_debug_mode("error")
    try:
        pyflex.flex_lora(x, w, None, A, B, 2.0, tau=tau).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
