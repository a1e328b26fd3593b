"""Structured outputs: a row's tokens decoded under a grammar (llguidance; compiled from the request's
`response_format` by shared/structured.py), so its answer always parses
and validates against the request's JSON schema (`response_format`). Each row keeps its own matcher:
constrained and free rows share a batch. The mask is computed on the CPU (llguidance's Rust
matcher, microseconds a token) and applied to the row's logits wherever they are (CPU or GPU).

For harmony models the grammar governs the final channel's message only (the reasoning runs free);
it opens when that message starts and, once complete, lets only `<|return|>` end the answer.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llguidance
import torch

from shared.contract import JobRequest
from shared.structured import grammar_for

O200K_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)
"""o200k's pre-tokenisation pattern (tiktoken's), which llguidance needs to tokenise text as o200k does."""


@functools.cache
def harmony_tokenizer(vocab_file: Path, special: tuple[tuple[str, int], ...], n_vocab: int, eos: int) -> Any:
    """llguidance's tokenizer over o200k_harmony: the o200k ranks file, harmony's `special` tokens,
    `eos` (`<|return|>`) as the end. Built once per process (about a second)."""
    ranks = {}
    for line in vocab_file.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return llguidance.LLTokenizer.from_tiktoken(  # type: ignore[attr-defined]
        encoder=ranks,
        special_tokens={n: i for n, i in special if i < n_vocab},
        pattern=O200K_PATTERN,
        eos_token=eos,
        n_vocab=n_vocab,
    )


def harmony_specials(encoding: Any) -> tuple[tuple[str, int], ...]:
    """Harmony's special tokens and their ids, as `harmony_tokenizer` takes them."""
    names = sorted(encoding.special_tokens_set)
    return tuple((name, encoding.encode(name, allowed_special="all")[0]) for name in names)


def template_tokenizer(tokenizer: Any, n_vocab: int) -> llguidance.LLTokenizer:
    """llguidance's tokenizer over a Hugging Face fast tokenizer (its end token ends the answer)."""
    import llguidance.hf

    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab)


class Constraint:
    """One row's grammar: whether it governs the next token (`active`), the tokens it allows
    (`fill`), and each token the row took (`accept`). `gate()` says whether the row is where the
    grammar applies (always, for a chat template; in the final message, for harmony)."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str, gate: Callable[[], bool]):
        self._matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        self._gate = gate
        self._open = False

    def active(self) -> bool:
        self._open = self._open or self._gate()
        return self._open and not self._matcher.is_error()

    def fill(self, bitmask: torch.Tensor, index: int) -> None:
        """Row `index` of `bitmask` (int32, [rows, vocab/32], on the CPU) gets the allowed tokens."""
        row = bitmask[index]
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def accept(self, token: int) -> None:
        """The row took `token` (ignored before the grammar opens)."""
        if self._open and not self._matcher.is_stopped():
            self._matcher.consume_token(token)

    @property
    def error(self) -> str | None:
        """Why the matcher gave up, if it did."""
        return self._matcher.get_error() if self._matcher.is_error() else None


def mask_logits(scores: torch.Tensor, rows: list[int], constraints: list[Constraint]) -> None:
    """Set to -inf, in place, every token of `scores` [rows, vocab] that row `rows[i]`'s grammar
    refuses (its bitmask filled on the CPU, unpacked where the scores are)."""
    vocab = scores.shape[1]
    bitmask = torch.full((len(rows), (vocab + 31) // 32), -1, dtype=torch.int32)
    for index, constraint in enumerate(constraints):
        constraint.fill(bitmask, index)
    bits = torch.arange(32, dtype=torch.int32, device=scores.device)
    words = bitmask.to(scores.device)
    allowed = ((words.unsqueeze(-1) >> bits) & 1).bool().reshape(len(rows), -1)[:, :vocab]
    index = torch.tensor(rows, device=scores.device)
    scores[index] = scores[index].masked_fill(~allowed, float("-inf"))


def grammar_tokenizer(runtime: Any) -> Any:
    """llguidance's view of a runtime's vocabulary (built once per runtime: about a second), ending
    answers with the chat template's end token, or harmony's `<|return|>`."""
    if runtime._grammar_tokenizer is None:
        vocab = int(runtime.model.config.vocab_size)
        if runtime.chat is None:
            runtime._grammar_tokenizer = template_tokenizer(runtime.tokenizer, vocab)
        else:
            specials, end = harmony_specials(runtime.chat.encoding), runtime.chat.encode("<|return|>")[0]
            runtime._grammar_tokenizer = harmony_tokenizer(runtime.vocab_file, specials, vocab, end)
    return runtime._grammar_tokenizer


def constraint_for(runtime: Any, request: JobRequest, completion: Any) -> Constraint | None:
    """The grammar `request.response_format` asks for (None for plain text), governing where the
    answer is: every token of a chat template's answer, harmony's final message only."""
    grammar = grammar_for(request.response_format.wire()) if request.response_format else None
    if grammar is None:
        return None
    gate = (lambda: True) if runtime.chat is None else (lambda: completion.in_content(None))
    return Constraint(grammar_tokenizer(runtime), grammar, gate)
