"""Callbacks own lifecycle pieces (export, reference model, rollout engines, diagnostics); they
never change a method's math."""

__all__: list[str] = []
