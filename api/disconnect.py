"""Whether the client of the current request has gone away, by peeking at its socket.

gunicorn (`gunicorn.socket`) and werkzeug's server (`werkzeug.socket`) put the connection in the
WSGI environ. A socket that is readable but yields no bytes has been closed by the peer; a request
whose body was read has nothing else to send, so this does not consume anything the app needs.
"""

from __future__ import annotations

import select
import socket
from typing import Any

SOCKET_KEYS = ("gunicorn.socket", "werkzeug.socket")


def client_socket(environ: dict[str, Any]) -> socket.socket | None:
    """The connection of a request, when the server exposes it."""
    for key in SOCKET_KEYS:
        sock = environ.get(key)
        if isinstance(sock, socket.socket):
            return sock
    return None


def gone(sock: socket.socket | None) -> bool:
    """The peer closed (or reset) the connection. False when unknown (no socket, TLS)."""
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):  # a spurious wake-up: nothing to read, still there
        return False
    except (ConnectionError, OSError):
        return True
    except ValueError:  # TLS sockets refuse MSG_PEEK
        return False
