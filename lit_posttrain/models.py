"""Model and tokenizer loading, shared by every method.

A model comes from a hub id, a local directory with weights, or (``random_init=True``) only a
config: the directory's ``config.json`` (optionally updated by ``model_config``), or a
``model_config`` dict with a ``model_type`` alone. LoRA adapters come from a `LoRAConfig`, which
maps one to one onto YAML fields.

QLoRA (``quantization``, docs/qlora.md): the base is loaded in 4-bit (NF4 / FP4) or 8-bit with
bitsandbytes (``pip install 'lit-posttrain[qlora]'``; bitsandbytes >= 0.48 runs it on CPU too), frozen,
and trained through LoRA adapters only. The quantization dict holds transformers' `BitsAndBytesConfig`
fields, e.g. ``{"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype":
"bfloat16", "bnb_4bit_use_double_quant": True}``. Exports and vLLM weight syncs dequantize the base
(`dequantized_weight`, `dequantize_state_dict`): a quantized model is never written as such.
Strategies: single device and DDP; FSDP2 (``ModelParallelStrategy``) is refused (bitsandbytes' packed
4-bit weights cannot be sharded by ``fully_shard``).
"""

from __future__ import annotations

import copy
import difflib
import inspect
import os
import tempfile
from dataclasses import dataclass
from typing import Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as transformers_logging

DType = Literal["auto", "float32", "bfloat16", "float16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
QLORA_INSTALL_HINT = "quantization needs bitsandbytes: pip install 'lit-posttrain[qlora]'"


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


# a checkpoint's hyperparameters hold the LoRAConfig: plain data, allowed in weights-only loads (resume)
torch.serialization.add_safe_globals([LoRAConfig])


def check_local_path(name_or_path: str, option: str) -> None:
    """A path that is meant to be local (``./x``, ``/x``, ``~/x``, or ``dir/x`` with ``dir`` here) but does
    not exist is a typo: say so, instead of the hub connection error its lookup as a hub id gives."""
    path = os.path.expanduser(str(name_or_path))
    if os.path.exists(path):
        return
    parent = os.path.dirname(path.rstrip("/"))
    if str(name_or_path).startswith((".", "/", "~")) or (parent and os.path.isdir(parent)):
        entries = sorted(os.listdir(parent or ".")) if os.path.isdir(parent or ".") else []
        close = difflib.get_close_matches(os.path.basename(path.rstrip("/")), entries, n=3, cutoff=0.6)
        near = close + [e for e in entries if e not in close][: max(0, 8 - len(close))]  # the closest first
        raise FileNotFoundError(
            f"{option} {name_or_path!r}: no such local directory"
            + (f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else "")
            + (f" ({parent}/ holds: {', '.join(near)}{', ...' if len(entries) > len(near) else ''})" if near else "")
            + "; a hub id has the form 'org/name' and needs no local folder of that name"
        )


def load_tokenizer(
    name_or_path: str | PreTrainedTokenizerBase, *, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load a tokenizer; a pad token is set to EOS when the tokenizer has none."""
    if isinstance(name_or_path, PreTrainedTokenizerBase):
        return name_or_path
    check_local_path(name_or_path, "tokenizer_name_or_path")
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
    quantization: dict | None = None,
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
        quantization: QLoRA: `BitsAndBytesConfig` fields (``load_in_4bit`` or ``load_in_8bit`` and
            their ``bnb_*`` options). Needs ``lora``. The base is quantized at load time (with
            ``random_init``: the seeded random weights, then quantized) and prepared with PEFT's
            ``prepare_model_for_kbit_training`` (frozen base, non-quantized float weights in fp32,
            input gradients and non-reentrant checkpointing when ``gradient_checkpointing``).

    The model is returned in train mode (``from_pretrained`` returns eval mode, which would
    silently switch dropout off for a whole run); a caller that only infers calls ``eval()``.
    """
    if name_or_path is None and not (random_init and model_config and "model_type" in model_config):
        raise ValueError(
            "model_name_or_path is required, unless random_init=True and model_config names a 'model_type'"
        )
    quantization_config = bitsandbytes_config(quantization, lora)
    model_config = dict(model_config or {})
    if name_or_path is not None:
        check_local_path(name_or_path, "model_name_or_path")
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
        if quantization_config is not None:
            model = _quantized_copy(model, auto_class, quantization_config, kwargs)
    else:
        if os.path.isdir(name_or_path) and not _has_weights(name_or_path):
            raise FileNotFoundError(
                f"{name_or_path} has no model weights (*.safetensors / *.bin). "
                "Set random_init: true to build the model from its config.json with random weights."
            )
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        model = auto_class.from_pretrained(name_or_path, config=config, dtype=torch_dtype, **kwargs)
    if random_init and name_or_path is not None and os.path.isfile(os.path.join(name_or_path, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(name_or_path)

    model.train()
    if disable_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0

    if quantization_config is not None:
        # TRL's QLoRA preparation: base frozen, float weights that are not quantized upcast to fp32,
        # input gradients and checkpointing when asked
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        _register_4bit_load_hooks(model)
        if gradient_checkpointing:
            model.config.use_cache = False
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora is not None:
        if gradient_checkpointing:
            model.enable_input_require_grads()
        peft_task = "CAUSAL_LM" if task == "causal-lm" else "SEQ_CLS"
        model = get_peft_model(model, lora.to_peft(peft_task))
    return model


def bitsandbytes_config(quantization: dict | None, lora: LoRAConfig | None) -> BitsAndBytesConfig | None:
    """transformers' `BitsAndBytesConfig` for the ``quantization`` option (None: no quantization).

    Raises ``ValueError`` naming the key for an unknown field, no ``load_in_4bit`` / ``load_in_8bit``,
    or a missing ``lora``; ``ImportError`` without bitsandbytes."""
    if quantization is None:
        return None
    fields = [name for name in inspect.signature(BitsAndBytesConfig.__init__).parameters if name not in ("self", "kwargs")]
    unknown = sorted(set(quantization) - set(fields))
    if unknown:
        raise ValueError(f"quantization: unknown key(s) {unknown}; the keys are transformers' BitsAndBytesConfig fields {fields}")
    if bool(quantization.get("load_in_4bit")) == bool(quantization.get("load_in_8bit")):
        raise ValueError(
            "quantization: set exactly one of load_in_4bit: true (QLoRA, NF4/FP4) or load_in_8bit: true, "
            f"got {quantization}"
        )
    if lora is None:
        raise ValueError(
            "quantization needs lora: a quantized base is frozen and only LoRA adapters train (QLoRA); "
            "set lora (e.g. lora: {r: 16, alpha: 32}) or remove quantization"
        )
    try:
        import bitsandbytes  # noqa: F401 (optional dependency: QLoRA)
    except ImportError as err:
        raise ImportError(QLORA_INSTALL_HINT) from err
    return BitsAndBytesConfig(**quantization)


def _quantized_copy(model: PreTrainedModel, auto_class, quantization_config: BitsAndBytesConfig, kwargs: dict) -> PreTrainedModel:
    """``model`` (random init) quantized by transformers' own loader: saved to a temporary directory and
    loaded back with ``quantization_config`` (so it is exactly what a checkpoint of these weights gives)."""
    name_or_path = model.config.name_or_path
    progress_bar = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # "Writing model shards" / "Loading weights" of a temporary copy
    try:
        with tempfile.TemporaryDirectory(prefix="lit-posttrain-qlora-") as tmp:
            model.save_pretrained(tmp)
            dtype = model.dtype
            del model
            quantized = auto_class.from_pretrained(tmp, dtype=dtype, quantization_config=quantization_config, **kwargs)
    finally:
        if progress_bar:
            transformers_logging.enable_progress_bar()
    quantized.config.name_or_path = name_or_path  # where the architecture came from, not the temporary copy
    quantized.name_or_path = name_or_path
    return quantized


def is_quantized(model) -> bool:
    """Whether ``model`` (or the model a PEFT model wraps) was loaded with a bitsandbytes quantization."""
    return getattr(unwrap_peft(model), "hf_quantizer", None) is not None  # how transformers itself tells


def export_dtype(model) -> torch.dtype:
    """The dtype a quantized model's base is dequantized to for export and vLLM: the load ``dtype``."""
    return unwrap_peft(model).config.dtype


def plain_config(config):
    """A copy of a model config without its ``quantization_config``: what an export or a vLLM engine of the
    dequantized model reads (a ``quantization_config`` in config.json would make loaders quantize again)."""
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):  # set by from_pretrained(quantization_config=...) only
        del config.quantization_config
    return config


def dequantized_weight(linear: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The float weight (out, in) of a linear layer: bitsandbytes 4-bit / 8-bit weights dequantized."""
    weight = linear.weight.detach()
    if weight.dtype in (torch.uint8, torch.int8) and not weight.is_floating_point():
        import bitsandbytes as bnb

        if isinstance(linear, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(weight, linear.weight.quant_state)
        elif isinstance(linear, bnb.nn.Linear8bitLt):
            # row-wise absmax scales: on the weight once moved to its device, else on the layer state (as bnb saves them)
            scb = getattr(linear.weight, "SCB", None)
            scb = linear.state.SCB if scb is None else scb
            weight = weight.float() * scb.float()[:, None] / 127.0
    return weight if dtype is None else weight.to(dtype)


def dequantized_numel(param: torch.Tensor) -> int:
    """Elements of a parameter once dequantized (a packed 4-bit weight holds two per byte)."""
    quant_state = getattr(param, "quant_state", None)  # bitsandbytes Params4bit
    return param.numel() if quant_state is None else quant_state.shape.numel()


def dequantize_state_dict(model, state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``state_dict`` (names as in ``model.state_dict()``) with every bitsandbytes layer's weight
    dequantized to ``dtype`` and its quantization statistics dropped: the state dict of the same
    architecture with plain ``nn.Linear`` layers. Works from saved tensors (a checkpoint), not the module."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    state_dict = dict(state_dict)
    for name, module in model.named_modules():
        key = f"{name}.weight" if name else "weight"
        if isinstance(module, bnb.nn.Linear4bit):
            stats = {k[len(key) + 1 :]: state_dict.pop(k) for k in list(state_dict) if k.startswith(key + ".")}
            quant_state = QuantState.from_dict(stats, device=torch.device("cpu"))
            state_dict[key] = bnb.functional.dequantize_4bit(state_dict[key].cpu(), quant_state).to(dtype)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            prefix = key.removesuffix("weight")
            scb = state_dict.pop(prefix + "SCB").float()
            state_dict.pop(prefix + "weight_format", None)
            state_dict[key] = (state_dict[key].float() * scb[:, None] / 127.0).to(dtype)
    return state_dict


def _register_4bit_load_hooks(model: torch.nn.Module) -> None:
    """Let ``load_state_dict`` (Lightning's resume, strict) read back what 4-bit layers save: the packed
    weight is copied as usual, the quantization statistics saved beside it (``weight.absmax``,
    ``weight.quant_map``, ``weight.quant_state.*``) become the layer's quant state. (8-bit layers load
    their ``SCB`` themselves.)"""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    def load_quant_state(module, state_dict, prefix, *args):
        key = prefix + "weight"
        stats = {k[len(key) + 1 :]: state_dict.pop(k) for k in list(state_dict) if k.startswith(key + ".")}
        if stats:
            module.weight.quant_state = module.quant_state = QuantState.from_dict(stats, device=module.weight.device)

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module._register_load_state_dict_pre_hook(load_quant_state, with_module=True)
            # bitsandbytes repacks a 4-bit layer for its AVX512-bf16 CPU kernel at the first no-grad eval
            # forward, rounding its scales to bf16 for good: the base would change under validation and
            # generation, and exports would differ with the moment they are taken. Keep one layout.
            module.support_avx512bf16_for_cpu = False


def _has_weights(path: str) -> bool:
    return any(name.endswith((".safetensors", ".bin")) for name in os.listdir(path))


def unwrap_peft(model) -> PreTrainedModel:
    """The underlying transformers model of a PEFT model (the model itself otherwise)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def is_peft_model(model) -> bool:
    return isinstance(model, PeftModel)


def final_hidden_states(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, T, H) final hidden states of a causal LM (after its last norm: what ``lm_head`` reads), from
    one forward that computes no logits. Turn them into log-probs chunk by chunk with
    `lit_posttrain.ops.chunked_selective_log_softmax` and ``model.get_output_embeddings()``.

    The forward is the model's own (root) call with ``logits_to_keep`` an empty index tensor (the head
    runs on zero positions), so whatever wraps the root forward keeps working: PEFT (LoRA, QLoRA) and
    FSDP2, whose root module unshards its parameters (embedding, final norm, ``lm_head``) for the
    forward and, with the default ``reshard_after_forward`` of a root, keeps them unsharded until its
    backward: the head called afterwards reads the full weight and its gradient reaches the
    reduce-scatter. (A root sharded with ``reshard_after_forward=True``, as the frozen models of
    `lit_posttrain.callbacks.ReferenceModel` are, needs ``model.unshard()`` around the head's calls.)
    The hidden states are taken by a forward hook on ``model.get_decoder()``
    (``output_hidden_states=True`` would also keep every layer's output alive).
    """
    captured = []
    hook = model.get_decoder().register_forward_hook(
        lambda module, args, output: captured.append(output.last_hidden_state)
    )
    try:
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=input_ids.new_empty(0),  # no logits: the caller applies the head in chunks
            use_cache=False,
        )
    finally:
        hook.remove()
    return captured[-1]


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated transformer blocks of a (PEFT-wrapped) model: the units FSDP2 shards."""
    if is_quantized(model):
        raise ValueError(
            "quantization (QLoRA) does not support FSDP2 (ModelParallelStrategy): bitsandbytes' packed 4-bit / "
            "8-bit weights cannot be sharded by fully_shard. Use strategy: ddp (each process holds the whole "
            "quantized base, which is what QLoRA makes small), or drop quantization to shard the model"
        )
    return transformer_blocks(model)


def transformer_blocks(model) -> list[torch.nn.Module]:
    """The modules of ``model`` whose class (or a base class: FSDP2's ``fully_shard`` swaps in a subclass,
    ``FSDPLlamaDecoderLayer``) the (PEFT-wrapped) model names in ``_no_split_modules``: its decoder layers."""
    layer_classes = set(unwrap_peft(model)._no_split_modules or [])
    return [m for m in model.modules() if any(cls.__name__ in layer_classes for cls in type(m).__mro__)]
