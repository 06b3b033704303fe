"""Optional API keys for both front ends.

Keys come from an environment variable (comma-separated) and/or a mounted file
(one key per line, `#` comments allowed). Auth is on when the variable holds at
least one key or a key file is configured; a configured file that holds no key
refuses everything (fail closed) rather than silently opening the service.
The file is re-read when it changes, so a rotated Kubernetes Secret takes
effect without a restart.

Keys are only ever kept as SHA-256 digests and compared in constant time; no
message here (or anywhere in the router) contains a presented or stored key.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from typing import Iterable, Optional

logger = logging.getLogger("ray.serve")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _parse_keys(lines: Iterable[str]) -> list[str]:
    out = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def bearer_token(value: Optional[str]) -> Optional[str]:
    """The token of an `Authorization: Bearer <token>` value, or None when absent or malformed."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


class ApiKeys:
    def __init__(self, env_var: Optional[str] = None, file: Optional[str] = None, recheck_s: float = 5.0):
        self._env_keys = _parse_keys(os.environ.get(env_var, "").split(",")) if env_var else []
        self._file = file
        self._recheck_s = recheck_s
        self._file_mtime: Optional[float] = None
        self._file_keys: list[str] = []
        self._next_check = 0.0
        if file is not None:
            if not os.path.isfile(file):
                raise FileNotFoundError(f"api_keys_file {file!r} does not exist")
            self._reload_file(force=True)
        self._digests = self._build()
        if self.enabled:
            logger.info(
                "API keys enabled: %d from %s, %d from %s",
                len(self._env_keys), env_var, len(self._file_keys), file,
            )

    @property
    def enabled(self) -> bool:
        return bool(self._env_keys) or self._file is not None

    def _build(self) -> list[bytes]:
        return [_digest(k) for k in (*self._env_keys, *self._file_keys)]

    def _reload_file(self, force: bool = False) -> None:
        assert self._file is not None
        try:
            mtime = os.stat(self._file).st_mtime
            if not force and mtime == self._file_mtime:
                return
            with open(self._file, encoding="utf-8") as f:
                keys = _parse_keys(f)
        except OSError as e:
            # A Secret being swapped can vanish for a moment: keep the keys we had.
            logger.warning("could not read api_keys_file %s (%s); keeping the previous keys", self._file, e.strerror)
            return
        self._file_mtime = mtime
        self._file_keys = keys
        if not keys:
            logger.warning("api_keys_file %s holds no key: every request will be refused", self._file)

    def _maybe_reload(self) -> None:
        if self._file is None:
            return
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self._recheck_s
        before = self._file_mtime
        self._reload_file()
        if self._file_mtime != before:
            self._digests = self._build()

    def check(self, presented: Optional[str]) -> bool:
        """True when auth is off, or when `presented` is one of the keys."""
        if not self.enabled:
            return True
        self._maybe_reload()
        if not presented:
            return False
        d = _digest(presented)
        ok = False
        for known in self._digests:  # no early exit: the time taken does not depend on which key matched
            ok |= hmac.compare_digest(d, known)
        return ok
