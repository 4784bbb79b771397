"""Webhook signatures as the Standard Webhooks specification gives them (standardwebhooks.com).

Standard library only: the settings check a secret with it, and the core must not pull in an
HTTP client to do so.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac


def secret_bytes(secret: str) -> bytes:
    """The signing key a secret stands for, as the Standard Webhooks libraries read it: base64,
    after an optional ``whsec_`` prefix. ``ValueError`` for one that is not (or is under 16 bytes)."""
    text = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        raise ValueError(
            "must be base64 (whsec_<base64>, as Standard Webhooks secrets are): for example "
            "whsec_$(head -c 32 /dev/urandom | base64)"
        ) from None
    if len(key) < 16:
        raise ValueError(f"is {len(key)} bytes long: use 16 or more (32 random bytes, base64)")
    return key


def signature(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header's value for one post (Standard Webhooks, ``v1``)."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
