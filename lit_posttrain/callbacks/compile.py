"""`CompileLayers`: the trained model's decoder layers (and, with ``loss=True``, the loss's work over the
vocabulary) through ``torch.compile`` for the length of a run.

Regional compilation: each repeated transformer block (``model._no_split_modules``: the units FSDP2
shards too) runs a compiled ``forward``, and since the blocks share one class, one compiled graph serves
them all (the first step compiles one block, forward and backward, not the whole model). Inductor fuses
the elementwise work around the matmuls (norms, rotary embeddings, activations, residual adds, the
casts): that work runs at the same speed in bfloat16 as in float32 on a CPU, so it is what keeps
bfloat16 from paying off there (docs/benchmarks.md, "bf16 on CPU"). With ``loss=True`` the per-chunk
log-softmax over the vocabulary compiles too (`lit_posttrain.ops.compile_loss_enabled`; off by default:
the eager loss, computed in place, is faster).

    trainer = L.Trainer(precision="bf16-true", callbacks=[CompileLayers()])

What it does not change: the math (values and gradients equal the eager ones up to float rounding,
tested), the module's ``state_dict`` keys, checkpoints and exports (the compiled function is set as the
layers' ``forward`` attribute; ``__call__`` and its hooks stay eager, so FSDP2's and PEFT's hooks run as
without it). The frozen models of the Trainer's `ReferenceModel` and `TeacherModel` callbacks compile
too (``frozen=True``); a copy made during the run (``copy.deepcopy``) calls the compiled function on
its own layers.

A layer called with a KV cache (``past_key_values``: generation with HF ``generate``, as GRPO's and
RLOO's default rollout does) runs eager: the cache's Python state changes with every token and would
make Dynamo recompile until it gives up. Training and validation forwards run without a cache and
compile.

Costs: the first step (and the first validation step, whose no-grad eval graph is another) waits for
Inductor: about 2 minutes on 2 CPU cores for `benchmarks/sft.py`'s model in ``bf16-true`` with
Inductor's on-disk cache cold, seconds with it warm. Inductor needs a C++ compiler on CPU and Triton on
GPU. ``dynamic=True`` (default) compiles for any sequence length at once, so varying batch shapes
(packing, padding to the longest row) do not recompile. Measured (docs/benchmarks.md, "Compiled
layers"): SFT in ``bf16-true`` 1.58x faster than eager ``bf16-true`` on a CPU with AMX, 2.10x eager
float32; float32 itself gains nothing there. Since the eager loss computes its log-softmax in place
(docs/benchmarks.md, "The loss in place"), eager float32 and ``bf16-true`` are faster and the margin is
smaller: ``bf16-true`` with the layers compiled 1.07x eager ``bf16-true`` and 2.03x eager float32 (both
with fused AdamW, the default; docs/benchmarks.md, "Fused AdamW by default"), and ``loss=True`` slower
than ``loss=False`` (hence its default).
"""

from __future__ import annotations

import types

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_posttrain import ops
from lit_posttrain.callbacks.reference_model import ReferenceModel, TeacherModel
from lit_posttrain.models import transformer_blocks


def _eager_with_a_kv_cache(eager, compiled):
    """A layer forward that runs ``compiled``, except with a KV cache (generation: HF ``generate`` in the
    rollouts, where the cache's Python state changes every token and would recompile until Dynamo gives
    up), which runs ``eager``."""

    def forward(self, *args, **kwargs):
        cache = kwargs.get("past_key_values", kwargs.get("past_key_value"))
        return (compiled if cache is None else eager)(self, *args, **kwargs)

    return forward


class CompileLayers(L.Callback):
    """Compile ``pl_module.model``'s decoder layers (and with ``loss`` the chunked loss) from
    ``on_fit_start`` to the end of the run.

    Args:
        loss: also run `lit_posttrain.ops.chunked_selective_log_softmax`'s per-chunk work through
            ``torch.compile`` (process-wide while the run lasts; restored at ``teardown``). Off by
            default: the eager loss computes its log-softmax in place, and measured 1.03-1.04x faster
            than the compiled one in ``bf16-true`` with less memory (docs/benchmarks.md).
        dynamic: ``torch.compile``'s ``dynamic``: True compiles shape-generic code once (sequence
            lengths vary from batch to batch in every method here); None lets it specialise first.
        mode: ``torch.compile``'s ``mode`` (None, "default", "reduce-overhead", "max-autotune", ...).
        backend: ``torch.compile``'s backend.
        frozen: also compile the layers of the frozen models the Trainer's `ReferenceModel` and
            `TeacherModel` callbacks hold (their no-grad forwards: one more graph to compile).
    """

    def __init__(
        self,
        *,
        loss: bool = False,
        dynamic: bool | None = True,
        mode: str | None = None,
        backend: str = "inductor",
        frozen: bool = True,
    ):
        self.loss, self.dynamic, self.mode, self.backend, self.frozen = loss, dynamic, mode, backend, frozen
        self._compiled: dict = {}  # layer class's forward function -> its compiled function
        self._layers: list[torch.nn.Module] = []  # the layers whose forward this callback set
        self._previous_compile_loss: bool | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = getattr(pl_module, "model", None)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"CompileLayers compiles the decoder layers of `pl_module.model`; {type(pl_module).__name__} "
                "has no `model` attribute holding a torch.nn.Module"
            )
        layers = transformer_blocks(model)
        if not layers:
            raise ValueError(
                f"CompileLayers found no decoder layers in {type(model).__name__}: it compiles the classes named by "
                "the model's `_no_split_modules` (every transformers causal LM names its decoder layer there)"
            )
        frozen = []  # the reference's / teacher's layers (LoRA's reference is the policy itself: no model)
        if self.frozen:
            for callback in trainer.callbacks:
                if isinstance(callback, (ReferenceModel, TeacherModel)) and isinstance(
                    callback.model, torch.nn.Module
                ):
                    frozen += transformer_blocks(callback.model)
        for layer in layers + frozen:
            function = type(layer).forward
            if function not in self._compiled:
                compiled = torch.compile(function, dynamic=self.dynamic, mode=self.mode, backend=self.backend)
                self._compiled[function] = _eager_with_a_kv_cache(function, compiled)
            # a bound method of the shared compiled function: copy.deepcopy rebinds it to the copy's layer
            layer.forward = types.MethodType(self._compiled[function], layer)
            self._layers.append(layer)
        if self.loss:
            self._previous_compile_loss, ops._compile_loss = ops._compile_loss, True
        rank_zero_info(
            f"[lit-posttrain] CompileLayers: {len(layers)} x {type(layers[0]).__name__} compiled"
            f"{f' (+ {len(frozen)} of frozen models)' if frozen else ''} "
            f"(dynamic={self.dynamic}, mode={self.mode}){', and the loss' if self.loss else ''}; the first step compiles"
        )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for layer in self._layers:
            if isinstance(layer.__dict__.get("forward"), types.MethodType):
                del layer.forward  # the class's eager forward again
        self._layers.clear()
        if self.loss:
            ops._compile_loss = self._previous_compile_loss
