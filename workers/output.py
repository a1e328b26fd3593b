"""Generated text by channel, cut at the first stop string, released to a stream only when final."""

from __future__ import annotations

from shared.harmony import FINAL_CHANNEL


class OutputText:
    """Text of each channel; stop strings apply to the final channel.

    Text that might be the start of a stop string is held back until it is known not to be one, so
    a stream never shows what the result later cuts.
    """

    def __init__(self, stops: list[str] | None = None):
        self._stops = list(stops or [])
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._text: dict[str, str] = {}
        self._released: dict[str, int] = {}
        self.stopped = False

    def add(self, channel: str, text: str) -> list[tuple[str, str]]:
        """Take new text of `channel`; the (channel, text) deltas safe to stream now."""
        if self.stopped or not text:
            return []
        full = self._text[channel] = self._text.get(channel, "") + text
        if channel != FINAL_CHANNEL or not self._stops:
            return self._release(channel, len(full))
        cuts = [i for i in (full.find(s) for s in self._stops) if i >= 0]
        if cuts:
            self.stopped = True
            self._text[channel] = full[: min(cuts)]
            return self._release(channel, min(cuts))
        return self._release(channel, len(full) - self._hold)

    def flush(self) -> list[tuple[str, str]]:
        """Deltas still held back, at the end of generation."""
        return [d for channel, text in self._text.items() for d in self._release(channel, len(text))]

    def text(self, channel: str) -> str:
        """All text of `channel`, cut at a stop string."""
        return self._text.get(channel, "")

    def channels(self) -> list[tuple[str, str]]:
        """Every channel's text, in the order the channels began."""
        return list(self._text.items())

    def stop(self) -> None:
        """End the output here (the turn is over: what the model writes next is not its answer)."""
        self.stopped = True

    def _release(self, channel: str, upto: int) -> list[tuple[str, str]]:
        start = self._released.get(channel, 0)
        if upto <= start:
            return []
        self._released[channel] = upto
        return [(channel, self._text[channel][start:upto])]
