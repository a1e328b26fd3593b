"""The Redis that `gptoss up` starts for itself, locked to its user: a password and private files.

The password is generated once and kept in the Redis folder (0600), so every start of the same data
dir uses the same one. redis-server reads it from a config file (0600), never from its argv, which
`ps` shows to every local user. The folder is 0700 and redis-server runs under umask 077, so its
AOF, RDB and log are readable by this user only.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

PASSWORD_FILE = "password"
"""The kept password, in the Redis folder."""

URL_FILE = "url"
"""The URL of the latest start, password included, for `GPTOSS_REDIS_URL=$(cat …/url) gptoss keys …`."""

CONFIG_FILE = "redis.conf"
"""redis-server's config, written at each start."""

LOG_FILE = "redis.log"
"""redis-server's log, in the Redis folder."""

PRIVATE_UMASK = 0o077
"""The umask redis-server runs under: what it creates (AOF, RDB, log) only its user can read."""

PASSWORD_BYTES = 32
"""Random bytes of a new password (43 URL-safe characters)."""


def private_dir(path: Path, *, tighten: bool = False) -> Path:
    """`path` as a folder: made 0700 if missing (its parents as usual); an existing one is made
    0700 only when `tighten` (a folder that is ours alone, like the Redis data)."""
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)
        path.chmod(0o700)
    elif tighten:
        path.chmod(0o700)
    return path


def write_private(path: Path, text: str) -> None:
    """Write `path` with mode 0600 from its first byte: a new file, then renamed over any old one."""
    partial = _new_private(path, text)
    os.replace(partial, path)


def kept_password(path: Path) -> str:
    """The password kept at `path`, or a new one written there (0600) if there is none."""
    if not path.exists():
        partial = _new_private(path, secrets.token_urlsafe(PASSWORD_BYTES) + "\n")
        try:
            os.link(partial, path)  # whole or not at all; a concurrent start's password wins if first
        except FileExistsError:
            pass
        finally:
            partial.unlink()
    path.chmod(0o600)  # a copy loosened by hand is tightened again
    if password := path.read_text().strip():
        return password
    raise RuntimeError(f"{path} is empty; delete it to have a new password made")


def _new_private(path: Path, text: str) -> Path:
    """A new file beside `path` holding `text`, mode 0600 from its creation; its path."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    return partial


def server_config(folder: Path, port: int, password: str, fsync: str) -> str:
    """redis.conf of our own Redis: loopback only, AOF on (`fsync`: everysec or always), no RDB
    snapshots, its log in `folder`, a password required."""
    lines = [
        f"port {port}",
        "bind 127.0.0.1",
        f"dir {_quoted(str(folder))}",
        f"logfile {_quoted(str(folder / LOG_FILE))}",
        "appendonly yes",
        f"appendfsync {fsync}",
        'save ""',
        f"requirepass {_quoted(password)}",
    ]
    return "\n".join(lines) + "\n"


def _quoted(value: str) -> str:
    """`value` as a double-quoted redis.conf argument."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def server_url(port: int, password: str) -> str:
    """The URL of our own Redis on loopback, password included."""
    return f"redis://:{password}@127.0.0.1:{port}/0"


def prepare(folder: Path, port: int, fsync: str) -> tuple[Path, str]:
    """Make `folder` private, keep its password and write the config for a start on `port`;
    (the config file, the URL with the password)."""
    private_dir(folder, tighten=True)
    password = kept_password(folder / PASSWORD_FILE)
    config = folder / CONFIG_FILE
    write_private(config, server_config(folder, port, password, fsync))
    url = server_url(port, password)
    write_private(folder / URL_FILE, url + "\n")
    return config, url
