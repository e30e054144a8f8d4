"""DPO: loss values derived by hand, the collator, the concatenated forward, data checks, learning."""

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lit_posttrain import DataCollatorForPreference, DPODataModule, DPOModule, dpo_loss
from lit_posttrain.callbacks import LearningSignal, ReferenceModel
from lit_posttrain.data import DataFormatError, load_rows
from lit_posttrain.stable import dpo
from lit_posttrain.stable.dpo import LOSS_TYPES

DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "preference"


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# One pair used by most cases: logps chosen -1, rejected -3; reference -2 and -2. So the chosen
# log-ratio is c = +1, the rejected log-ratio r = -1, and h = c - r = 2.
PAIR = (t(-1.0), t(-3.0), t(-2.0), t(-2.0))


# ---------------------------------------------------------------------------------------------
# Loss values
# ---------------------------------------------------------------------------------------------
def test_sigmoid_value():
    """beta = 0.5: beta*h = 1, loss = -log sigmoid(1) = log(1 + e^-1) ~ 0.3133; rewards beta*c = 0.5, beta*r = -0.5."""
    losses, chosen_rewards, rejected_rewards = dpo_loss(*PAIR, beta=0.5, loss_type="sigmoid")
    assert losses.item() == pytest.approx(softplus(-1.0), abs=1e-12)
    assert chosen_rewards.item() == pytest.approx(0.5) and rejected_rewards.item() == pytest.approx(-0.5)


def test_sigmoid_label_smoothing_value():
    """cDPO, eps = 0.1, beta*h = 1: 0.9*log(1+e^-1) + 0.1*log(1+e^1) = log(1+e^-1) + 0.1 (as log(1+e) = 1 + log(1+e^-1))."""
    losses, _, _ = dpo_loss(*PAIR, beta=0.5, loss_type="sigmoid", label_smoothing=0.1)
    assert losses.item() == pytest.approx(softplus(-1.0) + 0.1, abs=1e-12)


def test_sigmoid_policy_equals_reference_is_log2():
    """Policy == reference: h = 0 and -log sigmoid(0) = log 2, whatever beta and the log-probs are."""
    logps = t(-3.0, -7.5, -0.25)
    losses, chosen_rewards, rejected_rewards = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.3)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)))
    assert torch.all(chosen_rewards == 0) and torch.all(rejected_rewards == 0)


def test_hinge_value():
    """beta = 0.25: relu(1 - beta*h) = relu(1 - 0.5) = 0.5; beta = 0.5 reaches the margin: relu(0) = 0."""
    assert dpo_loss(*PAIR, beta=0.25, loss_type="hinge")[0].item() == pytest.approx(0.5)
    assert dpo_loss(*PAIR, beta=0.5, loss_type="hinge")[0].item() == 0.0


def test_ipo_value_is_per_token():
    """Lengths 2 and 4: h = c/2 - r/4 = 0.5 + 0.25 = 0.75; beta = 0.5, target 1/(2 beta) = 1: (0.75 - 1)^2 = 0.0625."""
    losses, _, _ = dpo_loss(
        *PAIR, beta=0.5, loss_type="ipo", chosen_num_tokens=t(2), rejected_num_tokens=t(4)
    )
    assert losses.item() == pytest.approx(0.0625, abs=1e-12)


def test_exo_pair_value():
    """eps = 0.1, beta*h = 1: KL(q || p) of q = (sigmoid(1), sigmoid(-1)) ~ (0.7311, 0.2689) from p = (0.9, 0.1):
    0.7311*log(0.7311/0.9) + 0.2689*log(0.2689/0.1) ~ -0.1520 + 0.2661 = 0.1141."""
    q1, q2 = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))
    expected = q1 * math.log(q1 / 0.9) + q2 * math.log(q2 / 0.1)
    losses, _, _ = dpo_loss(*PAIR, beta=0.5, loss_type="exo_pair", label_smoothing=0.1)
    assert losses.item() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.1141, abs=1e-4)


def test_nca_pair_value():
    """beta = 0.5, rewards 0.5 and -0.5: -log s(0.5) - 0.5 log s(-0.5) - 0.5 log s(0.5)
    = 1.5*log(1+e^-0.5) + 0.5*log(1+e^0.5) ~ 1.5*0.4741 + 0.5*0.9741 = 1.1982."""
    losses, _, _ = dpo_loss(*PAIR, beta=0.5, loss_type="nca_pair")
    assert losses.item() == pytest.approx(1.5 * softplus(-0.5) + 0.5 * softplus(0.5), abs=1e-12)
    assert losses.item() == pytest.approx(1.1982, abs=1e-4)


def test_robust_value():
    """eps = 0.1, beta*h = 1: (0.9*log(1+e^-1) - 0.1*log(1+e^1)) / 0.8 = (0.28194 - 0.13133) / 0.8 ~ 0.18826."""
    losses, _, _ = dpo_loss(*PAIR, beta=0.5, loss_type="robust", label_smoothing=0.1)
    assert losses.item() == pytest.approx((0.9 * softplus(-1) - 0.1 * softplus(1)) / 0.8, abs=1e-12)
    assert losses.item() == pytest.approx(0.18826, abs=1e-5)


def test_bco_pair_value():
    """beta = 0.5, rewards 0.5 / -0.5, delta = 0.25: -log s(0.5 - 0.25) - log s(-(-0.5 - 0.25))
    = log(1+e^-0.25) + log(1+e^-0.75)."""
    losses, _, _ = dpo_loss(*PAIR, beta=0.5, loss_type="bco_pair", bco_delta=0.25)
    assert losses.item() == pytest.approx(softplus(-0.25) + softplus(-0.75), abs=1e-12)


def test_sppo_hard_value():
    """beta = 1: (c - 1/(2 beta))^2 + (r + 1/(2 beta))^2 = (1 - 0.5)^2 + (-1 + 0.5)^2 = 0.5."""
    assert dpo_loss(*PAIR, beta=1.0, loss_type="sppo_hard")[0].item() == pytest.approx(0.5)


# Two pairs for the AOT losses (which sort over the batch):
# chosen logps (-1, -2), rejected (-4, -2), ref chosen (-2, -2), ref rejected (-2, -3).
AOT = (t(-1.0, -2.0), t(-4.0, -2.0), t(-2.0, -2.0), t(-2.0, -3.0))


def test_aot_value_sorts_margins():
    """Policy margins (3, 0) sort to (0, 3); reference margins (0, 1) to (0, 1); deltas (0, 2) (unsorted they
    would be (3, -1)). beta = 1: losses (log 2, log(1 + e^-2))."""
    losses, _, _ = dpo_loss(*AOT, beta=1.0, loss_type="aot")
    assert torch.allclose(losses, t(math.log(2), softplus(-2)), atol=1e-12)


def test_aot_unpaired_value_sorts_logratios():
    """Chosen log-ratios (1, 0) sort to (0, 1); rejected (-2, 1) to (-2, 1); deltas (2, 0) (unsorted: (3, -1)).
    beta = 1: losses (log(1 + e^-2), log 2)."""
    losses, _, _ = dpo_loss(*AOT, beta=1.0, loss_type="aot_unpaired")
    assert torch.allclose(losses, t(softplus(-2), math.log(2)), atol=1e-12)


def test_apo_zero_value():
    """beta = 0.5: (1 - s(0.5)) + s(-0.5) = 2 s(-0.5) ~ 0.75508."""
    losses, _, _ = dpo_loss(*PAIR, beta=0.5, loss_type="apo_zero")
    assert losses.item() == pytest.approx(2 / (1 + math.exp(0.5)), abs=1e-12)


def test_apo_down_value():
    """beta = 0.5: s(beta c) + 1 - s(beta h) = s(0.5) + 1 - s(1) ~ 0.62246 + 0.26894 = 0.89140."""
    losses, _, _ = dpo_loss(*PAIR, beta=0.5, loss_type="apo_down")
    assert losses.item() == pytest.approx(1 / (1 + math.exp(-0.5)) + 1 / (1 + math.exp(1)), abs=1e-12)
    assert losses.item() == pytest.approx(0.89140, abs=1e-5)


def test_discopop_value():
    """beta*h = 1, tau = 1: mix = s(1); loss = log(1+e^-1)*(1 - s(1)) + e^-1*s(1) = 0.31326*0.26894 + s(-1)
    ~ 0.08425 + 0.26894 = 0.35319 (e^-1 s(1) = s(-1)). With tau = 0.05 the mix ~ 1 and the loss ~ e^-1."""
    losses, _, _ = dpo_loss(*PAIR, beta=0.5, loss_type="discopop", discopop_tau=1.0)
    s1 = 1 / (1 + math.exp(-1))
    assert losses.item() == pytest.approx(softplus(-1) * (1 - s1) + math.exp(-1) * s1, abs=1e-12)
    assert losses.item() == pytest.approx(0.35319, abs=1e-5)
    assert dpo_loss(*PAIR, beta=0.5, loss_type="discopop")[0].item() == pytest.approx(math.exp(-1), abs=1e-8)


def test_sigmoid_norm_value():
    """Lengths 2 and 4: h = c/2 - r/4 = 0.75; beta = 0.5: -log s(0.375) = log(1 + e^-0.375)."""
    losses, _, _ = dpo_loss(
        *PAIR, beta=0.5, loss_type="sigmoid_norm", chosen_num_tokens=t(2), rejected_num_tokens=t(4)
    )
    assert losses.item() == pytest.approx(softplus(-0.375), abs=1e-12)


def test_sft_value_is_token_mean_nll_of_chosen():
    """Chosen logps (-1, -3) over (2, 4) tokens: NLL = (1 + 3) / 6 = 2/3 for every pair; rejected ignored."""
    losses, _, _ = dpo_loss(
        t(-1.0, -3.0),
        t(-9.0, -9.0),
        t(0.0, 0.0),
        t(0.0, 0.0),
        loss_type="sft",
        chosen_num_tokens=t(2, 4),
        rejected_num_tokens=t(1, 1),
    )
    assert torch.allclose(losses, t(2 / 3, 2 / 3), atol=1e-12)


def test_every_loss_type_has_a_value_test():
    """Each loss type in LOSS_TYPES is covered by a hand-derived test above."""
    names = {name.replace("test_", "") for name in globals() if name.startswith("test_")}
    for loss_type in LOSS_TYPES:
        assert any(name.startswith(loss_type + "_value") for name in names), loss_type


def test_loss_list_combines_with_weights():
    """RPO-style [sigmoid, sft] with weights [1, 0.5] = sigmoid + 0.5 * sft; MPO [sigmoid, bco_pair, sft] adds bco_pair."""
    kwargs = {"beta": 0.5, "chosen_num_tokens": t(2), "rejected_num_tokens": t(4)}
    sigmoid = dpo_loss(*PAIR, loss_type="sigmoid", **kwargs)[0]
    sft = dpo_loss(*PAIR, loss_type="sft", **kwargs)[0]
    bco = dpo_loss(*PAIR, loss_type="bco_pair", **kwargs)[0]
    rpo = dpo_loss(*PAIR, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], **kwargs)[0]
    mpo = dpo_loss(*PAIR, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], **kwargs)[0]
    assert torch.allclose(rpo, sigmoid + 0.5 * sft) and sft.item() == pytest.approx(0.5)  # -(-1)/2
    assert torch.allclose(mpo, 0.8 * sigmoid + 0.2 * bco + sft)
    assert torch.allclose(
        dpo_loss(*PAIR, loss_type=["sigmoid", "sft"], **kwargs)[0], sigmoid + sft
    )  # default weights 1


@pytest.mark.parametrize("loss_type", [lt for lt in LOSS_TYPES if lt not in ("sft", "discopop")])
def test_gradients_raise_chosen_and_lower_rejected(loss_type):
    """At policy == reference, a gradient step raises the chosen log-probs and lowers the rejected ones
    (apo_down is built to lower both: its chosen gradient is 0 there; we only check rejected)."""
    chosen, rejected = t(-2.0, -3.0).requires_grad_(), t(-2.5, -4.0).requires_grad_()
    losses, _, _ = dpo_loss(
        chosen,
        rejected,
        chosen.detach().clone(),
        rejected.detach().clone(),
        beta=0.5,
        loss_type=loss_type,
        label_smoothing=0.1 if loss_type in ("exo_pair", "robust") else 0.0,
        chosen_num_tokens=t(2, 3),
        rejected_num_tokens=t(3, 4),
    )
    losses.mean().backward()
    assert torch.all(rejected.grad > 0), rejected.grad  # descent lowers rejected
    if loss_type != "apo_down":
        assert torch.all(chosen.grad < 0), chosen.grad  # descent raises chosen


@pytest.mark.parametrize("beta_h", [-1.0, 1.0])
def test_discopop_gradients_away_from_zero(beta_h):
    """DiscoPOP is non-convex: within about 2*tau of h = 0 its gradient points the other way (at 0, with
    tau = 0.05: d loss / d(beta h) = -0.25 - 5 log 2 - 0.5 + 5 ~ +0.78). At beta*h = -1 and +1 (the mix is
    ~0 / ~1: logistic / exponential) descent raises chosen and lowers rejected."""
    chosen, rejected = t(-2.0).requires_grad_(), t(-3.0).requires_grad_()
    # beta = 0.5, reference chosen shifted so that h = beta_h / beta
    losses, _, _ = dpo_loss(chosen, rejected, t(-2.0 - 2 * beta_h), t(-3.0), beta=0.5, loss_type="discopop")
    losses.sum().backward()
    assert chosen.grad.item() < 0 and rejected.grad.item() > 0


def test_discopop_gradient_at_zero_points_away():
    """The hand-derived slope at h = 0 (see above): d loss / d(beta h) = 4.75 - 5 log 2 - 0.25 ~ +0.7843 (tau = 0.05)."""
    x = t(0.0).requires_grad_()
    dpo_loss(x, t(0.0), t(0.0), t(0.0), beta=1.0, loss_type="discopop")[0].sum().backward()
    assert x.grad.item() == pytest.approx(-0.25 - 5 * math.log(2) - 0.5 + 5, abs=1e-9)


def test_sft_gradient_raises_chosen_only():
    """The sft term raises the chosen log-probs and leaves the rejected ones alone."""
    chosen, rejected = t(-2.0).requires_grad_(), t(-3.0).requires_grad_()
    dpo_loss(
        chosen, rejected, t(0.0), t(0.0), loss_type="sft", chosen_num_tokens=t(2), rejected_num_tokens=t(2)
    )[0].sum().backward()
    assert chosen.grad.item() < 0 and rejected.grad is None  # no path from the rejected log-probs


def test_unknown_loss_type_raises_naming_allowed_values():
    """An unknown loss type raises ValueError that lists the allowed ones (from the function and the module)."""
    with pytest.raises(ValueError, match="sigmoid.*discopop.*sft"):
        dpo_loss(*PAIR, loss_type="simpo")
    with pytest.raises(ValueError, match="sigmoid.*discopop"):
        dpo_loss(*PAIR, loss_type=["sigmoid", "nope"])
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*PAIR, loss_type="exo_pair")
    with pytest.raises(ValueError, match="one weight per loss type"):
        dpo_loss(*PAIR, loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="chosen_num_tokens"):
        dpo_loss(*PAIR, loss_type="ipo")


def test_module_rejects_unknown_loss_type(tiny_model_dir):
    """The module checks loss_type at construction, naming the allowed values."""
    with pytest.raises(ValueError, match="loss_type must be one of"):
        DPOModule(tiny_model_dir, random_init=True, loss_type="kto")


# ---------------------------------------------------------------------------------------------
# Collator and tokenization
# ---------------------------------------------------------------------------------------------
EXAMPLES = [
    {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10]},
    {"prompt_ids": [11, 12], "chosen_ids": [13], "rejected_ids": [14, 15, 16]},
]


def test_collator_pads_chosen_then_rejected():
    """Rows are prompt+chosen for each example, then prompt+rejected, right-padded to the longest of all."""
    batch = DataCollatorForPreference(pad_token_id=0)(EXAMPLES)
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 8, 9],
        [11, 12, 13, 0, 0],
        [5, 6, 7, 10, 0],
        [11, 12, 14, 15, 16],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ]
    assert batch["completion_mask"].tolist() == [
        [0, 0, 0, 1, 1],
        [0, 0, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 1, 1, 1],
    ]
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask"}


def test_collator_truncates_prompt_end_then_sequence_start():
    """max_prompt_length=2 keeps the prompt's last 2 tokens; max_length=4 then keeps each row's first 4 tokens;
    extra float columns (precomputed reference log-probs) pass through as (B,) tensors."""
    examples = [
        dict(EXAMPLES[0], ref_chosen_logps=-1.5, ref_rejected_logps=-2.0),
        dict(EXAMPLES[1], ref_chosen_logps=-0.5, ref_rejected_logps=-3.0),
    ]
    batch = DataCollatorForPreference(pad_token_id=0, max_length=4, max_prompt_length=2)(examples)
    assert batch["input_ids"].tolist() == [[6, 7, 8, 9], [11, 12, 13, 0], [6, 7, 10, 0], [11, 12, 14, 15]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1], [0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    assert batch["ref_chosen_logps"].tolist() == [-1.5, -0.5] and batch["ref_rejected_logps"].tolist() == [
        -2.0,
        -3.0,
    ]


def test_tokenization_plain_and_conversational(tiny_tokenizer):
    """Plain completions get EOS appended; conversations are rendered by the chat template, the completion being
    what follows the generation prompt; without a prompt column the shared user turn becomes the prompt."""
    user = {"role": "user", "content": "1+2"}
    rows = [
        {"prompt": "1+2=", "chosen": "3", "rejected": "4"},
    ]
    dm = DPODataModule(tiny_tokenizer, train_data=rows)
    dm.setup()
    (example,) = dm.examples["train"]
    decode = tiny_tokenizer.decode
    assert decode(example["prompt_ids"]) == "1+2="
    assert (
        decode(example["chosen_ids"]) == "3<|endoftext|>"
        and decode(example["rejected_ids"]) == "4<|endoftext|>"
    )

    chat = [
        {
            "chosen": [user, {"role": "assistant", "content": "3"}],
            "rejected": [user, {"role": "assistant", "content": "4"}],
        }
    ]
    dm = DPODataModule(tiny_tokenizer, train_data=chat)
    dm.setup()
    (example,) = dm.examples["train"]
    assert decode(example["prompt_ids"]) == "<|im_start|>user\n1+2<|im_end|>\n<|im_start|>assistant\n"
    assert (
        decode(example["chosen_ids"]) == "3<|im_end|>\n"
        and decode(example["rejected_ids"]) == "4<|im_end|>\n"
    )

    explicit = [
        {
            "prompt": [user],
            "chosen": [{"role": "assistant", "content": "3"}],
            "rejected": [{"role": "assistant", "content": "4"}],
        }
    ]
    dm = DPODataModule(tiny_tokenizer, train_data=explicit)
    dm.setup()
    assert dm.examples["train"] == [example]


def test_columns_and_splits_reach_load_rows(tiny_tokenizer, monkeypatch):
    """`columns` renames the data's columns to the expected ones; both splits and dataset_config reach load_rows."""
    calls = []

    def recording_load_rows(source, **kwargs):
        calls.append(kwargs)
        return load_rows(source, **kwargs)

    monkeypatch.setattr(dpo, "load_rows", recording_load_rows)
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    renamed = DPODataModule(
        tiny_tokenizer,
        train_data=[{"question": "1+2=", "good": "3", "bad": "4"}],
        val_data=[{"question": "2+2=", "good": "4", "bad": "5"}],
        dataset_split="train_prefs",
        val_dataset_split="test_prefs",
        dataset_config="main",
        columns=columns,
    )
    renamed.setup()
    expected = DPODataModule(
        tiny_tokenizer,
        train_data=[{"prompt": "1+2=", "chosen": "3", "rejected": "4"}],
        val_data=[{"prompt": "2+2=", "chosen": "4", "rejected": "5"}],
    )
    expected.setup()
    assert renamed.examples == expected.examples and set(renamed.examples) == {"train", "val"}
    assert calls[:2] == [
        {"split": "train_prefs", "name": "main", "columns": columns},
        {"split": "test_prefs", "name": "main", "columns": columns},
    ]
    calls.clear()
    row = {"prompt": "1+2=", "chosen": "3", "rejected": "4"}
    DPODataModule(tiny_tokenizer, train_data=[row], val_data=[row], dataset_split="x").setup()
    assert [call["split"] for call in calls] == ["x", "x"]  # val_dataset_split defaults to dataset_split


@pytest.mark.parametrize(
    "rows, match",
    [
        (
            [
                {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
                {"prompt": "1+2=", "chosen": "3", "rejected": 5},
            ],
            r"row 1, column 'rejected'",
        ),
        (
            [
                {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
                {"prompt": "1+2=", "chosen": "", "rejected": "4"},
            ],
            r"row 1, column 'chosen'",
        ),
        (
            [
                {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
                {"prompt": "1+2=", "chosen": [{"role": "assistant", "content": "3"}], "rejected": "4"},
            ],
            r"row 1, column 'chosen'",
        ),
        (
            [
                {
                    "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                    "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                }
            ],
            r"row 0, column 'chosen'.*share",
        ),
        ([{"prompt": "1+1=", "chosen": "2"}], r"missing column\(s\) \['rejected'\]"),
    ],
)
def test_malformed_row_raises_before_training(tiny_model_dir, rows, match):
    """A malformed row raises DataFormatError naming row and column during setup, before any training step."""
    module = DPOModule(tiny_model_dir, random_init=True)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(DataFormatError, match=match):
        trainer.fit(module, DPODataModule(tiny_model_dir, train_data=rows))
    assert trainer.global_step == 0


# ---------------------------------------------------------------------------------------------
# Concatenated forward
# ---------------------------------------------------------------------------------------------
def test_concatenated_forward_matches_naive_per_sequence(tiny_model_dir):
    """Log-probs from one padded 2B-row forward (only completion logits) equal a per-sequence, unpadded forward
    with a full log_softmax summed over the completion tokens (1e-5)."""
    module = DPOModule(tiny_model_dir, random_init=True).eval()
    dm = DPODataModule(tiny_model_dir, train_data=str(DATA / "chat_val.jsonl"))
    dm.setup()
    examples = dm.examples["train"][:3] + [
        {"prompt_ids": [5, 6, 7, 8, 9, 10, 11, 12], "chosen_ids": [13, 1], "rejected_ids": [14, 15, 16, 1]}
    ]
    batch = dm.collator(examples)
    with torch.no_grad():
        logps, stats, mask = module.concatenated_forward(batch)
        naive = []
        for key in ("chosen_ids", "rejected_ids"):
            for example in examples:
                ids = torch.tensor([example["prompt_ids"] + example[key]])
                full_logps = F.log_softmax(module.model(input_ids=ids).logits[0, :-1], dim=-1)  # (L-1, V)
                token_logps = full_logps.gather(-1, ids[0, 1:, None])[:, 0]
                naive.append(token_logps[len(example["prompt_ids"]) - 1 :].sum())
    assert stats.entropy.shape[1] < batch["input_ids"].shape[1] - 1  # prompt-only positions were not computed
    assert mask.sum(1).tolist() == [len(e[k]) for k in ("chosen_ids", "rejected_ids") for e in examples]
    torch.testing.assert_close(logps, torch.stack(naive), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def test_learning_signal_reward_accuracy(tiny_model_dir):
    """DPO on the tiny random-init model and the shipped data: held-out rewards start at 0 (policy == reference)
    and after 10 steps the held-out reward accuracy is >= 0.9 and the loss well below log 2."""
    L.seed_everything(0)
    module = DPOModule(tiny_model_dir, random_init=True, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    dm = DPODataModule(
        tiny_model_dir,
        train_data=str(DATA / "train.jsonl"),
        val_data=str(DATA / "val.jsonl"),
        batch_size=32,
        max_length=32,
    )
    signal = LearningSignal(["val/loss", "val/rewards/accuracies", "val/rewards/margins"])
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=10,
        val_check_interval=10,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=-1,
        limit_val_batches=4,  # 128 held-out pairs
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[signal],
    )
    trainer.fit(module, dm)
    assert [type(cb) for cb in trainer.callbacks].count(ReferenceModel) == 1  # added by configure_callbacks
    assert signal.before["val/loss"] == pytest.approx(math.log(2), abs=1e-5)
    # before training policy == reference: rewards are 0 up to float rounding (ties and noise, not skill)
    assert abs(signal.before["val/rewards/margins"]) < 1e-4 and signal.before["val/rewards/accuracies"] < 0.75
    assert signal.after["val/rewards/accuracies"] >= 0.9
    assert signal.after["val/loss"] < 0.6 and signal.after["val/rewards/margins"] > 0
    for name in (
        "rewards/chosen",
        "rewards/rejected",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
        "entropy",
    ):
        assert math.isfinite(trainer.callback_metrics[f"val/{name}"]), name
    # every pair is "ab+cd=" + 2 digits + EOS (9 tokens) and "ab+cd=" + 3 digits + EOS (10 tokens)
    assert trainer.callback_metrics["train/num_tokens"] == 10 * 32 * (9 + 10)


def test_token_statistics_only_on_logged_steps(tiny_model_dir, tmp_path, with_stats_calls):
    """Departure 6: logits/* and entropy are computed on the optimizer steps Lightning logs (every 2nd here)
    and the run's last step, not on the others; the rows written hold the same values as a run that
    computes them every step, and the other metrics are logged every row either way."""
    from helpers.metrics import assert_rows_match, sparse_and_dense_runs

    computed = with_stats_calls(dpo)  # with_stats of each training forward of the policy

    def make():
        module = DPOModule(tiny_model_dir, random_init=True, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
        return module, DPODataModule(tiny_model_dir, train_data=str(DATA / "train.jsonl"), batch_size=4, max_length=32)

    (sparse, sparse_rows), (dense, dense_rows) = sparse_and_dense_runs(computed, make, tmp_path, 2, max_steps=5)
    assert sparse == [False, True, False, True, True]  # steps 1..5: 2 and 4 are logged, 5 is the last
    assert dense == [True] * 5
    assert sorted(sparse_rows) == [1, 3]
    names = ("loss", "rewards/margins", "logits/chosen", "logits/rejected", "entropy")
    assert_rows_match(sparse_rows, dense_rows, [f"train/{name}" for name in names])


def test_conversational_rpo_and_reference_free_run(tiny_model_dir):
    """Conversational data with an implicit prompt trains with a loss list (RPO: sigmoid + sft); reference_free
    adds no ReferenceModel and its rewards are beta * logps."""
    dm = DPODataModule(tiny_model_dir, train_data=str(DATA / "chat_val.jsonl"), val_size=32, batch_size=8)
    module = DPOModule(
        tiny_model_dir, random_init=True, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0]
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, dm)
    assert math.isfinite(trainer.callback_metrics["train/loss"])
    # sigmoid starts at log 2, the sft term adds the chosen NLL (about log 128 per token at init)
    assert trainer.callback_metrics["val/loss"] > math.log(2) + 1

    module = DPOModule(tiny_model_dir, random_init=True, reference_free=True, beta=0.5)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        val_check_interval=1,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, dm)
    assert not any(isinstance(cb, ReferenceModel) for cb in trainer.callbacks)
    metrics = trainer.callback_metrics
    assert metrics["val/rewards/chosen"].item() == pytest.approx(
        0.5 * metrics["val/logps/chosen"].item(), rel=1e-5
    )


def test_bco_pair_running_mean_is_a_checkpointed_buffer(tiny_model_dir):
    """bco_pair's running reward mean is updated once per training step and is part of the module's state_dict."""
    dm = DPODataModule(tiny_model_dir, train_data=str(DATA / "val.jsonl"), batch_size=8)
    module = DPOModule(
        tiny_model_dir,
        random_init=True,
        loss_type="bco_pair",
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, dm)
    state = module.state_dict()
    assert state["bco_num_updates"].item() == 3 and state["bco_rewards_mean"].item() != 0.0
