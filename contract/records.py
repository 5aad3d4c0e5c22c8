"""Job records in storage, signed by the service: what a job was asked, whose it is, its frozen inputs.

A job Redis lost is rebuilt from its record (``request.json``, ``pipeline.json``,
``training.json``), and a request may read its own job's files under the results prefix: both only
when the service wrote that record. Each carries an HMAC-SHA256 (key: the server's signing secret,
:meth:`contract.settings.Settings.signing_key`) over its canonical JSON; a record planted in
storage by anyone else (a training job's output aimed there, a hand-written object) fails the check
and is never adopted. Records are JSON, never pickles.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

from rib_core.io.storage import Storage

SIGNATURE = "signature"


class UntrustedRecordError(ValueError):
    """A record in storage the service did not write (no signature, or a wrong one)."""


def _canonical(body: dict[str, Any]) -> bytes:
    """The record's bytes without its signature: compact JSON in the record's own key order (which
    a JSON round trip keeps), so that the stored record is these bytes with the signature added."""
    return json.dumps({k: v for k, v in body.items() if k != SIGNATURE}, separators=(",", ":")).encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Records:
    """Signed JSON records in one storage."""

    storage: Storage
    key: bytes

    def _mac(self, canonical: bytes) -> str:
        return hmac.new(self.key, canonical, hashlib.sha256).hexdigest()

    def put(self, key: str, body: dict[str, Any]) -> None:
        canonical = _canonical({k: v for k, v in body.items() if k != SIGNATURE})
        signed = canonical[:-1] + (b"," if len(canonical) > 2 else b"") + \
            f'"{SIGNATURE}":"{self._mac(canonical)}"}}'.encode()
        self.storage.put(key, signed, "application/json")

    def get(self, key: str) -> dict[str, Any]:
        """The record without its signature. FileNotFoundError when absent, UntrustedRecordError when the
        service did not write it."""
        if not self.storage.exists(key):
            raise FileNotFoundError(key)
        try:
            body = json.loads(self.storage.get(key))
        except json.JSONDecodeError as e:
            raise UntrustedRecordError(f"{key} is not a job record") from e
        if not isinstance(body, dict) or not hmac.compare_digest(str(body.get(SIGNATURE, "")),
                                                                 self._mac(_canonical(body))):
            raise UntrustedRecordError(f"{key} was not written by this service")
        return {k: v for k, v in body.items() if k != SIGNATURE}

    def put_frozen(self, key: str, data: bytes) -> str:
        """Store a job's frozen input (a validated manifest); returns its digest, kept in the
        job's record and checked on every read (:meth:`get_frozen`)."""
        self.storage.put(key, data, "application/x-ndjson")
        return sha256(data)

    def get_frozen(self, key: str, digest: str) -> bytes:
        data = self.storage.get(key)
        if not hmac.compare_digest(sha256(data), digest):
            raise UntrustedRecordError(f"{key} changed after the job was submitted")
        return data
