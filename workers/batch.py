"""Continuous batching: many requests decoded together in one model pass per step, over one
left-padded KV cache. New requests join between steps (prefilled together, then merged into the
cache); a long prompt is prefilled a chunk per step beside the decoding rows (chunked prefill) and
merged once whole; ended ones leave, and columns that only padding fills are trimmed away."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import DynamicCache

from shared.contract import JobRequest
from workers.completion import Completion
from workers.memory import TOO_BIG_ALONE, OutOfMemory, is_out_of_memory
from workers.sampling import Sampler, choose
from workers.sessions import Layers, SessionPrefix


@dataclass
class Row:
    """One request in the batch: its completion and how it picks tokens."""

    key: str
    completion: Completion
    sampler: Sampler
    error: BaseException | None = None
    """What went wrong with this row alone (its text could not be decoded or streamed)."""
    prefix: SessionPrefix | None = None
    """Keys and values of the start of its prompt, from its session's last turn: not computed again."""
    request: JobRequest | None = None
    """What it answers (a row decoded alone needs its generation settings, not only its sampler)."""
    choices: int = 1
    """Choices the request asks for (`n`): the others decode as its siblings, under the same key."""
    spawn: Callable[[int], Row] | None = None
    """Makes choice k's row (its own completion and sampler), at the request's first prefill."""
    siblings: list[Row] = field(default_factory=list)
    parent: Row | None = None
    """The row of choice 0, for a sibling: its failures are the request's."""

    def worst_cases(self) -> list[int]:
        """The most cache each of the request's choices can need."""
        return [self.completion.worst_case_tokens] * self.choices

    @property
    def ended(self) -> bool:
        """Every choice of the request ended."""
        return self.completion.ended and all(s.completion.ended for s in self.siblings)

    def add(self, token: int) -> None:
        """Give the row its next token; a failure stays with the row (its request), not the batch. A
        choice that ended while the others decode takes no more."""
        owner = self.parent or self
        if owner.error is not None or (owner.choices > 1 and self.completion.ended):
            return
        try:
            self.completion.add(token, self.sampler.last)
        except Exception as exc:
            owner.error = exc


class Decoder(Protocol):
    """Rows decoding in a worker's session: together in one batch (DecodeBatch), or one at a time
    (workers/serial.py) where the model cannot share decode steps."""

    device: str
    rows: list[Row]

    def __len__(self) -> int: ...

    @property
    def length(self) -> int:
        """Columns of the KV cache held between steps (0: none is held)."""
        ...

    def join(self, rows: list[Row]) -> None:
        """Take `rows` in."""
        ...

    def step(self) -> None:
        """Decode further: each row gets its next token(s)."""
        ...

    def drop(self, keys: set[str]) -> list[Row]:
        """Take the rows of `keys` out; the rows taken out."""
        ...

    def row_state(self, key: str) -> tuple[list[int], Layers] | None:
        """Row `key`'s tokens in the cache and their keys and values, for its session's next turn."""
        ...


@dataclass
class Prefilling:
    """A row whose long prompt is prefilled a chunk per step, in a cache of its own."""

    row: Row
    ids: list[int]
    cache: DynamicCache
    done: int = 0
    """Tokens of `ids` in the cache."""


class DecodeBatch:
    """The rows decoding together, their shared cache, attention mask and positions.

    Every row's tokens sit contiguously at the right end of the cache (left padding), so one decode
    step appends one column for all rows, and causal and sliding-window masks hold per row.
    A cold row with more than `prefill_chunk` tokens to prefill (0: no limit) waits in `prefilling`
    and gets one chunk per step, so neither the decoding rows nor a short newcomer wait for its whole
    prefill; it joins the rows with its first token once its prompt is in.
    """

    def __init__(self, model: Any, device: str, pad_id: int, prefill_chunk: int = 0):
        self.model, self.device, self.pad_id, self.chunk = model, device, pad_id, prefill_chunk
        self.rows: list[Row] = []
        self.prefilling: list[Prefilling] = []
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros((0, 0), dtype=torch.long, device=device)
        self._positions = torch.zeros((0, 1), dtype=torch.long, device=device)
        self._last = torch.zeros((0,), dtype=torch.long, device=device)

    def __len__(self) -> int:
        return len(self.rows) + len(self.prefilling)

    @property
    def length(self) -> int:
        """Columns of the cache (the longest row, padding included)."""
        return int(self._mask.shape[1])

    def join(self, rows: list[Row]) -> None:
        """Prefill `rows` and merge them into the batch; each gets its next token. Rows without a
        cached prefix are prefilled together; one with a prefix computes only the rest of its prompt.
        A row that has tokens already (taken out after a failed step) is prefilled with them too, so
        it gets the token that step owed it."""
        short = []
        for row in rows:
            if row.prefix is not None:
                continue
            if self.chunk and tokens_to_prefill(row) > self.chunk and row.choices == 1:
                self.prefilling.append(Prefilling(row, _prefill_ids(row), DynamicCache()))
            else:
                short.append(row)
        if short:
            self._join_cold(short)
        for row in rows:
            if row.prefix is not None:
                self._join_warm(row, row.prefix)

    def _join_cold(self, rows: list[Row]) -> None:
        rows, source, sequences = _with_choices(rows)
        width = max(len(s) for s in sequences)
        ids = torch.tensor([[self.pad_id] * (width - len(s)) + s for s in sequences], device=self.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self._prefill(rows, ids, mask, positions, DynamicCache(), source)

    def _join_warm(self, row: Row, prefix: SessionPrefix) -> None:
        prompt = row.completion.prompt_ids + row.completion.token_ids
        cache = DynamicCache()
        for index, (keys, values) in enumerate(prefix.layers):
            cache.update(keys, values, index)
        ids = torch.tensor([prompt[prefix.length :]], device=self.device)
        mask = torch.ones((1, len(prompt)), dtype=torch.long, device=self.device)
        positions = torch.arange(prefix.length, len(prompt), device=self.device)[None, :]
        self._prefill([row], ids, mask, positions, cache)

    def _prefill(
        self,
        rows: list[Row],
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        source: list[int] | None = None,
    ) -> None:
        logits = self._forward(ids, mask, positions, cache)
        if source is not None and len(source) != len(logits):  # new choices share their prompt's prefill
            index = torch.tensor(source, device=self.device)
            logits, mask, positions = (t.index_select(0, index) for t in (logits, mask, positions))
            for layer in cache.layers:
                layer.keys, layer.values = (
                    layer.keys.index_select(0, index),
                    layer.values.index_select(0, index),
                )
        first = choose(logits, [r.sampler for r in rows])
        self._merge(cache, mask, positions[:, -1:], first)
        self.rows.extend(rows)
        for row, token in zip(rows, first.tolist(), strict=True):
            row.add(int(token))

    def row_state(self, key: str) -> tuple[list[int], Layers] | None:
        """The tokens in the cache for row `key` and their keys and values (copied out of the
        batch), for its session's next turn; None when they do not line up."""
        index = next((i for i, r in enumerate(self.rows) if r.key == key), None)
        if index is None or self._cache is None:
            return None
        completion = self.rows[index].completion
        # The last token chosen was never fed back through the model: its keys are not cached.
        token_ids = completion.prompt_ids + completion.token_ids[:-1]
        held = int(self._mask[index].sum())
        if held != len(token_ids) or held == 0:
            return None
        layers = [
            (
                layer.keys[index : index + 1, :, -held:].clone(),
                layer.values[index : index + 1, :, -held:].clone(),
            )
            for layer in self._cache.layers
        ]
        return token_ids, layers

    def step(self) -> None:
        """One decode step: every row gets its next token; then the oldest long prompt's next chunk
        (a row whose chunk fails keeps the error; the batch is untouched; a chunk out of memory
        beside decoding rows is tried again at the next step)."""
        self._decode()
        if self.prefilling:
            self._prefill_chunk(self.prefilling[0])

    def _prefill_chunk(self, waiting: Prefilling) -> None:
        end = min(waiting.done + self.chunk, len(waiting.ids))
        ids = torch.tensor([waiting.ids[waiting.done : end]], device=self.device)
        mask = torch.ones((1, end), dtype=torch.long, device=self.device)
        positions = torch.arange(waiting.done, end, device=self.device)[None, :]
        try:
            logits = self._forward(ids, mask, positions, waiting.cache)
        except Exception as exc:
            if is_out_of_memory(exc) and self.rows:
                return  # tried again at the next step: rows leave meanwhile
            self.prefilling.remove(waiting)
            waiting.row.error = exc if not is_out_of_memory(exc) else OutOfMemory(TOO_BIG_ALONE)
            return
        waiting.done = end
        if end < len(waiting.ids):
            return
        self.prefilling.remove(waiting)
        first = choose(logits, [waiting.row.sampler])
        self._merge(waiting.cache, mask, positions[:, -1:], first)
        self.rows.append(waiting.row)
        waiting.row.add(int(first[0]))

    def _decode(self) -> None:
        if not self.rows:
            return
        assert self._cache is not None
        ones = torch.ones((len(self.rows), 1), dtype=self._mask.dtype, device=self.device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        self._positions = self._positions + 1
        logits = self._forward(self._last[:, None], self._mask, self._positions, self._cache)
        self._last = choose(logits, [r.sampler for r in self.rows])
        for row, token in zip(self.rows, self._last.tolist(), strict=True):
            row.add(int(token))

    def drop(self, keys: set[str]) -> list[Row]:
        """Take the rows of `keys` out of the batch (decoding or still prefilling); the rows taken
        out."""
        waiting = [w.row for w in self.prefilling if w.row.key in keys]
        self.prefilling = [w for w in self.prefilling if w.row.key not in keys]
        return waiting + self._drop_rows(keys)

    def _drop_rows(self, keys: set[str]) -> list[Row]:
        gone = [r for r in self.rows if r.key in keys]
        if not gone:
            return []
        keep = [i for i, r in enumerate(self.rows) if r.key not in keys]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self._cache = None
            self._mask = self._mask[:0, :0]
            self._positions, self._last = self._positions[:0], self._last[:0]
            return gone
        index = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        start = int(mask.any(dim=0).int().argmax())  # leading columns that are padding in every row
        self._mask = mask[:, start:]
        self._positions, self._last = (
            self._positions.index_select(0, index),
            self._last.index_select(0, index),
        )
        assert self._cache is not None
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        return gone

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return out.logits[:, -1, :]

    def _merge(
        self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor, last: torch.Tensor
    ) -> None:
        if self._cache is None or not self.rows:
            self._cache, self._mask, self._positions, self._last = cache, mask, positions, last
            return
        width = max(self.length, int(mask.shape[1]))
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_pad_left(old.keys, width, 2), _pad_left(new.keys, width, 2)], dim=0)
            old.values = torch.cat([_pad_left(old.values, width, 2), _pad_left(new.values, width, 2)], dim=0)
        self._mask = torch.cat([_pad_left(self._mask, width, 1), _pad_left(mask, width, 1)], dim=0)
        self._positions = torch.cat([self._positions, positions], dim=0)
        self._last = torch.cat([self._last, last], dim=0)


def tokens_to_prefill(row: Row) -> int:
    """Tokens `row`'s prefill computes: its prompt and any tokens it has, less a session's prefix."""
    held = len(row.completion.prompt_ids) + len(row.completion.token_ids)
    return held - (row.prefix.length if row.prefix is not None else 0)


def _with_choices(rows: list[Row]) -> tuple[list[Row], list[int], list[list[int]]]:
    """`rows` with each one's other choices after it; for each, the index of the sequence it is
    prefilled from; the sequences. New choices (made here, n > 1) share their request's prompt;
    choices that have tokens already (after a failed step) are prefilled with their own."""
    every, source, sequences = [], [], []
    for row in rows:
        fresh = row.choices > 1 and not row.siblings and row.spawn is not None
        if fresh:
            assert row.spawn is not None
            row.siblings = [row.spawn(k) for k in range(1, row.choices)]
        for choice in [row, *row.siblings]:
            if choice is row or not fresh:
                sequences.append(_prefill_ids(choice))
            every.append(choice)
            source.append(len(sequences) - 1)
    return every, source, sequences


def _prefill_ids(row: Row) -> list[int]:
    """What a cold prefill of `row` computes: its prompt and any tokens it has already."""
    return row.completion.prompt_ids + row.completion.token_ids


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`tensor` grown to `width` along `dim` with zeros in front."""
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
