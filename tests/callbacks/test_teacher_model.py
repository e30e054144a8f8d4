"""TeacherModel (and ReferenceModel(model_name_or_path)): a frozen model loaded from its own path, its own dtype,
outside the module, with the vocabulary checked at setup. (Training with it: tests/experimental/test_gkd.py.)"""

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_posttrain import SFTModule, load_model
from lit_posttrain.callbacks import ReferenceModel
from lit_posttrain.callbacks.reference_model import TeacherModel, find_reference_model, find_teacher_model

TEACHER = Path(__file__).resolve().parents[2] / "examples" / "tiny-teacher"
STUDENT = Path(__file__).resolve().parents[2] / "examples" / "tiny-student"


def set_up(callback, module):
    """Run the callback's setup as fit does (CPU, 32-bit), without training."""
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, callbacks=[callback]
    )
    callback.setup(trainer, module, "fit")
    return trainer


def student(**kwargs):
    return SFTModule(str(STUDENT), random_init=True, **kwargs)


def batch():
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, 100, (3, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0  # a left-padded row
    return input_ids, attention_mask


def test_teacher_is_the_loaded_model_frozen_and_outside_the_module():
    """The teacher's logits are those of the shipped teacher loaded directly (bit-exact), in eval mode without
    gradients; it is not among the student's parameters or state_dict; logits_to_keep keeps the last positions."""
    module = student()
    teacher = TeacherModel(str(TEACHER))
    set_up(teacher, module)
    input_ids, attention_mask = batch()
    direct = load_model(str(TEACHER)).eval()
    with torch.no_grad():
        expected = direct(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logits = teacher.forward(input_ids, attention_mask)
    assert logits.shape == (3, 9, 128) and not logits.requires_grad
    assert torch.equal(logits, expected)
    # the last 4 positions only (a smaller head matmul: equal up to float32 rounding)
    torch.testing.assert_close(teacher.forward(input_ids, attention_mask, logits_to_keep=4), expected[:, -4:])
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    assert len(list(teacher.model.parameters())) > len(list(module.model.parameters()))  # 2 layers vs 1
    module_ptrs = {p.data_ptr() for p in module.parameters()} | {
        t.data_ptr() for t in module.state_dict().values()
    }
    assert not module_ptrs & {p.data_ptr() for p in teacher.model.parameters()}
    assert find_teacher_model(set_up(TeacherModel(str(TEACHER)), module), "GKD") is not None


def test_teacher_dtype():
    """dtype="bfloat16": the teacher's parameters are bfloat16 (the student stays float32) and its logits are those
    of the float32 teacher up to bfloat16 rounding."""
    module = student()
    teacher = TeacherModel(str(TEACHER), dtype="bfloat16")
    set_up(teacher, module)
    assert {p.dtype for p in teacher.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    float_teacher = TeacherModel(str(TEACHER))
    set_up(float_teacher, module)
    input_ids, attention_mask = batch()
    torch.testing.assert_close(
        teacher.forward(input_ids, attention_mask).float(), float_teacher.forward(input_ids, attention_mask),
        atol=0.25, rtol=0.05,
    )  # fmt: skip


def test_logit_width_mismatch_names_both_models():
    """A student whose vocabulary is 256 wide against the 128-wide teacher: ValueError at setup naming both and sizes."""
    module = SFTModule(str(STUDENT), random_init=True, model_config={"vocab_size": 256})
    with pytest.raises(
        ValueError, match=r"teacher model .*tiny-teacher has 128 logits .* policy .*tiny-student has 256"
    ):
        set_up(TeacherModel(str(TEACHER)), module)


def test_tokenizer_mismatch_names_both_paths_and_sizes(tmp_path):
    """Same logit width, but the teacher's tokenizer has one more token: ValueError naming both tokenizers, their
    sizes and a differing (token, id) pair."""
    other = tmp_path / "other-tokenizer"
    other.mkdir()
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TEACHER / name, other / name)
    tokenizer = json.loads((TEACHER / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    size = len(vocab)
    vocab["\u00e9"] = size  # a token the student does not have
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(
        ValueError,
        match=rf"(?s)teacher tokenizer .*other-tokenizer has {size + 1} tokens.*tiny-student.* has {size}.*'\u00e9'",
    ):
        set_up(TeacherModel(str(TEACHER), tokenizer_name_or_path=str(other)), student())


def test_missing_teacher_names_the_method():
    """find_teacher_model without a TeacherModel: RuntimeError naming the method and how to add one."""
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(
        RuntimeError, match=r"GKD needs exactly one lit_posttrain.callbacks.TeacherModel .* has 0\. Add one"
    ):
        find_teacher_model(trainer, "GKD")
    with pytest.raises(RuntimeError, match="not set up yet"):
        TeacherModel(str(TEACHER)).forward(*batch())


def test_reference_loaded_from_its_own_path():
    """ReferenceModel(model_name_or_path=teacher): the reference is that model (its logits, bit-exact), not a copy of
    the policy; dtype without a path is rejected naming the option."""
    module = student()
    reference = ReferenceModel(model_name_or_path=str(TEACHER))
    trainer = set_up(reference, module)
    assert find_reference_model(trainer, "DPO") is reference
    input_ids, attention_mask = batch()
    teacher = TeacherModel(str(TEACHER))
    set_up(teacher, module)
    assert torch.equal(
        reference.forward(input_ids, attention_mask), teacher.forward(input_ids, attention_mask)
    )
    with torch.no_grad():
        policy_logits = module.model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert not torch.allclose(policy_logits, reference.forward(input_ids, attention_mask))
    assert not reference.model.training and not any(p.requires_grad for p in reference.model.parameters())
    with pytest.raises(ValueError, match="dtype applies to a reference loaded from model_name_or_path"):
        ReferenceModel(dtype="bfloat16")
