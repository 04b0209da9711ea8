"""Tiny Hugging Face models built from configs (no hub access), PEFT comparison helpers and random NF4 weights,
shared by the tests."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import pyflex

VOCAB = 64
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "gpt_neox", "bert")


def tiny_config(family: str, layers: int = 3):
    import transformers as tf
    common = dict(vocab_size=VOCAB, attn_implementation="eager")
    llama_like = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, **common)
    if family == "llama":
        return tf.LlamaConfig(**llama_like)
    if family == "mistral":
        return tf.MistralConfig(sliding_window=None, **llama_like)
    if family == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if family == "qwen3":
        return tf.Qwen3Config(head_dim=8, **llama_like)
    if family == "gemma2":
        return tf.Gemma2Config(head_dim=8, query_pre_attn_scalar=8, sliding_window=16, pad_token_id=0, **llama_like)
    if family == "phi3":
        return tf.Phi3Config(pad_token_id=0, bos_token_id=1, eos_token_id=2, **llama_like)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                             attn_pdrop=0.0, **common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                                max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0, **common)
    if family == "bert":
        return tf.BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                             max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                             **common)
    raise KeyError(family)


def tiny_model(family: str = "llama", layers: int = 3, seed: int = 0) -> nn.Module:
    import transformers as tf
    torch.manual_seed(seed)
    config = tiny_config(family, layers)
    model = tf.BertForMaskedLM(config) if family == "bert" else tf.AutoModelForCausalLM.from_config(config)
    return model.eval()


def tokens(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def peft_lora_modules(peft_model):
    """{qualified name in the base model: PEFT LoRA layer}."""
    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and "default" in module.lora_A:
            out[name.removeprefix("base_model.model.")] = module
    return out


def randomize_peft(peft_model, seed: int = 2, std: float = 0.2) -> None:
    """Nonzero random lora_A and lora_B in every PEFT LoRA layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in peft_lora_modules(peft_model).values():
            for p in (module.lora_A["default"].weight, module.lora_B["default"].weight):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def copy_peft_to_flex(peft_model, flex_model) -> int:
    """Copy PEFT's LoRA weights into the matching FlexLinear modules; returns how many modules were copied."""
    n = 0
    with torch.no_grad():
        for name, module in peft_lora_modules(peft_model).items():
            flex = flex_model.get_submodule(name)
            flex.lora_A.copy_(module.lora_A["default"].weight)
            flex.lora_B.copy_(module.lora_B["default"].weight)
            n += 1
    return n


def randomize_flex(model, seed: int = 3, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, pyflex.FlexLinear):
                module.lora_A.copy_(torch.randn(module.lora_A.shape, generator=g) * std)
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * std)


def lm_loss(model, ids):
    out = model(input_ids=ids)
    logits = out.logits
    return logits, logits.float().pow(2).mean() + logits[..., :-1, :].log_softmax(-1).gather(
        -1, ids[:, 1:, None]).mean() * -1.0


def assert_close(a, b, atol=2e-5, rtol=1e-4, msg=""):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=msg or None)


def clone(model):
    return copy.deepcopy(model)




@pytest.fixture(autouse=False)
def single_thread():
    """Tiny models run fastest on one thread; on a busy 2-core box intra-op threads oversubscribe badly (5-10x)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def reference_backend(single_thread):
    """Model-level tests run the reference op on one thread, so they do not depend on the C++ build (the op tests
    cover every backend). A test module opts in by importing this fixture (it is autouse there)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pyflex.use_backend("reference"):
            yield


def tiny_classifier(family: str = "llama", num_labels: int = 3, layers: int = 3, seed: int = 0) -> nn.Module:
    """A tiny ``*ForSequenceClassification`` (head ``score`` for decoders, ``classifier`` for BERT), eval mode."""
    import transformers as tf
    torch.manual_seed(seed)
    config = tiny_config(family, layers)
    config.num_labels = num_labels
    config.pad_token_id = 0  # tokens() never draws it, so each row's last token is the one classified
    return tf.AutoModelForSequenceClassification.from_config(config).eval()


def random_nf4(n, k, *, scales="layer", dtype=torch.float32, nested=False, blocksize=64, seed=0, device="cpu"):
    """An NF4Weight of random codes (no bitsandbytes needed). ``scales="layer"``: scales sized like a real layer's
    (|W| ~ 1/√K), for tolerance checks; ``"random"``: arbitrary scales and double-quant code book, for bit-exact
    checks of the dequantization."""
    from pyflex.lora.nf4 import NF4_CODE, NF4Weight

    if scales not in ("layer", "random"):
        raise ValueError(f"scales={scales!r}; allowed: 'layer', 'random'")
    g = torch.Generator().manual_seed(seed)
    numel = n * k
    nb = math.ceil(numel / blocksize)
    packed = torch.randint(0, 256, ((numel + 1) // 2,), generator=g, dtype=torch.uint8)
    kw = dict(packed=packed, code=NF4_CODE.clone(), shape=(n, k), dtype=dtype, blocksize=blocksize)
    if nested:
        kw["absmax"] = torch.randint(0, 256, (nb,), generator=g, dtype=torch.uint8)
        if scales == "layer":
            kw.update(absmax_code=torch.linspace(-1, 1, 256),
                      absmax_scale=torch.full((math.ceil(nb / 256),), 0.5 / k ** 0.5),
                      absmax_offset=torch.tensor(2.0 / k ** 0.5))
        else:
            kw.update(absmax_code=torch.randn(256, generator=g).sort().values,
                      absmax_scale=torch.rand(math.ceil(nb / 256), generator=g) * 3,
                      absmax_offset=torch.tensor(2.5678))  # 0-dim
    elif scales == "layer":
        kw["absmax"] = (torch.rand(nb, generator=g) + 1) * 2 / k ** 0.5
    else:
        kw["absmax"] = torch.rand(nb, generator=g) * 4
    return NF4Weight(**kw).to(device)


def init_gloo_worker(rank: int, world: int, port: int) -> None:
    """Set up one spawned CPU rank for a gloo test: quiet warnings, one thread, the process group on localhost."""
    import os

    import torch.distributed as dist

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
