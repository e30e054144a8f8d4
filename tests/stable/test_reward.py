"""Reward modeling: loss values, batching, where the reward is read, learning signal, export, scorer, data checks."""

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lit_posttrain import RewardDataModule, RewardModule, reward_loss
from lit_posttrain.callbacks import HubExport, LearningSignal
from lit_posttrain.data import DataFormatError, load_rows
from lit_posttrain.models import LoRAConfig
from lit_posttrain.rewards.model import RewardModelScorer, tokenize_for_reward
from lit_posttrain.stable import reward
from lit_posttrain.stable.reward import DataCollatorForReward

DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "preference"


def make_preference_rows(pairs):
    """The shipped data's task (examples/make_preference_data.py): two-digit sums; rejected is the
    carry-less "column" answer (three digits)."""
    return [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": f"{a // 10 + b // 10}{a % 10 + b % 10:02d}"} for a, b in pairs]


# ---------------------------------------------------------------------------------------------
# reward_loss
# ---------------------------------------------------------------------------------------------
def test_reward_loss_hand_derived():
    """r_c = [2, 0], r_r = [0, 0]: loss = (log(1 + e^-2) + log 2) / 2 = (0.126928 + 0.693147) / 2 = 0.410038;
    accuracy 1/2 (a tie is not a win), margin mean(2, 0) = 1, rewards {2, 0, 0, 0}: mean 0.5, min 0, max 2."""
    loss, metrics = reward_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert loss.item() == pytest.approx((math.log1p(math.exp(-2)) + math.log(2)) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.410038, abs=1e-6)
    expected = {"accuracy": 0.5, "margin": 1.0, "mean_reward": 0.5, "min_reward": 0.0, "max_reward": 2.0}
    assert {name: value.item() for name, value in metrics.items()} == pytest.approx(expected)
    assert not any(value.requires_grad for value in metrics.values())


def test_reward_loss_margin():
    """Llama 2 margin: r_c - r_r = [2, 0] with m = [1, -1] gives logits [1, 1]: loss = log(1 + e^-1) = 0.313262.
    The margin changes the loss only, not the metrics (margin metric stays mean(r_c - r_r) = 1)."""
    loss, metrics = reward_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]), margin=torch.tensor([1.0, -1.0]))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-6)
    assert loss.item() == pytest.approx(0.313262, abs=1e-6)
    assert metrics["margin"].item() == pytest.approx(1.0)


def test_reward_loss_centering():
    """Centering (Eisenstein et al.): + 0.01 * mean((r_c + r_r)^2) = 0.01 * (4 + 0) / 2 = 0.02 on top of
    0.410038 -> 0.430038. Shifting every reward by the same constant leaves the Bradley-Terry term
    unchanged but not the centering term."""
    r_c, r_r = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    loss, _ = reward_loss(r_c, r_r, center_rewards_coefficient=0.01)
    assert loss.item() == pytest.approx(0.430038, abs=1e-6)
    shifted, _ = reward_loss(r_c + 5, r_r + 5)
    assert shifted.item() == pytest.approx(0.410038, abs=1e-6)
    shifted_centered, _ = reward_loss(r_c + 5, r_r + 5, center_rewards_coefficient=0.01)
    # 0.01 * ((12^2 + 10^2) / 2) = 1.22
    assert shifted_centered.item() == pytest.approx(0.410038 + 1.22, abs=1e-5)


def test_reward_loss_gradient_direction():
    """Descending the loss raises every chosen reward and lowers every rejected one:
    dL/dr_c = -sigmoid(r_r - r_c) / B < 0 and dL/dr_r = -dL/dr_c > 0 (here B = 2, pair 1 at a tie:
    -0.5 / 2 = -0.25). With centering and large positive rewards both gradients turn positive (pull to 0)."""
    r_c = torch.tensor([1.0, 0.0], requires_grad=True)
    r_r = torch.tensor([-1.0, 0.0], requires_grad=True)
    reward_loss(r_c, r_r)[0].backward()
    assert (r_c.grad < 0).all() and (r_r.grad > 0).all()
    torch.testing.assert_close(r_r.grad, -r_c.grad)
    assert r_c.grad[1].item() == pytest.approx(-0.25)
    assert r_c.grad[0].item() == pytest.approx(-torch.sigmoid(torch.tensor(-2.0)).item() / 2)

    r_c = torch.tensor([10.0], requires_grad=True)
    r_r = torch.tensor([9.0], requires_grad=True)
    reward_loss(r_c, r_r, center_rewards_coefficient=0.01)[0].backward()
    assert r_c.grad.item() > 0 and r_r.grad.item() > 0


def test_reward_loss_accumulation_invariance():
    """Normalising by the pairs of the whole step: two half-batches with num_items_in_batch=4 sum to the
    loss of the full batch of 4 (also with margin and centering)."""
    r_c, r_r = torch.tensor([0.3, -1.2, 2.0, 0.1]), torch.tensor([0.5, 0.4, -0.7, 0.0])
    margin = torch.tensor([0.0, 1.0, 0.5, -0.2])
    kwargs = {"center_rewards_coefficient": 0.1}
    full, _ = reward_loss(r_c, r_r, margin=margin, **kwargs)
    halves = [reward_loss(r_c[s], r_r[s], margin=margin[s], num_items_in_batch=4, **kwargs)[0] for s in (slice(0, 2), slice(2, 4))]
    torch.testing.assert_close(halves[0] + halves[1], full)


# ---------------------------------------------------------------------------------------------
# tokenization and batching
# ---------------------------------------------------------------------------------------------
def test_tokenize_and_collate_exact(tiny_tokenizer):
    """Character tokenizer: '0'..'9' -> 4..13, '+' -> 76, '=' -> 84, EOS 1, pad 0. Plain rows are
    prompt + completion + EOS; the collator stacks chosen rows first, then rejected, right-padded."""
    rows = [
        {"prompt": "1+2=", "chosen": "3", "rejected": "45", "margin": 0.5},
        {"prompt": "9=", "chosen": "9", "rejected": "8", "margin": -1},
    ]
    dm = RewardDataModule(tiny_tokenizer, train_data=rows)
    dm.setup("fit")
    assert dm.train_examples == [
        {"chosen_ids": [5, 76, 6, 84, 7, 1], "rejected_ids": [5, 76, 6, 84, 8, 9, 1], "margin": 0.5},
        {"chosen_ids": [13, 84, 13, 1], "rejected_ids": [13, 84, 12, 1], "margin": -1.0},
    ]
    batch = dm.collator(dm.train_examples)
    assert batch["input_ids"].tolist() == [
        [5, 76, 6, 84, 7, 1, 0],
        [13, 84, 13, 1, 0, 0, 0],
        [5, 76, 6, 84, 8, 9, 1],
        [13, 84, 12, 1, 0, 0, 0],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0, 0],
    ]
    assert batch["margin"].tolist() == [0.5, -1.0]
    assert "margin" not in DataCollatorForReward(0)([{"chosen_ids": [4], "rejected_ids": [5]}])


def test_conversational_implicit_prompt(tiny_tokenizer):
    """A conversational row without a prompt column is the chat template over the whole conversation,
    the same ids as the explicit-prompt row (prompt = shared user turn) and as the scorer's input."""
    user = {"role": "user", "content": "12+28"}
    chosen, rejected = {"role": "assistant", "content": "40"}, {"role": "assistant", "content": "440"}
    implicit = RewardDataModule(tiny_tokenizer, train_data=[{"chosen": [user, chosen], "rejected": [user, rejected]}])
    explicit = RewardDataModule(tiny_tokenizer, train_data=[{"prompt": [user], "chosen": [chosen], "rejected": [rejected]}])
    implicit.setup("fit")
    explicit.setup("fit")
    expected = tiny_tokenizer.apply_chat_template([user, chosen], tokenize=True, return_dict=True)["input_ids"]
    assert implicit.train_examples[0]["chosen_ids"] == list(expected)
    assert implicit.train_examples == explicit.train_examples
    assert tokenize_for_reward(tiny_tokenizer, [user], [rejected]) == implicit.train_examples[0]["rejected_ids"]
    assert expected[-2:] == [3, tiny_tokenizer.convert_tokens_to_ids("\n")]  # ends "<|im_end|>\n"


def test_columns_and_splits_reach_load_rows(tiny_tokenizer, monkeypatch):
    """`columns` renames the data's columns to the expected ones; both splits and dataset_config reach load_rows."""
    calls = []

    def recording_load_rows(source, **kwargs):
        calls.append(kwargs)
        return load_rows(source, **kwargs)

    monkeypatch.setattr(reward, "load_rows", recording_load_rows)
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad", "margin": "strength"}
    renamed = RewardDataModule(
        tiny_tokenizer,
        train_data=[{"question": "1+2=", "good": "3", "bad": "45", "strength": 2.0}],
        val_data=[{"question": "9=", "good": "9", "bad": "8", "strength": 1.0}],
        dataset_split="train_prefs",
        val_dataset_split="test_prefs",
        dataset_config="main",
        columns=columns,
    )
    renamed.setup("fit")
    assert renamed.train_examples == [
        {"chosen_ids": [5, 76, 6, 84, 7, 1], "rejected_ids": [5, 76, 6, 84, 8, 9, 1], "margin": 2.0}
    ]
    assert renamed.val_examples == [{"chosen_ids": [13, 84, 13, 1], "rejected_ids": [13, 84, 12, 1], "margin": 1.0}]
    assert calls[:2] == [
        {"split": "train_prefs", "name": "main", "columns": columns},
        {"split": "test_prefs", "name": "main", "columns": columns},
    ]
    calls.clear()
    row = {"chosen": "3", "rejected": "4"}
    RewardDataModule(tiny_tokenizer, train_data=[row], val_data=[row], dataset_split="x").setup("fit")
    assert [call["split"] for call in calls] == ["x", "x"]  # val_dataset_split defaults to dataset_split


def test_max_length_drops_pairs(tiny_tokenizer):
    """max_length drops (does not truncate) pairs with a longer sequence, as TRL does, and says how many."""
    rows = [{"prompt": "1+2=", "chosen": "3", "rejected": "45"}, {"prompt": "1=", "chosen": "1", "rejected": "2"}]
    dm = RewardDataModule(tiny_tokenizer, train_data=rows, max_length=6)  # the first rejected has 7 tokens
    with pytest.warns(UserWarning, match="dropped 1 of 2 pairs"):
        dm.setup("fit")
    assert dm.train_examples == [{"chosen_ids": [5, 84, 5, 1], "rejected_ids": [5, 84, 6, 1]}]
    with pytest.raises(DataFormatError, match="every pair"):
        RewardDataModule(tiny_tokenizer, train_data=rows, max_length=3).setup("fit")


def test_reward_read_at_last_non_pad_token(tiny_model_dir):
    """The batched, right-padded forward gives each sequence the score of its own last token, as a naive
    unpadded forward does: score(h_last). The model config's eos/pad (3, unset) differ from the
    tokenizer's pad (0), as for Qwen2.5-Instruct; the module must make the head look for pad 0."""
    torch.manual_seed(0)
    module = RewardModule(tiny_model_dir, random_init=True, model_config={"pad_token_id": None, "eos_token_id": 3}).eval()
    assert module.model.config.pad_token_id == module.tokenizer.pad_token_id == 0
    user = {"role": "user", "content": "12+28"}
    rows = [
        {"chosen": [user, {"role": "assistant", "content": "40"}], "rejected": [user, {"role": "assistant", "content": "4400"}]},
        {"chosen": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}],
         "rejected": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "11"}]},
    ]
    dm = RewardDataModule(module.tokenizer, train_data=rows)
    dm.setup("fit")
    batch = dm.collator(dm.train_examples)
    assert (batch["attention_mask"] == 0).any()  # padding is present
    with torch.no_grad():
        rewards = module(batch["input_ids"], batch["attention_mask"])
        naive = []
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            seq = ids[mask.bool()][None]  # (1, L) no padding
            hidden = module.model.model(input_ids=seq).last_hidden_state[0, -1]
            naive.append(module.model.score(hidden)[0])
    torch.testing.assert_close(rewards, torch.stack(naive), atol=1e-5, rtol=0)


def test_lora_trains_score_head(tiny_model_dir, tmp_path):
    """With LoRA, the randomly initialised score head is trained in full (modules_to_save) next to the
    adapters, the base weights are frozen, and HubExport's merged export gives the trained rewards (up to
    the float32 rounding of merging W + BA)."""
    torch.manual_seed(0)  # the LoRA A matrices come from the global RNG
    module = RewardModule(
        tiny_model_dir, random_init=True, lora=LoRAConfig(r=4, dropout=0.0, modules_to_save=None),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
    )
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert any("score.modules_to_save" in name for name in trainable)
    assert all("lora_" in name or "score.modules_to_save" in name for name in trainable)
    head_before = module.model.base_model.model.score.modules_to_save["default"].weight.detach().clone()

    rows = make_preference_rows([(12, 28), (27, 29), (26, 42), (19, 33)])
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[HubExport(tmp_path / "export")],
    )
    trainer.fit(module, datamodule=RewardDataModule(tiny_model_dir, train_data=rows, batch_size=4))
    assert not torch.equal(module.model.base_model.model.score.modules_to_save["default"].weight, head_before)

    batch = DataCollatorForReward(0)([{"chosen_ids": [5, 76, 6, 84, 7, 1], "rejected_ids": [5, 84, 8, 9, 1]}])
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export" / "final").eval()
    with torch.no_grad():
        expected = module.eval()(batch["input_ids"], batch["attention_mask"])
        got = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        with module.model.disable_adapter():  # the untrained base and head
            untrained = module(batch["input_ids"], batch["attention_mask"])
    assert (untrained - expected).abs().max() > 1e-2  # training moved the rewards: the comparison means something
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# training: learning signal, export, scorer
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def preference_data():
    if (DATA / "train.jsonl").exists():
        return str(DATA / "train.jsonl"), str(DATA / "val.jsonl")
    pairs = [(a, b) for a in range(10, 50) for b in range(10, 50)]
    return make_preference_rows(pairs[::2]), make_preference_rows(pairs[1::2][:300])


@pytest.fixture(scope="module")
def trained(tiny_model_dir, preference_data, tmp_path_factory):
    """A tiny random-init reward model trained for 20 steps on the preference data, exported by HubExport."""
    L.seed_everything(0)
    root = tmp_path_factory.mktemp("reward")
    train_data, val_data = preference_data
    module = RewardModule(tiny_model_dir, random_init=True, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    dm = RewardDataModule(tiny_model_dir, train_data=train_data, val_data=val_data, batch_size=32, max_length=64)
    signal = LearningSignal(["val/loss", "val/accuracy"])
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=20,
        val_check_interval=20,
        num_sanity_val_steps=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[signal, HubExport(root / "export")],
    )
    trainer.fit(module, datamodule=dm)
    return module.eval(), dm, signal, root / "export" / "final"


def test_learning_signal(trained):
    """20 steps on the arithmetic preference data take held-out accuracy from chance to >= 0.9."""
    _, _, signal, _ = trained
    assert signal.before["val/accuracy"] < 0.8
    assert signal.after["val/accuracy"] >= 0.9
    assert signal.after["val/loss"] < signal.before["val/loss"] - 0.3


def test_export_reloads_with_same_rewards(trained):
    """The HubExport directory loads with AutoModelForSequenceClassification (+ AutoTokenizer) and gives the
    trained module's rewards on a padded held-out batch."""
    module, dm, _, export = trained
    batch = dm.collator(dm.val_examples[:16])
    reloaded = AutoModelForSequenceClassification.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert reloaded.config.num_labels == 1 and reloaded.config.pad_token_id == tokenizer.pad_token_id == 0
    with torch.no_grad():
        expected = module(batch["input_ids"], batch["attention_mask"])
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert "Reward modeling" in (export / "README.md").read_text()


def test_scorer_matches_module(trained):
    """RewardModelScorer(export) returns the module's rewards, for plain prompts/completions and for
    conversations (prompt messages + assistant completion), batching with padding."""
    module, _, _, export = trained
    scorer = RewardModelScorer(str(export), batch_size=3)

    def user(text):
        return [{"role": "user", "content": text}]

    plain = {"prompt": ["12+28=", "9+9=", "31+4="], "chosen": ["40", "18", "35"], "rejected": ["440", "108", "305"]}
    chat = {"prompt": [user("12+28"), user("1+1")], "chosen": [[{"role": "assistant", "content": "40"}]] * 2,
            "rejected": [[{"role": "assistant", "content": "4040"}], [{"role": "assistant", "content": "2"}]]}
    scores = {}
    for name, rows in (("plain", plain), ("chat", chat)):
        as_rows = [dict(zip(rows, values)) for values in zip(*rows.values())]
        dm = RewardDataModule(module.tokenizer, train_data=as_rows)
        dm.setup("fit")
        batch = dm.collator(dm.train_examples)
        with torch.no_grad():
            expected = module(batch["input_ids"], batch["attention_mask"]).tolist()
        n = len(rows["prompt"])
        scores[name] = scorer(rows["prompt"] * 2, rows["chosen"] + rows["rejected"], answer=["ignored"] * (2 * n))
        assert scores[name] == pytest.approx(expected, abs=1e-5)
    # the trained model ranks the correct sums above the wrong ones
    assert all(c > r for c, r in zip(scores["plain"][:3], scores["plain"][3:]))
    # a plain string completion of a conversational prompt is one assistant message
    assert scorer([user("12+28")], ["40"]) == pytest.approx(scorer([user("12+28")], [[{"role": "assistant", "content": "40"}]]))


# ---------------------------------------------------------------------------------------------
# data checks
# ---------------------------------------------------------------------------------------------
GOOD = {"prompt": "1+2=", "chosen": "three", "rejected": "four", "margin": 1.0}


@pytest.mark.parametrize(
    "bad, as_file, message",
    [
        ({"chosen": 3}, False, r"row 1, column 'chosen'"),
        ({"chosen": 3}, True, r"row 1, column 'chosen': expected a (non-empty )?string( or a list of messages)?, got 3"),
        ({"margin": "big"}, False, r"row 1, column 'margin'"),
        ({"margin": "big"}, True, r"row 1, column 'margin': expected a number, got 'big'"),
        ({"rejected": ""}, True, r"row 1, column 'rejected'"),
        ({"chosen": [{"role": "assistant", "content": "3"}]}, True, r"row 1, column 'chosen'"),
        ({"prompt": [{"role": "user", "content": "1+2"}]}, True, r"row 1, column 'prompt': expected a string"),
    ],
)
def test_malformed_row(tiny_model_dir, tmp_path, bad, as_file, message):
    """A malformed row raises DataFormatError naming the row and the column, in setup (before training)."""
    rows = [GOOD, {**GOOD, **bad}, GOOD]
    if as_file:
        path = tmp_path / "pairs.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        rows = str(path)
    module = RewardModule(tiny_model_dir, random_init=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(DataFormatError, match=message):
        trainer.fit(module, datamodule=RewardDataModule(tiny_model_dir, train_data=rows))
    assert trainer.global_step == 0


def test_malformed_row_digit_strings_in_jsonl(tiny_tokenizer, tmp_path):
    """A number among digit strings in a JSONL file is reported at its own row (datasets stores a JSON
    column of mixed kinds as Json and decodes the string '3' as the number 3: data.load_rows reads the
    raw rows to name the odd one)."""
    rows = [{"prompt": "1+2=", "chosen": "3", "rejected": "45"}, {"prompt": "1+3=", "chosen": 4, "rejected": "45"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataFormatError, match=r"row 1, column 'chosen'"):
        RewardDataModule(tiny_tokenizer, train_data=str(path)).setup("fit")


def test_gradient_accumulation_invariance(tiny_model_dir):
    """One optimizer step over the same 7 pairs gives the same weights as 1 micro-batch of 7 or 4 micro-batches
    of 2, 2, 2, 1 (accumulate_grad_batches=4): the loss is a sum over pairs divided by the pairs of the whole
    step, not a mean of micro-batch means (which would weight the last pair twice). SGD, so the update is
    proportional to the gradient."""
    rows = make_preference_rows([(12, 28), (27, 29), (26, 42), (19, 33), (45, 45), (10, 10), (38, 17)])
    weights, num_tokens = [], []
    for batch_size, accumulate in ((7, 1), (2, 4)):
        module = RewardModule(tiny_model_dir, random_init=True, optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
        dm = RewardDataModule(tiny_model_dir, train_data=rows, batch_size=batch_size)
        trainer = L.Trainer(
            accelerator="cpu", max_steps=1, accumulate_grad_batches=accumulate, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.fit(module, datamodule=dm)
        weights.append({k: v.clone() for k, v in module.model.state_dict().items()})
        num_tokens.append(module.num_tokens.item())
    initial = RewardModule(tiny_model_dir, random_init=True).model.state_dict()
    assert (weights[0]["score.weight"] - initial["score.weight"]).abs().max() > 1e-3  # the step moved the head
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], atol=1e-6, rtol=1e-5)
    assert num_tokens[0] == num_tokens[1] == 7 * (9 + 10)  # "12+28=" 6 chars + 2 or 3 digits + EOS, x 7 pairs
