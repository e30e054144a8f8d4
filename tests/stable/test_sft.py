import json
import math

import lightning as L
import pytest
import torch

from lit_posttrain import DataCollatorForLanguageModeling, SFTDataModule, SFTModule, sft_loss
from lit_posttrain.data import DataFormatError, load_rows
from lit_posttrain.stable import sft
from lit_posttrain.stable.sft import pack_bfd


def _trainer(**kwargs):
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


# ------------------------------------------------------------------------------------------ loss
def test_sft_loss_hand_derived():
    """NLL is -sum(logp)/tokens; DFT weights each term by p: values derived by hand."""
    logps = torch.log(torch.tensor([[0.5, 0.25, 0.9]]))
    mask = torch.tensor([[1, 1, 0]])
    # nll: -(log .5 + log .25) / 2 = (0.6931 + 1.3863) / 2 = 1.0397
    assert sft_loss(logps, mask).item() == pytest.approx((math.log(2) + math.log(4)) / 2, abs=1e-6)
    # dft: -(.5 log .5 + .25 log .25) / 2 = (0.3466 + 0.3466) / 2 = 0.3466
    assert sft_loss(logps, mask, loss_type="dft").item() == pytest.approx(0.5 * math.log(2), abs=1e-6)
    # normalised by the whole step's tokens (4), not this batch's (2)
    assert sft_loss(logps, mask, num_items_in_batch=4).item() == pytest.approx((math.log(2) + math.log(4)) / 4)
    with pytest.raises(ValueError, match=r"\['nll', 'dft'\]"):
        sft_loss(logps, mask, loss_type="ce")


def test_dft_gradient_is_probability_weighted():
    """DFT's gradient w.r.t. a token's log-prob is -p/N (NLL's is -1/N)."""
    logps = torch.log(torch.tensor([[0.5, 0.25]])).requires_grad_()
    sft_loss(logps, torch.ones(1, 2), loss_type="dft").backward()
    assert torch.allclose(logps.grad, torch.tensor([[-0.25, -0.125]]))


# ------------------------------------------------------------------------------------ collator
def test_collator_padded_exact():
    """Right padding, attention mask, and labels -100 on prompt, padding and each first token."""
    collator = DataCollatorForLanguageModeling(pad_token_id=0)
    batch = collator(
        [
            {"input_ids": [5, 6, 7, 8], "completion_mask": [0, 0, 1, 1], "seq_lengths": [4]},
            {"input_ids": [9, 10], "completion_mask": [1, 1], "seq_lengths": [2]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]


def test_collator_packed_position_ids_exact():
    """Packed rows: position_ids restart per packed sequence (and for the padding tail), sequence
    starts and padding unlabelled, no attention_mask (the mask comes from position_ids)."""
    collator = DataCollatorForLanguageModeling(pad_token_id=0, packed=True)
    batch = collator(
        [
            {"input_ids": [5, 6, 7, 8, 9], "completion_mask": [0, 1, 1, 1, 1], "seq_lengths": [3, 2]},
            {"input_ids": [10, 11], "completion_mask": [1, 1], "seq_lengths": [2]},
        ]
    )
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [10, 11, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 11, -100, -100, -100]]


def test_pack_bfd_exact_bins():
    """Best-fit-decreasing: longest first, each into the fullest bin that still fits."""
    # lengths 7, 5, 4, 3, 2, 1 into bins of 8: 7 -> A(1 left); 5 -> B(3); 4 -> C(4); 3 -> B(0);
    # 2 -> C(2); 1 -> A(0)
    assert pack_bfd([4, 7, 2, 5, 1, 3], 8) == [[1, 4], [3, 5], [0, 2]]
    bins = pack_bfd([3] * 5, 8)
    assert sorted(len(b) for b in bins) == [1, 2, 2]


# ------------------------------------------------------------------------------------ masks
def test_completion_only_mask_plain(tiny_tokenizer):
    """Prompt-completion: loss on the completion and its EOS only."""
    dm = SFTDataModule(tiny_tokenizer, train_data=[{"prompt": "1+2=", "completion": "3"}], batch_size=1)
    dm.setup()
    example = dm.train_examples[0]
    expected_ids = tiny_tokenizer("1+2=3", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert example["input_ids"] == expected_ids
    assert example["completion_mask"] == [0, 0, 0, 0, 1, 1]


def test_assistant_only_mask_conversation(tiny_tokenizer):
    """Conversations: loss on assistant content and its end-of-turn token, nothing else."""
    messages = [{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "3"}]
    dm = SFTDataModule(tiny_tokenizer, train_data=[{"messages": messages}], batch_size=1, assistant_only_loss=True)
    dm.setup()
    example = dm.train_examples[0]
    trained = [t for t, m in zip(example["input_ids"], example["completion_mask"]) if m]
    assert tiny_tokenizer.decode(trained) == "3<|im_end|>"


def test_whole_conversation_trains_by_default(tiny_tokenizer):
    """assistant_only_loss is off by default (TRL's default): every token of a conversation takes the loss,
    so chat templates without {% generation %} markers (Qwen2.5, Llama 3) work out of the box."""
    messages = [{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "3"}]
    template_without_markers = tiny_tokenizer.chat_template.replace("{% generation %}", "").replace(
        "{% endgeneration %}", ""
    )
    tokenizer = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tokenizer.chat_template = template_without_markers
    dm = SFTDataModule(tokenizer, train_data=[{"messages": messages}], batch_size=1)
    dm.setup()
    example = dm.train_examples[0]
    assert all(example["completion_mask"]) and len(example["input_ids"]) > len("3<|im_end|>")


def test_untrained_end_of_turn_warns(tiny_tokenizer):
    """A template whose assistant mask leaves out the end-of-turn token triggers a warning."""
    tokenizer = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}",
        "{% generation %}{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>' }}",
    )
    messages = [{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "3"}]
    dm = SFTDataModule(tokenizer, train_data=[{"messages": messages}], batch_size=1, assistant_only_loss=True)
    with pytest.warns(UserWarning, match="end-of-turn token is not trained"):
        dm.setup()


def test_max_length_truncation_keeps_start(tiny_tokenizer):
    """A sequence longer than max_length keeps its first max_length tokens."""
    dm = SFTDataModule(tiny_tokenizer, train_data=[{"text": "abcdefgh"}], max_length=4)
    dm.setup()
    assert tiny_tokenizer.decode(dm.train_examples[0]["input_ids"]) == "abcd"


def test_columns_and_splits_reach_load_rows(tiny_tokenizer, monkeypatch):
    """`columns` renames the data's columns to the expected ones; both splits and dataset_config reach load_rows."""
    calls = []

    def recording_load_rows(source, **kwargs):
        calls.append(kwargs)
        return load_rows(source, **kwargs)

    monkeypatch.setattr(sft, "load_rows", recording_load_rows)
    columns = {"prompt": "question", "completion": "answer"}
    renamed = SFTDataModule(
        tiny_tokenizer,
        train_data=[{"question": "1+2=", "answer": "3"}],
        val_data=[{"question": "2+2=", "answer": "4"}],
        dataset_split="train_sft",
        val_dataset_split="test_sft",
        dataset_config="main",
        columns=columns,
    )
    renamed.setup()
    expected = SFTDataModule(
        tiny_tokenizer,
        train_data=[{"prompt": "1+2=", "completion": "3"}],
        val_data=[{"prompt": "2+2=", "completion": "4"}],
    )
    expected.setup()
    assert renamed.train_examples == expected.train_examples and renamed.val_examples == expected.val_examples
    assert calls[:2] == [
        {"split": "train_sft", "name": "main", "columns": columns},
        {"split": "test_sft", "name": "main", "columns": columns},
    ]
    calls.clear()
    SFTDataModule(tiny_tokenizer, train_data=[{"text": "a"}], val_data=[{"text": "b"}], dataset_split="x").setup()
    assert [call["split"] for call in calls] == ["x", "x"]  # val_dataset_split defaults to dataset_split


# ------------------------------------------------------------------------------ packing = unpacked
def test_packed_loss_equals_unpacked(tiny_model_dir):
    """The loss on a BFD-packed batch (several sequences per row) equals the loss on the same sequences padded."""
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in [(1, 2), (13, 29), (7, 40), (45, 5), (0, 0)]]
    module = SFTModule(tiny_model_dir, random_init=True).eval()
    losses = {}
    for packing in (None, "bfd"):
        dm = SFTDataModule(tiny_model_dir, train_data=rows, batch_size=len(rows), max_length=16, packing=packing)
        dm.setup()
        batch = dm.collator(dm.train_examples)
        with torch.no_grad():
            logps, mask, n, correct, entropy = module._shared_step(batch)
        losses[packing] = (sft_loss(logps, mask).item(), int(n), int(correct), float(entropy))
    if packing == "bfd":
        assert len(dm.train_examples) < len(rows)  # really packed
    assert losses["bfd"][1] == losses[None][1]
    assert losses["bfd"][0] == pytest.approx(losses[None][0], abs=1e-5)
    assert losses["bfd"][2] == losses[None][2]
    assert losses["bfd"][3] == pytest.approx(losses[None][3], abs=1e-3)


# ------------------------------------------------------------------------------ learning signal
def test_sft_learning_signal(tiny_model_dir):
    """Held-out loss falls and held-out token accuracy rises on the addition task."""
    from lit_posttrain.callbacks import LearningSignal

    module = SFTModule(
        tiny_model_dir, random_init=True, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3)
    )
    dm = SFTDataModule(
        tiny_model_dir,
        train_data="examples/data/sft/train.jsonl",
        val_data="examples/data/sft/val.jsonl",
        batch_size=32,
        max_length=32,
    )
    signal = LearningSignal(metrics=["val/loss", "val/mean_token_accuracy"])
    trainer = _trainer(
        max_steps=150, val_check_interval=150, check_val_every_n_epoch=None, num_sanity_val_steps=-1, callbacks=[signal]
    )
    trainer.fit(module, dm)
    assert signal.before["val/loss"] > 4.0  # ~ln(128): untrained
    assert signal.after["val/loss"] < signal.before["val/loss"] - 2.0
    assert signal.after["val/mean_token_accuracy"] > signal.before["val/mean_token_accuracy"] + 0.3


# ------------------------------------------------------------------------------ accumulation
def test_accumulation_invariance(tiny_model_dir):
    """One optimizer step over 4 micro-batches of 1 equals one step over 1 batch of 4 (token-normalised)."""
    rows = [{"text": "a" * n} for n in (3, 9, 5, 14)]  # unequal token counts: per-batch means would differ

    def one_step(batch_size, accumulate):
        module = SFTModule(tiny_model_dir, random_init=True, optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
        dm = SFTDataModule(tiny_model_dir, train_data=rows, batch_size=batch_size, max_length=32)
        trainer = _trainer(max_steps=1, accumulate_grad_batches=accumulate, limit_val_batches=0)
        trainer.fit(module, dm)
        return torch.cat([p.detach().flatten() for p in module.model.parameters()])

    reference = SFTModule(tiny_model_dir, random_init=True)
    before = torch.cat([p.detach().flatten() for p in reference.model.parameters()])
    big, small = one_step(4, 1), one_step(1, 4)
    assert not torch.allclose(big, before)
    torch.testing.assert_close(small, big, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------ metrics cadence
def test_token_statistics_only_on_logged_steps(tiny_model_dir, tmp_path, with_stats_calls):
    """Departure 3: accuracy and entropy are computed on the optimizer steps Lightning logs (every 3rd here,
    both micro-batches of each) and on the run's last step, not on the others; the rows written hold the
    same values as a run that computes them every step, and the loss is logged every row either way."""
    from helpers.metrics import assert_rows_match, sparse_and_dense_runs

    computed = with_stats_calls(sft)  # with_stats of each training micro-batch
    rows = [{"text": f"{i}+{i}={2 * i}"} for i in range(40)]

    def make():
        module = SFTModule(tiny_model_dir, random_init=True, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
        return module, SFTDataModule(tiny_model_dir, train_data=rows, batch_size=2, max_length=32)

    (sparse, sparse_rows), (dense, dense_rows) = sparse_and_dense_runs(
        computed, make, tmp_path, 3, max_steps=7, accumulate_grad_batches=2
    )
    # optimizer steps 1..7 (two micro-batches each): steps 3 and 6 are logged, step 7 is the last
    assert sparse == [step in (3, 6, 7) for step in range(1, 8) for _ in range(2)]
    assert dense == [True] * 14
    assert sorted(sparse_rows) == [2, 5]  # CSVLogger's step: optimizer steps done before the logged one
    assert_rows_match(sparse_rows, dense_rows, ("train/loss", "train/mean_token_accuracy", "train/entropy"))


# ------------------------------------------------------------------------------ bad input
def test_malformed_row_names_file_row_and_column(tmp_path, tiny_tokenizer):
    """A bad row fails in setup, before training, naming the file, the row and the column."""
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": "1+1=", "completion": "2"}] * 3 + [{"prompt": "2+2=", "completion": ""}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dm = SFTDataModule(tiny_tokenizer, train_data=str(path))
    with pytest.raises(DataFormatError, match=rf"{path}: row 3, column 'completion': expected a non-empty string"):
        dm.setup()


def test_bad_messages_and_missing_columns(tiny_tokenizer):
    """An unknown role names its row, column and message; data without an SFT column lists the columns found."""
    dm = SFTDataModule(tiny_tokenizer, train_data=[{"messages": [{"role": "user", "content": "hi"}]}, {"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(DataFormatError, match=r"row 1, column 'messages', message 0: role must be one of"):
        dm.setup()
    dm = SFTDataModule(tiny_tokenizer, train_data=[{"question": "hi"}])
    with pytest.raises(DataFormatError, match=r"needs a 'text' column.*found \['question'\]"):
        dm.setup()


def test_missing_file_is_named(tiny_tokenizer):
    """A train_data path that does not exist raises FileNotFoundError naming the path."""
    dm = SFTDataModule(tiny_tokenizer, train_data="data/nope.jsonl")
    with pytest.raises(FileNotFoundError, match="data/nope.jsonl"):
        dm.setup()


# ------------------------------------------------------------------------------ loggers
def test_wandb_offline_run_writes_run_directory(tmp_path, tiny_model_dir, monkeypatch):
    """A WandbLogger(offline=True) run writes its offline run directory with the logged history."""
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="lit-posttrain-test")
    module = SFTModule(tiny_model_dir, random_init=True)
    dm = SFTDataModule(tiny_model_dir, train_data=[{"text": "abc"}] * 8, batch_size=4, max_length=8)
    trainer = _trainer(max_steps=2, logger=logger, log_every_n_steps=1)
    trainer.fit(module, dm)
    import wandb

    wandb.finish()
    run_dirs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    assert list(run_dirs[0].glob("*.wandb"))  # the run's history file
