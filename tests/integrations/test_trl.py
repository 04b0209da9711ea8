"""pyflex.SFTTrainer and pyflex.DPOTrainer (pyflex/integrations/trl.py): TRL's trainers on a tiny patched Llama, on
CPU. SFT trains with τ on (PyflexCallback's Adam trains τ); DPO's reference is the policy with its adapters disabled
and its log-probabilities are the base model's."""
import copy
import os

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import pyflex  # noqa: E402
from pyflex.integrations.trainer import TAU_OPTIMIZER_FILE, PyflexCallback  # noqa: E402
from pyflex.integrations.trl import AdaptersDisabled  # noqa: E402

from _schedule_utils import VOCAB, one_thread, tiny_llama  # noqa: E402,F401

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 3)]


@pytest.fixture(autouse=True)
def quiet_and_reference_op():
    """datasets' map bars off (the tests' output stays clean); the reference op, independent of the C++ build."""
    datasets.disable_progress_bars()
    with pyflex.use_backend("reference"):
        yield
    datasets.enable_progress_bars()


def tokenizer():
    """A word-level tokenizer over the tiny model's vocabulary ('w7' is one token), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _word(i):
    return f"w{i % (VOCAB - 3)}"


def sft_dataset(n=16, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start, step = int(torch.randint(0, VOCAB, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        rows.append(" ".join(_word(start + k * step) for k in range(length)))
    return datasets.Dataset.from_dict({"text": rows})


def dpo_dataset(n=8, seed=0):
    """The chosen completion continues the prompt's progression, the rejected one jumps around."""
    g = torch.Generator().manual_seed(seed)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for k in range(n):
        s = int(torch.randint(0, VOCAB, (1,), generator=g))
        rows["prompt"].append(" ".join(_word(s + j) for j in range(4)))
        rows["chosen"].append(" " + " ".join(_word(s + 4 + j) for j in range(3)))  # leading space: a token boundary
        rows["rejected"].append(" " + " ".join(_word(s + 17 * j + 5) for j in range(2 + k % 3)))
    return datasets.Dataset.from_dict(rows)


def _nonzero_lora(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _base_weights(model):
    adapters = set(pyflex.get_registry(model).named_adapter_parameters())
    return {n: p.detach().clone() for n, p in model.named_parameters() if n not in adapters}


def _config(cls, out, **kwargs):
    defaults = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                    logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True,
                    dataloader_num_workers=0)
    return cls(**{**defaults, **kwargs})


def test_sft_trains_a_patched_llama_with_tau_from_a_model_path(tmp_path):
    from trl import SFTConfig
    tiny_llama(num_layers=2).save_pretrained(tmp_path / "base")  # a model id TRL loads itself
    args = _config(SFTConfig, tmp_path / "run", save_strategy="steps", save_steps=2)
    trainer = pyflex.SFTTrainer(model=str(tmp_path / "base"), args=args, train_dataset=sft_dataset(),
                                processing_class=tokenizer(), peft_config=dict(r=4, alpha=8, tau=True, lam=1e-3))
    model = trainer.model
    assert pyflex.model.patch.is_patched(model) and len(pyflex.tau_parameters(model)) == 2 * 7
    (callback,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, PyflexCallback)]
    base = _base_weights(model)
    trainer.train()

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses))) and len(set(losses)) > 1
    assert callback.tau_optimizer is not None  # τ trained by PEFT_S's Adam, not by the Trainer's AdamW
    assert all(float(t.detach()) != 0.0 for t in pyflex.tau_parameters(model))  # τ moved (its rule: test_trainer)
    (group,) = callback.tau_optimizer.param_groups
    assert {id(p) for p in group["params"]} == {id(t) for t in pyflex.tau_parameters(model)}
    assert all(float(p.detach().abs().max()) > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)  # the base never moves
    logged = trainer.state.log_history[0]
    assert "pyflex/tau/layer_0" in logged and "pyflex/tau_sparsity/layer_1" in logged
    files = set(os.listdir(tmp_path / "run" / "checkpoint-2"))
    assert {"pyflex_adapter.safetensors", "pyflex_config.json", TAU_OPTIMIZER_FILE} <= files
    assert not files & {"model.safetensors", "config.json", "adapter_model.safetensors"}  # τ: no PEFT copy


def test_sft_takes_a_peft_lora_config_as_trl_does(tmp_path):
    from peft import LoraConfig
    from trl import SFTConfig
    trainer = pyflex.SFTTrainer(model=tiny_llama(num_layers=2), args=_config(SFTConfig, tmp_path, max_steps=2),
                                train_dataset=sft_dataset(), processing_class=tokenizer(),
                                peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                                pyflex_config=pyflex.PyflexConfig(tau=True))
    flex = {n: m for n, m in trainer.model.named_modules() if isinstance(m, pyflex.FlexLinear)}
    assert len(flex) == 2 * 2 and all(n.endswith(("q_proj", "v_proj")) for n in flex)
    assert all(m.r == 4 and m.alpha == 8 and m.tau is not None for m in flex.values())
    trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


def _dpo(tmp_path, model, **kwargs):
    from trl import DPOConfig
    return pyflex.DPOTrainer(model=model, args=_config(DPOConfig, tmp_path, max_steps=3, **kwargs),
                             train_dataset=dpo_dataset(), processing_class=tokenizer())


def _plain_logps(model, batch):
    """Σ log p(token | prefix) over each sequence's completion tokens, by log_softmax in plain PyTorch."""
    ids = batch["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    per_token = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    return (per_token * batch["completion_mask"][:, 1:]).sum(1)


def test_dpo_reference_is_the_base_model(tmp_path):
    from trl.trainer.utils import add_fused_lm_head
    base = tiny_llama(num_layers=2)
    model = pyflex.patch_model(copy.deepcopy(base), r=4, alpha=8)
    _nonzero_lora(model)  # the policy differs from the base from the start
    trainer = _dpo(tmp_path, model)
    assert isinstance(trainer.ref_model, AdaptersDisabled) and trainer.ref_model.policy is model
    assert not list(trainer.ref_model.parameters())  # no second copy of any weight
    batch = next(iter(trainer.get_train_dataloader()))
    ref = torch.cat(trainer.compute_ref_log_probs(trainer.ref_model, batch))

    add_fused_lm_head(base)  # TRL's own reference computation on the unpatched base model
    assert torch.equal(ref, torch.cat(trainer.compute_ref_log_probs(base, batch)))
    torch.testing.assert_close(ref, _plain_logps(base, batch), rtol=0, atol=1e-3)
    assert (ref - _plain_logps(model, batch)).abs().max() > 0.05  # the policy's own log-probs differ
    assert all(m.adapter_enabled for m in model.modules() if isinstance(m, pyflex.FlexLinear))  # switched back


def test_dpo_trains_a_patched_llama_against_its_disabled_adapters(tmp_path):
    from trl import DPOConfig
    model = tiny_llama(num_layers=2)
    trainer = pyflex.DPOTrainer(model=model, args=_config(DPOConfig, tmp_path, max_steps=4),
                                train_dataset=dpo_dataset(), processing_class=tokenizer(),
                                peft_config=dict(r=4, alpha=8))
    assert pyflex.model.patch.is_patched(model) and isinstance(trainer.ref_model, AdaptersDisabled)
    base = _base_weights(model)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses))) and len(set(losses)) > 1
    # with lora_B = 0 the policy starts as the reference: the first loss is DPO's log 2 exactly there
    assert losses[0] == pytest.approx(0.6931472, abs=1e-5)
    assert all(float(p.detach().abs().max()) > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)


def test_dpo_refuses_what_has_no_disabled_adapter_reference(tmp_path):
    from trl import DPOConfig
    model = pyflex.patch_model(tiny_llama(num_layers=2), r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match="modules_to_save"):
        _dpo(tmp_path, model)
    with pytest.raises(ValueError, match="sync_ref_model"):
        pyflex.DPOTrainer(model=pyflex.patch_model(tiny_llama(num_layers=2), r=4),
                          args=_config(DPOConfig, tmp_path, sync_ref_model=True), train_dataset=dpo_dataset(),
                          processing_class=tokenizer())
    with pytest.raises(ValueError, match="already"):
        pyflex.DPOTrainer(model=pyflex.patch_model(tiny_llama(num_layers=2), r=4),
                          args=_config(DPOConfig, tmp_path), train_dataset=dpo_dataset(),
                          processing_class=tokenizer(), peft_config=dict(r=4))


def test_dpo_precomputed_reference_is_the_base_model(tmp_path):
    """precompute_ref_log_probs=True: TRL computes the reference over the dataset up front (through the view) and
    keys its cache by a hash of the reference's state dict, which is the base weights."""
    base = tiny_llama(num_layers=2)
    model = pyflex.patch_model(copy.deepcopy(base), r=4, alpha=8)
    _nonzero_lora(model)
    assert set(AdaptersDisabled(model).state_dict()) == set(base.state_dict())
    trainer = _dpo(tmp_path, model, precompute_ref_log_probs=True, per_device_train_batch_size=8)
    data = trainer.train_dataset
    batch = trainer.data_collator([data[i] for i in range(len(data))])
    got = torch.cat([torch.tensor(data["ref_chosen_logps"]), torch.tensor(data["ref_rejected_logps"])])
    from trl.trainer.utils import add_fused_lm_head
    add_fused_lm_head(base)
    assert torch.equal(got, torch.cat(trainer.compute_ref_log_probs(base, batch)))  # one batch of 8, as precomputed
    torch.testing.assert_close(got, _plain_logps(base, batch), rtol=2e-4, atol=0)  # TRL's chunked log-softmax
    assert (got - _plain_logps(model, batch)).abs().max() > 0.05
