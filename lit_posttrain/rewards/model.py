"""A trained reward model (sequence classification, one output) as a reward function.

    from lit_posttrain.rewards.model import RewardModelScorer

    reward = RewardModelScorer("outputs/reward/export")   # a RewardModule export, or any hub reward model
    reward(prompts, completions)                          # -> list[float], one score per completion

In a YAML's ``reward_funcs``::

    - class_path: lit_posttrain.rewards.model.RewardModelScorer
      init_args: {model_name_or_path: outputs/reward/export, batch_size: 16}

Each prompt + completion is tokenized exactly as `RewardDataModule` tokenizes training pairs, by
`tokenize_for_reward` below: the chat template over ``prompt + completion`` for conversations,
``prompt + completion`` + EOS for plain text. The model is loaded at the first call (on the current
CUDA device when there is one), not at construction, so building a config does not load weights.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from lit_posttrain.models import DType, load_model, load_tokenizer
from lit_posttrain.ops import pad


def tokenize_for_reward(
    tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict], completion: str | list[dict]
) -> list[int]:
    """Token ids of ``prompt + completion`` as the reward model reads them.

    Conversational (lists of messages): the chat template over the whole conversation. Plain text:
    the tokenizer's own encoding of ``prompt + completion`` with EOS appended when it does not
    already end with it (as TRL does). `RewardDataModule` tokenizes training pairs with it and
    `RewardModelScorer` scores with it, so a trained model is scored on exactly the inputs it was
    trained on.
    """
    if isinstance(completion, list):
        return list(tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"])
    ids = list(tokenizer(prompt + completion)["input_ids"])
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
    return ids


class RewardModelScorer:
    """Score completions with a sequence-classification reward model.

    Args:
        model_name_or_path: hub id or local directory (e.g. a `RewardModule` export).
        tokenizer_name_or_path: tokenizer location when it differs from the model's.
        batch_size: sequences per forward pass.
        device: where to run the model; None for the current CUDA device, else CPU.
        dtype: parameter dtype (``"bfloat16"`` halves memory on GPU).
        trust_remote_code: allow model code from the hub (off unless asked).

    Call with ``(prompts, completions, **columns)``: ``prompts`` plain strings or lists of
    messages, ``completions`` the same kind (a plain-string completion of a conversational prompt
    is taken as one assistant message). Extra dataset columns and keyword arguments (such as
    ``completion_ids``) are ignored. Returns one float per completion.
    """

    def __init__(
        self,
        model_name_or_path: str,
        *,
        tokenizer_name_or_path: str | None = None,
        batch_size: int = 8,
        device: str | None = None,
        dtype: DType = "float32",
        trust_remote_code: bool = False,
    ):
        self.model_name_or_path = model_name_or_path
        self.tokenizer_name_or_path = tokenizer_name_or_path or model_name_or_path
        self.batch_size, self.device, self.dtype = batch_size, device, dtype
        self.trust_remote_code = trust_remote_code
        self.tokenizer = None
        self.model = None

    def _load(self) -> None:
        self.tokenizer = load_tokenizer(self.tokenizer_name_or_path, trust_remote_code=self.trust_remote_code)
        self.model = load_model(
            self.model_name_or_path,
            task="sequence-classification",
            num_labels=1,
            pad_token_id=self.tokenizer.pad_token_id,  # the head reads the score at the last non-pad token
            dtype=self.dtype,
            trust_remote_code=self.trust_remote_code,
        )
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(device).eval()

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts and {len(completions)} completions; expected one each")
        if self.model is None:
            self._load()
        sequences = []
        for prompt, completion in zip(prompts, completions):
            if isinstance(prompt, list) and isinstance(completion, str):
                completion = [{"role": "assistant", "content": completion}]
            sequences.append(torch.tensor(tokenize_for_reward(self.tokenizer, prompt, completion), dtype=torch.long))
        device = next(self.model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start : start + self.batch_size]
            input_ids = pad(chunk, self.tokenizer.pad_token_id).to(device)  # (N, T)
            attention_mask = pad([torch.ones_like(s) for s in chunk], 0).to(device)  # (N, T)
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (N, 1)
            scores.extend(logits[:, 0].float().tolist())
        return scores
