"""HLPT / H²LPT plan: placement counts from the paper, structure, gates, training."""
import pytest
import torch

import pyflex
from pyflex.layers import FlexLinear
from pyflex.plans import HLPT_LR, apply_hlpt, hlpt_layer_counts
from pyflex.prefix import GatedPrefix, PooledGate

from _schedule_utils import VOCAB, make_batches, one_thread, snapshot, tiny_llama  # noqa: F401

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
    assert model.config._attn_implementation == "pyflex_prefix"


def test_lora_gate_scales_the_delta():
    model = tiny_llama(num_layers=4).double()
    apply_hlpt(model, counts=(1, 1), prefix_len=2)
    down = model.model.layers[0].mlp.down_proj
    torch.nn.init.normal_(down.lora_B, std=0.5)
    x = torch.randn(2, 3, down.in_features, dtype=torch.float64)
    ctx = down.gate.context
    ctx.begin_forward(None, past_length=0)
    with pyflex.use_backend("reference"), torch.no_grad():
        y = down(x)
        g = torch.sigmoid(down.gate.linear(x)).squeeze(-1).mean(1)  # per-sample pooled gate
        ref = x @ down.weight.T + g[:, None, None] * down.scaling * (x @ down.lora_A.T @ down.lora_B.T)
    torch.testing.assert_close(y, ref)


def test_errors():
    model = tiny_llama(num_layers=4)
    pyflex.patch_model(model)
    with pytest.raises(ValueError, match="unpatched"):
        apply_hlpt(model)
    from transformers import BertConfig, BertModel
    with pytest.raises(ValueError, match="variant"):
        apply_hlpt(tiny_llama(num_layers=4), variant="h3lpt")
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
