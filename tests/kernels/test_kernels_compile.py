"""Every Triton kernel compiles for the H100 (sm_90) and fits its shared memory, checked without a GPU.

The interpreter tests check what the kernels compute; this checks that the compiler accepts them, in the
configurations the launchers use on a GPU (tests/kernels/aot_compile_kernels.py: the launchers run on CPU tensors and each
launch becomes an ahead-of-time triton.compile down to a cubin). It runs in a subprocess because this test process
runs Triton in interpreter mode.
"""
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_every_kernel_compiles_for_sm90():
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "aot_compile_kernels.py")
    proc = subprocess.run([sys.executable, script, "--targets", "90"], env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = re.search(r"compiled (\d+) variants of (\d+) kernels", proc.stdout)
    assert found, proc.stdout[-2000:]
    variants, kernels = int(found.group(1)), int(found.group(2))
    assert kernels == 9 and variants >= 50, found.group(0)      # 9: the NF4 dequantization pass (kernels/nf4.py)
