from __future__ import annotations

import base64
import copy
import json

import pytest

from tuneline import secrets
from tuneline.secrets import (
    SECRET_DETECTORS,
    detect_secret,
    find_pii,
    find_secrets,
    find_secrets_and_pii,
    pii_kinds,
    redact_example,
    redact_text,
)

ALNUM = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _b64(document: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(document).encode()).decode().rstrip("=")


JWT = f"{_b64({'alg': 'HS256', 'typ': 'JWT'})}.{_b64({'sub': '42'})}.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"

# One credential in each detector's format (fake values).
SAMPLES = {
    "PrivateKeyDetector": "-----BEGIN RSA PRIVATE KEY-----",
    "PrivateKeyBlockDetector": "-----BEGIN ENCRYPTED PRIVATE KEY-----",
    "AWSKeyDetector": "AKIAIOSFODNN7EXAMPLE",
    "AzureStorageKeyDetector": "AccountKey=" + ("abcdEFGH1234+/" * 7)[:86] + "==",
    "BasicAuthDetector": "https://admin:hunter2@db.example.com/",
    "CloudantDetector": 'cloudant_password = "' + "0123456789abcdef" * 4 + '"',
    "DiscordBotTokenDetector": "MTA" + "x" * 21 + ".Gabcde." + "y" * 27,
    "GitHubTokenDetector": "ghp_" + ALNUM[:36],
    "GitHubFineGrainedTokenDetector": "github_pat_" + ALNUM[:40],
    "GitLabTokenDetector": "glpat-" + ALNUM[:20],
    "GoogleApiKeyDetector": "AIza" + ALNUM[:35],
    "HuggingFaceTokenDetector": "hf_abcdefghijklmnopqrstuvwxyzABCDEFGH",
    "IbmCloudIamDetector": 'ibm_cloud_iam_key = "' + (ALNUM + "_-")[:44] + '"',
    "IbmCosHmacDetector": 'ibm_cos_hmac_secret_access_key = "' + "0123456789abcdef" * 3 + '"',
    "JwtTokenDetector": JWT,
    "MailchimpDetector": "0123456789abcdef0123456789abcdef-us12",
    "NpmDetector": "//registry.npmjs.org/:_authToken=npm_" + ALNUM[:36],
    "OpenAIDetector": "sk-" + ALNUM[:20] + "T3BlbkFJ" + ALNUM[20:40],
    "SecretKeyDetector": "sk-proj-" + ALNUM[:40],
    "PypiTokenDetector": "pypi-AgEIcHlwaS5vcmc" + ALNUM + ALNUM[:10],
    "SendGridDetector": "SG." + ALNUM[:22] + "." + ALNUM[:43],
    "SlackDetector": "XOXB-1-A",  # short and upper case: found by the case-blind literal, not by length
    "SoftlayerDetector": 'softlayer_api_key = "' + "0123456789abcdef" * 4 + '"',
    "SquareOAuthDetector": "sq0csp-" + ALNUM[:43],
    "StripeDetector": "sk_live_" + ALNUM[:24],
    "TelegramBotTokenDetector": "123456789:" + ALNUM[:35],
    "TwilioKeyDetector": "AC" + "0123456789abcdef" * 2,
}

# Ordinary support text: ids, amounts, dates, versions, URLs, long words. None of it is a credential
# or PII.
CLEAN = [
    "Hi, my order #48213 hasn't arrived. Ticket TCK-2024-000123, tracking 1Z999AA10123456784.",
    "I was charged $1,299.00 twice on 2026-11-02 at 10:45; invoice INV-88213 shows both.",
    "The app (version 4.12.3, build 20261102) crashes on my Pixel 8 Pro after the update.",
    "See https://help.acme.example/billing/refunds?order=48213 for the refund policy.",
    "I reset my password three times and the key fob still shows error 0x80070005.",
    "Account ID 1234567, customer since 2019, loyalty points 48,213. Call back tomorrow!",
    "Unfortunately the internationalization settings (Settings > Language) are confusing.",
    "The serial number is SN-4821-3394-2211 and the model is AX-2000/B.",
    "Order 5551234 and order 5551235 were both delivered to the wrong address.",
    "Please ship to 221B Baker Street, London NW1 6XE; my postcode was wrong.",
    "Kundendienstmitarbeiterin Grüße, die Lieferung kam am 12.11.2026 beschädigt an.",
]


def test_every_detector_has_a_sample_it_finds_through_the_batch_scan() -> None:
    assert {type(d).__name__ for d in SECRET_DETECTORS} == set(SAMPLES)
    texts = [*CLEAN]
    for detector in SECRET_DETECTORS:
        sample = SAMPLES[type(detector).__name__]
        assert list(detector.analyze_string(sample)), type(detector).__name__
        texts.append(f"My order #48213 is late. Here is what support asked for: {sample} thanks")
    found = find_secrets(texts)
    assert sorted(found) == list(range(len(CLEAN), len(texts)))


def test_no_false_positives_on_ordinary_support_text() -> None:
    assert find_secrets_and_pii(CLEAN) == ({}, {})
    for text in CLEAN:
        assert detect_secret(text) is None, text
        assert pii_kinds(text) == [], text


def test_a_finding_names_the_kind_and_masks_the_value() -> None:
    finding = detect_secret("my key is sk-proj-" + ALNUM[:40])
    assert finding is not None
    assert finding.secret_type == "Secret API Key (sk-...)"
    assert str(finding) == "Secret API Key (sk-...) (sk-pro…)"
    assert ALNUM[:40] not in str(finding)


def test_texts_are_scanned_in_chunks_without_losing_a_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secrets, "_CHUNK_BYTES", 64)
    texts = [f"order {i} is late" for i in range(50)]
    texts[17] = "AKIAIOSFODNN7EXAMPLE"
    texts[18] = "-----BEGIN OPENSSH PRIVATE KEY-----"
    texts[49] = "write to jo@example.com"
    secrets_found, pii_found = find_secrets_and_pii(texts)
    assert sorted(secrets_found) == [17, 18]
    assert pii_found == {49: ["email"]}


@pytest.mark.parametrize(
    "text",
    [
        "call me at (212) 555-0147 please",
        "text me on +1 212-555-0147",
        "my UK number is +44 20 7946 0123.",
        "reach me: +14155550123",
        "office 212.555.0147 or 212 555 0147",
    ],
)
def test_phone_numbers_are_pii(text: str) -> None:
    assert pii_kinds(text) == ["phone"]
    assert "[phone]" in redact_text(text)
    assert find_pii(["nothing here", text]) == {1: ["phone"]}


def test_emails_and_phones_are_redacted_in_place() -> None:
    text = "Move my account from maria.lopez12@example.com to (212) 555-0147, thanks."
    assert pii_kinds(text) == ["email", "phone"]
    assert redact_text(text) == "Move my account from [email] to [phone], thanks."


def test_redact_example_copies_what_it_changes_and_shares_the_rest() -> None:
    example = {
        "messages": [
            {"role": "system", "content": "House style."},
            {"role": "user", "content": "Mail the invoice to jo@example.com"},
            {"role": "assistant", "content": "Billing: sent."},
        ]
    }
    before = copy.deepcopy(example)
    redacted = redact_example(example)
    assert example == before  # the input is untouched
    assert redacted["messages"][1]["content"] == "Mail the invoice to [email]"
    assert redacted is not example and redacted["messages"] is not example["messages"]
    assert redacted["messages"][0] is example["messages"][0]
    clean = {"messages": [{"role": "user", "content": "hello"}]}
    assert redact_example(clean) is clean
