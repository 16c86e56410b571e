"""Sticky A/B assignment: the same user always gets the same variant, and the share holds."""

from __future__ import annotations

import math
from collections import Counter

from gateway_harness import Gateway

from tuneline.gateway import ab


def binomial_bounds(n: int, p: float, z: float = 4.0) -> tuple[float, float]:
    """The count of successes within z standard deviations of n*p (z=4: a false alarm once in ~16,000)."""
    sd = math.sqrt(n * p * (1 - p))
    return n * p - z * sd, n * p + z * sd


def test_the_share_holds_within_binomial_bounds_over_10000_users() -> None:
    users = [f"user-{i}" for i in range(10_000)]
    for share in (0.05, 0.2, 0.5):
        for salt in ("support-assistant@2", "support-assistant@3"):
            to_challenger = sum(ab.to_challenger(u, share, salt) for u in users)
            low, high = binomial_bounds(len(users), share)
            assert low <= to_challenger <= high, (share, salt, to_challenger)


def test_the_same_user_always_gets_the_same_variant_and_a_new_challenger_redraws() -> None:
    users = [f"user-{i}" for i in range(2_000)]
    first = [ab.to_challenger(u, 0.3, "m@2") for u in users]
    assert [ab.to_challenger(u, 0.3, "m@2") for u in users] == first
    # A larger share keeps everyone already in the challenger's group (monotone in the share).
    assert all(ab.to_challenger(u, 0.5, "m@2") for u, inside in zip(users, first, strict=True) if inside)
    # A new challenger version draws a new group: about share^2 of users are in both.
    redrawn = [ab.to_challenger(u, 0.3, "m@3") for u in users]
    both = sum(a and b for a, b in zip(first, redrawn, strict=True))
    low, high = binomial_bounds(len(users), 0.09)
    assert low <= both <= high
    assert not ab.to_challenger(None, 0.9, "m@2") and not ab.to_challenger("", 0.9, "m@2")
    assert ab.to_challenger("anyone", 1.0, "m@2") and not ab.to_challenger("anyone", 0.0, "m@2")


def test_the_gateway_routes_users_stickily_by_user_field_or_header(gateways, upstreams) -> None:
    share = 0.3
    gw: Gateway = gateways(challenger_share=share, tracing=False)
    champion = gw.registry.register(upstreams(answer="champion"), "ft:x:v1", "champion")
    challenger = gw.registry.register(upstreams(answer="challenger"), "ft:x:v2", "challenger")
    salt = ab.salt_for(gw.name, challenger)
    seen: dict[str, set[str]] = {}
    variants: Counter[str] = Counter()
    for round_ in range(2):
        for i in range(60):
            user = f"user-{i}"
            if i % 2:
                raw = gw.ask(user=user)
            else:  # no `user` field: the header decides
                raw = gw.client().chat.completions.with_raw_response.create(
                    model=gw.name,
                    messages=[{"role": "user", "content": "hi"}],
                    extra_headers={"x-tuneline-user": user},
                )
            variant = raw.headers["x-tuneline-variant"]
            version = raw.headers["x-tuneline-model-version"]
            expected = "challenger" if ab.to_challenger(user, share, salt) else "champion"
            assert variant == expected
            assert version == (challenger if expected == "challenger" else champion)
            assert raw.parse().choices[0].message.content == expected
            seen.setdefault(user, set()).add(variant)
            variants[variant] += round_ == 0
    assert all(len(v) == 1 for v in seen.values())
    assert variants["challenger"] and variants["champion"]
    # Without a user key a request cannot be sticky: the champion answers it.
    assert gw.ask().headers["x-tuneline-variant"] == "champion"
