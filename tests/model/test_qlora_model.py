"""QLoRA on a whole model: a tiny Llama saved and reloaded in 4-bit (bitsandbytes NF4) on CPU, patched by pyflex,
against PEFT's QLoRA on the same 4-bit model (logits and LoRA gradients), PEFT adapter files both ways, what is
refused, the gated-MLP recompute, τ, torch.compile, memory, and the example (pyflex/demo/qlora.py).

The models are put in train mode before any forward (an eval-mode bitsandbytes forward on CPU may repack the weights
in place); K is a multiple of 64 (bitsandbytes' CPU dequantization is wrong otherwise).
"""
from __future__ import annotations

import pytest
import torch

import pyflex

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from pyflex.layers.quantized import QuantizedFlexLinear, UnsupportedQuantizedWeight  # noqa: E402
from pyflex.memory import step_peak_bytes  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    conf = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    transformers.LlamaForCausalLM(conf).save_pretrained(path)
    return str(path)


def load_4bit(path, *, dtype=torch.float32, compute=torch.float32, nested=True, storage=torch.uint8,
              quant_type="nf4"):
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                          bnb_4bit_compute_dtype=compute, bnb_4bit_use_double_quant=nested,
                                          bnb_4bit_quant_storage=storage)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, device_map="cpu",
                                                              dtype=dtype)
    return model.train()


def peft_qlora(path, targets="all-linear", **load_kw):
    """PEFT LoRA (r=4, α=8) on the 4-bit model, lora_B randomised (seeded) so that the adapters matter."""
    model = peft.get_peft_model(load_4bit(path, **load_kw), peft.LoraConfig(r=4, lora_alpha=8,
                                                                            target_modules=targets))
    model.train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _ids(seed=0, batch=2, seq=12):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _step(model, ids):
    for p in model.parameters():
        p.grad = None
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach()


def _lora_grads(model):
    """{module path: (dA, dB)} for PEFT and pyflex models alike."""
    grads = {}
    for n, p in model.named_parameters():
        if p.requires_grad and "lora_" in n:
            key = n.replace("base_model.model.", "").replace(".default.weight", "")
            grads[key] = p.grad
    return grads


def _rms(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype,compute,nested,storage,exact", [
    (torch.float32, torch.float32, True, torch.uint8, True),
    (torch.float32, torch.float32, False, torch.bfloat16, True),
    (torch.bfloat16, torch.float32, True, torch.uint8, False),
    (torch.bfloat16, torch.bfloat16, False, torch.uint8, False),
], ids=["fp32-dq", "fp32-bf16storage", "bf16-fp32compute", "bf16"])
def test_pyflex_qlora_equals_peft_qlora(llama_dir, tmp_path, dtype, compute, nested, storage, exact):
    """The same LoRA adapters (PEFT's, loaded with pyflex.load_peft_adapter) on the same 4-bit model: in fp32 identical
    logits (the dequantized W0 is bit-identical and the forward math is the same) and LoRA gradients within float
    rounding (backward sums the same terms in another order); in bf16 within the rounding of the two orders of
    operations (pyflex adds the delta to y0 before one rounding, PEFT rounds y0 first)."""
    kw = dict(dtype=dtype, compute=compute, nested=nested, storage=storage)
    ref = peft_qlora(llama_dir, **kw)
    ref.save_pretrained(tmp_path)
    ids = _ids()
    logits_ref = _step(ref, ids)
    grads_ref = _lora_grads(ref)

    model = pyflex.load_peft_adapter(load_4bit(llama_dir, **kw), str(tmp_path))
    patched = [m for m in model.modules() if isinstance(m, QuantizedFlexLinear)]
    assert len(patched) == 14 and not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    logits = _step(model, ids)
    grads = _lora_grads(model)
    assert set(grads) == set(grads_ref) and len(grads) == 28
    if exact:
        assert torch.equal(logits, logits_ref)
        for key in grads:   # backward sums the same terms in another order (dx = gy W0 + v A in one pass)
            assert _rms(grads[key], grads_ref[key]) < 1e-6, key
    else:
        assert _rms(logits, logits_ref) < 2e-2
        for key in grads:
            assert _rms(grads[key], grads_ref[key]) < 5e-2, key


def test_export_loads_back_into_peft_on_a_4bit_model(llama_dir, tmp_path):
    model = pyflex.patch_model(load_4bit(llama_dir), r=4, alpha=8, target_modules="all-linear")
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, QuantizedFlexLinear):
                layer.lora_B.normal_(0, 0.05)
    ids = _ids(1)
    logits = _step(model, ids)
    pyflex.save_peft_adapter(model, str(tmp_path / "peft"))
    ref = peft.PeftModel.from_pretrained(load_4bit(llama_dir), str(tmp_path / "peft"), is_trainable=True)
    ref.train()
    assert torch.equal(_step(ref, ids), logits)
    pyflex.save_adapter(model, str(tmp_path / "pyflex"))                     # pyflex's own files, same story
    again = pyflex.load_adapter(load_4bit(llama_dir), str(tmp_path / "pyflex"))
    assert isinstance(again.model.layers[1].mlp.down_proj, QuantizedFlexLinear)
    assert torch.equal(_step(again, ids), logits)


def test_untargeted_linear4bit_layers_keep_working(llama_dir):
    """Only q_proj and v_proj patched: the other Linear4bit stay bitsandbytes' and the model equals PEFT with the same
    targets."""
    ref = peft_qlora(llama_dir, targets=["q_proj", "v_proj"])
    ids = _ids(2)
    logits_ref = _step(ref, ids)
    grads_ref = _lora_grads(ref)
    model = pyflex.patch_model(load_4bit(llama_dir), r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(dict(ref.named_parameters())[
                    "base_model.model." + name.replace("lora_A", "lora_A.default.weight").replace(
                        "lora_B", "lora_B.default.weight")])
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith(("k_proj", "up_proj", "down_proj"))}
    assert kinds == {"Linear4bit"}
    logits = _step(model, ids)
    assert torch.equal(logits, logits_ref)
    grads = _lora_grads(model)
    assert set(grads) == set(grads_ref) and len(grads) == 8
    assert all(_rms(grads[k], grads_ref[k]) < 1e-6 for k in grads_ref)


def test_merge_is_refused_and_leaves_the_model_patched(llama_dir):
    model = pyflex.patch_model(load_4bit(llama_dir), r=4, alpha=8, target_modules="all-linear")
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.self_attn\.q_proj: cannot merge .* 4-bit"):
        pyflex.merge(model)
    assert pyflex.get_registry(model) is not None
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantizedFlexLinear)
    _step(model, _ids())


def test_fp4_model_is_refused_by_module_name_and_left_unchanged(llama_dir):
    model = load_4bit(llama_dir, quant_type="fp4")
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(UnsupportedQuantizedWeight, match=r"model\.layers\.0\.self_attn\.q_proj.*fp4"):
        pyflex.patch_model(model, r=4, target_modules="all-linear")
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert not pyflex.model.patch.is_patched(model)


def test_unpatch_gives_the_linear4bit_layers_back(llama_dir):
    model = load_4bit(llama_dir)
    q = model.model.layers[0].self_attn.q_proj
    ids = _ids(3)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    pyflex.patch_model(model, r=4, target_modules="all-linear")
    pyflex.unpatch(model)
    assert model.model.layers[0].self_attn.q_proj is q and isinstance(q.weight, bnb.nn.Params4bit)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)


def test_recompute_tau_and_dropout_on_a_4bit_base(llama_dir):
    """The gated-MLP recompute gives the same numbers on a 4-bit base as without it (τ mask and dropout on), and τ
    trains."""
    results = []
    for recompute in (True, False):
        torch.manual_seed(0)                                     # the same lora_A init
        model = pyflex.patch_model(load_4bit(llama_dir), r=4, alpha=8, target_modules="all-linear", tau=True,
                                   dropout=0.1, recompute_mlp=recompute)
        with torch.no_grad():
            for layer in model.modules():
                if isinstance(layer, QuantizedFlexLinear):
                    layer.lora_B.copy_(torch.randn(layer.lora_B.shape,
                                                   generator=torch.Generator().manual_seed(layer.out_features)) * 0.05)
        torch.manual_seed(5)
        logits = _step(model, _ids(4))
        taus = [p.grad for n, p in model.named_parameters() if n.endswith(".tau")]
        results.append((logits, _lora_grads(model), taus))
    (l1, g1, t1), (l2, g2, t2) = results
    assert torch.equal(l1, l2)
    assert all(torch.equal(g1[k], g2[k]) for k in g1)
    assert len(t1) == 14 and all(a is not None and torch.equal(a, b) for a, b in zip(t1, t2))


def test_torch_compile_fullgraph_on_a_patched_4bit_model(llama_dir):
    model = pyflex.patch_model(load_4bit(llama_dir), r=4, alpha=8, target_modules="all-linear")
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, QuantizedFlexLinear):
                layer.lora_B.normal_(0, 0.05)
    ids = _ids(5)
    logits = _step(model, ids)
    grads = {k: v.clone() for k, v in _lora_grads(model).items()}
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    logits_c = _step(compiled, ids)
    assert _rms(logits_c, logits) < 1e-6
    for k, g in _lora_grads(model).items():
        assert _rms(g, grads[k]) < 1e-5, k


def test_training_step_memory_against_bf16_base_and_peft(llama_dir):
    """Peak tensor bytes of one AdamW step (pyflex.memory, exact on CPU): pyflex QLoRA holds the 4-bit weights and
    at most one dequantized weight, so it stays below pyflex on the bf16 base and not above PEFT's QLoRA."""
    ids = _ids(6, batch=2, seq=16)

    def peak(model):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()   # optimizer state exists from here on
        return step_peak_bytes(model, opt, step)

    qlora = peak(pyflex.patch_model(load_4bit(llama_dir, dtype=torch.bfloat16, compute=torch.bfloat16), r=4, alpha=8,
                                    target_modules="all-linear"))
    dense = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).train()
    bf16 = peak(pyflex.patch_model(dense, r=4, alpha=8, target_modules="all-linear"))
    ref = peak(peft_qlora(llama_dir, dtype=torch.bfloat16, compute=torch.bfloat16))
    assert qlora < bf16, (qlora, bf16)
    assert qlora <= ref, (qlora, ref)


def test_qlora_example_trains():
    from pyflex.demo import qlora
    lines = []
    result = qlora.run(steps=12, layers=1, batch=4, seq=16, lr=1e-2, log=lines.append)
    assert result["quantized_layers"] == 7
    assert result["losses"][-1] < result["losses"][0]
    assert any("4-bit layers" in line for line in lines)
