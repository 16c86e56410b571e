"""Sticky A/B assignment: which users the challenger serves.

A user's key (the request's `user` field, else the `serving.user_header` header) is hashed with the
test's salt (the registered model and the challenger's version, so each new challenger draws a fresh
group of users): the first 64 bits of BLAKE2b, as a number in [0, 1), below `share` means challenger.
The same user always gets the same variant for a given challenger, without any stored state, and over
many users the share is `share` within its binomial bounds. A request without a user key cannot be
sticky: it goes to the champion.
"""

from __future__ import annotations

import hashlib

_SCALE = float(1 << 64)


def bucket(user: str, salt: str) -> float:
    """A user's point in [0, 1) for this test, uniform over users."""
    digest = hashlib.blake2b(f"{salt}\x00{user}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


def to_challenger(user: str | None, share: float, salt: str) -> bool:
    """True when this user is in the challenger's share."""
    if not user or share <= 0.0:
        return False
    if share >= 1.0:
        return True
    return bucket(user, salt) < share


def salt_for(registered_model: str, challenger_version: str) -> str:
    return f"{registered_model}@{challenger_version}"
