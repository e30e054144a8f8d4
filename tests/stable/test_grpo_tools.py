"""GRPO and RLOO with tools: multi-turn rollouts whose inserted tool results carry no loss, on the shipped
warm-started tool caller (examples/tiny-tool-caller, examples/make_tool_caller.py)."""

import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_posttrain import GRPODataModule, GRPOModule, RLOOModule

ROOT = Path(__file__).resolve().parents[2]
CALLER = str(ROOT / "examples" / "tiny-tool-caller")
sys.path.insert(0, str(ROOT / "examples"))
from tool_rewards import add, final_answer  # noqa: E402


def _rows(split: str, n: int) -> list[dict]:
    lines = (ROOT / "examples" / "data" / "tools" / f"{split}.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("cls", [GRPOModule, RLOOModule])
def test_tool_results_carry_no_loss(cls):
    """The loss mask of a tool rollout is 1 exactly on the tokens the model sampled: the inserted tool results
    (``=1073`` and a newline) are 0, token by token; reward functions get the trajectory's messages."""
    torch.manual_seed(0)
    module = cls(
        CALLER, reward_funcs=[final_answer], tools=[add], tool_call_format="tiny", max_tool_calling_iterations=2,
        num_generations=2, max_completion_length=32,
    )  # fmt: skip
    rows = _rows("val", 4)
    prompt_ids = [module.tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    rollout = module._engine().generate(module.model, prompt_ids, num_generations=2, max_completion_length=32)
    _, _, completion_mask = module._pack(prompt_ids, rollout)
    inserted = 0
    for i, (ids, mask) in enumerate(zip(rollout.completion_ids, rollout.completion_mask)):
        assert completion_mask[i, : len(ids)].tolist() == mask
        assert completion_mask[i, len(ids) :].sum() == 0
        inserted += mask.count(0)
        text = module.tokenizer.decode([t for t, m in zip(ids, mask) if m == 0])
        assert text == "" or text.startswith("=")  # what the loop inserted: "=<result>\n"
    assert inserted > 0, "no tool was called: the warm-started model should call add"
    batch = {"prompt": [r["prompt"] for r in rows], "columns": {"answer": [r["answer"] for r in rows]}}
    _, _, columns = module._reward_inputs(batch, rollout)
    assert columns["trajectory"] == rollout.messages and len(columns["trajectory"]) == 8


def test_grpo_fit_with_a_tool_logs_tool_and_episode_metrics():
    """A short GRPO fit with the add tool logs tools/* and episodes/* every step, consistent with what the
    rollouts did (every episode calls at most max_tool_calling_iterations - 1 tools here: a call, then the
    answer)."""
    L.seed_everything(0)
    module = GRPOModule(
        CALLER, reward_funcs=[final_answer], tools=[add], tool_call_format="tiny", max_tool_calling_iterations=2,
        num_generations=4, max_completion_length=32, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4),
    )  # fmt: skip
    steps = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Record()], limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, GRPODataModule(CALLER, _rows("train", 16), batch_size=4))
    for step in steps:
        assert 0 < step["train/tools/calls_per_episode"] <= 1
        assert 0 <= step["train/tools/success_rate"] <= 1 and step["train/tools/timeouts"] == 0
        assert 1 <= step["train/episodes/turns_mean"] <= 2 and 0 <= step["train/episodes/truncated_ratio"] <= 1
