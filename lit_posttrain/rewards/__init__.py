"""Built-in reward functions: callables ``(prompts, completions, **dataset_columns) -> list[float | None]``."""
