"""Credentials and personal data in training text: what is looked for, and how PII is redacted.

Credentials are found by detect-secrets' own detectors (`SECRET_DETECTORS`): its regex-based key
detectors and the private-key detector, plus a few of the same kind for key formats it lacks (OpenAI
project keys without the legacy marker, any private-key block, fine-grained GitHub tokens, Google and
Hugging Face keys). Left out on purpose, because they flag ordinary support text: the high-entropy
string detectors (order numbers, tracking ids), the keyword detector (prose like "my password is
fine"), the Artifactory detector (any word starting "AP" plus a hex digit) and the public-IP detector
(not a credential). Detectors run offline: nothing is ever verified against a provider.

Scanning a million records with one detector call per text would take minutes, so each batch of
texts is first searched once with the union of all the detectors' patterns; only texts it hits are
handed to the detectors, which decide. The union matches wherever any detector's pattern does, so the
pre-filter never hides a finding.

PII is emails and phone numbers (`EMAIL`, `PHONE`); the policy (allow | redact | quarantine) is the
dedupe stage's. Phone numbers must look like phone numbers (a `+` country code, or a 3-3-4 grouping
with separators), so order numbers like #48213, ticket ids and dates are not PII.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
from detect_secrets.plugins.base import RegexBasedDetector
from detect_secrets.plugins.basic_auth import BasicAuthDetector
from detect_secrets.plugins.cloudant import CloudantDetector
from detect_secrets.plugins.discord import DiscordBotTokenDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.ibm_cloud_iam import IbmCloudIamDetector
from detect_secrets.plugins.ibm_cos_hmac import IbmCosHmacDetector
from detect_secrets.plugins.jwt import JwtTokenDetector
from detect_secrets.plugins.mailchimp import MailchimpDetector
from detect_secrets.plugins.npm import NpmDetector
from detect_secrets.plugins.openai import OpenAIDetector
from detect_secrets.plugins.private_key import PrivateKeyDetector
from detect_secrets.plugins.pypi_token import PypiTokenDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.slack import SlackDetector
from detect_secrets.plugins.softlayer import SoftlayerDetector
from detect_secrets.plugins.square_oauth import SquareOAuthDetector
from detect_secrets.plugins.stripe import StripeDetector
from detect_secrets.plugins.telegram_token import TelegramBotTokenDetector
from detect_secrets.plugins.twilio import TwilioKeyDetector


class SecretKeyDetector(RegexBasedDetector):
    """`sk-` secret keys (OpenAI project and service keys, Anthropic keys): detect-secrets' OpenAI
    detector only knows the legacy keys carrying the T3BlbkFJ marker."""

    secret_type = "Secret API Key (sk-...)"
    denylist = (re.compile(r"(?<![\w-])sk-[A-Za-z0-9_-]{20,}"),)


class PrivateKeyBlockDetector(RegexBasedDetector):
    """Any PEM private-key header, e.g. ENCRYPTED PRIVATE KEY, which detect-secrets' list lacks."""

    secret_type = "Private Key"
    denylist = (re.compile(r"-----BEGIN[A-Z0-9 ]* PRIVATE KEY(?: BLOCK)?-----"),)


class GitHubFineGrainedTokenDetector(RegexBasedDetector):
    secret_type = "GitHub Token"
    denylist = (re.compile(r"github_pat_[A-Za-z0-9_]{22,}"),)


class GoogleApiKeyDetector(RegexBasedDetector):
    secret_type = "Google API Key"
    denylist = (re.compile(r"AIza[0-9A-Za-z_-]{35}"),)


class HuggingFaceTokenDetector(RegexBasedDetector):
    secret_type = "Hugging Face Token"
    denylist = (re.compile(r"(?<![\w-])hf_[A-Za-z0-9]{34,}"),)


SECRET_DETECTORS: tuple[RegexBasedDetector, ...] = (
    PrivateKeyDetector(),
    PrivateKeyBlockDetector(),
    AWSKeyDetector(),
    AzureStorageKeyDetector(),
    BasicAuthDetector(),
    CloudantDetector(),
    DiscordBotTokenDetector(),
    GitHubTokenDetector(),
    GitHubFineGrainedTokenDetector(),
    GitLabTokenDetector(),
    GoogleApiKeyDetector(),
    HuggingFaceTokenDetector(),
    IbmCloudIamDetector(),
    IbmCosHmacDetector(),
    JwtTokenDetector(),
    MailchimpDetector(),
    NpmDetector(),
    OpenAIDetector(),
    SecretKeyDetector(),
    PypiTokenDetector(),
    SendGridDetector(),
    SlackDetector(),
    SoftlayerDetector(),
    SquareOAuthDetector(),
    StripeDetector(),
    TelegramBotTokenDetector(),
    TwilioKeyDetector(),
)

EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w-])")
PHONE = re.compile(
    r"""
    (?<![\w\#/.+-])                                          # not the tail of an id, a decimal, an order #
    (?:
        \+\d{1,3}[\ .-]?(?:\(\d{1,4}\)[\ .-]?)?\d{1,4}(?:[\ .-]\d{2,4}){1,4}   # +44 20 7946 0123, +1 212-555-0147
      | \+\d{8,15}                                           # +14155550123
      | \(\d{3}\)[\ .-]?\d{3}[\ .-]\d{4}                     # (212) 555-0147
      | \d{3}[.-]\d{3}[.-]\d{4}                              # 212-555-0147, 212.555.0147
      | \d{3}\ \d{3}\ \d{4}                                  # 212 555 0147
    )
    (?![\w-])
    """,
    re.VERBOSE | re.ASCII,
)
REDACTIONS = (("[email]", EMAIL), ("[phone]", PHONE))

# Texts joined per scan: large enough to amortise the calls, small enough to bound the joined copy.
_CHUNK_BYTES = 1 << 24


def _byte_table(classes: dict[bytes, bytes], default: bytes, high: bytes) -> bytes:
    """A bytes.translate table: each byte of a class key becomes that class's byte; other ASCII bytes
    `default`; bytes >= 0x80 (parts of non-ASCII characters) `high`."""
    table = bytearray(default * 128 + high * 128)
    for members, replacement in classes.items():
        for byte in members:
            table[byte] = replacement[0]
    return bytes(table)


_ALNUM = (
    bytes(range(ord("0"), ord("9") + 1))
    + bytes(range(ord("A"), ord("Z") + 1))
    + bytes(range(ord("a"), ord("z") + 1))
)
# Every detector's pattern, when it matches, covers either 16 characters in a row of [\w+/=\\-] (every
# key format: 16 to 1024 such characters) or one of these literals (the formats that can be short: key
# headers, URLs with credentials, minimal JWTs, npm and Slack tokens). Non-ASCII bytes count as token
# characters, since a non-ASCII \w character is one; a test checks a sample secret of every detector.
_TOKEN_TABLE = _byte_table({_ALNUM + b"_+/=\\-": b"a"}, b" ", b"a")
_SECRET_RUN = b"a" * 16
_SECRET_LITERALS = (b"PRIVATE KEY", b"PuTTY-User-Key-File", b"://", b"eyJ", b"_authToken")
_SECRET_LITERALS_ANY_CASE = (b"xox",)  # searched in ASCII-lowercased text
_LOWER_TABLE = bytes.maketrans(bytes(range(ord("A"), ord("Z") + 1)), bytes(range(ord("a"), ord("z") + 1)))
# Every PHONE match holds "+" and a digit, or 3 digits, a separator and 4 digits (PHONE is ASCII-only).
_PHONE_TABLE = _byte_table({bytes(range(ord("0"), ord("9") + 1)): b"9", b" .-": b"s", b"+": b"+"}, b"_", b"_")
_PHONE_NEEDLES = (b"+9", b"999s9999")


Search = tuple[bytes | None, tuple[bytes, ...]]  # (translate table or None, needles)


def _containing(texts: Sequence[str], groups: Sequence[Sequence[Search]]) -> list[set[int]]:
    """For each group of searches, the indices of the texts that contain a needle of one of its
    searches once the search's table maps their UTF-8 bytes. Texts are encoded once and searched
    joined (by newlines, which no needle holds), a chunk at a time, with bytes.find: a C loop, where a
    regex over the same text takes ten times longer."""
    found: list[set[int]] = [set() for _ in groups]
    start = 0
    while start < len(texts):
        encoded: list[bytes] = []
        size = 0
        while start + len(encoded) < len(texts) and size < _CHUNK_BYTES:
            piece = texts[start + len(encoded)].encode("utf-8", "surrogatepass")
            encoded.append(piece)
            size += len(piece) + 1
        original = b"\n".join(encoded)
        ends = np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)) + 1)
        for hits, searches in zip(found, groups, strict=True):
            for table, needles in searches:
                joined = original if table is None else original.translate(table)
                for needle in needles:
                    position = joined.find(needle)
                    while position >= 0:
                        index = int(np.searchsorted(ends, position, side="right"))
                        hits.add(start + index)
                        position = joined.find(needle, int(ends[index]))  # on to the next text
        start += len(encoded)
    return found


# A superset of the texts a secret detector flags (see _TOKEN_TABLE), and of those with PII.
_SECRET_SEARCHES: tuple[Search, ...] = (
    (_TOKEN_TABLE, (_SECRET_RUN,)),
    (None, _SECRET_LITERALS),
    (_LOWER_TABLE, _SECRET_LITERALS_ANY_CASE),
)
_PII_SEARCHES: tuple[Search, ...] = ((None, (b"@",)), (_PHONE_TABLE, _PHONE_NEEDLES))


@dataclass(frozen=True)
class SecretFinding:
    """A credential found in a text: the detector's name for it and a masked excerpt."""

    secret_type: str
    excerpt: str

    def __str__(self) -> str:
        return f"{self.secret_type} ({self.excerpt})"


def mask(secret: str) -> str:
    """Enough of a secret to find it again in the raw record, not enough to use it."""
    secret = secret.strip()
    return (secret[:6] if len(secret) >= 20 else secret[:2]) + "…"


def detect_secret(text: str) -> SecretFinding | None:
    """The first credential in a text by the detectors' order, or None."""
    for detector in SECRET_DETECTORS:
        for secret in detector.analyze_string(text):
            return SecretFinding(detector.secret_type, mask(secret))
    return None


def find_secrets(texts: Sequence[str]) -> dict[int, SecretFinding]:
    """The first credential of every text that holds one, by the text's index."""
    return find_secrets_and_pii(texts)[0]


def pii_kinds(text: str) -> list[str]:
    """Which kinds of PII a text holds: "email", "phone" (in that order)."""
    kinds = []
    if "@" in text and EMAIL.search(text):
        kinds.append("email")
    if PHONE.search(text):
        kinds.append("phone")
    return kinds


def find_pii(texts: Sequence[str]) -> dict[int, list[str]]:
    """The kinds of PII of every text that holds some, by the text's index."""
    return find_secrets_and_pii(texts)[1]


def find_secrets_and_pii(texts: Sequence[str]) -> tuple[dict[int, SecretFinding], dict[int, list[str]]]:
    """find_secrets and find_pii in one pass over the texts."""
    secret_candidates, pii_candidates = _containing(texts, (_SECRET_SEARCHES, _PII_SEARCHES))
    secrets: dict[int, SecretFinding] = {}
    for index in sorted(secret_candidates):
        finding = detect_secret(texts[index])
        if finding is not None:
            secrets[index] = finding
    pii: dict[int, list[str]] = {}
    for index in sorted(pii_candidates):
        kinds = pii_kinds(texts[index])
        if kinds:
            pii[index] = kinds
    return secrets, pii


def redact_text(text: str) -> str:
    """The text with every email replaced by [email] and every phone number by [phone]."""
    for replacement, pattern in REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


def redact_example(value: Any) -> Any:
    """A copy of an example with PII redacted in every string value (keys and the original untouched);
    containers without PII are shared, not copied."""
    if isinstance(value, str):
        text = redact_text(value)
        return value if text == value else text
    if isinstance(value, dict):
        items = {key: redact_example(item) for key, item in value.items()}
        return value if all(items[k] is value[k] for k in value) else items
    if isinstance(value, list):
        redacted = [redact_example(item) for item in value]
        return value if all(a is b for a, b in zip(redacted, value, strict=True)) else redacted
    return value


# A private key's header is what the detectors match; masking takes its body too: up to its END line,
# else to the end of the JSON string it is in (an unescaped quote), else to the end of the text.
_KEY_BLOCK = re.compile(
    r"(?:-{4,5} ?BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)? ?-{4,5}|PuTTY-User-Key-File-\d+:)"
    r".*?(?:-{4,5} ?END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)? ?-{4,5}|(?=(?<!\\)\")|\Z)",
    re.DOTALL,
)


def masked(kind: str) -> str:
    """What stands in a text where a credential was: where it was, and which detector found it."""
    return f"[masked credential: {kind}]"


def mask_credentials(text: str) -> str:
    """The text with everything any detector's pattern matches replaced by `masked(kind)`: the whole
    match (a keyword with its value too), and a private key from its header to its end. Masks at least
    what `detect_secret` finds, since it runs the same patterns (some detectors then check the value)."""
    spans: list[tuple[int, int, str]] = []
    for detector in SECRET_DETECTORS:
        for pattern in detector.denylist:
            spans.extend(
                (m.start(), m.end(), detector.secret_type)
                for m in pattern.finditer(text)
                if m.end() > m.start()
            )
    spans.extend((m.start(), m.end(), "Private Key") for m in _KEY_BLOCK.finditer(text))
    if not spans:
        return text
    spans.sort()
    pieces: list[str] = []
    position = 0
    start, end, kind = spans[0]
    for next_start, next_end, next_kind in spans[1:]:
        if next_start < end:  # overlapping matches are one masked stretch, named by the first
            end = max(end, next_end)
            continue
        pieces += [text[position:start], masked(kind)]
        position = end
        start, end, kind = next_start, next_end, next_kind
    pieces += [text[position:start], masked(kind), text[end:]]
    return "".join(pieces)
