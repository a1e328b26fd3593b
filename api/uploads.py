"""Reading an uploaded batch file line by line: each line parsed as strictly as a request body
(api.body.decode) and checked as a batch line (shared.batches.lines), stored as it comes while the
file is valid; never more than one line in memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import IO

from shared.batches.errors import FileTooLarge
from shared.batches.lines import MAX_ERRORS_LISTED, InputLine, LineError, check_line
from shared.batches.store import Upload
from shared.errors import GptossError
from shared.json_body import decode


@dataclass(frozen=True)
class Limits:
    """What one upload may hold."""

    line_bytes: int
    lines: int
    bytes: int


@dataclass
class Ingested:
    """What an upload held: its line errors (the first MAX_ERRORS_LISTED), how many, the urls its
    lines call."""

    errors: list[LineError] = field(default_factory=list)
    error_count: int = 0
    urls: set[str] = field(default_factory=set)

    def refuse(self, error: LineError) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_LISTED:
            self.errors.append(error)


def ingest(stream: IO[bytes], upload: Upload, limits: Limits) -> Ingested:
    """Check every line of `stream` and append each to `upload` while none was refused; 413 past
    the byte or line limit. Blank lines are skipped (line numbers still count them)."""
    found = Ingested()
    seen: set[str] = set()
    read = requests = 0
    number = 0
    while raw := stream.readline(limits.line_bytes + 2):  # + "\r\n": a line at the limit still fits
        number += 1
        read += len(raw)
        if read > limits.bytes:
            raise FileTooLarge(f"The file is over the limit of {limits.bytes} bytes.")
        line = raw.rstrip(b"\r\n")
        if len(line) > limits.line_bytes or (not raw.endswith(b"\n") and len(raw) > limits.line_bytes):
            found.refuse(LineError(number, "line_too_long", f"The line is over {limits.line_bytes} bytes; "
                                   "the lines after it were not checked."))  # fmt: skip
            break
        if not line.strip():
            continue
        requests += 1
        if requests > limits.lines:
            raise FileTooLarge(f"The file has more than {limits.lines} requests.")
        checked = _check(number, line, seen)
        if isinstance(checked, LineError):
            found.refuse(checked)
        elif not found.error_count:
            found.urls.add(checked.url)
            upload.append(line.decode())
    if requests == 0 and not found.error_count:
        found.refuse(LineError(1, "empty_file", "The file holds no requests."))
    return found


def _check(number: int, line: bytes, seen: set[str]) -> InputLine | LineError:
    try:
        parsed = decode(line)
    except GptossError as exc:
        return LineError(number, exc.code, exc.message.replace("The request body", "The line"))
    return check_line(number, parsed, seen)
