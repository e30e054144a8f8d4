"""A tiny model recipe for tests, examples and the quickstarts: no network needed.

`make_tiny_model_dir(path)` writes a Hugging Face model directory *without weights*: a
character-level tokenizer built locally with `tokenizers` (with a ChatML chat template whose
assistant turns are wrapped in `{% generation %}` so assistant-only masks work) and a Llama- or
Qwen2-style `config.json` (Llama by default: for ``qwen2`` transformers replaces a generic
tokenizer with its own Qwen2 class) with head_dim 64 (vLLM's CPU attention kernels reject 16). Load it with
`load_model(path, random_init=True)`; the project ships one at `examples/tiny-model`.

    python -m lit_posttrain.tiny examples/tiny-model
"""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD, EOS, IM_START, IM_END = "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, EOS, IM_START, IM_END]
VOCAB_SIZE = 128  # 4 special tokens + 96 characters, rounded up

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer():
    """A character-level `PreTrainedTokenizerFast`: one token per printable ASCII character."""
    chars = list(string.printable[:95]) + ["\n"]  # digits, letters, punctuation, space, newline
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=None,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def tiny_config(arch: Literal["llama", "qwen2"] = "llama", **overrides) -> dict:
    """The tiny model's config as a dict (about 0.5M parameters; head_dim 64)."""
    config = {
        "model_type": arch,
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 1,
        "torch_dtype": "float32",
    }
    config.update(overrides)
    return config


def make_tiny_model_dir(path: str | Path, arch: Literal["llama", "qwen2"] = "llama", **overrides) -> Path:
    """Write tokenizer files, `config.json` and `generation_config.json` (no weights) to `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer().save_pretrained(path)
    # name the generic class: for some model types (qwen2 among them) transformers otherwise
    # swaps in that model's own tokenizer class, which re-tokenizes with a byte-level pre-tokenizer
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (path / "config.json").write_text(json.dumps(tiny_config(arch, **overrides), indent=2) + "\n")
    generation_config = {"eos_token_id": [1, 3], "pad_token_id": 0, "bos_token_id": 1}
    (path / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    return path


if __name__ == "__main__":
    print(make_tiny_model_dir(sys.argv[1] if len(sys.argv) > 1 else "examples/tiny-model"))
