"""`tiny-gpt-oss`: a 2-layer gpt-oss with the real o200k_harmony vocabulary, trained for seconds on a
handful of harmony conversations so that it answers in valid harmony (analysis, then final), and
calls functions in harmony's commentary channel (`workers/tiny_tools.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.contract import ChatMessage, JobRequest
from shared.harmony import HarmonyChat
from workers.tiny_tools import tool_training_pairs

VOCAB_SIZE = 201088
"""o200k_harmony's size, as gpt-oss-20b's config has it: every real harmony token id is valid."""

PAD_TOKEN_ID = 199999
"""`<|endoftext|>`, gpt-oss's pad token."""

STOP_TOKEN_IDS = [200002, 200012]
"""`<|return|>` and `<|call|>`: the assistant's turn ends."""

TOOL_EFFORTS = ("medium",)
"""Reasoning efforts the tool conversations are trained at: the default one only, which keeps
training in seconds (the tests of tool calls leave the effort unset)."""

TRAIN_STEPS = 300
"""Most optimiser steps; training stops earlier once the loss is below TARGET_LOSS."""

TARGET_LOSS = 0.002
"""Loss the training stops at. At 0.01 a seeded run ended a hair under it on one machine and its greedy
answers repeated a phrase; a fifth of that leaves every trained answer a clear margin (about 60%
more steps, seconds on a CPU)."""

CONVERSATIONS = [
    ("What is the capital of France?", "The user asks for the capital of France. It is Paris.",
     "The capital of France is Paris."),
    ("What is 2+2?", "Simple arithmetic: 2 plus 2 is 4.", "2 + 2 = 4."),
    ("Say hello.", "A greeting is wanted.", "Hello!"),
    ("Name a colour.", "Any colour will do; blue is common.", "Blue."),
    ("What is the largest planet?", "The largest planet in the solar system is Jupiter.",
     "Jupiter is the largest planet."),
    ("Translate 'cat' to French.", "Cat in French is chat.", "Chat."),
    ("hi", "The user greets me.", "Hi! How can I help you today?"),
    ("Say something", "The user wants any sentence.", "The sky is blue and the sun is warm today."),
]  # fmt: skip
"""(question, analysis, final) triples the model learns to answer in harmony."""


def tiny_config() -> Any:
    """The architecture: gpt-oss's, shrunk to 2 layers of width 64 with 4 experts."""
    from transformers import GptOssConfig

    return GptOssConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
        sliding_window=128,
        eos_token_id=STOP_TOKEN_IDS,
        pad_token_id=PAD_TOKEN_ID,
        tie_word_embeddings=False,
    )


def training_pairs(chat: HarmonyChat) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of every conversation at every reasoning effort, then the tool
    conversations."""
    pairs = []
    for question, analysis, final in CONVERSATIONS:
        completion = chat.encode(
            f"<|channel|>analysis<|message|>{analysis}<|end|>"
            f"<|start|>assistant<|channel|>final<|message|>{final}<|return|>"
        )
        for effort in ("low", "medium", "high"):
            messages = [ChatMessage(role="user", content=question)]
            request = JobRequest(messages=messages, reasoning_effort=effort)
            pairs.append((chat.render(request), completion))
    return pairs + tool_training_pairs(chat, TOOL_EFFORTS)


def build_tiny_gpt_oss(out: Path, vocab_dir: Path, dtype: str = "float32") -> dict[str, float]:
    """Build, train and save the model into `out`; figures of the training run."""
    import time

    import torch
    from transformers import GenerationConfig, GptOssForCausalLM

    started = time.perf_counter()
    torch.manual_seed(0)
    config = tiny_config()
    config._attn_implementation = "eager"  # sdpa and flex do not support gpt-oss on CPU
    model = GptOssForCausalLM(config)
    pairs = training_pairs(HarmonyChat(vocab_dir))
    loss, steps = _train(model, pairs)
    model.config._attn_implementation = "eager"
    model.generation_config = GenerationConfig(
        eos_token_id=STOP_TOKEN_IDS, pad_token_id=PAD_TOKEN_ID, do_sample=False
    )
    model.to(getattr(torch, dtype)).save_pretrained(str(out))
    return {"loss": round(loss, 4), "steps": steps, "seconds": round(time.perf_counter() - started, 2)}


def _train(model: Any, pairs: list[tuple[list[int], list[int]]]) -> tuple[float, int]:
    """Fit the completions, training only the embedding and head rows of tokens the data uses.

    The full 201088-row head would cost seconds per step on a CPU. Unused head rows are zeroed
    and the loss has one constant-0 logit standing for all of them, so every trained token
    outscores every unused one.
    """
    import torch
    import torch.nn.functional as F

    used = sorted({t for prompt, completion in pairs for t in prompt + completion} | {PAD_TOKEN_ID})
    local = {token: i for i, token in enumerate(used)}
    buckets = [_bucket(group, local) for group in _by_length(pairs)]
    index = torch.tensor(used)
    embed = torch.nn.Parameter(model.model.embed_tokens.weight.data[index].clone())
    head = torch.nn.Parameter(model.lm_head.weight.data[index].clone())
    rows = ("model.embed_tokens.weight", "lm_head.weight")
    body = [p for name, p in model.named_parameters() if name not in rows]
    optimizer = torch.optim.Adam([embed, head, *body], lr=1e-2)
    total = sum(int(picked.sum()) for _, _, picked, _ in buckets)
    model.train()
    loss, steps = torch.tensor(float("inf")), 0
    while steps < TRAIN_STEPS and loss.item() >= TARGET_LOSS:
        steps += 1
        loss = torch.zeros(())
        for ids, mask, picked, targets in buckets:
            hidden = model.model(inputs_embeds=embed[ids], attention_mask=mask).last_hidden_state[picked]
            logits = torch.cat([hidden @ head.T, torch.zeros(len(hidden), 1)], dim=1)
            loss = loss + F.cross_entropy(logits, targets, reduction="sum") / total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[index] = embed.data
        model.lm_head.weight.zero_()
        model.lm_head.weight[index] = head.data
    return float(loss.item()), steps


def _by_length(pairs: list[tuple[list[int], list[int]]]) -> list[list[tuple[list[int], list[int]]]]:
    """`pairs` in groups of similar length (at most twice the shortest), so short conversations do
    not pay for the padding of long ones."""
    groups: list[list[tuple[list[int], list[int]]]] = []
    for pair in sorted(pairs, key=lambda p: len(p[0]) + len(p[1])):
        if groups and len(pair[0]) + len(pair[1]) <= 2 * (len(groups[-1][0][0]) + len(groups[-1][0][1])):
            groups[-1].append(pair)
        else:
            groups.append([pair])
    return groups


def _bucket(pairs: list[tuple[list[int], list[int]]], local: dict[int, int]) -> tuple[Any, Any, Any, Any]:
    """One group's padded ids, attention mask, which positions predict a completion token, and those
    tokens (in `local`'s numbering of the used tokens)."""
    import torch

    length = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), length), local[PAD_TOKEN_ID])
    labels = torch.full((len(pairs), length), -100)
    mask = torch.zeros((len(pairs), length), dtype=torch.long)
    for row, (prompt, completion) in enumerate(pairs):
        sequence = [local[t] for t in prompt + completion]
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
        labels[row, len(prompt) - 1 : len(sequence) - 1] = torch.tensor([local[t] for t in completion])
    picked = labels != -100
    return ids, mask, picked, labels[picked]
