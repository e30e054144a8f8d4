import copy
import types

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lit_posttrain import SFTDataModule, SFTModule, ops
from lit_posttrain.callbacks import CompileLayers, ReferenceModel
from lit_posttrain.models import decoder_layers
from tests.helpers.metrics import metrics_csv_rows


class _WatchLayers(L.Callback):
    """Records, at each training batch, whether the layers run a compiled forward and whether the loss
    compiles, and what a deep copy of the model made during the run calls."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        layers = decoder_layers(pl_module.model)
        bound = [layer.__dict__.get("forward") for layer in layers]
        copied = decoder_layers(copy.deepcopy(pl_module.model))
        self.seen.append(
            {
                "compiled": all(
                    isinstance(b, types.MethodType) and b.__self__ is layer for b, layer in zip(bound, layers)
                ),
                "one_function": len({b.__func__ for b in bound if b is not None}) == 1,
                "copy_bound_to_copy": all(c.forward.__self__ is c for c in copied),
                "loss": ops.compile_loss_enabled(),
            }
        )


def _run(tiny_model_dir, tmp_path, name, callbacks):
    L.seed_everything(0)
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(9) for b in range(0, 90, 11)]
    module = SFTModule(tiny_model_dir, random_init=True, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    # packed rows of varying length: the compiled layers see a new sequence length every step
    dm = SFTDataModule(tiny_model_dir, train_data=rows, batch_size=4, max_length=24, packing="bfd")
    logger = CSVLogger(tmp_path, name=name)
    trainer = L.Trainer(accelerator="cpu", max_steps=6, log_every_n_steps=1, logger=logger, limit_val_batches=0,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks)  # fmt: skip
    trainer.fit(module, dm)
    return module, metrics_csv_rows(logger.log_dir)


def test_compiled_run_equals_eager_and_restores(tiny_model_dir, tmp_path, monkeypatch):
    """Six SFT steps with `CompileLayers` log the eager run's losses and entropies and end at its weights
    (float rounding apart: Inductor fuses and reorders), while the layers really ran compiled (one shared
    function, rebinding under deepcopy) and the loss too; afterwards the module is eager again."""
    monkeypatch.delenv("LIT_POSTTRAIN_COMPILE_LOSS", raising=False)
    eager, eager_rows = _run(tiny_model_dir, tmp_path, "eager", [])
    watch = _WatchLayers()
    compiled, compiled_rows = _run(tiny_model_dir, tmp_path, "compiled", [CompileLayers(loss=True), watch])

    assert len(watch.seen) == 6 and all(all(seen.values()) for seen in watch.seen), watch.seen
    assert sorted(compiled_rows) == sorted(eager_rows) and len(eager_rows) == 6
    for step, row in eager_rows.items():
        for name in ("train/loss", "train/entropy"):
            assert float(compiled_rows[step][name]) == pytest.approx(float(row[name]), abs=2e-4), (step, name)
    assert (
        float(eager_rows[max(eager_rows)]["train/loss"])
        < float(eager_rows[min(eager_rows)]["train/loss"]) - 0.5
    )
    for (name, p), q in zip(eager.model.named_parameters(), compiled.model.parameters()):
        torch.testing.assert_close(q, p, atol=2e-4, rtol=1e-3, msg=name)
    # the run is over: eager forwards and the environment's choice for the loss again
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(compiled.model))
    assert ops._compile_loss is None and not ops.compile_loss_enabled()


class _Holder(L.LightningModule):
    """A LightningModule around a model, for calling the callback's hooks directly."""

    def __init__(self, model):
        super().__init__()
        self.model = model


def test_a_module_without_a_model_is_refused():
    class NoModel(L.LightningModule):
        pass

    with pytest.raises(TypeError, match=r"NoModel has no `model` attribute"):
        CompileLayers().on_fit_start(None, NoModel())


def test_generation_with_a_kv_cache_runs_eager(tiny_model):
    """HF ``generate`` with a KV cache through compiled layers: the same tokens as without the callback,
    and Dynamo never traces a frame (the cache's per-token state would recompile it until it gave up)."""
    from torch._dynamo.utils import counters

    prompt = torch.tensor([[5, 9, 14, 3]])
    torch.manual_seed(0)
    expected = tiny_model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    callback = CompileLayers(loss=False)
    callback.on_fit_start(L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False), _Holder(tiny_model))
    try:
        assert all(
            isinstance(layer.__dict__.get("forward"), types.MethodType)
            for layer in decoder_layers(tiny_model)
        )
        frames = counters["frames"]["total"]
        generated = tiny_model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        assert counters["frames"]["total"] == frames
    finally:
        callback.teardown(None, None, "fit")
    assert torch.equal(generated, expected)
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(tiny_model))


def test_the_frozen_models_layers_compile_too(tiny_model):
    """With a `ReferenceModel` on the Trainer, the reference copy's layers get the same compiled forward as
    the policy's (bound to themselves), with ``frozen=False`` they stay eager; teardown restores both."""
    for frozen in (True, False):
        reference = ReferenceModel()
        reference.model = copy.deepcopy(tiny_model)
        trainer = L.Trainer(accelerator="cpu", callbacks=[reference], logger=False, enable_progress_bar=False)
        callback = CompileLayers(frozen=frozen, loss=False)
        callback.on_fit_start(trainer, _Holder(tiny_model))
        try:  # the session's tiny_model must be eager again for the other tests, whatever fails here
            policy_forward = decoder_layers(tiny_model)[0].__dict__["forward"].__func__
            for layer in decoder_layers(reference.model):
                bound = layer.__dict__.get("forward")
                assert (bound.__func__ is policy_forward and bound.__self__ is layer) if frozen else bound is None
        finally:
            callback.teardown(trainer, None, "fit")
        assert all(
            "forward" not in layer.__dict__
            for layer in decoder_layers(reference.model) + decoder_layers(tiny_model)
        )
