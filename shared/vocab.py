"""The o200k vocabulary harmony needs, provisioned offline from npm's `js-tiktoken` and checked."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

VOCAB_FILE = "o200k_base.tiktoken"
"""File name harmony looks for under TIKTOKEN_ENCODINGS_BASE."""

VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
"""SHA-256 of OpenAI's published o200k_base.tiktoken; the rebuilt file must match it."""

JS_TIKTOKEN = "js-tiktoken@1.0.21"
"""npm package whose `dist/ranks/o200k_base.js` holds the same ranks, compressed."""

RANKS_MEMBER = "package/dist/ranks/o200k_base.js"


class VocabMismatch(RuntimeError):
    """The rebuilt vocabulary is not OpenAI's file."""


def ranks_file(js_source: str) -> bytes:
    """OpenAI's `<base64 token> <rank>` file rebuilt from js-tiktoken's `! <first rank> <tokens…>` lines."""
    data = json.loads(js_source[js_source.index("{") :].rstrip().rstrip(";"))
    ranks: dict[str, int] = {}
    for line in data["bpe_ranks"].split("\n"):
        if not line:
            continue
        _, first, *tokens = line.split(" ")
        for offset, token in enumerate(tokens):
            ranks[token] = int(first) + offset
    return "".join(
        f"{token} {rank}\n" for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    ).encode()


def is_provisioned(folder: Path) -> bool:
    """The vocabulary file is in `folder`."""
    return (folder / VOCAB_FILE).is_file()


def provision(folder: Path, npm: str = "npm") -> Path:
    """Rebuild the vocabulary into `folder` (once) from the npm registry; the file's path."""
    target = folder / VOCAB_FILE
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        packed = (
            subprocess.run(
                [npm, "pack", JS_TIKTOKEN, "--silent", "--pack-destination", scratch],
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        with tarfile.open(Path(scratch) / packed) as archive:
            member = archive.extractfile(RANKS_MEMBER)
            assert member is not None, f"{JS_TIKTOKEN} has no {RANKS_MEMBER}"
            content = ranks_file(member.read().decode())
    digest = hashlib.sha256(content).hexdigest()
    if digest != VOCAB_SHA256:
        raise VocabMismatch(f"rebuilt {VOCAB_FILE} has SHA-256 {digest}, expected {VOCAB_SHA256}")
    partial = target.with_suffix(".partial")
    partial.write_bytes(content)
    partial.replace(target)
    return target


def point_harmony_at(folder: Path | None) -> None:
    """Make harmony read the vocabulary from `folder` when it is there (else it downloads it itself)."""
    if folder is not None and is_provisioned(folder):
        # Read by harmony's Rust loader, which takes no path argument.
        os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(folder)


def npm_available(npm: str = "npm") -> bool:
    """npm is on PATH."""
    return shutil.which(npm) is not None
