"""Made-up values the planted records carry: credentials, email addresses, phone numbers, tool-call
ids and pasted logs. Credentials are made at run time from random characters, so no literal
credential is in the source (a hook greps diffs for them).
"""

from __future__ import annotations

import random
import string
from datetime import datetime, timedelta
from typing import Any

from tuneline.demo.content import DIRT

ALNUM = string.ascii_letters + string.digits


def _random_chars(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def fake_openai_key(rng: random.Random) -> str:
    return "sk-" + "proj-" + _random_chars(rng, ALNUM + "_-", 40)


def fake_aws_access_key(rng: random.Random) -> str:
    return "AK" + "IA" + _random_chars(rng, string.ascii_uppercase + string.digits, 16)


def fake_github_token(rng: random.Random) -> str:
    return "gh" + "p_" + _random_chars(rng, ALNUM, 36)


def fake_private_key(rng: random.Random, label: str) -> str:
    body = _random_chars(rng, ALNUM + "+/", 160)
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join([f"-----BEGIN {label} PRIVATE KEY-----", *lines, f"-----END {label} PRIVATE KEY-----"])


CREDENTIAL_MAKERS = {
    "OpenAI API key": fake_openai_key,
    "AWS access key": fake_aws_access_key,
    "GitHub token": fake_github_token,
    "EC private key block": lambda rng: fake_private_key(rng, "EC"),
    "OpenSSH private key block": lambda rng: fake_private_key(rng, "OPENSSH"),
}


def fake_email(rng: random.Random) -> str:
    parts = DIRT.email
    first, last = rng.choice(parts.first_names), rng.choice(parts.last_names)
    return f"{first}.{last}{rng.randint(1, 99)}@{rng.choice(parts.domains)}"


def fake_phone(rng: random.Random) -> str:
    return rng.choice(
        (
            f"({rng.randint(201, 989)}) 555-01{rng.randint(10, 99)}",
            f"+1 {rng.randint(201, 989)}-555-01{rng.randint(10, 99)}",
            f"+44 20 7946 0{rng.randint(100, 999)}",
        )
    )


def tool_call(call_id: str, name: str | None, arguments: str) -> dict[str, Any]:
    """A tool call; `name` None leaves the function name out (a broken call)."""
    function = {"arguments": arguments} if name is None else {"name": name, "arguments": arguments}
    return {"id": call_id, "type": "function", "function": function}


def call_id(rng: random.Random) -> str:
    # Short, as real ids are opaque but not key-like: long random ids read as secrets to scanners.
    return "call_" + _random_chars(rng, ALNUM, 8)


def pasted_log(rng: random.Random, lines: int) -> str:
    moment = datetime(2026, 11, 18, 9, 14, 3)
    out = []
    for _ in range(lines):
        moment += timedelta(milliseconds=rng.randint(5, 900))
        out.append(
            f"{moment:%Y-%m-%d %H:%M:%S}.{moment.microsecond // 1000:03d} {rng.choice(DIRT.log_lines)}"
        )
    return "\n".join(out)
