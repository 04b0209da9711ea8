"""HLPT / H²LPT plan: placement counts from the paper, structure, gates (eq. 9 by hand, the FFN input on every
family, padding), training."""
import pytest
import torch

import pyflex
from pyflex.layers.linear import FlexLinear
from pyflex.methods.hlpt import HLPT_LR, apply_hlpt, hlpt_layer_counts
from pyflex.methods.prefix import GatedPrefix, PooledGate

from _schedule_utils import VOCAB, make_batches, one_thread, snapshot, tiny_llama  # noqa: F401
from tiny_models import FAMILIES, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("layers, variant, expected", [
    (32, "hlpt", (24, 8)),    # LLaMA-7B: LoRA 24 : prefix 8 (paper §3.1, the best 3:1 split)
    (32, "h2lpt", (12, 4)),   # bottom 3/8, top 1/8
    (28, "hlpt", (21, 7)),    # GPT-J: 3/4 and 1/4
    (28, "h2lpt", (12, 4)),   # GPT-J: the paper's 3/7 and 1/7
    (40, "hlpt", (30, 10)),   # LLaMA-13B
    (40, "h2lpt", (15, 5)),
])
def test_paper_placement_counts(layers, variant, expected):
    assert hlpt_layer_counts(layers, variant) == expected


def test_counts_rounding_and_overrides():
    assert hlpt_layer_counts(6, "hlpt") == (4, 2)          # 1.5 prefix layers round half up; LoRA takes the rest
    assert hlpt_layer_counts(12, "h2lpt") == (5, 2)        # 4.5 → 5, 1.5 → 2
    assert hlpt_layer_counts(32, "hlpt", lora_ratio=0.5, prefix_ratio=0.5) == (16, 16)
    with pytest.raises(ValueError, match="more than"):
        hlpt_layer_counts(8, "hlpt", lora_ratio=0.9, prefix_ratio=0.5)
    with pytest.raises(ValueError, match="variant"):
        hlpt_layer_counts(8, "lora")
    assert HLPT_LR == 3e-3


def test_h2lpt_structure_on_a_model():
    model = tiny_llama(num_layers=8)
    apply_hlpt(model, variant="h2lpt", prefix_len=5)  # 8 layers: 3 LoRA (0-2), 1 prefix (7), 4 middle layers free
    plan = model.pyflex_plan
    assert plan.lora_layers == [0, 1, 2] and plan.prefix_layers == [7]
    reg = pyflex.get_registry(model)
    for i in range(8):
        down = model.model.layers[i].mlp.down_proj
        prefix = getattr(model.model.layers[i].self_attn, "pyflex_prefix", None)
        assert isinstance(down, FlexLinear) == (i in plan.lora_layers)
        if i in plan.lora_layers:
            assert isinstance(down.gate, PooledGate) and (down.r, down.scaling) == (8, 2.0)
            # paper eq. 9: the gate reads the FFN input h_FN (hidden_size wide), observed on the layer's mlp
            assert down.gate.linear.in_features == 32 and down.gate.observes == f"model.layers.{i}.mlp"
        assert isinstance(prefix, GatedPrefix) == (i in plan.prefix_layers)
        assert (len(reg[i].parameters()) > 0) == (i in plan.lora_layers + plan.prefix_layers)
    # only the other projections stay plain Linear; prefix P_k/P_v are (num_kv_heads, l, head_dim)
    assert not isinstance(model.model.layers[0].mlp.up_proj, FlexLinear)
    assert model.model.layers[7].self_attn.pyflex_prefix.prefix_key.shape == (2, 5, 8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter = set(reg.named_adapter_parameters())
    assert trainable == adapter
    assert any("pyflex_prefix.prefix_value" in n for n in trainable)
    assert any("down_proj.gate.linear.weight" in n for n in trainable)
    assert model.config._attn_implementation == "pyflex_prefix"  # tiny_llama runs sdpa
    assert (plan.gate_input, plan.gate_pooling) == ("ffn_input", "causal")


def _capture_io(module):
    """Forward hook storing the module's first input and its output."""
    store = {}

    def hook(mod, args, output):
        store["in"], store["out"] = args[0], output
    return store, module.register_forward_hook(hook)


def _causal_mean(per_token, real):
    w = real.to(per_token.dtype)
    return (per_token * w).cumsum(1) / w.cumsum(1).clamp_min(1)


def _sequence_mean(per_token, real):
    w = real.to(per_token.dtype)
    return ((per_token * w).sum(1) / w.sum(1))[:, None].expand_as(per_token)


@pytest.mark.parametrize("gate_input", ["ffn_input", "down_proj_input"])
@pytest.mark.parametrize("pooling", ["causal", "sequence"])
def test_lora_gate_eq9_by_hand(gate_input, pooling):
    """y = x W2ᵀ + g·s·(x Aᵀ Bᵀ) on the down projection, g_t = mean over real tokens (up to t for causal pooling) of
    sigmoid(w·h + b) with h = h_FN (the mlp input: the post-attention-norm output; paper) or h = x (down_proj's
    input; official code)."""
    model = tiny_llama(num_layers=4).double().eval()
    apply_hlpt(model, counts=(2, 1), prefix_len=2, gate_input=gate_input, gate_pooling=pooling)
    layer = model.model.layers[1]
    down = layer.mlp.down_proj
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pyflex.get_registry(model).adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    norm_io, h1 = _capture_io(layer.post_attention_layernorm)
    mlp_io, h2 = _capture_io(layer.mlp)
    down_io, h3 = _capture_io(down)
    ids = torch.randint(0, VOCAB, (2, 7), generator=g)
    am = torch.ones(2, 7, dtype=torch.long)
    am[1, :3] = 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(1) - 1).clamp_min(0))
    for h in (h1, h2, h3):
        h.remove()
    h_fn, x = norm_io["out"], down_io["in"]
    assert torch.equal(mlp_io["in"], h_fn)  # h_FN is the mlp's input, the post-attention norm's output
    src = h_fn if gate_input == "ffn_input" else x
    assert down.gate.linear.in_features == src.shape[-1] == (32 if gate_input == "ffn_input" else 64)
    w, b = down.gate.linear.weight, down.gate.linear.bias
    with torch.no_grad():
        per_token = torch.sigmoid(src @ w[0] + b[0])
        coef = (_causal_mean if pooling == "causal" else _sequence_mean)(per_token, am.bool())
        ref = x @ down.weight.T + coef[..., None] * down.scaling * (x @ down.lora_A.T @ down.lora_B.T)
    torch.testing.assert_close(down_io["out"], ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mlp_io["out"], ref, rtol=1e-12, atol=1e-12)


def _ffn_input_module(model, family, i):
    if family == "bert":
        return model.bert.encoder.layer[i].intermediate
    if family == "gpt2":
        return model.transformer.h[i].mlp
    if family == "gpt_neox":
        return model.gpt_neox.layers[i].mlp
    return model.model.layers[i].mlp


def _down_proj(model, family, i):
    if family == "bert":
        return model.bert.encoder.layer[i].output.dense
    return {"gpt2": lambda: model.transformer.h[i].mlp.c_proj,
            "gpt_neox": lambda: model.gpt_neox.layers[i].mlp.dense_4h_to_h}.get(
        family, lambda: model.model.layers[i].mlp.down_proj)()


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_gate_reads_the_ffn_input_on_every_family(family):
    """The LoRA gate's coefficient is the pooled sigmoid(Linear(h_FN)) of the input of the FFN module (BERT's
    ``intermediate``, Phi-3's fused MLP, GPT-2/NeoX ``mlp``), padding excluded; causal for decoders, over the whole
    sample for the bidirectional encoder (its mask reaches the layers as a 4-D bias)."""
    model = tiny_model(family, layers=3).double()
    if family not in ("gemma2", "bert"):
        model.set_attn_implementation("sdpa")
    apply_hlpt(model, counts=(2, 1), prefix_len=2)
    hidden = model.config.hidden_size
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pyflex.get_registry(model).adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    ids = torch.randint(3, 60, (2, 7), generator=gen)
    am = torch.ones(2, 7, dtype=torch.long)
    if family in ("bert", "gemma2"):
        am[1, 4:] = 0  # right padding (eager float64 makes fully masked query rows NaN in transformers)
    else:
        am[1, :3] = 0
    stores, handles = [], []
    for i in (0, 1):
        gate = _down_proj(model, family, i).gate
        assert gate.linear.in_features == hidden
        ffn_in = {}
        handles.append(_ffn_input_module(model, family, i).register_forward_pre_hook(
            lambda mod, args, store=ffn_in: store.update(h=args[0])))
        gate_out, h = _capture_io(gate)
        handles.append(h)
        stores.append((gate, ffn_in, gate_out))
    kw = {} if family == "bert" else {"position_ids": (am.cumsum(1) - 1).clamp_min(0)}
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am, **kw)
    for h in handles:
        h.remove()
    pool = _sequence_mean if family == "bert" else _causal_mean
    assert model.pyflex_plan.gate_pooling == ("sequence" if family == "bert" else "causal")
    for gate, ffn_in, gate_out in stores:
        with torch.no_grad():
            per_token = torch.sigmoid(gate.linear(ffn_in["h"])).squeeze(-1)
        torch.testing.assert_close(gate_out["out"], pool(per_token, am.bool()), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "bert"])
def test_official_gate_input_is_the_down_projection_input(family):
    model = tiny_model(family, layers=3)
    apply_hlpt(model, counts=(2, 1), prefix_len=2, gate_input="down_proj_input")
    down = _down_proj(model, family, 0)
    assert down.gate.observes is None and down.gate.linear.in_features == down.in_features != model.config.hidden_size
    assert model.pyflex_plan.gate_input == "down_proj_input"


def _padded(ids, pad, side):
    """(1 + 1) batch: ``ids`` padded by ``pad`` tokens on ``side`` and a full-length companion sample."""
    n = ids.shape[0] + pad
    g = torch.Generator().manual_seed(pad)
    batch = torch.randint(3, 60, (2, n), generator=g)
    am = torch.ones(2, n, dtype=torch.long)
    sl = slice(pad, n) if side == "left" else slice(0, ids.shape[0])
    batch[0, sl] = ids
    am[0] = 0
    am[0, sl] = 1
    return batch, am, sl


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_padding_changes_neither_outputs_nor_gradients(family):
    """The same sequence padded to two lengths (left for the causal LM, right for BERT): same logits on its real
    tokens and same gradients of every gate, prefix and LoRA parameter."""
    results = []
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 60, (6,), generator=gen)
    weights = torch.randn(6, 64, generator=gen, dtype=torch.float64)
    for pad in (2, 5):
        model = tiny_model(family, layers=4 if family == "llama" else 3).double().train()
        if family == "llama":
            model.set_attn_implementation("sdpa")
        apply_hlpt(model, counts=(2, 1) if family == "bert" else (3, 1), prefix_len=3)
        reg = pyflex.get_registry(model)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in reg.adapter_parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        side = "left" if family == "llama" else "right"
        batch, am, sl = _padded(ids, pad, side)
        kw = {"position_ids": (am.cumsum(1) - 1).clamp_min(0)} if family == "llama" else {}
        logits = model(input_ids=batch, attention_mask=am, **kw).logits[0, sl]
        (logits * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in reg.named_adapter_parameters().items()}
        results.append((logits.detach(), grads))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
    assert g1.keys() == g2.keys() and any("gate" in n for n in g1) and any("prefix_key" in n for n in g1)
    for n in g1:
        assert g1[n].abs().sum() > 0, n
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_bert_4d_masks_pool_like_2d_masks(impl):
    """A 4-D mask given by the user reaches the gates as the same real-token mask as the 2-D one."""
    model = tiny_model("bert", layers=3).double()
    model.set_attn_implementation(impl)
    apply_hlpt(model, counts=(2, 1), prefix_len=3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pyflex.get_registry(model).adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    ids = torch.randint(3, 60, (2, 7), generator=gen)
    am = torch.ones(2, 7, dtype=torch.long)
    am[1, 4:] = 0
    masks = [torch.zeros(2, 1, 7, 7, dtype=torch.float64).masked_fill(~am.bool()[:, None, None, :],
                                                                      torch.finfo(torch.float64).min)]
    if impl == "sdpa":  # transformers' eager attention adds a bool mask instead of applying it
        masks.append(am.bool()[:, None, None, :].expand(2, 1, 7, 7))
    with torch.no_grad():
        ref = model(ids, attention_mask=am).logits
        for mask in masks:
            torch.testing.assert_close(model(ids, attention_mask=mask).logits, ref, rtol=1e-12, atol=1e-12)


def test_errors():
    model = tiny_llama(num_layers=4)
    pyflex.patch_model(model)
    with pytest.raises(ValueError, match="unpatched"):
        apply_hlpt(model)
    from transformers import BertConfig, BertModel
    with pytest.raises(ValueError, match="variant"):
        apply_hlpt(tiny_llama(num_layers=4), variant="h3lpt")
    with pytest.raises(ValueError, match="gate_input='h_fn'.*ffn_input, down_proj_input"):
        apply_hlpt(tiny_llama(num_layers=4), gate_input="h_fn")
    with pytest.raises(ValueError, match="gate_pooling='mean'.*auto, causal, sequence"):
        apply_hlpt(tiny_llama(num_layers=4), gate_pooling="mean")
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
    bert.config.model_type = "not-a-family"
    with pytest.raises(ValueError, match="supported"):
        apply_hlpt(bert)


@pytest.mark.parametrize("variant", ["hlpt", "h2lpt"])
def test_training_reduces_loss_and_touches_only_adapters(variant):
    model = tiny_llama(num_layers=8)
    apply_hlpt(model, variant=variant, prefix_len=4)
    reg = pyflex.get_registry(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=HLPT_LR * 3)
    batch = make_batches(1, pad=True)[0]
    before = snapshot(model.named_parameters())
    losses = []
    with pyflex.use_backend("reference"):
        for _ in range(6):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    assert losses[-1] < losses[0]
    adapters = set(reg.named_adapter_parameters())
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and changed <= adapters
    assert any("pyflex_prefix" in n for n in changed) and any("lora_B" in n for n in changed)


def test_save_and_load_adapter_round_trip(tmp_path):
    src = tiny_llama(num_layers=4)
    apply_hlpt(src, variant="hlpt", prefix_len=3)
    with torch.no_grad():
        for p in pyflex.get_registry(src).adapter_parameters():
            p.normal_(0, 0.1)
    pyflex.save_adapter(src, str(tmp_path))
    dst = tiny_llama(num_layers=4)  # same base weights (same seed)
    apply_hlpt(dst, variant="hlpt", prefix_len=3)  # the plan creates gates and prefixes, then the adapter loads
    pyflex.load_adapter(dst, str(tmp_path))
    ids = torch.randint(0, VOCAB, (2, 6))
    with pyflex.use_backend("reference"), torch.no_grad():
        torch.testing.assert_close(dst(input_ids=ids).logits, src(input_ids=ids).logits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gates_and_prefixes_are_fp32_master_weights_on_16_bit_bases(dtype):
    """As lora_A/lora_B: every trainable HLPT parameter is fp32 on a 16-bit base; outputs stay in the base dtype."""
    from tiny_models import tiny_model, tokens
    model = pyflex.apply_hlpt(tiny_model("llama", layers=4).to(dtype), counts=(2, 2), prefix_len=3)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any("pyflex_prefix" in n for n, _ in trainable) and any(".gate." in n for n, _ in trainable)
    assert all(p.dtype == torch.float32 for _, p in trainable), [(n, p.dtype) for n, p in trainable]
    logits = model(input_ids=tokens(batch=2, seq=5)).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()


# -- unpatch ----------------------------------------------------------------------------------------------------
def _hooks(model):
    return {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()}


@pytest.mark.parametrize("family, impl, gate_input", [
    *[(f, "eager", "ffn_input") for f in FAMILIES],
    ("llama", "sdpa", "ffn_input"), ("llama", "eager", "down_proj_input"), ("bert", "sdpa", "down_proj_input")])
def test_unpatch_after_hlpt_gives_back_the_base_model(family, impl, gate_input):
    """pyflex.unpatch after apply_hlpt (trained-looking gates and prefixes): the same logits as before patching, bit
    for bit, no prefix or gate left (parameters, submodules, hooks), the attention implementation it had; HLPT can
    then be applied again. Before the fix unpatch left the prefixes in place (logits off by ~0.1)."""
    model = tiny_model(family, layers=4).eval()
    model.set_attn_implementation(impl)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    names, hooks = [n for n, _ in model.named_parameters()], _hooks(model)
    apply_hlpt(model, counts=(2, 2), prefix_len=3, gate_input=gate_input)
    with torch.no_grad():
        for p in pyflex.get_registry(model).adapter_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype) * 0.3)
        assert not torch.equal(model(input_ids=ids).logits, want)
    pyflex.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)
    assert [n for n, _ in model.named_parameters()] == names and _hooks(model) == hooks
    assert not any(isinstance(m, (GatedPrefix, PooledGate, FlexLinear)) for m in model.modules())
    assert model.config._attn_implementation == impl and not hasattr(model, "pyflex_plan")
    apply_hlpt(model, counts=(2, 2), prefix_len=3, gate_input=gate_input)   # a clean model again
    assert model.pyflex_plan.prefix_layers == [2, 3]


def test_unpatch_of_a_deep_copied_hlpt_model_leaves_the_original_alone():
    import copy

    model = tiny_model("llama", layers=4).eval()
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    apply_hlpt(model, counts=(2, 2), prefix_len=3)
    with torch.no_grad():
        for p in pyflex.get_registry(model).adapter_parameters():
            p.add_(0.2)
        hlpt_logits = model(input_ids=ids).logits
    copied = pyflex.unpatch(copy.deepcopy(model))
    with torch.no_grad():
        assert torch.equal(copied(input_ids=ids).logits, want)
        assert torch.equal(model(input_ids=ids).logits, hlpt_logits)


@pytest.mark.parametrize("kwargs, match", [
    ({"prefix_len": 0}, "prefix_len=0 is not allowed"),
    ({"prefix_init_std": float("nan")}, "prefix_init_std=nan is not allowed"),
    ({"prefix_init_std": -1.0}, "prefix_init_std=-1.0 is not allowed"),
    ({"layers": [0]}, "apply_hlpt decides layers itself"),
    ({"target_modules": "all-linear"}, "apply_hlpt decides target_modules itself"),
    ({"gated": "yes"}, "gated='yes' is not allowed"),
], ids=lambda v: str(v))
def test_bad_hlpt_arguments_are_errors_before_the_model_changes(kwargs, match):
    model = tiny_model("llama", layers=4).eval()
    hooks, impl = _hooks(model), model.config._attn_implementation
    with pytest.raises(ValueError, match=match):
        apply_hlpt(model, **kwargs)
    assert not any(isinstance(m, FlexLinear) for m in model.modules()) and _hooks(model) == hooks
    assert model.config._attn_implementation == impl and not hasattr(model, "pyflex_plan")


def test_a_failure_after_patching_leaves_the_model_as_it_was(monkeypatch):
    """An error while the prefixes are attached (after patch_model ran and the gates were hooked) rolls everything
    back: no adapter, hook, prefix attention or registry is left, and the logits are the base model's."""
    import pyflex.methods.hlpt as hlpt

    model = tiny_model("llama", layers=4).eval()
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    hooks, impl = _hooks(model), model.config._attn_implementation

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")
    monkeypatch.setattr(hlpt, "attach_prefix", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        apply_hlpt(model, counts=(2, 2), prefix_len=3)
    assert not any(isinstance(m, (FlexLinear, PooledGate, GatedPrefix)) for m in model.modules())
    assert _hooks(model) == hooks and model.config._attn_implementation == impl
    assert not pyflex.model.patch.is_patched(model) and not hasattr(model, "pyflex_plan")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)
    monkeypatch.undo()
    apply_hlpt(model, counts=(2, 2), prefix_len=3)   # and it can be applied for real afterwards


def test_unpatch_knows_hlpt_as_soon_as_its_module_is_imported():
    """A model that carries an HLPTPlan but was not built in this process (torch.load of a pickled model) still
    unpatches once pyflex.methods.hlpt is imported: the remover is registered at import, not by apply_hlpt."""
    import subprocess
    import sys

    code = ("import pyflex.methods.hlpt, pyflex.model.patch as patch; "
            "assert 'HLPTPlan' in patch._PLAN_REMOVERS, patch._PLAN_REMOVERS")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_an_hlpt_model_survives_torch_save_and_load():
    """A whole HLPT model through torch.save / torch.load: same logits, and unpatch on the loaded copy gives the base
    model (the remover is known, the hooks are found by type)."""
    import io

    model = tiny_model("llama", layers=4).eval()
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    apply_hlpt(model, counts=(2, 2), prefix_len=3, tau=True)
    with torch.no_grad():
        for p in pyflex.get_registry(model).adapter_parameters():
            p.add_(0.2)
        hlpt_logits = model(input_ids=ids).logits
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, hlpt_logits)
        assert torch.equal(pyflex.unpatch(loaded)(input_ids=ids).logits, want)
