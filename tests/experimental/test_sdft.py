"""SDFT: the self-distillation loss derived by hand, the teacher prompt, no second copy of the weights, learning."""

import doctest
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_posttrain.data import DataFormatError
from lit_posttrain.experimental import sdft
from lit_posttrain.experimental.sdft import (
    DataCollatorForSDFT,
    SDFTDataModule,
    SDFTModule,
    compose_teacher_prompt,
    sdft_loss,
    token_accuracy,
)
from lit_posttrain.models import LoRAConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DATA = EXAMPLES / "data" / "sdft"

# one position, 3-way: the student S = (0.5, 0.3, 0.2), the teacher T = (0.7, 0.1, 0.2); the student's top 2
# tokens are 0 and 1
S, T = [0.5, 0.3, 0.2], [0.7, 0.1, 0.2]
# top-2 renormalised: S' = (0.625, 0.375), T' = (0.875, 0.125); reverse KL(S' || T') =
# 0.625 ln(0.625/0.875) + 0.375 ln(0.375/0.125) = 0.625 ln(5/7) + 0.375 ln 3
TOP2_REVERSE = 0.625 * math.log(5 / 7) + 0.375 * math.log(3)  # 0.201684
# forward KL(T' || S') = 0.875 ln(0.875/0.625) + 0.125 ln(0.125/0.375) = 0.875 ln 1.4 - 0.125 ln 3
TOP2_FORWARD = 0.875 * math.log(1.4) - 0.125 * math.log(3)  # 0.157087
# full vocabulary reverse KL(S || T) = 0.5 ln(5/7) + 0.3 ln 3 + 0.2 ln 1; with a tail bucket the top-2 support
# plus the tail (0.2 on both sides) is the full distribution here, so the same number
FULL_REVERSE = 0.5 * math.log(5 / 7) + 0.3 * math.log(3)  # 0.161348


def _logits(*rows):
    return torch.tensor([rows], dtype=torch.float64).log()  # (1, T, 3) log-probabilities as logits


def test_topk_hand_values():
    """topk_logits with k=2: the renormalised top-2 divergences (alpha 1 reverse, 0 forward); with a tail bucket,
    the full-vocabulary value (the tail is the third token); full_logits gives it too."""
    student, teacher, mask = _logits(S), _logits(T), torch.ones(1, 1)
    value = lambda **kw: sdft_loss(student, teacher, mask, distillation_topk=2, **kw)[0].item()
    assert value(distillation_alpha=1.0) == pytest.approx(TOP2_REVERSE, abs=1e-9)
    assert value(distillation_alpha=0.0) == pytest.approx(TOP2_FORWARD, abs=1e-9)
    assert value(distillation_alpha=1.0, distillation_add_tail=True) == pytest.approx(FULL_REVERSE, abs=1e-9)
    assert value(distillation_alpha=1.0, distillation_mode="full_logits") == pytest.approx(
        FULL_REVERSE, abs=1e-9
    )
    assert [round(v, 6) for v in (TOP2_REVERSE, TOP2_FORWARD, FULL_REVERSE)] == [0.201684, 0.157087, 0.161348]
    # JSD (alpha 0.5) on the top 2: M = (0.75, 0.25); 0.5 KL(T'||M) + 0.5 KL(S'||M), each by hand
    jsd = 0.5 * (0.875 * math.log(0.875 / 0.75) + 0.125 * math.log(0.125 / 0.25)) + 0.5 * (
        0.625 * math.log(0.625 / 0.75) + 0.375 * math.log(0.375 / 0.25)
    )
    assert value(distillation_alpha=0.5) == pytest.approx(jsd, abs=1e-9)
    assert 0 < value(distillation_alpha=0.5) <= math.log(2)


def test_sampled_token_value_and_metrics():
    """sampled_token: (log S(y) - log T(y)) * log S(y) for the sampled y = 1: ln 3 * ln 0.3 (its gradient is the
    reverse KL's policy gradient); the metrics are the full-vocabulary reverse KL and the two entropies."""
    student, teacher, mask = _logits(S), _logits(T), torch.ones(1, 1)
    loss, metrics = sdft_loss(student, teacher, mask, distillation_mode="sampled_token", distillation_alpha=1.0,
                              completion_ids=torch.tensor([[1]]))  # fmt: skip
    assert loss.item() == pytest.approx(math.log(3) * math.log(0.3), abs=1e-9)  # -1.322694
    assert metrics["kl"].item() == pytest.approx(FULL_REVERSE, abs=1e-9)
    assert metrics["student_entropy"].item() == pytest.approx(-sum(p * math.log(p) for p in S), abs=1e-9)
    assert metrics["teacher_entropy"].item() == pytest.approx(-sum(p * math.log(p) for p in T), abs=1e-9)
    with pytest.raises(ValueError, match="distillation_alpha=1.0"):
        sdft_loss(
            student, teacher, mask, distillation_mode="sampled_token", completion_ids=torch.tensor([[1]])
        )


def test_masked_positions_and_gradient_direction():
    """A masked position changes nothing; a gradient step lowers the loss and moves the student toward the
    teacher's preferred token 0; identical distributions give 0."""
    student, teacher = _logits(S, [0.98, 0.01, 0.01]), _logits(T, [0.01, 0.01, 0.98])
    plain = sdft_loss(_logits(S), _logits(T), torch.ones(1, 1), distillation_topk=2)[0]
    masked = sdft_loss(student, teacher, torch.tensor([[1, 0]]), distillation_topk=2)[0]
    assert masked.item() == pytest.approx(plain.item(), abs=1e-12)
    logits = _logits(S).requires_grad_(True)
    loss, _ = sdft_loss(logits, _logits(T), torch.ones(1, 1), distillation_mode="full_logits")
    loss.backward()
    stepped = (logits - 0.5 * logits.grad).detach()
    assert (
        sdft_loss(stepped, _logits(T), torch.ones(1, 1), distillation_mode="full_logits")[0] < loss.detach()
    )
    assert stepped[0, 0].softmax(-1)[0] > logits.detach()[0, 0].softmax(-1)[0]
    assert sdft_loss(_logits(S), _logits(S), torch.ones(1, 1))[0].item() == pytest.approx(0, abs=1e-12)


def test_teacher_prompt_and_data_checks(tiny_model_dir):
    """The template's result for plain and chat prompts; a missing privileged_context column, an empty context
    and a template without its placeholders fail naming what to change."""
    assert compose_teacher_prompt("2+2=", "2+2=4", "{privileged_context}\n{prompt}") == "2+2=4\n2+2="
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert compose_teacher_prompt(chat, [{"role": "assistant", "content": "4"}], "{prompt} Hint: {privileged_context}") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2? Hint: 4"},
    ]  # fmt: skip
    with pytest.raises(DataFormatError, match=r"privileged_context column .* data.columns"):
        SDFTDataModule(tiny_model_dir, [{"prompt": "1+1="}]).setup()
    with pytest.raises(DataFormatError, match="row 1, column 'privileged_context'"):
        SDFTDataModule(tiny_model_dir, [{"prompt": "1+1=", "privileged_context": "2"},
                                        {"prompt": "1+2=", "privileged_context": ""}]).setup()  # fmt: skip
    with pytest.raises(ValueError, match="teacher_prompt_template must contain"):
        SDFTDataModule(tiny_model_dir, teacher_prompt_template="{prompt} only")
    data = SDFTDataModule(tiny_model_dir, [{"q": "1+1=", "solution": "1+1=2"}], teacher_prompt_template="{privileged_context}|{prompt}",
                          columns={"prompt": "q", "privileged_context": "solution"})  # fmt: skip
    data.setup()
    tok = data.tokenizer
    example = data.train_examples[0]
    assert (
        tok.decode(example["prompt_ids"]) == "1+1="
        and tok.decode(example["teacher_prompt_ids"]) == "1+1=2|1+1="
    )


def test_reference_completion_and_token_accuracy(tiny_model_dir):
    """An optional completion column becomes reference_ids (batched only when every row has one; old data without
    it still loads, the accuracy metrics are then absent); token_accuracy counts each reference token and the end."""
    rows = [{"prompt": "1+1=", "privileged_context": "1+1=2", "completion": "2"},
            {"prompt": "9+9=", "privileged_context": "9+9=18", "completion": "18"}]  # fmt: skip
    data = SDFTDataModule(tiny_model_dir, rows)
    data.setup()
    tok = data.tokenizer
    assert [tok.decode(example["reference_ids"]) for example in data.train_examples] == ["2", "18"]
    assert DataCollatorForSDFT()(data.train_examples)["reference_ids"] == [
        tok("2")["input_ids"],
        tok("18")["input_ids"],
    ]
    old = SDFTDataModule(
        tiny_model_dir, [{k: v for k, v in row.items() if k != "completion"} for row in rows]
    )
    old.setup()
    assert "reference_ids" not in DataCollatorForSDFT()(old.train_examples)
    assert "reference_ids" not in DataCollatorForSDFT()([data.train_examples[0], old.train_examples[0]])
    with pytest.raises(DataFormatError, match="row 1, column 'completion'"):
        SDFTDataModule(tiny_model_dir, [rows[0], {**rows[1], "completion": ""}]).setup()
    # reference "18" = [5, 12] then the end (EOS 1): exact 3/3; "19" 2/3; "1" then EOS 1/3 (the end comes too
    # early); "18" cut by max_completion_length (truncated) 2/3; "180" then EOS 2/3 (no end after "18")
    eos = 1
    completions = [[5, 12, eos], [5, 13, eos], [5, eos], [5, 12], [5, 12, 4, eos]]
    truncated = [False, False, False, True, False]
    assert token_accuracy(completions, truncated, [[5, 12]] * 5) == (3 + 2 + 1 + 2 + 2, 15)


def test_bad_options_are_named(tiny_model_dir):
    """An EMA teacher, a base teacher without LoRA and sampled_token with alpha != 1 fail naming the option."""
    with pytest.raises(ValueError, match="teacher_model_kind must be one of"):
        SDFTModule(tiny_model_dir, random_init=True, teacher_model_kind="ema")
    with pytest.raises(ValueError, match="needs lora"):
        SDFTModule(tiny_model_dir, random_init=True, teacher_model_kind="base")
    with pytest.raises(ValueError, match="distillation_alpha=1.0"):
        SDFTModule(tiny_model_dir, random_init=True, distillation_mode="sampled_token")
    with pytest.raises(ValueError, match="distillation_mode must be one of"):
        SDFTModule(tiny_model_dir, random_init=True, distillation_mode="top_k")


def test_doctests():
    """The docstring examples run."""
    assert doctest.testmod(sdft, raise_on_error=True).failed == 0


# ---------------------------------------------------------------------------------------------
# Learning signal and memory
# ---------------------------------------------------------------------------------------------
class _Record(L.Callback):
    """The logged metrics after every training step and every validation (the sanity check included)."""

    def __init__(self):
        self.train, self.val = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train.append(
            {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        )

    def on_validation_end(self, trainer, pl_module):  # the sanity check (all batches) is the "before"
        self.val.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})


def _rows(split: str, n: int, completion: bool = True) -> list[dict]:
    import json

    rows = [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text().splitlines()[:n]]
    return rows if completion else [{k: v for k, v in row.items() if k != "completion"} for row in rows]


def _fit(model_dir, steps: int, *, random_init=True, num_train=512, num_val=16, seed=0, completion=True,
         **module_options):  # fmt: skip
    L.seed_everything(seed)
    module = SDFTModule(model_dir, random_init=random_init, max_completion_length=4, distillation_mode="full_logits",
                        diagnostics=False, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
                        **module_options)  # fmt: skip
    record = _Record()
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, val_check_interval=steps, check_val_every_n_epoch=None, num_sanity_val_steps=-1,
        callbacks=[record],
    )  # fmt: skip
    train, val = _rows("train", num_train, completion), _rows("val", num_val, completion)
    data = SDFTDataModule(model_dir, train, val, batch_size=8,
                          teacher_prompt_template="{privileged_context}\n{prompt}")  # fmt: skip
    trainer.fit(module, data)
    return module, trainer, record


def test_learning_signal_held_out_kl_falls(tiny_model_dir):
    """On held-out prompts the student's per-token KL to its own privileged-context teacher falls. The model is a
    random tiny Llama with peaked logits (initializer_range 0.3), so the demonstration in the teacher's prompt
    changes its next-token distributions a lot at the start. Measured val/kl before -> after 16 steps (lr 1e-3) for
    seeds 0, 1, 2, 3 (inverse-CDF sampling, `lit_posttrain.rollout.hf`): 3.61 -> 3.23, 2.83, 2.71, 2.29 (ratios
    0.90, 0.79, 0.75, 0.64; with generate's multinomial sampler, seeds 0-2: 0.61, 0.75, 0.33). The bar is 0.85;
    this test keeps seed 1."""
    _, _, record = _fit(tiny_model_dir, 16, seed=1, model_config={"initializer_range": 0.3})
    val_kl = [record.val[0]["val/kl"], record.val[-1]["val/kl"]]
    train_kl = [step["train/kl"] for step in record.train]
    print(f"\nSDFT val/kl {val_kl}, train/kl first/last {train_kl[0]:.3f}/{train_kl[-1]:.3f}")
    assert val_kl[1] < 0.85 * val_kl[0], val_kl
    for name in ("loss", "kl", "teacher_entropy", "student_entropy", "completions/mean_length", "grad_norm"):
        assert math.isfinite(record.train[-1][f"train/{name}"]), name


def test_learning_signal_accuracy_rises_toward_the_teacher():
    """From the shipped warm start (examples/tiny-sdft-start: copies an answer shown in its context, adds poorly
    alone), SDFT with the paper's fixed teacher (LoRA, teacher_model_kind='base': the warm start itself, shown the
    worked answer) lowers the held-out KL and raises the student's greedy token accuracy toward the teacher's.
    Measured on the first 64 validation prompts, 256 steps of 8 prompts, LoRA r 16, lr 1e-3, JSD on the full
    vocabulary, seeds 0, 1, 2: val/kl 2.98 -> 2.31, 2.20, 2.23; val/mean_token_accuracy 0.32 -> 0.53, 0.54, 0.54;
    val/teacher_mean_token_accuracy 0.85 throughout. The bars: KL below 0.9x, accuracy up by 0.12 or more, the
    gap to the teacher down by a quarter or more."""
    start = EXAMPLES / "tiny-sdft-start"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small gain nothing from threads, and lose 10x on a busy machine
    try:
        _, _, record = _fit(start, 256, random_init=False, num_train=2300, num_val=64,
                            lora=LoRAConfig(r=16, alpha=32, dropout=0.0), teacher_model_kind="base")  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    before, after = record.val[0], record.val[-1]
    figures = {name: (round(before[f"val/{name}"], 3), round(after[f"val/{name}"], 3))
               for name in ("kl", "mean_token_accuracy", "teacher_mean_token_accuracy")}  # fmt: skip
    print(f"\nSDFT from the warm start, before -> after: {figures}")
    (kl0, kl1), (acc0, acc1), (teacher0, teacher1) = figures.values()
    assert kl1 < 0.9 * kl0, figures
    assert teacher0 > 0.8 and teacher1 == teacher0, figures  # the fixed teacher knows the answers
    assert acc0 < 0.4 and acc1 > acc0 + 0.12, figures  # weak alone, then better
    assert teacher1 - acc1 < 0.75 * (teacher0 - acc0), figures  # toward the teacher
    assert 0 <= record.train[-1]["train/completions/mean_token_accuracy"] <= 1


def test_no_second_copy_of_the_weights(tiny_model_dir):
    """After training, the parameter bytes held by the module and every callback are those of the one model (full
    fine-tuning); with LoRA and teacher_model_kind='base' the teacher pass disables the adapters (no copy either)
    and equals the base model's output. (Trained on data without the completion column: no accuracy is logged.)"""
    module, trainer, record = _fit(tiny_model_dir, 2, completion=False)
    assert "val/kl" in record.val[-1] and "train/kl" in record.train[-1]
    assert not [name for name in [*record.val[-1], *record.train[-1]] if "accuracy" in name]
    model_bytes = sum(p.numel() * p.element_size() for p in module.model.parameters())
    held = {id(p): p for p in module.parameters()}
    for callback in trainer.callbacks:
        for value in vars(callback).values():
            if isinstance(value, torch.nn.Module):
                held |= {id(p): p for p in value.parameters()}
    assert sum(p.numel() * p.element_size() for p in held.values()) == model_bytes
    assert len(trainer.optimizers[0].param_groups[0]["params"]) == len(list(module.model.parameters()))

    lora = SDFTModule(tiny_model_dir, random_init=True, lora=LoRAConfig(r=4, alpha=8, dropout=0.0),
                      teacher_model_kind="base")  # fmt: skip
    for name, p in lora.model.named_parameters():  # non-zero adapters, so they change the output
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    ids, mask = torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad(), lora._teacher_context():
        teacher = lora(ids, mask, 2)
    with torch.no_grad(), lora.model.disable_adapter():
        base = lora(ids, mask, 2)
    with torch.no_grad():
        student = lora(ids, mask, 2)
    assert torch.equal(teacher, base) and not torch.allclose(teacher, student)
