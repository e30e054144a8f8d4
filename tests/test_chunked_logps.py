"""Chunked log-probs (`chunked_selective_log_softmax` from the final hidden states, `final_hidden_states`):
values and gradients equal the unchunked computation from full logits, for the op itself and for the
forwards of SFT, DPO, KTO, GRPO and RLOO and the reference model; and the peak memory of a log-prob +
backward step at a 150k vocabulary does not grow with vocabulary x tokens."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from lit_posttrain import DPOModule, GRPOModule, KTOModule, RLOOModule, SFTModule, ops
from lit_posttrain.callbacks import ReferenceModel
from lit_posttrain.models import LoRAConfig, final_hidden_states, load_model
from lit_posttrain.ops import TokenStats, _TargetLogSoftmax, chunked_selective_log_softmax, masked_sum
from lit_posttrain.rewards import PatternFractionReward
from lit_posttrain.stable.dpo import DataCollatorForPreference, _logits_to_keep
from lit_posttrain.stable.sft import sft_loss

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _naive(logits: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, TokenStats]:
    """log_softmax + gather over full logits, and the statistics the methods computed from them."""
    logps = F.log_softmax(logits.float(), -1)
    entropy = -(logps.exp() * logps).sum(-1)
    stats = TokenStats(entropy.detach(), logits.float().mean(-1).detach(), logits.argmax(-1))
    return logps.gather(-1, index[..., None])[..., 0], stats


def _grads(*tensors_or_modules) -> list[torch.Tensor]:
    out = []
    for x in tensors_or_modules:
        params = [x] if isinstance(x, torch.Tensor) else [p for p in x.parameters() if p.requires_grad]
        out += [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
    return out


# ---------------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 21, None])  # 21 positions: 4 does not divide it, 7 does
@pytest.mark.parametrize("keep_numel", [0, 9 * 50])  # recompute all chunks but the last / keep the last 9 positions'
def test_values_and_gradients_equal_unchunked(chunk_size, keep_numel, temperature):
    """Log-probs, statistics and the gradients w.r.t. the hidden states and the head's weight and bias
    equal those of log_softmax(head(h) / T).gather(...) to 1e-5 (float32), whatever the chunking and
    whichever chunks are recomputed in the backward."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50)
    hidden = (torch.randn(3, 7, 16) * 2).requires_grad_()
    index = torch.randint(0, 50, (3, 7))
    weights = torch.randn(3, 7)  # a downstream loss that weighs each token differently

    logps, stats = chunked_selective_log_softmax(
        hidden, head, index, temperature=temperature, chunk_size=chunk_size, keep_numel=keep_numel, with_stats=True
    )
    (logps * weights).sum().backward()
    chunked_grads = _grads(hidden, head)

    expected, expected_stats = _naive(head(hidden) / temperature, index)
    (expected * weights).sum().backward()
    assert logps.shape == (3, 7) and logps.dtype == torch.float32
    torch.testing.assert_close(logps, expected, **TOL)
    torch.testing.assert_close(stats.entropy, expected_stats.entropy, **TOL)
    torch.testing.assert_close(stats.mean_logit, expected_stats.mean_logit, **TOL)
    assert torch.equal(stats.argmax, expected_stats.argmax)
    assert not (stats.entropy.requires_grad or stats.mean_logit.requires_grad)
    for got, want in zip(chunked_grads, _grads(hidden, head), strict=True):
        torch.testing.assert_close(got, want, **TOL)


def test_backward_recomputes_each_chunk_instead_of_keeping_its_logits():
    """With gradients on, the head runs once per chunk in the forward and once more in the backward
    for every chunk but the trailing ones within ``keep_numel`` (their logits were not kept; the kept
    chunks' backward runs first, from their log-softmax; the last chunk is always kept); without
    gradients, once per chunk."""
    calls = []
    head = torch.nn.Linear(8, 30)
    head.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    hidden = torch.randn(2, 10, 8, requires_grad=True)
    index = torch.randint(0, 30, (2, 10))
    # 20 positions in chunks of 6 start at 0, 6, 12, 18; keep_numel of 8 positions x 30 keeps those from 12 on
    for keep_numel, recomputed in [(0, [6, 6, 6]), (8 * 30, [6, 6]), (7 * 30, [6, 6, 6]), (20 * 30, [])]:
        calls.clear()
        logps, _ = chunked_selective_log_softmax(hidden, head, index, chunk_size=6, keep_numel=keep_numel)
        assert calls == [6, 6, 6, 2]
        logps.sum().backward()
        assert sorted(calls[4:]) == recomputed, keep_numel
    calls.clear()
    with torch.no_grad():
        chunked_selective_log_softmax(hidden, head, index, chunk_size=6, keep_numel=0)
    assert calls == [6, 6, 6, 2]


def test_dropout_in_the_head_replays_in_the_recomputation():
    """A head with dropout: the backward's recomputation draws the forward's masks again (RNG state
    restored), so the gradients equal those of the same chunks computed once without checkpointing."""
    head = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(8, 30))
    hidden = torch.randn(2, 9, 8, requires_grad=True)
    index = torch.randint(0, 30, (2, 9))
    torch.manual_seed(1)
    logps, _ = chunked_selective_log_softmax(hidden, head, index, chunk_size=4, keep_numel=0)
    logps.sum().backward()
    chunked_grads = _grads(hidden, head)
    torch.manual_seed(1)
    expected = torch.cat(
        [_naive(head(h), i)[0] for h, i in zip(hidden.reshape(-1, 8).split(4), index.reshape(-1).split(4))]
    ).view(2, 9)
    expected.sum().backward()
    torch.testing.assert_close(logps, expected, **TOL)
    for got, want in zip(chunked_grads, _grads(hidden, head), strict=True):
        torch.testing.assert_close(got, want, **TOL)


def test_bfloat16_head_gives_float32_logps_of_its_logits():
    """A bfloat16 head: the log-probs are the float32 log-softmax of its bfloat16 logits (not rounded)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50).to(torch.bfloat16)
    hidden = torch.randn(3, 5, 16, dtype=torch.bfloat16)
    index = torch.randint(0, 50, (3, 5))
    logps, _ = chunked_selective_log_softmax(hidden, head, index, chunk_size=4)
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps, _naive(head(hidden), index)[0], **TOL)


def test_target_log_softmax_overwrites_the_logits_and_writes_its_gradient_over_them():
    """The eager chunk op (`_TargetLogSoftmax`): its log-probs are the log-softmax computed in the logits'
    own memory, and its gradient, (onehot - softmax) scaled by each position's upstream gradient (some
    zero, some negative), equals autograd's log_softmax + gather to 1e-6 and is written over the saved
    log-softmax (no new (C, V) tensor). A second backward through it raises instead of using the consumed
    log-softmax."""
    torch.manual_seed(0)
    x = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 40, (6,))
    upstream = torch.tensor([1.0, -2.0, 0.0, 0.5, 3.0, -0.25], dtype=torch.float64)
    expected = torch.log_softmax(x, -1).gather(-1, index[:, None])[:, 0]
    (want,) = torch.autograd.grad((expected * upstream).sum(), x)

    logits = x * 1.0  # a non-leaf, as a head's output
    storage = logits.data_ptr()
    seen = []
    logps, all_logps = _TargetLogSoftmax.apply(logits, index)
    assert all_logps.data_ptr() == storage and not all_logps.requires_grad
    torch.testing.assert_close(all_logps, torch.log_softmax(x.detach(), -1), atol=1e-12, rtol=0)
    torch.testing.assert_close(logps, expected, atol=1e-12, rtol=0)
    logps.grad_fn.register_hook(lambda grad_inputs, grad_outputs: seen.append(grad_inputs[0].data_ptr()))
    (got,) = torch.autograd.grad((logps * upstream).sum(), x, retain_graph=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert seen == [storage]  # the gradient w.r.t. the logits lives where the logits were
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad((logps * upstream).sum(), x)


def test_entropy_over_blocks_of_rows_equals_the_whole_chunks(monkeypatch):
    """The statistics' entropy, computed a block of rows at a time (`ENTROPY_BLOCK_NUMEL`), equals the
    naive entropy whether the blocks divide the chunk or not."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50)
    hidden, index = torch.randn(23, 16) * 3, torch.randint(0, 50, (23,))
    expected = _naive(head(hidden), index)[1].entropy
    for rows in (1, 3, 100):  # blocks of 1 row, 3 rows (23 = 7 x 3 + 2), the whole chunk
        monkeypatch.setattr(ops, "ENTROPY_BLOCK_NUMEL", rows * 50)
        _, stats = chunked_selective_log_softmax(hidden, head, index, chunk_size=10, with_stats=True)
        torch.testing.assert_close(stats.entropy, expected, **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_loss_equals_eager(dtype, monkeypatch):
    """``LIT_POSTTRAIN_COMPILE_LOSS=1`` runs each chunk's vocabulary work through torch.compile: the
    log-probs, statistics and gradients equal the eager path's (several chunks, the last one short;
    a temperature), and torch.compile did compile a frame (the path is not silently eager)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300).to(dtype)
    hidden = torch.randn(2, 13, 16, dtype=dtype, requires_grad=True)
    index = torch.randint(0, 300, (2, 13))

    def run():
        logps, stats = chunked_selective_log_softmax(
            hidden, head, index, temperature=0.7, chunk_size=5, keep_numel=0, with_stats=True
        )
        (logps * torch.linspace(-1, 1, 26).view(2, 13)).sum().backward()
        return [logps.detach(), *stats, *_grads(hidden, head)]

    monkeypatch.delenv("LIT_POSTTRAIN_COMPILE_LOSS", raising=False)
    eager = run()
    monkeypatch.setenv("LIT_POSTTRAIN_COMPILE_LOSS", "1")
    torch._dynamo.reset()  # compile afresh, whatever an earlier test compiled
    frames_before = counters["frames"]["ok"]
    compiled = run()
    assert counters["frames"]["ok"] > frames_before
    tol = TOL if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}  # bfloat16 gradients round
    for got, want in zip(compiled[:4], eager[:4], strict=True):  # log-probs and statistics: float32 math
        torch.testing.assert_close(got, want, **TOL)
    for got, want in zip(compiled[4:], eager[4:], strict=True):
        torch.testing.assert_close(got, want, **tol)


def test_no_positions_and_a_bad_chunk_size():
    """Zero positions give empty outputs; a chunk size below 1 is an error naming chunk_size."""
    head = torch.nn.Linear(8, 30)
    logps, stats = chunked_selective_log_softmax(
        torch.randn(0, 8, requires_grad=True), head, torch.zeros(0, dtype=torch.long), with_stats=True
    )
    assert logps.shape == stats.entropy.shape == stats.argmax.shape == (0,)
    logps.sum().backward()
    with pytest.raises(ValueError, match="chunk_size must be a positive number of positions, got 0"):
        chunked_selective_log_softmax(torch.randn(2, 8), head, torch.zeros(2, dtype=torch.long), chunk_size=0)


# ---------------------------------------------------------------------------------------------
# Hidden states of a whole model: tied head, LoRA on the head
# ---------------------------------------------------------------------------------------------
def _perturbed_lora(model) -> None:
    """LoRA B starts at 0 (the adapter is a no-op): give it values so the head's adapter matters."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)


@pytest.mark.parametrize("variant", ["full", "lora-on-head"])
def test_model_log_probs_and_gradients_equal_full_logits(variant, tiny_model_dir):
    """From `final_hidden_states` and the model's own head (tied to the embedding; or wrapped in LoRA),
    chunked log-probs and every trainable parameter's gradient equal those from the full logits."""
    lora = (
        LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "lm_head"])
        if variant != "full"
        else None
    )
    model = load_model(tiny_model_dir, random_init=True, lora=lora)
    if lora is not None:
        _perturbed_lora(model)
        assert type(model.get_output_embeddings()).__module__.startswith("peft.")
    else:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, 128, (3, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0  # a left-padded row

    hidden = final_hidden_states(model, input_ids, attention_mask)[:, :-1]
    logps, _ = chunked_selective_log_softmax(
        hidden, model.get_output_embeddings(), input_ids[:, 1:], temperature=0.9, chunk_size=5, keep_numel=0
    )
    logps.sum().backward()
    chunked_grads = _grads(model)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    expected, _ = _naive(logits / 0.9, input_ids[:, 1:])
    expected.sum().backward()
    torch.testing.assert_close(logps, expected, **TOL)
    for got, want in zip(chunked_grads, _grads(model), strict=True):
        torch.testing.assert_close(got, want, **TOL)


def test_reference_log_probs_disable_the_heads_adapter(tiny_model_dir):
    """With LoRA (also on the head) the reference log-probs are the base model's: the head runs with its
    adapter disabled too; they equal the log-softmax of the reference's own logits."""
    lora = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "lm_head"])
    policy = load_model(tiny_model_dir, random_init=True, lora=lora)
    _perturbed_lora(policy)
    base = load_model(tiny_model_dir, random_init=True).eval()
    reference = ReferenceModel()
    reference.policy = policy  # what setup() keeps for a LoRA policy (no copy)
    input_ids = torch.randint(4, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    logps = reference.per_token_logps(input_ids, attention_mask, logits_to_keep=6, temperature=0.8)
    with torch.no_grad():
        base_logits = base(input_ids=input_ids, attention_mask=attention_mask).logits[:, -7:-1]
        policy_logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits[:, -7:-1]
    torch.testing.assert_close(logps, _naive(base_logits / 0.8, input_ids[:, -6:])[0], **TOL)
    from_forward = reference.forward(input_ids, attention_mask)[:, -7:-1] / 0.8
    torch.testing.assert_close(logps, _naive(from_forward, input_ids[:, -6:])[0], **TOL)
    assert (
        logps - _naive(policy_logits / 0.8, input_ids[:, -6:])[0]
    ).abs().max() > 1e-3  # the adapters matter


# ---------------------------------------------------------------------------------------------
# The methods' forwards against their former full-logits computation
# ---------------------------------------------------------------------------------------------
def test_sft_step_equals_full_logits(tiny_model_dir):
    """SFT's loss terms, accuracy and entropy sums, and the loss gradient equal those from full logits."""
    module = SFTModule(tiny_model_dir, random_init=True)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, 128, (3, 14), generator=g)
    labels = input_ids.clone()
    labels[:, :5] = -100  # prompt
    labels[2, 10:] = -100  # padding
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 11:] = 0  # right padding (no targets there)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    per_token_logps, loss_mask, num_targets, correct, entropy = module._shared_step(batch)
    sft_loss(per_token_logps, loss_mask).backward()
    chunked_grads = _grads(module)

    logits = module(batch["input_ids"], batch["attention_mask"])[:, :-1]
    target = batch["labels"][:, 1:]
    mask = target != -100
    expected, stats = _naive(logits, target.clamp(min=0))
    sft_loss(expected, mask).backward()
    assert int(num_targets) == int(mask.sum())
    torch.testing.assert_close(per_token_logps[mask], expected[mask], **TOL)
    assert int(correct) == int((stats.argmax == target)[mask].sum())
    torch.testing.assert_close(entropy, stats.entropy[mask].sum(), **TOL)
    for got, want in zip(chunked_grads, _grads(module), strict=True):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_dpo_and_kto_log_probs_and_metrics_equal_full_logits(method, tiny_model_dir):
    """DPO's concatenated forward and KTO's completion forward: summed completion log-probs, the
    per-token entropy and mean logit behind ``entropy`` / ``logits/*``, and the gradients equal the
    full-logits ones."""
    rows = [
        {"prompt_ids": [4, 5, 6], "chosen_ids": [7, 8, 9, 1], "rejected_ids": [10, 1]},
        {"prompt_ids": [11, 12, 13, 14, 15], "chosen_ids": [16, 1], "rejected_ids": [17, 18, 19, 20, 1]},
    ]
    batch = DataCollatorForPreference(pad_token_id=0)(rows)
    if method == "dpo":
        module = DPOModule(tiny_model_dir, random_init=True)
        logps, stats, mask = module.concatenated_forward(batch)
    else:
        module = KTOModule(tiny_model_dir, random_init=True)
        logps, stats, mask = module.completion_logps(
            batch["input_ids"], batch["attention_mask"], batch["completion_mask"], with_stats=True
        )
    logps.sum().backward()
    chunked_grads = _grads(module)

    logits_to_keep = _logits_to_keep(batch["completion_mask"])
    logits = module(batch["input_ids"], batch["attention_mask"], logits_to_keep=logits_to_keep)[:, :-1]
    labels = batch["input_ids"][:, -logits.shape[1] :]
    expected, expected_stats = _naive(logits, labels)
    expected_logps = masked_sum(expected, mask, dim=1)
    expected_logps.sum().backward()
    torch.testing.assert_close(logps, expected_logps, **TOL)
    torch.testing.assert_close(stats.entropy[mask], expected_stats.entropy[mask], **TOL)
    torch.testing.assert_close(stats.mean_logit[mask], expected_stats.mean_logit[mask], **TOL)
    for got, want in zip(chunked_grads, _grads(module), strict=True):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_grpo_and_rloo_forward_equals_full_logits(method, tiny_model_dir):
    """GRPO's and RLOO's forward: per-token log-probs and entropies of the temperature-scaled policy on
    left-padded rows, and their gradients, equal the full-logits ones."""
    module_class = GRPOModule if method == "grpo" else RLOOModule
    module = module_class(
        tiny_model_dir,
        random_init=True,
        reward_funcs=[PatternFractionReward(pattern="[0-9]")],
        temperature=0.7,
    )
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, 128, (4, 13), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding of a shorter prompt
    completion_length = 6
    weights = torch.randn(4, completion_length, generator=g)

    per_token_logps, entropies = module(input_ids, attention_mask, completion_length, compute_entropy=True)
    (per_token_logps * weights).sum().backward()
    chunked_grads = _grads(module)

    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = module.model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).logits
    expected, stats = _naive(logits[:, -completion_length - 1 : -1] / 0.7, input_ids[:, -completion_length:])
    (expected * weights).sum().backward()
    torch.testing.assert_close(per_token_logps, expected, **TOL)
    torch.testing.assert_close(entropies, stats.entropy, **TOL)
    for got, want in zip(chunked_grads, _grads(module), strict=True):
        torch.testing.assert_close(got, want, **TOL)


# ---------------------------------------------------------------------------------------------
# Peak memory at a 150k vocabulary
# ---------------------------------------------------------------------------------------------
VOCAB, ROWS, COMPLETION = 150_000, 4, 256  # completion tokens per row: COMPLETION, then 2 * COMPLETION

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from lit_posttrain import GRPOModule
    from lit_posttrain.ops import selective_log_softmax
    from lit_posttrain.rewards import PatternFractionReward

    torch.set_num_threads(1)
    tiny_model_dir, vocab, rows, completion = sys.argv[1], *map(int, sys.argv[2:])
    module = GRPOModule(
        tiny_model_dir, random_init=True, reward_funcs=[PatternFractionReward(pattern="[0-9]")],
        model_config={"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                      "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 64},
    )

    def step(path, completion_length):  # the log-prob + backward of a GRPO-style micro-batch
        input_ids = torch.randint(4, vocab, (rows, 8 + completion_length))
        attention_mask = torch.ones_like(input_ids)
        if path == "chunked":
            per_token_logps, entropies = module(input_ids, attention_mask, completion_length, compute_entropy=True)
        else:  # from full logits, as before chunking
            logits = module.model(
                input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=completion_length + 1
            ).logits[:, :-1]
            per_token_logps = selective_log_softmax(logits, input_ids[:, -completion_length:])
        per_token_logps.mean().backward()
        module.model.zero_grad(set_to_none=False)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the peak so far (ru_maxrss: KiB)

    # each path's growth from its own smaller step (which also settles one-time buffers); the full path
    # runs second, so its growth is measured from the larger of its smaller step's peak and the chunked
    # path's (a lower bound of its own growth)
    peaks = {path: [step(path, completion), step(path, 2 * completion)] for path in ("chunked", "full")}
    print(json.dumps(peaks))
    """
)


def test_peak_memory_does_not_grow_with_vocab_times_tokens(tiny_model_dir):
    """At vocab 150k (hidden 64, 1 layer), doubling a GRPO micro-batch's completion tokens (4 x 256 -> 4 x 512)
    grows the peak RSS of its log-prob + backward step by less than a quarter of the added tokens' full
    logits (4 x 256 x 150k x 4 bytes = 586 MiB); the full-logits computation, measured the same way in
    the same fresh process, grows by more than those logits (the measurement sees torch's CPU
    allocations). Both steps hold more positions (1,024 and 2,048) than the log-softmax the chunked path keeps
    for backward (`ops.LOGITS_KEEP_NUMEL`, 512 MiB: the trailing chunks within 883 positions at this
    vocabulary; the chunks before them are recomputed), so what it keeps is the same in both steps and
    its growth is allocator noise of up to about one chunk (64 MiB of logits)."""
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, tiny_model_dir, str(VOCAB), str(ROWS), str(COMPLETION)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    (chunked_before, chunked_after), (full_before, full_after) = peaks["chunked"], peaks["full"]
    added_logits = ROWS * COMPLETION * VOCAB * 4
    print(
        f"\npeak RSS, 4 x 256 -> 4 x 512 completion tokens at vocab 150k: chunked {chunked_before / 2**20:.0f} -> "
        f"{chunked_after / 2**20:.0f} MiB; full logits {full_before / 2**20:.0f} -> {full_after / 2**20:.0f} MiB; "
        f"the added tokens' logits: {added_logits / 2**20:.0f} MiB"
    )
    # ru_maxrss is the process's high-water mark: the full path's growth is measured from at least its own
    # smaller step's peak (equal when that step stays under the chunked path's peak), so it is a lower bound
    assert full_before >= chunked_after
    assert full_after - full_before > added_logits
    assert chunked_after - chunked_before < added_logits / 4
