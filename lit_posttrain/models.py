"""Model and tokenizer loading, shared by every method.

A model comes from a hub id, a local directory with weights, or (``random_init=True``) only a
config: the directory's ``config.json`` (optionally updated by ``model_config``), or a
``model_config`` dict with a ``model_type`` alone. LoRA adapters come from a `LoRAConfig`, which
maps one to one onto YAML fields.

QLoRA (GPU only) is not wired in: see README "LoRA and QLoRA".
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

DType = Literal["auto", "float32", "bfloat16", "float16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


@dataclass
class LoRAConfig:
    """LoRA adapter settings (PEFT `LoraConfig` fields with the usual names).

    Args:
        r: adapter rank.
        alpha: scaling numerator (`lora_alpha`); the update is scaled by ``alpha / r``.
        dropout: dropout on the adapter input.
        target_modules: module names to adapt, or ``"all-linear"`` for every linear layer but the head.
        modules_to_save: extra modules trained in full and saved with the adapter (e.g. ``["score"]``).
        use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] | None = None
    use_rslora: bool = False

    def to_peft(self, task_type: str):
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            modules_to_save=self.modules_to_save,
            use_rslora=self.use_rslora,
            task_type=task_type,
        )


def load_tokenizer(
    name_or_path: str | PreTrainedTokenizerBase, *, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load a tokenizer; a pad token is set to EOS when the tokenizer has none."""
    if isinstance(name_or_path, PreTrainedTokenizerBase):
        return name_or_path
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | None,
    *,
    task: Literal["causal-lm", "sequence-classification"] = "causal-lm",
    random_init: bool = False,
    model_config: dict | None = None,
    init_seed: int = 0,
    dtype: DType = "float32",
    attn_implementation: str | None = None,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    lora: LoRAConfig | None = None,
    num_labels: int = 1,
    pad_token_id: int | None = None,
    disable_dropout: bool = False,
) -> PreTrainedModel:
    """Load (or build, with ``random_init``) a model for ``task`` and optionally wrap it in LoRA.

    Args:
        name_or_path: hub id or local directory. May be None only with ``random_init`` and a
            ``model_config`` that names its ``model_type``.
        random_init: build from the config with freshly initialised weights (seeded by ``init_seed``).
        model_config: config fields to override (or, with ``random_init`` and no path, the whole config).
        dtype: parameter dtype at load time. Lightning's ``precision`` still decides compute dtype.
        attn_implementation: e.g. ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``.
        gradient_checkpointing: recompute activations in the backward pass (non-reentrant).
        lora: wrap the model in PEFT LoRA adapters; the base weights are frozen.
        num_labels: output size of a sequence-classification head.
        pad_token_id: the id the collator pads with (sequence classification). The head reads its
            score at the last token that is not ``config.pad_token_id``, so the two must agree; None
            keeps the config's pad id (EOS when it has none).
        disable_dropout: set every ``torch.nn.Dropout`` to ``p=0`` (TRL's ``disable_dropout``;
            dropout applied inside attention kernels from a config float is not affected).

    The model is returned in train mode (``from_pretrained`` returns eval mode, which would
    silently switch dropout off for a whole run); a caller that only infers calls ``eval()``.
    """
    if name_or_path is None and not (random_init and model_config and "model_type" in model_config):
        raise ValueError(
            "model_name_or_path is required, unless random_init=True and model_config names a 'model_type'"
        )
    model_config = dict(model_config or {})
    if name_or_path is None:
        config = AutoConfig.for_model(**model_config)
    else:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **model_config)
    if task == "sequence-classification":
        config.num_labels = num_labels
        if pad_token_id is not None:
            config.pad_token_id = pad_token_id
        elif config.pad_token_id is None:
            config.pad_token_id = config.eos_token_id if isinstance(config.eos_token_id, int) else 0
    auto_class = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    kwargs = {"trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    torch_dtype = _DTYPES[dtype]

    if random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = auto_class.from_config(
                config, dtype=None if torch_dtype == "auto" else torch_dtype, **kwargs
            )
    else:
        if os.path.isdir(name_or_path) and not _has_weights(name_or_path):
            raise FileNotFoundError(
                f"{name_or_path} has no model weights (*.safetensors / *.bin). "
                "Set random_init: true to build the model from its config.json with random weights."
            )
        model = auto_class.from_pretrained(name_or_path, config=config, dtype=torch_dtype, **kwargs)
    if random_init and name_or_path is not None and os.path.isfile(os.path.join(name_or_path, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(name_or_path)

    model.train()
    if disable_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0

    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora is not None:
        if gradient_checkpointing:
            model.enable_input_require_grads()
        peft_task = "CAUSAL_LM" if task == "causal-lm" else "SEQ_CLS"
        model = get_peft_model(model, lora.to_peft(peft_task))
    return model


def _has_weights(path: str) -> bool:
    return any(name.endswith((".safetensors", ".bin")) for name in os.listdir(path))


def unwrap_peft(model) -> PreTrainedModel:
    """The underlying transformers model of a PEFT model (the model itself otherwise)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def is_peft_model(model) -> bool:
    return isinstance(model, PeftModel)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated transformer blocks of a (PEFT-wrapped) model: the units FSDP2 shards."""
    layer_classes = set(unwrap_peft(model)._no_split_modules or [])
    return [m for m in model.modules() if type(m).__name__ in layer_classes]
