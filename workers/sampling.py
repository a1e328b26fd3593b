"""Choosing each row's next token in a batch: greedy, or sampled with the row's own temperature,
top_p and random generator (a seeded request draws the same tokens whatever it is batched with);
under the row's grammar, if it has one (workers/grammar.py); with the chosen token's log-probability
and the most likely alternatives, if the request asked (from the same forward pass)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from shared import contract
from shared.contract import JobRequest
from shared.harmony import FINAL_CHANNEL

if TYPE_CHECKING:
    from workers.grammar import Constraint


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability and the `top` most likely tokens' (id, log-probability), from
    the model's raw logits: before temperature, top_p and any grammar mask (as vLLM returns them)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Sampler:
    """One request's way of choosing tokens; `generator` is None for greedy."""

    temperature: float
    top_p: float
    generator: torch.Generator | None
    top_logprobs: int | None = None
    """Log-probabilities asked for, with this many alternatives (0-20); None: not asked."""
    constraint: Constraint | None = None
    """The row's grammar (structured outputs), if any."""
    last: TokenLogprob | None = None
    """The last chosen token's log-probabilities (when asked for), set by `choose`."""

    @property
    def greedy(self) -> bool:
        """Always the most likely token."""
        return self.generator is None


def sampler_for(
    request: JobRequest, device: str | torch.device, constraint: Constraint | None = None, choice: int = 0
) -> Sampler:
    """The request's sampler for its choice `choice` (a seeded request's choices draw from seeds
    `seed`, `seed + 1`, ...): temperature 0 (or unset top-level default 1) as OpenAI means it; its
    logprobs as asked; under `constraint`, if any."""
    temperature = 1.0 if request.temperature is None else request.temperature
    top_p = 1.0 if request.top_p is None else request.top_p
    top_logprobs = (request.top_logprobs or 0) if request.logprobs else None
    if temperature <= 0:
        return Sampler(0.0, 1.0, None, top_logprobs, constraint)
    generator = torch.Generator(device=device)
    if request.seed is not None:
        generator.manual_seed((request.seed + choice) % 2**63)
    else:
        generator.seed()
    return Sampler(temperature, top_p, generator, top_logprobs, constraint)


def choose(logits: torch.Tensor, samplers: list[Sampler]) -> torch.Tensor:
    """The next token of each row of `logits` [rows, vocab], by that row's sampler."""
    raw = logits.float()  # exact, and on CPUs twice as fast as a bf16 argmax
    scores = raw
    constrained = [i for i, s in enumerate(samplers) if s.constraint is not None and s.constraint.active()]
    if constrained:
        from workers.grammar import mask_logits

        scores = raw.clone()
        mask_logits(scores, constrained, [samplers[i].constraint for i in constrained])  # type: ignore[misc]
    chosen = scores.argmax(dim=-1)
    for row, sampler in enumerate(samplers):
        if not sampler.greedy:
            chosen[row] = _sample(scores[row], sampler)
    asked = [i for i, s in enumerate(samplers) if s.top_logprobs is not None]
    if asked:
        _record_logprobs(raw, chosen, asked, samplers)
    if any(s.constraint is not None for s in samplers):
        for row, token in enumerate(chosen.tolist()):
            if (constraint := samplers[row].constraint) is not None:
                constraint.accept(int(token))
    return chosen


def _record_logprobs(
    raw: torch.Tensor, chosen: torch.Tensor, rows: list[int], samplers: list[Sampler]
) -> None:
    """Each asking row's chosen token's log-probability and its top alternatives, in one pass."""
    index = torch.tensor(rows, device=raw.device)
    logprobs = torch.log_softmax(raw.index_select(0, index), dim=-1)
    taken = logprobs.gather(1, chosen.index_select(0, index)[:, None])[:, 0].tolist()
    most = max(samplers[i].top_logprobs or 0 for i in rows)
    values, ids = logprobs.topk(most, dim=-1) if most else (logprobs[:, :0], logprobs[:, :0].long())
    values_l, ids_l, tokens = values.tolist(), ids.tolist(), chosen.tolist()
    for k, row in enumerate(rows):
        count = samplers[row].top_logprobs or 0
        top = tuple(zip(ids_l[k][:count], values_l[k][:count], strict=True))
        samplers[row].last = TokenLogprob(int(tokens[row]), float(taken[k]), top)


def _sample(logits: torch.Tensor, sampler: Sampler) -> torch.Tensor:
    probs = torch.softmax(logits / sampler.temperature, dim=-1)
    if sampler.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest set whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= sampler.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=sampler.generator)[0]


def logprob_entries(
    logprobs: tuple[TokenLogprob, ...] | None, token_bytes: Callable[[int], bytes]
) -> list[contract.TokenLogprob]:
    """`logprobs` in OpenAI's format: each token's text (its bytes decoded, invalid UTF-8 replaced:
    a character split over tokens), log-probability, bytes and top alternatives."""

    def top(token: int, logprob: float) -> contract.TopLogprob:
        raw = token_bytes(token)
        return contract.TopLogprob(token=raw.decode("utf-8", "replace"), logprob=logprob, bytes=list(raw))

    return [
        contract.TokenLogprob(
            **top(t.token, t.logprob).model_dump(), top_logprobs=[top(i, v) for i, v in t.top]
        )
        for t in logprobs or ()
    ]


def logprob_sink(
    on_text: Callable[..., None], made: list[Any], token_bytes: Callable[[int], bytes]
) -> Callable[[str, str], None]:
    """`on_text` that hands each piece of the answer's text the logprobs of the tokens that made it,
    streamed beside it (`made` holds the completion once it exists; the reasoning has none)."""
    sent = 0

    def send(channel: str, text: str) -> None:
        nonlocal sent
        taken = (made[0].logprobs or []) if made else []
        if channel != FINAL_CHANNEL or len(taken) == sent:
            on_text(channel, text)
            return
        entries = logprob_entries(tuple(taken[sent:]), token_bytes)
        sent = len(taken)
        on_text(channel, text, [e.model_dump(mode="json") for e in entries])

    return send
