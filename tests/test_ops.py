"""Each op in lit_posttrain.ops against its naive form."""

import pytest
import torch
import torch.nn.functional as F

from lit_posttrain.ops import entropy_from_logits, masked_mean, masked_sum, pad, selective_log_softmax


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_selective_log_softmax_matches_naive(dtype):
    """Gathered log-probs equal log_softmax(...).gather(...) (bf16 within its precision)."""
    torch.manual_seed(0)
    logits = (torch.randn(19, 7, 50) * 4).to(dtype)
    index = torch.randint(0, 50, (19, 7))
    naive = F.log_softmax(logits.float(), -1).gather(-1, index[..., None])[..., 0]
    out = selective_log_softmax(logits, index)
    assert out.shape == (19, 7) and out.dtype == dtype
    if dtype == torch.bfloat16:  # computed in float32, rounded once to bf16 (8 mantissa bits)
        torch.testing.assert_close(out.float(), naive, atol=1e-2, rtol=2**-8)
    else:
        torch.testing.assert_close(out.float(), naive, atol=1e-5, rtol=0)


def test_selective_log_softmax_gradient_matches_naive():
    """selective_log_softmax's gradient equals that of log_softmax + gather."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    index = torch.randint(0, 11, (3, 5))
    selective_log_softmax(logits, index).sum().backward()
    grad = logits.grad.clone()
    logits.grad = None
    F.log_softmax(logits, -1).gather(-1, index[..., None]).sum().backward()
    torch.testing.assert_close(grad, logits.grad)


def test_entropy_matches_naive():
    """Chunked entropy equals -sum p log p, and log V for uniform logits."""
    torch.manual_seed(0)
    logits = torch.randn(10, 4, 30)
    p = logits.softmax(-1)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=3), -(p * p.log()).sum(-1))
    # uniform logits: entropy = log V
    assert entropy_from_logits(torch.zeros(1, 8)).item() == pytest.approx(torch.log(torch.tensor(8.0)).item())


def test_masked_mean_and_sum():
    """Masked sums and means count only masked-in values; an empty row's mean is 0, not NaN."""
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert masked_sum(values, mask).item() == 3.0
    assert masked_mean(values, mask).item() == 1.5
    assert masked_mean(values, mask, dim=1).tolist() == [1.5, 0.0]  # empty row: 0, not NaN


def test_pad_left_and_right():
    """pad fills on the side asked for and rejects an unknown side."""
    seqs = [torch.tensor([1, 2, 3]), torch.tensor([4])]
    assert pad(seqs, 0).tolist() == [[1, 2, 3], [4, 0, 0]]
    assert pad(seqs, 9, padding_side="left").tolist() == [[1, 2, 3], [9, 9, 4]]
    with pytest.raises(ValueError, match="padding_side"):
        pad(seqs, 0, padding_side="middle")


def test_grad_norm_matches_the_norm_of_all_gradients():
    """grad_norm is the L2 norm of every gradient flattened together, as clip_grad_norm_ reports it."""
    from lit_posttrain.ops import grad_norm

    a, b, frozen = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
    assert grad_norm([a, b, frozen]).item() == pytest.approx(5.0)  # sqrt(3^2 + 4^2)
    assert grad_norm([frozen]).item() == 0.0
