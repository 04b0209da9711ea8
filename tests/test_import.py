"""`import pyflex` stays light: each public name loads its own module on first use, and patching a model never loads
the Trainer, peft, accelerate, liger, matplotlib or torch's compiler (they cost seconds on a small machine)."""
import subprocess
import sys

import pytest

HEAVY = ("peft", "accelerate", "trl", "liger_kernel", "matplotlib", "torch._dynamo", "transformers.trainer",
         "bitsandbytes", "safetensors")


def _loaded_after(code: str) -> set:
    probe = f"import sys\n{code}\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    return set(filter(None, lines[-1].split(","))) if lines else set()


def test_import_pyflex_loads_nothing_heavy():
    assert _loaded_after("import pyflex") == set()
    assert "transformers" not in _loaded_after("import pyflex\nimport sys\nassert 'transformers' not in sys.modules")


_PLAIN_LOOP = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
model = LlamaForCausalLM(cfg)
PATCH
ids = torch.randint(0, 64, (2, 8))
model(input_ids=ids, labels=ids).loss.backward()
STEP
"""


def test_patching_and_training_a_model_loads_nothing_transformers_does_not():
    """Whatever transformers itself loads for the same loop (it may import safetensors, accelerate, dynamo) is the
    floor; pyflex adds nothing to it."""
    plain = _loaded_after(_PLAIN_LOOP.replace("PATCH", "").replace("STEP", ""))
    patched = _loaded_after(_PLAIN_LOOP.replace("PATCH", "import pyflex\nmodel = pyflex.patch_model(model, r=4, tau=True)\n"
                                                "opt = torch.optim.AdamW(pyflex.tau_param_groups(model, lr=1e-3))")
                            .replace("STEP", "pyflex.clip_grad_norm_(model, 1.0)\nopt.step()"))
    assert patched - plain == set()


@pytest.mark.parametrize("name", ["PyflexCallback", "fuse_model_ops", "save_adapter", "ImportanceSchedule",
                                  "apply_hlpt", "flex_lora", "use_backend"])
def test_every_public_name_resolves(name):
    import pyflex
    assert name in pyflex.__all__ and getattr(pyflex, name) is not None


def test_unknown_attribute_is_an_attribute_error():
    import pyflex
    with pytest.raises(AttributeError, match="no attribute 'patch_modle'"):
        pyflex.patch_modle
