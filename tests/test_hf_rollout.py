"""`HFRollout`'s sampler: inverse-CDF draws from the warped distribution, checked by counting."""

import math

import pytest
import torch
from transformers import TopKLogitsWarper, TopPLogitsWarper

from lit_posttrain.rollout import HFRollout
from lit_posttrain.rollout.hf import InverseCDFSampling


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of ``counts`` against ``probs`` (over the tokens with probability > 0)
    and its degrees of freedom."""
    keep = probs > 0
    expected = probs[keep] * counts.sum()
    return float(((counts[keep] - expected) ** 2 / expected).sum()), int(keep.sum()) - 1


def chi_square_bound(dof: int) -> float:
    """Wilson-Hilferty's 99.99th percentile of the chi-square distribution (z = 3.72)."""
    z = 3.72
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def test_inverse_cdf_draws_follow_softmax_and_never_a_masked_token():
    torch.manual_seed(0)
    vocab = 12
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0, -6.0, 0.5, 1.5, -0.5, -2.0, 0.0, 0.0])
    logits[[2, 10, 11]] = float("-inf")  # masked, as top-k / top-p leave them
    probs = torch.softmax(logits, -1)
    rows = 200_000
    scores = InverseCDFSampling()(torch.zeros(rows, 1, dtype=torch.long), logits.expand(rows, vocab).clone())

    assert torch.isin(scores, torch.tensor([0.0, float("-inf")])).all()
    assert ((scores == 0).sum(-1) == 1).all()  # exactly one finite score per row: greedy picks it
    counts = torch.bincount(scores.argmax(-1), minlength=vocab).double()
    assert counts[[2, 10, 11]].sum() == 0
    # the rarest token (p = 4e-4) is drawn about 80 times
    assert counts[5] > 0
    statistic, dof = chi_square(counts, probs.double())
    assert statistic < chi_square_bound(dof), (statistic, dof)
    # an off-by-one in the search (the token after the drawn one) fails the same test
    shifted = torch.bincount((scores.argmax(-1) + 1) % vocab, minlength=vocab).double()
    assert chi_square(shifted[probs > 0], probs[probs > 0].double())[0] > chi_square_bound(dof)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 5, 1.0), (1.3, 0, 0.8)])
def test_rollout_samples_the_warped_next_token_distribution(
    tiny_model, tiny_tokenizer, temperature, top_k, top_p
):
    """The first sampled token of 6,000 completions of one prompt follows softmax(logits / T) after
    top-k / top-p (transformers' own warpers on the model's next-token logits), counted."""
    prompt = tiny_tokenizer("12+34=")["input_ids"]
    with torch.no_grad():
        logits = tiny_model(torch.tensor([prompt])).logits[0, -1].float()
    warped = logits[None] / temperature  # generate's order: temperature, top-k, top-p
    if top_k:
        warped = TopKLogitsWarper(top_k)(None, warped)
    if top_p < 1.0:
        warped = TopPLogitsWarper(top_p)(None, warped)
    warped = warped[0]
    probs = torch.softmax(warped, -1).double()
    kept = int((probs > 0).sum())
    assert 2 <= kept < logits.numel()  # the warpers mask something, and leave a choice

    torch.manual_seed(0)
    out = HFRollout(tiny_tokenizer).generate(
        tiny_model,
        [prompt],
        num_generations=6000,
        max_completion_length=1,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
    counts = torch.bincount(
        torch.tensor([ids[0] for ids in out.completion_ids]), minlength=logits.numel()
    ).double()
    assert counts[probs == 0].sum() == 0
    statistic, dof = chi_square(counts, probs)
    assert statistic < chi_square_bound(dof), (statistic, dof)


def test_rollout_greedy_is_the_argmax_and_sampling_is_seeded(tiny_model, tiny_tokenizer):
    prompt = tiny_tokenizer("7+8=")["input_ids"]
    rollout = HFRollout(tiny_tokenizer)
    greedy = rollout.generate(tiny_model, [prompt], max_completion_length=6, do_sample=False)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(len(greedy.completion_ids[0])):
            ids.append(int(tiny_model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert greedy.completion_ids[0] == ids[len(prompt) :]

    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        draws.append(
            rollout.generate(tiny_model, [prompt], num_generations=4, max_completion_length=8).completion_ids
        )
    assert draws[0] == draws[1]
    assert len({tuple(ids) for ids in draws[0]}) > 1  # sampled, not greedy
