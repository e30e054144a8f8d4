import json

import torch

from lit_posttrain.models import load_model
from lit_posttrain.tiny import make_tiny_model_dir


def test_shipped_tiny_model_matches_recipe(tmp_path, tiny_model_dir):
    """examples/tiny-model is exactly what lit_posttrain.tiny generates (no hand edits drift)."""
    fresh = make_tiny_model_dir(tmp_path / "tiny")
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json"):
        shipped = json.loads(open(f"{tiny_model_dir}/{name}").read())
        assert json.loads((fresh / name).read_text()) == shipped, name


def test_tiny_tokenizer_round_trips_characters(tiny_tokenizer):
    """The character tokenizer gives one token per character and decodes back to the text."""
    text = "12+7=19 hello\nWorld!"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character, whitespace kept
    assert tiny_tokenizer.decode(ids) == text


def test_tiny_model_seeded_and_vllm_friendly(tiny_model_dir):
    """Random init is reproducible from init_seed; head_dim is 64 (vLLM's CPU kernels reject 16)."""
    a = load_model(tiny_model_dir, random_init=True, init_seed=1)
    b = load_model(tiny_model_dir, random_init=True, init_seed=1)
    c = load_model(tiny_model_dir, random_init=True, init_seed=2)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.config.head_dim == 64
    assert a.generation_config.eos_token_id == [1, 3]


def test_directory_without_weights_needs_random_init(tiny_model_dir):
    """Loading a weightless directory without random_init fails and says to set it."""
    import pytest

    with pytest.raises(FileNotFoundError, match="random_init: true"):
        load_model(tiny_model_dir)
