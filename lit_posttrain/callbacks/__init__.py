"""Callbacks own lifecycle pieces (export, reference model, rollout engines, diagnostics, compilation);
they never change a method's math."""

from lit_posttrain.callbacks.compile import CompileLayers
from lit_posttrain.callbacks.diagnostics import LearningSignal, TrainingDiagnostics
from lit_posttrain.callbacks.hub_export import HubExport
from lit_posttrain.callbacks.reference_model import ReferenceModel, TeacherModel
from lit_posttrain.callbacks.vllm_rollout import VLLMRollout

__all__: list[str] = [
    "CompileLayers",
    "HubExport",
    "LearningSignal",
    "ReferenceModel",
    "TeacherModel",
    "TrainingDiagnostics",
    "VLLMRollout",
]
