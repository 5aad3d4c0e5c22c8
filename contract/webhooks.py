"""Webhooks: a finished job's final state POSTed once to the ``callback_url`` its owner gave, signed
and retried with backoff. Shared by every kind of job: the store calls :func:`notify_finished`
once a job is terminal (:meth:`contract.pipelines.PipelineStore.advance`, or a cancel that
accounts for an image job's last images), with the job's ``kind``.

Delivery goes through an outbox in Redis, not a Celery task. A job ends in whichever
process accounts for its last unit (a worker, the reaper, or the API on a cancel), and each of
them holds a Redis client but not necessarily a Celery app; an outbox entry is one atomic write
next to the job's own state. The schedule lives in Redis too: the attempt count and the time the
next attempt is due, so retries survive a worker restart (Celery retries with a countdown wait in
the memory of the worker that took them, and with a Redis broker a countdown longer than the
visibility timeout is handed out twice). A thread in every worker's main process sends what is due
(:func:`deliver_due`); an attempt is leased while it runs, so a worker that dies mid-send leaves it
to another.

Signing (what a receiver checks, :func:`verify`): ``X-RIB-Timestamp`` is the Unix time of the
attempt, ``X-RIB-Signature`` is ``sha256=`` and the hex HMAC-SHA256 of ``<timestamp>.<body>``
under the caller's own secret, :func:`signing_secret` of the server's ``RIB_WEBHOOK_SECRET`` and
the digest of the caller's API key (``GET /v1/webhooks/secret`` tells a caller its secret). A
delivery can arrive more than once (a lost answer is retried): ``X-RIB-Delivery`` names it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis

from contract.lua import script
from contract.settings import Settings

CALLBACK_HELP = "URL the job's final state is POSTed to once, signed (docs/SERVICE.md, Webhooks)"

log = logging.getLogger(__name__)

EVENT = "job.finished"
OUTBOX = "rib:webhooks:due"           # sorted set: delivery id -> Unix time its next attempt is due
DELIVERIES = "rib:webhooks:delivery"  # hash: delivery id -> JSON (url, owner, body, attempts, last_error)
LEASE_S = 30.0                        # an attempt's lease beyond its HTTP timeout


def signing_secret(server_secret: str, owner: str) -> str:
    """The secret a caller's deliveries are signed with: one per API key (``owner``, its digest), so
    one receiver cannot forge another's; derived, so nothing per key is stored."""
    return hmac.new(server_secret.encode(), f"rib-webhook:{owner}".encode(), hashlib.sha256).hexdigest()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """``X-RIB-Signature``: ``sha256=`` and the hex HMAC-SHA256 of ``<timestamp>.<body>``."""
    return "sha256=" + hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str, tolerance_s: float = 300,
           now: float | None = None) -> bool:
    """What a receiver checks: the signature over the raw body, and a timestamp within
    ``tolerance_s`` of its clock (an old delivery replayed is refused)."""
    try:
        sent = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - sent) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, sent, body), signature)


def _addresses(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
        return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


def callback_error(url: str, allowed: Sequence[str]) -> str | None:
    """Why ``url`` may not receive callbacks, or None. ``allowed`` (RIB_WEBHOOK_ALLOWED_HOSTS): host
    names, IP addresses or CIDR ranges, and ``*`` for any host whose addresses are all public. A
    host matched by ``*`` only is refused when it resolves to a private, loopback or link-local
    address (the API's own network); listing the host or its range allows it. Checked at submit and
    again before each attempt (a name may resolve elsewhere by then)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"callback_url {url!r} must be an http:// or https:// URL with a host"
    if parts.username or parts.password:
        return "callback_url must not carry credentials: deliveries are signed instead"
    if not allowed:
        return "this server sends no callbacks: RIB_WEBHOOK_ALLOWED_HOSTS is empty"
    host = parts.hostname.lower()
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = _addresses(host, port)
    except (OSError, ValueError, UnicodeError) as e:
        return f"callback_url's host {host!r} cannot be resolved ({type(e).__name__})"
    names = {entry.strip().lower() for entry in allowed}
    networks = []
    for entry in names - {"*"}:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            continue  # a host name
    if host in names or (addresses and all(any(a in net for net in networks) for a in addresses)):
        return None
    if "*" not in names:
        return f"callback_url's host {host!r} is not in RIB_WEBHOOK_ALLOWED_HOSTS"
    if private := [a for a in addresses if not a.is_global]:
        return (f"callback_url's host {host!r} resolves to a private or loopback address ({private[0]}); only "
                "hosts listed in RIB_WEBHOOK_ALLOWED_HOSTS may be private")
    return None


def check_callback(url: str | None, settings: Settings) -> str | None:
    """Why a job may not carry ``url`` as its ``callback_url`` on this server, or None (no URL is fine)."""
    if url is None:
        return None
    if settings.webhook_secret is None:
        return "this server sends no callbacks: RIB_WEBHOOK_SECRET is not set"
    return callback_error(url, settings.webhook_allowed_hosts)


def notify_finished(r: redis.Redis, kind: str, job_id: str, state_body: dict[str, Any], callback_url: str | None,
                    owner: str, ttl_s: int) -> bool:
    """Queue the POST of a finished job's final state (``state_body``: its status) to ``callback_url``,
    once per job whatever calls this again (claimed in Redis for ``ttl_s``). True when queued now."""
    if not callback_url:
        return False
    delivery = f"{kind}:{job_id}"
    body = json.dumps({"event": EVENT, "kind": kind, "job_id": job_id, "state": state_body.get("state"),
                       "job": state_body}, sort_keys=True)
    record = json.dumps({"url": callback_url, "owner": owner, "body": body, "attempts": 0, "last_error": None})
    enqueue = r.register_script(script("webhook_enqueue"))
    return bool(enqueue(keys=[f"rib:webhooks:claimed:{delivery}", DELIVERIES, OUTBOX],
                        args=[delivery, record, time.time(), ttl_s]))


def _attempt(record: dict[str, Any], delivery: str, settings: Settings) -> str | None:
    """One POST; None when the receiver answered 2xx, else why not. Redirects are not followed."""
    if err := callback_error(record["url"], settings.webhook_allowed_hosts):
        return err
    assert settings.webhook_secret is not None
    body = record["body"].encode()
    now = int(time.time())
    secret = signing_secret(settings.webhook_secret.get_secret_value(), record["owner"])
    headers = {"Content-Type": "application/json", "User-Agent": "rib-service-webhook",
               "X-RIB-Event": EVENT, "X-RIB-Delivery": delivery, "X-RIB-Timestamp": str(now),
               "X-RIB-Signature": sign(secret, now, body)}
    try:
        response = httpx.post(record["url"], content=body, headers=headers, timeout=settings.webhook_timeout_s,
                              follow_redirects=False)
    except httpx.HTTPError as e:
        return f"{type(e).__name__}: {e}"
    return None if response.is_success else f"the receiver answered {response.status_code}"


def deliver_due(r: redis.Redis, settings: Settings, now: float | None = None) -> int:
    """Attempt every delivery due at ``now``; a failed attempt is due again after the next of
    ``RIB_WEBHOOK_RETRY_S``, and after the last one the delivery is dropped with a log line.
    Returns how many were delivered."""
    now = time.time() if now is None else now
    take = r.register_script(script("webhook_take"))
    delivered = 0
    while (delivery := take(keys=[OUTBOX], args=[now, now + settings.webhook_timeout_s + LEASE_S])) is not None:
        raw = r.hget(DELIVERIES, delivery)
        if raw is None:
            r.zrem(OUTBOX, delivery)
            continue
        record = json.loads(raw)
        error = _attempt(record, delivery, settings)
        attempts = record["attempts"] + 1
        if error is None or attempts > len(settings.webhook_retry_s):
            with r.pipeline() as pipe:
                pipe.hdel(DELIVERIES, delivery)
                pipe.zrem(OUTBOX, delivery)
                pipe.execute()
            if error is None:
                delivered += 1
            else:
                log.warning("webhook %s to %s dropped after %d attempts: %s", delivery, record["url"], attempts, error)
            continue
        log.info("webhook %s to %s: attempt %d failed (%s); next in %.0f s", delivery, record["url"], attempts,
                 error, settings.webhook_retry_s[attempts - 1])
        with r.pipeline() as pipe:
            pipe.hset(DELIVERIES, delivery, json.dumps({**record, "attempts": attempts, "last_error": error}))
            pipe.zadd(OUTBOX, {delivery: now + settings.webhook_retry_s[attempts - 1]})
            pipe.execute()
    return delivered
