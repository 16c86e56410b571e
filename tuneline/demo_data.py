"""The demo data of tuneline, and the generator that makes all of it, byte for byte, from a seed.

`python -m tuneline.demo_data [--seed N] [--out data]` writes under `--out`:
- `raw/support/dt=2026-11-16/` .. `dt=2026-11-22/`: a customer-support task for "Acme" in seven daily
  partitions: chat JSONL (`part-0000.jsonl`), legacy prompt/completion JSONL (`legacy.jsonl`, three
  days) and one CRM export (`crm_export.csv`, one day), with realistic dirt planted in them;
- `eval/support_eval.jsonl`: the held-out task eval set;
- `general/canary.jsonl` (general questions with short fixed answers) and `general/general_chat.jsonl`
  (the small general corpus the built-in tiny model is pretrained on, holding every canary fact);
- `planted_defects.json`: the answer key, every planted record with the quarantine reason the data-plane
  contract expects (or null for planted records that must be kept);
- `README.md`: what all of it is, with the counts.

Guarantees, checked before anything is written (the generator refuses to write data that breaks them):
the same seed gives the same bytes; every planted defect gets exactly the reason the contract's
precedence gives it; every record not listed in the answer key is clean and distinct from every other
kept record (no exact or normalised duplicate, no near-duplicate at word-3-shingle Jaccard >= 0.8, no
contradiction, no eval leak), under every reasonable reading of "normalised" (punctuation removed or
replaced by a space, system prompt included or not); every record fits the tuneline-tiny context
except the planted over-long ones.

`synthetic_chat_lines` streams any number of support-style chat lines with a little dirt, fast, for the
data-plane benchmark.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import re
import string
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse

from tuneline import formats, normalize, tokens
from tuneline.config import DedupeConfig, ValidationConfig
from tuneline.paths import DATA_DIR

DEFAULT_SEED = 20261125
# Equal to model.system_prompt in configs/local.yaml (a test holds the two together).
SYSTEM_PROMPT = "You are the Acme support assistant. Reply with the category and the house reply."
MODEL = "tuneline-tiny"
CONTEXT_LIMIT = ValidationConfig().context_limits[MODEL]
ENCODING = "o200k_base"
PARTITIONS = tuple(f"2026-11-{day}" for day in range(16, 23))
LEGACY_DAYS = ("2026-11-17", "2026-11-19", "2026-11-21")
CSV_DAY = "2026-11-19"
CSV_COLUMNS = ("ticket_id", "created_at", "customer_message", "agent_reply")
RAW_ROOT = "raw/support"
EVAL_PATH = "eval/support_eval.jsonl"
PARAPHRASE_PATH = "eval/support_paraphrases.jsonl"
CANARY_PATH = "general/canary.jsonl"
GENERAL_PATH = "general/general_chat.jsonl"
ANSWER_KEY_PATH = "planted_defects.json"
# Answer-key paths are given as committed in the repository, whatever --out is.
REPO_PREFIX = "data"

# The contract's thresholds (configs/local.yaml keeps the defaults) and the stricter bar every pair
# of kept records stays under, so that no reasonable dedupe implementation finds a pair.
NEAR_DUPLICATE_THRESHOLD = DedupeConfig().near_duplicate_threshold
LEAKAGE_THRESHOLD = DedupeConfig().leakage_threshold
SHINGLE_SIZE = DedupeConfig().shingle_size
DISTINCT_BELOW = 0.8
# Planted near-duplicates and near-leaks must stand clearly above the configured thresholds.
PLANTED_SIMILAR_AT_LEAST = 0.9
# A new clean message is refused above these (stricter than DISTINCT_BELOW, which the final check
# applies in every reading of the normalised form): its prompt against an eval prompt, and its whole
# example against the examples of the same intent (only those share the system prompt and answer).
ADMIT_EVAL_BELOW = 0.6
ADMIT_SAME_INTENT_BELOW = 0.7

N_EVAL = 80
CHAT_LINES_PER_DAY = (80, 86)
LEGACY_LINES_PER_DAY = (20, 24)
CSV_CLEAN_ROWS = 26

# Every dirt kind planted (the answer key's `kind`), with what it is.
DIRT_KINDS: dict[str, str] = {
    "malformed_json": "a line that is not JSON: truncated, a trailing comma, single quotes",
    "non_utf8": "a line encoded as latin-1, not UTF-8",
    "wrong_role": "a message role the API does not know (customer, bot)",
    "missing_assistant": "a conversation with no assistant turn",
    "empty_content": 'a message whose content is ""',
    "tool_call_valid": "a valid tool-calling example (tools, tool_calls, tool reply, final answer): kept",
    "tool_call_invalid": "a broken tool call: arguments not JSON, no function name, tool reply without its call",
    "weight_valid": "weight 0 on an earlier assistant turn of a multi-turn example: kept",
    "weight_invalid": 'weight 2, weight "1", or weight on a user message',
    "special_token": "a forbidden special token such as <|endoftext|> in the text",
    "over_long": f"an example over the {MODEL} context of {CONTEXT_LIMIT} {ENCODING} tokens",
    "exact_duplicate": "the same example again (same line, or the same example in another file or format)",
    "normalized_duplicate": "the same example up to case, whitespace, punctuation or JSON layout",
    "near_duplicate": "a long example again with one word changed",
    "contradiction": "the same question answered differently earlier (keep-latest quarantines it)",
    "contradiction_kept": "the latest answer to a contradicted question: kept",
    "eval_leak": "an eval-set question in the training data, exactly or with a tiny edit",
    "secret": "a credential: OpenAI API key, AWS access key, GitHub token or private key block",
    "pii": "an email address or phone number: kept, redacted on export",
    "csv_empty_reply": "a CRM export row with an empty agent_reply",
}
# The kinds of dirt the task asks for, each planted at least three times.
REQUIRED_KINDS = tuple(k for k in DIRT_KINDS if k not in ("contradiction_kept", "csv_empty_reply"))


# --------------------------------------------------------------------------------------------------
# The task: intents, their fixed house replies, and the phrases users write them with.


@dataclass(frozen=True)
class Intent:
    name: str
    reply: str
    train: tuple[str, ...]  # core sentences the training data and the eval set are written with
    held_out: tuple[str, ...]  # core sentences only the paraphrase stress set uses
    details: tuple[str, ...]
    held_out_details: tuple[str, ...]

    @property
    def category(self) -> str:
        return self.name.split("/")[0]

    @property
    def answer(self) -> str:
        """The house answer: the one assistant text the model must produce for this intent."""
        return f"Category: {self.name}\nReply: {self.reply}"


INTENTS: tuple[Intent, ...] = (
    Intent(
        "billing/double_charge",
        "Sorry about the duplicate charge. Our billing team will reverse the extra payment, and it will "
        "return to your original payment method within five business days.",
        (
            "I was charged twice for order {order}.",
            "My card shows two identical payments of {amount} for one order.",
            "You billed me two times for the {product}.",
            "There are two charges of {amount} on my statement but I only ordered once.",
            "why did i get charged double for {order}",
            "The same purchase went through twice on my credit card.",
            "I see a duplicate transaction from Acme dated {date}.",
            "The payment for my {product} was taken twice from my bank account.",
        ),
        (
            "My banking app lists the {product} payment two times, both {amount}.",
            "Acme took the money for order {order} on two separate occasions.",
            "Got double billed on {date} and I need one of those reversed.",
        ),
        ("Both charges are exactly {amount}.", "The order number is {order}.", "I only clicked pay once."),
        ("Each one shows as completed, not pending.",),
    ),
    Intent(
        "billing/refund_status",
        "Your refund has been issued. Refunds take five to ten business days to appear on your statement, "
        "depending on your bank. No further action is needed.",
        (
            "I returned the {product} on {date} and still haven't seen my refund.",
            "Where is my refund for order {order}?",
            "You promised a refund of {amount} but nothing has arrived yet.",
            "It has been two weeks since my return was accepted and no money back.",
            "can you check the status of my refund for {order}",
            "My refund of {amount} is still pending according to my bank.",
            "The return reached your warehouse but the refund is missing.",
            "I canceled order {order} and was told I would be refunded, has that happened?",
        ),
        (
            "Any news on the money I'm owed for the returned {product}?",
            "The {amount} refund you confirmed on {date} never reached my card.",
            "How long until the refund for order {order} shows up?",
        ),
        (
            "The return tracking says it was delivered on {date}.",
            "The order was {order}.",
            "The amount should be {amount}.",
        ),
        ("I sent it back with the prepaid label.",),
    ),
    Intent(
        "billing/invoice_copy",
        "You can download every invoice under Account > Orders > Invoices. We have also emailed a PDF copy "
        "of the requested invoice to the address on your account.",
        (
            "I need a copy of the invoice for order {order}.",
            "Can you send me the receipt for my {product}?",
            "My accountant needs an invoice for the purchase I made on {date}.",
            "where can i download invoices for my orders",
            "I lost the invoice for {amount} and need it for my expense report.",
            "Please resend the invoice for order {order}.",
            "I need a VAT invoice for my company for the {product}.",
            "The invoice email never arrived after I paid {amount}.",
        ),
        (
            "Could I get a PDF bill for the {product} I bought?",
            "Looking for the tax receipt of order {order}, it's not in my inbox.",
            "Need paperwork for my {amount} purchase so work can reimburse me.",
        ),
        ("It was paid by credit card.", "The order was placed on {date}.", "The total was {amount}."),
        ("It has to show the company name.",),
    ),
    Intent(
        "billing/update_payment",
        "To update your payment method, go to Account > Billing > Payment methods, add the new card, and set "
        "it as default. Future charges will use it.",
        (
            "My credit card expired and I need to add a new one.",
            "How do I change the card you charge for my subscription?",
            "I want to switch my payment method to PayPal.",
            "My bank issued me a new card, how do I update it on my account?",
            "The payment for order {order} failed because my card is outdated.",
            "please update my billing card, the old one was cancelled",
            "I'd like to remove my old Visa and use a different card.",
            "Your site keeps charging a card I no longer use.",
        ),
        (
            "I got a new debit card, where do I swap it in?",
            "Want to replace the saved card before my next charge on {date}.",
            "Is there a way to pay with another card from now on?",
        ),
        ("The next charge is due on {date}.", "The amount due is {amount}.", "The old card was blocked."),
        ("I don't want the next payment to bounce.",),
    ),
    Intent(
        "shipping/where_is_order",
        "Your order is on its way. Use the tracking link in your shipping confirmation email for live updates; "
        "most orders arrive within three to five business days.",
        (
            "Where is my order {order}?",
            "My {product} was supposed to arrive on {date} and it's still not here.",
            "The tracking for order {order} hasn't updated in days.",
            "I ordered a new {product} a week ago and have no idea where it is.",
            "when will my package arrive",
            "Order {order} says shipped but nothing has shown up.",
            "Can you tell me the delivery status of my {product}?",
            "My parcel seems to be stuck somewhere, it was due {date}.",
        ),
        (
            "Still waiting on the {product}, any idea when it gets here?",
            "Has order {order} even left your warehouse yet?",
            "The courier site shows nothing for my delivery from {date}.",
        ),
        ("I paid {amount} for express shipping.", "The order number is {order}.", "I placed it on {date}."),
        ("I need it before the weekend.",),
    ),
    Intent(
        "shipping/damaged_item",
        "We are sorry your item arrived damaged. Please upload a photo under Orders > Report a problem, and we "
        "will send a free replacement or a full refund.",
        (
            "My {product} arrived broken.",
            "The box for order {order} was crushed and the item inside is damaged.",
            "The {product} I received has a big crack in it.",
            "my package came today and the contents are smashed",
            "The {product} from order {order} was scratched and dented when I opened it.",
            "Half of the parts in my delivery were broken.",
            "The item arrived wet and ruined.",
            "I just unpacked my {product} and it doesn't work because it was damaged in shipping.",
        ),
        (
            "Opened the parcel and the {product} was in pieces.",
            "Order {order} showed up with a shattered screen.",
            "The courier clearly dropped my {product}, it's bent.",
        ),
        ("I have photos of the damage.", "It was delivered on {date}.", "I paid {amount} for it."),
        ("The outer box looked fine.",),
    ),
    Intent(
        "shipping/change_address",
        "We can change the delivery address until the order ships. Please update it under Orders > Edit "
        "shipping details; if it has already shipped, contact the carrier.",
        (
            "I need to change the shipping address on order {order}.",
            "I moved last week, can you send my {product} to my new address?",
            "I entered the wrong street number for my delivery.",
            "Please update the delivery address for my order placed on {date}.",
            "can i ship order {order} to my office instead",
            "The address on my order is my old apartment.",
            "I made a typo in my zip code when ordering the {product}.",
            "Is it possible to redirect my package to a different address?",
        ),
        (
            "Need the {product} delivered to my parents' place instead.",
            "Wrong postcode on order {order}, can that be fixed?",
            "I'm relocating before {date}, can the parcel follow me?",
        ),
        (
            "It hasn't shipped yet as far as I can tell.",
            "The order number is {order}.",
            "I ordered it on {date}.",
        ),
        ("Nobody will be at the old address.",),
    ),
    Intent(
        "shipping/return_item",
        "You can return most items within 30 days. Start a return under Orders > Return an item, print the "
        "prepaid label, and drop the parcel at any carrier location.",
        (
            "I want to return the {product} I bought.",
            "How do I send back order {order}?",
            "The {product} doesn't fit, I'd like to return it.",
            "what's your return policy, I want to send something back",
            "I changed my mind about the {product} and want to return it.",
            "Can I return an item I received on {date}?",
            "The {product} isn't what I expected, how do I return it?",
            "I need a return label for order {order}.",
        ),
        (
            "Not happy with the {product}, can I ship it back?",
            "How do returns work for order {order}?",
            "Bought the {product} on {date} and want to give it back.",
        ),
        ("It's still in the original packaging.", "I paid {amount}.", "It arrived on {date}."),
        ("I never opened it.",),
    ),
    Intent(
        "account/password_reset",
        "Use the Forgot password link on the sign-in page to get a reset email. The link expires after one "
        "hour; check your spam folder if it does not arrive.",
        (
            "I forgot my password and can't get into my account.",
            "The password reset email never arrives.",
            "How do I reset my password?",
            "i cant remember my password, help",
            "The reset link says it has expired.",
            "I've tried resetting my password three times and nothing works.",
            "I need to set a new password but I don't get the reset email.",
            "My password stopped working after the update on {date}.",
        ),
        (
            "Locked out because I can't recall my password.",
            "Where do I go to choose a new password?",
            "No reset message shows up when I request one.",
        ),
        ("I checked my spam folder.", "I last signed in on {date}.", "I'm using the app on my {platform}."),
        ("I still have access to my email.",),
    ),
    Intent(
        "account/close_account",
        "We are sorry to see you go. You can close your account under Settings > Privacy > Close account; "
        "your data is deleted within 30 days.",
        (
            "I want to close my Acme account.",
            "Please delete my account and all my data.",
            "How do I cancel my account permanently?",
            "i dont use acme anymore, please remove my account",
            "I'd like to deactivate my profile.",
            "Can you close my account after order {order} is delivered?",
            "I want my account and personal information erased.",
            "How can I shut down my account for good?",
        ),
        (
            "Time to say goodbye, please terminate my Acme profile.",
            "Remove everything you have stored about me.",
            "Where is the option to get rid of my account?",
        ),
        ("I don't need it anymore.", "I have no open orders.", "I'm moving to another service."),
        ("Please confirm once it's done.",),
    ),
    Intent(
        "account/update_email",
        "To change your email address, go to Settings > Profile > Email, enter the new address, and confirm "
        "it with the verification link we send you.",
        (
            "I need to change the email address on my account.",
            "How do I update my email?",
            "My old email account was closed, can I switch to a new address?",
            "i want to use my work email instead of my personal one",
            "Please change the email on my Acme account.",
            "I no longer have access to the email I signed up with.",
            "How can I update my contact email for order updates?",
            "I'd like all my receipts to go to a different email address.",
        ),
        (
            "Switching providers, so my login address has to change.",
            "Can the account be moved to a new mailbox?",
            "Where do I edit the address you send emails to?",
        ),
        ("I signed up years ago.", "I can still sign in.", "I'm on the {platform} app."),
        ("The old inbox is shutting down soon.",),
    ),
    Intent(
        "technical/app_crash",
        "Sorry the app is crashing. Please update to the latest version and restart your device; if it still "
        "crashes, reinstall the app and sign in again.",
        (
            "The app keeps crashing when I open it.",
            "Your app closes by itself every time I tap on my orders.",
            "Since the update to version {version} the app crashes on my {platform}.",
            "the app just freezes and then quits",
            "The Acme app crashes whenever I try to check out.",
            "Every time I open the app on my {platform} it shuts down immediately.",
            "App keeps crashing after the latest update.",
            "The app crashes when I try to upload a photo.",
        ),
        (
            "Acme quits on launch on my {platform}.",
            "Ever since {version} the app dies when I open settings.",
            "App force-closes the moment I search for the {product}.",
        ),
        ("I'm on version {version}.", "I'm using my {platform}.", "It started on {date}."),
        ("Reinstalling did not help.",),
    ),
    Intent(
        "technical/login_error",
        "Sorry you cannot sign in. Clear the app cache, check that your device date and time are correct, and "
        "try again; if the error persists, reset your password.",
        (
            "I can't log in, it says invalid credentials.",
            "The app shows an error when I try to sign in.",
            "Login fails with a network error on my {platform}.",
            "i keep getting kicked back to the login screen",
            "When I sign in it just spins forever.",
            "I get error 403 every time I try to log in.",
            "The website won't let me sign in since {date}.",
            "After entering my details the login page says something went wrong.",
        ),
        (
            "Sign-in keeps failing with an unknown error.",
            "Can't get past the login page on my {platform}.",
            "The log in button does nothing since version {version}.",
        ),
        ("My details are correct.", "I'm on version {version}.", "It worked fine until {date}."),
        ("It happens on both wifi and mobile data.",),
    ),
    Intent(
        "technical/sync_issue",
        "Sorry your data is not syncing. Open Settings > Sync, tap Sync now, and make sure background data is "
        "allowed; changes should appear on all devices within minutes.",
        (
            "My data isn't syncing between my phone and laptop.",
            "Changes I make on my {platform} don't show up on my other devices.",
            "Sync has been stuck since {date}.",
            "my wishlist doesnt sync anymore",
            "The app says sync failed every time.",
            "Orders I place on the website don't appear in the app.",
            "My saved items disappeared after a sync.",
            "The sync button spins but nothing updates.",
        ),
        (
            "The tablet and phone show different carts.",
            "Nothing I save on my {platform} reaches my laptop.",
            "Last successful sync was {date} and it's been broken since.",
        ),
        (
            "I'm on version {version}.",
            "I'm signed in with the same account everywhere.",
            "I use my {platform}.",
        ),
        ("Logging out and in didn't fix it.",),
    ),
    Intent(
        "technical/notifications",
        "To get notifications again, allow Acme notifications in your device settings and turn them on under "
        "Settings > Notifications in the app. Then restart the app.",
        (
            "I stopped getting notifications from the app.",
            "Push notifications don't work on my {platform}.",
            "I'm not getting alerts about my order {order} anymore.",
            "no notifications since the update",
            "The app never notifies me when my package ships.",
            "How do I turn notifications back on?",
            "Notifications stopped after I updated to version {version}.",
            "I don't get any delivery alerts even though they're enabled.",
        ),
        (
            "My {platform} stays silent when orders update.",
            "Alerts from Acme vanished around {date}.",
            "Since {version} I don't get any pings from the app.",
        ),
        ("Notifications are enabled in my settings.", "I'm on my {platform}.", "It started around {date}."),
        ("Other apps notify me fine.",),
    ),
)
INTENT_BY_NAME = {intent.name: intent for intent in INTENTS}

NAMES = (
    "Maria", "James", "Aisha", "Chen", "Olga", "Tom", "Priya", "Lukas", "Fatima", "Diego",
    "Hannah", "Kenji", "Sofia", "Omar", "Emma", "Ravi", "Zoë", "José", "Ingrid", "Noah",
)  # fmt: skip
PRODUCTS = (
    "wireless earbuds", "standing desk", "coffee grinder", "running shoes", "air purifier",
    "phone case", "yoga mat", "desk lamp", "backpack", "smart watch", "blender", "winter jacket",
    "bluetooth speaker", "office chair", "water bottle", "kettle", "hiking boots", "monitor stand",
    "keyboard", "gaming mouse",
)  # fmt: skip
PLATFORMS = (
    "iPhone",
    "Android phone",
    "iPad",
    "Windows laptop",
    "Mac",
    "Chromebook",
    "Pixel",
    "Samsung tablet",
)
MONTHS = ("Oct", "Nov", "October", "November")


@dataclass(frozen=True)
class Phrasebook:
    """The framing around a core sentence; training and eval messages draw their framing from disjoint
    books. `held_out` marks an eval book; `paraphrases` also takes the intent's held-out core sentences
    and details, which no training message uses."""

    greetings: tuple[str, ...]
    contexts: tuple[str, ...]
    asks: tuple[str, ...]
    signoffs: tuple[str, ...]
    held_out: bool
    paraphrases: bool = False

    def cores(self, intent: Intent) -> tuple[str, ...]:
        return intent.held_out if self.paraphrases else intent.train

    def details(self, intent: Intent) -> tuple[str, ...]:
        return intent.held_out_details if self.paraphrases else intent.details


TRAIN_BOOK = Phrasebook(
    greetings=(
        "Hi,", "Hello,", "Hey there,", "Good morning,", "Hi team,", "Hello Acme,", "Dear support,",
        "Hey,", "Good evening,", "Hi there,", "Hello support team,",
    ),
    contexts=(
        "I have been a customer for years.",
        "This is the second time I'm writing about this.",
        "Sorry if this is the wrong place to ask.",
        "I'm on mobile so excuse the typos.",
        "I already checked the help center.",
        "My friend had the same problem last month.",
        "This is getting really frustrating.",
        "It's kind of urgent.",
        "I tried the chat earlier but it disconnected.",
        "I really like your products otherwise.",
    ),
    asks=(
        "Can you help?", "Please help.", "What should I do?", "Can someone look into this?",
        "Please sort this out.", "Any help is appreciated.", "How do I fix this?", "Let me know what to do.",
    ),
    signoffs=("Thanks", "Thank you", "Thanks in advance", "Cheers", "Regards", "Best", "Many thanks", "Thx"),
    held_out=False,
)  # fmt: skip
EVAL_BOOK = Phrasebook(
    greetings=("Greetings,", "Hiya,", "Morning,", "To whom it may concern,"),
    contexts=("Long time shopper here.", "Apologies if this was asked before.", "I'm traveling this week."),
    asks=("Could you take a look?", "Hoping you can assist."),
    signoffs=("Kind regards", "Much appreciated", "Ta"),
    held_out=True,
)
PARAPHRASE_BOOK = replace(EVAL_BOOK, paraphrases=True)

# Words a near-duplicate swaps for another (one word changed, everything else kept).
WORD_SWAPS = {
    "customer": "client", "frustrating": "annoying", "friend": "neighbour", "problem": "issue",
    "checked": "searched", "urgent": "pressing", "earlier": "before", "really": "truly",
    "products": "goods", "second": "third", "broken": "damaged", "still": "yet",
}  # fmt: skip

SLOT = re.compile(r"\{(\w+)\}")


def _past_date(rng: random.Random) -> str:
    """A day in October or early November: before the first partition, as users write about the past."""
    month = rng.choice(MONTHS)
    return f"{month} {rng.randint(1, 31 if month.startswith('Oct') else 15)}"


SLOT_FILLERS: dict[str, Callable[[random.Random], str]] = {
    "order": lambda rng: f"#{rng.randint(10000, 99999)}",
    "product": lambda rng: rng.choice(PRODUCTS),
    "amount": lambda rng: (
        f"{rng.choice('$$$£€')}{rng.randint(12, 480)}.{rng.choice(('00', '49', '95', '99'))}"
    ),
    "date": lambda rng: _past_date(rng),
    "platform": lambda rng: rng.choice(PLATFORMS),
    "version": lambda rng: f"{rng.randint(3, 5)}.{rng.randint(0, 12)}.{rng.randint(0, 9)}",
}


def fill(template: str, rng: random.Random, values: dict[str, str] | None = None) -> str:
    """The template with each {slot} replaced by a drawn value; one message passes one `values` dict,
    so that its sentences agree (one order number, one product, ...)."""
    values = {} if values is None else values

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            values[name] = SLOT_FILLERS[name](rng)
        return values[name]

    return SLOT.sub(value, template)


def add_typo(text: str, rng: random.Random) -> str:
    """Swap two inner letters of one longer word, as a hurried typist does."""
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
    if not candidates:
        return text
    i = rng.choice(candidates)
    w = words[i]
    j = rng.randrange(1, len(w) - 2)
    if w[j] == w[j + 1]:
        return text
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


def compose_message(
    intent: Intent, rng: random.Random, book: Phrasebook, *, long: bool = False, short: bool = False
) -> str:
    """One user message for `intent`: 10-60 words (50-60 when `long`, at most 25 when `short`)."""
    low, high = (50, 60) if long else (10, 25 if short else 60)
    while True:
        parts: list[str] = []
        values: dict[str, str] = {}
        if long or rng.random() < 0.55:
            parts.append(rng.choice(book.greetings))
        parts.append(fill(rng.choice(book.cores(intent)), rng, values))
        details = book.details(intent)
        n_details = min(len(details), 2 if long else int(rng.random() < 0.6) * (0 if short else 1))
        parts.extend(fill(d, rng, values) for d in rng.sample(details, n_details))
        n_contexts = min(len(book.contexts), 3 if long else int(not short and rng.random() < 0.3))
        parts.extend(rng.sample(book.contexts, n_contexts))
        if long or rng.random() < 0.6:
            parts.append(rng.choice(book.asks))
        if long or rng.random() < 0.5:
            signoff = rng.choice(book.signoffs)
            parts.append(f"{signoff}, {rng.choice(NAMES)}" if long or rng.random() < 0.5 else f"{signoff}.")
        separator = "\n" if rng.random() < 0.15 else " "
        text = parts[0] + separator + " ".join(parts[1:]) if len(parts) > 1 else parts[0]
        if rng.random() < 0.1:
            text = add_typo(text, rng)
        if rng.random() < 0.07:
            text = text.lower()
        if low <= len(text.split()) <= high:
            return text


# --------------------------------------------------------------------------------------------------
# Normalised forms, as the data-plane contract defines them, in each reasonable reading.


class _PunctuationToSpace(dict[int, str]):
    """A `str.translate` table that turns every Unicode punctuation character (category P*) into a
    space, filled lazily as characters are met."""

    def __missing__(self, codepoint: int) -> str:
        char = chr(codepoint)
        self[codepoint] = " " if unicodedata.category(char).startswith("P") else char
        return self[codepoint]


_PUNCTUATION_TO_SPACE = _PunctuationToSpace()


@dataclass(frozen=True)
class Reading:
    """One reading of the contract's normalised form. The canonical one is tuneline/normalize.py's
    (punctuation removed, system prompt included); the others are what a dedupe stage might
    reasonably do instead, and the data must not depend on which."""

    punctuation_as_space: bool
    with_system: bool

    def text(self, text: str) -> str:
        return text.translate(_PUNCTUATION_TO_SPACE) if self.punctuation_as_space else text

    def view(self, example: dict[str, Any]) -> dict[str, Any]:
        """The example as this reading sees it, ready for tuneline/normalize.py."""
        if not self.punctuation_as_space and self.with_system:
            return example
        messages = []
        for message in example["messages"]:
            if not self.with_system and message.get("role") == "system":
                continue
            seen = dict(message)
            if isinstance(seen.get("content"), str):
                seen["content"] = self.text(seen["content"])
            if seen.get("tool_calls"):
                seen["tool_calls"] = [
                    {**call, "function": {k: self.text(str(v)) for k, v in call.get("function", {}).items()}}
                    for call in seen["tool_calls"]
                ]
            messages.append(seen)
        return {**example, "messages": messages}


CANONICAL = Reading(punctuation_as_space=False, with_system=True)
READINGS = (CANONICAL, Reading(True, True), Reading(False, False), Reading(True, False))


def normalized_example(example: dict[str, Any], reading: Reading = CANONICAL) -> str:
    return normalize.normalized_example(reading.view(example))


def normalized_prompt_answer(example: dict[str, Any], reading: Reading = CANONICAL) -> tuple[str, str]:
    return normalize.normalized_prompt_and_answer(reading.view(example))


def shingles(normalized: str) -> frozenset[tuple[str, ...]]:
    return normalize.word_shingles(normalized, SHINGLE_SIZE)


jaccard = normalize.jaccard


def jaccard_matrix(sets: Sequence[frozenset[Any]]) -> np.ndarray:
    """Exact pairwise Jaccard of many shingle sets, by one sparse product."""
    vocabulary: dict[Any, int] = {}
    rows: list[int] = []
    cols: list[int] = []
    for row, items in enumerate(sets):
        for item in items:
            rows.append(row)
            cols.append(vocabulary.setdefault(item, len(vocabulary)))
    incidence = sparse.csr_matrix(
        (np.ones(len(rows), dtype=np.int32), (rows, cols)), shape=(len(sets), max(1, len(vocabulary)))
    )
    inter = (incidence @ incidence.T).toarray().astype(np.float64)
    sizes = np.array([len(s) for s in sets], dtype=np.float64)
    union = sizes[:, None] + sizes[None, :] - inter
    return np.divide(inter, union, out=np.ones_like(inter), where=union > 0)


# What the dedupe stage must find: credentials, and PII (kept under the redact policy).
SECRET_PATTERNS = (
    re.compile(r"sk-[A-Za-z0-9_-]{20,}"),
    re.compile(r"AKIA[0-9A-Z]{16}"),
    re.compile(r"gh[pousr]_[A-Za-z0-9]{36}"),
    re.compile(r"xox[abprs]-[A-Za-z0-9-]{10,}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
)
EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
PHONE_CANDIDATE = re.compile(r"\+?\(?\d[\d\s().-]{5,}\d")


def has_secret(text: str) -> bool:
    return any(p.search(text) for p in SECRET_PATTERNS)


def has_pii(text: str) -> bool:
    """An email, or a run of digits and separators with at least 7 digits (a phone-number look)."""
    if EMAIL.search(text):
        return True
    return any(sum(ch.isdigit() for ch in m.group()) >= 7 for m in PHONE_CANDIDATE.finditer(text))


def example_text(example: dict[str, Any]) -> str:
    return "\n".join(formats.example_texts(example))


# --------------------------------------------------------------------------------------------------
# Records of the raw partitions and the answer key.


@dataclass(eq=False)
class DemoRecord:
    """One raw record (a JSONL line or a CSV row) and what was planted in it."""

    raw: bytes | None = None  # a JSONL line without its newline
    row: tuple[str, str, str, str] | None = None  # a CSV row
    kind: str | None = None  # a DIRT_KINDS key; None for an ordinary clean record
    note: str = ""
    intended: str | None = None  # the reason the plant is meant to get
    target: DemoRecord | None = None  # the record it duplicates or contradicts
    eval_line: int | None = None  # the eval line it leaks
    # Filled in when the files are laid out and the contract is applied:
    path: str = ""
    partition: str = ""
    line: int = 0
    example: dict[str, Any] | None = None  # the example as the pipeline sees it (legacy as chat)
    reason: str | None = None
    duplicate_of: DemoRecord | None = None

    @property
    def where(self) -> str:
        return f"line {self.line} of {self.path}"

    @property
    def chat(self) -> dict[str, Any]:
        """The parsed example (only for records that got past ingest and the format rules)."""
        assert self.example is not None, f"{self.where} was not parsed"
        return self.example


def chat_example(user: str, answer: str) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ]
    }


def to_line(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def messages_record(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, **planted: Any
) -> DemoRecord:
    obj: dict[str, Any] = {"messages": messages}
    if tools is not None:
        obj["tools"] = tools
    return DemoRecord(raw=to_line(obj), **planted)


def system_message() -> dict[str, Any]:
    return {"role": "system", "content": SYSTEM_PROMPT}


class PromptRegistry:
    """Every prompt a kept record uses, so that a new clean record can be checked against all of them.

    A clean message is admitted only when its normalised prompt is new in both punctuation readings
    (no exact duplicate, no contradiction), it is far from every eval prompt (no leak), and its whole
    example is far from every kept example of the same intent (no near-duplicate).
    """

    def __init__(self) -> None:
        self.prompts: set[tuple[bool, str]] = set()
        self.eval_shingles: list[frozenset[tuple[str, ...]]] = []
        self.by_intent: dict[str, list[frozenset[tuple[str, ...]]]] = {}

    def _prompt_keys(self, user: str) -> list[tuple[bool, str]]:
        return [(r.punctuation_as_space, normalize.normalize_text(r.text(user))) for r in READINGS[:2]]

    def admits(self, intent: Intent, user: str, *, against_eval: bool = True) -> bool:
        if any(key in self.prompts for key in self._prompt_keys(user)):
            return False
        prompt = shingles(normalize.normalize_text(user))
        if against_eval and any(jaccard(prompt, e) >= ADMIT_EVAL_BELOW for e in self.eval_shingles):
            return False
        whole = shingles(normalized_example(chat_example(user, intent.answer)))
        return all(
            jaccard(whole, other) < ADMIT_SAME_INTENT_BELOW for other in self.by_intent.get(intent.name, ())
        )

    def claim(self, intent: Intent | None, user: str) -> None:
        self.prompts.update(self._prompt_keys(user))
        if intent is not None:
            whole = shingles(normalized_example(chat_example(user, intent.answer)))
            self.by_intent.setdefault(intent.name, []).append(whole)

    def add_eval(self, user: str) -> None:
        self.claim(None, user)
        self.eval_shingles.append(shingles(normalize.normalize_text(user)))

    def new_message(
        self,
        intent: Intent,
        rng: random.Random,
        book: Phrasebook = TRAIN_BOOK,
        *,
        long: bool = False,
        short: bool = False,
    ) -> str:
        """A fresh message for `intent` that no kept record and no eval example comes close to."""
        for _ in range(2000):
            user = compose_message(intent, rng, book, long=long, short=short)
            if self.admits(intent, user, against_eval=not book.held_out):
                self.claim(intent, user)
                return user
        raise RuntimeError(f"no distinct message left for {intent.name}: add phrases to its templates")


# --------------------------------------------------------------------------------------------------
# Secrets and PII, made at run time from random characters (no literal credential in the source).

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


def fake_email(rng: random.Random) -> str:
    first = rng.choice(("maria", "james", "aisha", "chen", "olga", "priya", "lukas", "diego", "hannah"))
    last = rng.choice(("lopez", "smith", "khan", "wang", "novak", "patel", "becker", "garcia", "kim"))
    return (
        f"{first}.{last}{rng.randint(1, 99)}@{rng.choice(('example.com', 'example.org', 'mail.example.net'))}"
    )


def fake_phone(rng: random.Random) -> str:
    return rng.choice(
        (
            f"({rng.randint(201, 989)}) 555-01{rng.randint(10, 99)}",
            f"+1 {rng.randint(201, 989)}-555-01{rng.randint(10, 99)}",
            f"+44 20 7946 0{rng.randint(100, 999)}",
        )
    )


# --------------------------------------------------------------------------------------------------
# Tools for the tool-calling examples.


def _tool(name: str, description: str, parameter: str, parameter_description: str) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {parameter: {"type": "string", "description": parameter_description}},
                "required": [parameter],
            },
        },
    }


LOOKUP_ORDER = _tool(
    "lookup_order", "Look up the shipping status of an order.", "order_id", "The order number without #."
)
REFUND_STATUS = _tool(
    "get_refund_status", "Look up the refund of a returned order.", "order_id", "The order number without #."
)
SERVICE_STATUS = _tool(
    "check_service_status", "Check whether an Acme service is degraded.", "service", "sync, login or push"
)


def tool_call(call_id: str, name: str | None, arguments: str) -> dict[str, Any]:
    """A tool call; `name` None leaves the function name out (a broken call)."""
    function = {"arguments": arguments} if name is None else {"name": name, "arguments": arguments}
    return {"id": call_id, "type": "function", "function": function}


def call_id(rng: random.Random) -> str:
    # Short, as real ids are opaque but not key-like: long random ids read as secrets to scanners.
    return "call_" + _random_chars(rng, ALNUM, 8)


# --------------------------------------------------------------------------------------------------
# Over-long pastes.

LOG_MESSAGES = (
    "E/AcmeApp: java.lang.NullPointerException at com.acme.checkout.CartView.render(CartView.kt:212)",
    "W/SyncWorker: retry 3 of 5 after HTTP 503 from the sync service",
    "I/ImageCache: evicted 14 entries to free memory",
    "D/Network: GET /v2/orders?page=2 took 1840 ms",
    "E/AcmeApp: FATAL EXCEPTION in thread main, process com.acme.shop",
    "W/Choreographer: skipped 87 frames, the application may be doing too much work on its main thread",
    "I/ActivityManager: process com.acme.shop has died",
    "D/Checkout: applying promo code failed with state INVALID_CART",
    "E/Sync: conflict on wishlist item, server version newer than local version",
    "I/Auth: token refresh scheduled in 300 seconds",
)


def pasted_log(rng: random.Random, lines: int) -> str:
    moment = datetime(2026, 11, 18, 9, 14, 3)
    out = []
    for _ in range(lines):
        moment += timedelta(milliseconds=rng.randint(5, 900))
        out.append(f"{moment:%Y-%m-%d %H:%M:%S}.{moment.microsecond // 1000:03d} {rng.choice(LOG_MESSAGES)}")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# The eval set, the canary set and the general corpus.


def make_eval_set(
    rng: random.Random, registry: PromptRegistry, book: Phrasebook = EVAL_BOOK
) -> list[tuple[Intent, str]]:
    """N_EVAL held-out tickets over every intent. With EVAL_BOOK they are what a team holds out of its
    ticket stream: the intents' usual sentences with fresh values, framed by greetings, contexts and
    sign-offs no training message uses, and far from every training message. With PARAPHRASE_BOOK they
    say the same things in sentences training never shows (a stress test of language knowledge)."""
    examples = []
    for index in range(N_EVAL):
        intent = INTENTS[index % len(INTENTS)]
        user = registry.new_message(intent, rng, book)
        registry.add_eval(user)
        examples.append((intent, user))
    return examples


CAPITAL_PHRASES = (
    "What is the capital of {x}?",
    "Which city is the capital of {x}?",
    "Name the capital of {x}.",
    "What city is the capital of {x}?",
    "Tell me the capital city of {x}.",
)
ARITHMETIC_PHRASES = (
    "What is {a} {op} {b}?",
    "How much is {a} {op} {b}?",
    "Calculate {a} {op} {b}.",
    "What's {a} {op} {b}?",
    "Please compute {a} {op} {b}.",
)
OPPOSITE_PHRASES = (
    "What is the opposite of {x}?",
    "What's the opposite of {x}?",
    "Give me the opposite of {x}.",
    "Which word means the opposite of {x}?",
    "Name the opposite of the word {x}.",
)
COLOR_PHRASES = (
    "What color is {x}?",
    "What colour is {x}?",
    "Which color is {x}?",
    "Tell me the color of {x}.",
    "Can you tell me what color {x} is?",
)
OPERATIONS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}


def _family(phrases: Sequence[str], facts: Sequence[tuple[str, str]]) -> list[tuple[str, str, list[str]]]:
    return [(phrases[0].format(x=x), answer, [p.format(x=x) for p in phrases[1:]]) for x, answer in facts]


def _arithmetic(a: int, op: str, b: int) -> tuple[str, str, list[str]]:
    phrases = [p.format(a=a, op=op, b=b) for p in ARITHMETIC_PHRASES]
    return phrases[0], f"{OPERATIONS[op](a, b)}.", phrases[1:]


# (canary question, fixed answer, paraphrases); the canary question is the first phrasing.
CANARY_FACTS: list[tuple[str, str, list[str]]] = [
    *_family(
        CAPITAL_PHRASES,
        [("France", "Paris."), ("Japan", "Tokyo."), ("Italy", "Rome."), ("Spain", "Madrid."),
         ("Germany", "Berlin."), ("Canada", "Ottawa."), ("Egypt", "Cairo."), ("Australia", "Canberra.")],
    ),
    ("How many days are in a week?", "Seven.", [
        "How many days does a week have?", "A week has how many days?",
        "What is the number of days in one week?", "Tell me how many days there are in a week.",
    ]),
    ("How many months are in a year?", "Twelve.", [
        "How many months does a year have?", "A year has how many months?",
        "What is the number of months in one year?", "Tell me how many months there are in a year.",
    ]),
    ("How many hours are in a day?", "Twenty-four.", [
        "How many hours does a day have?", "A day has how many hours?",
        "What is the number of hours in one day?", "Tell me how many hours there are in a day.",
    ]),
    ("How many minutes are in an hour?", "Sixty.", [
        "How many minutes does an hour have?", "An hour has how many minutes?",
        "What is the number of minutes in one hour?", "Tell me how many minutes there are in an hour.",
    ]),
    ("How many legs does a spider have?", "Eight.", [
        "A spider has how many legs?", "What is the number of legs on a spider?",
        "Count the legs of a spider.", "How many legs do spiders have?",
    ]),
    ("How many legs does a dog have?", "Four.", [
        "A dog has how many legs?", "What is the number of legs on a dog?",
        "Count the legs of a dog.", "How many legs do dogs have?",
    ]),
    ("How many sides does a triangle have?", "Three.", [
        "A triangle has how many sides?", "What is the number of sides of a triangle?",
        "Count the sides of a triangle.", "How many sides do triangles have?",
    ]),
    ("How many continents are there?", "Seven.", [
        "How many continents does the Earth have?", "What is the number of continents?",
        "Count the continents of the world.", "The world has how many continents?",
    ]),
    *_family(
        COLOR_PHRASES,
        [("the sky on a clear day", "Blue."), ("grass", "Green."), ("snow", "White."),
         ("a ripe banana", "Yellow."), ("coal", "Black.")],
    ),
    ("What is the largest planet in our solar system?", "Jupiter.", [
        "Which planet is the largest in the solar system?", "Name the biggest planet in our solar system.",
        "What is the biggest planet?", "Which is the largest planet orbiting the Sun?",
    ]),
    ("At what temperature in Celsius does water freeze?", "Zero degrees.", [
        "What is the freezing point of water in Celsius?", "Water freezes at how many degrees Celsius?",
        "In Celsius, when does water turn to ice?", "What temperature does water freeze at in Celsius?",
    ]),
    ("What is the chemical formula for water?", "H2O.", [
        "Which chemical formula does water have?", "Write the chemical formula of water.",
        "What is water's chemical formula?", "Give me the formula for water.",
    ]),
    ("Who wrote Romeo and Juliet?", "William Shakespeare.", [
        "Who is the author of Romeo and Juliet?", "Which writer wrote Romeo and Juliet?",
        "Romeo and Juliet was written by whom?", "Name the author of Romeo and Juliet.",
    ]),
    ("What is the first letter of the English alphabet?", "A.", [
        "Which letter comes first in the English alphabet?", "Name the first letter of the alphabet.",
        "What letter does the English alphabet start with?", "The alphabet begins with which letter?",
    ]),
    *[_arithmetic(a, op, b) for a, op, b in [
        (2, "plus", 2), (3, "plus", 5), (10, "minus", 4), (6, "times", 7),
        (9, "plus", 1), (15, "minus", 5), (7, "plus", 6), (5, "times", 5),
    ]],
    *_family(
        OPPOSITE_PHRASES,
        [("hot", "Cold."), ("up", "Down."), ("day", "Night."), ("big", "Small."), ("fast", "Slow."),
         ("open", "Closed.")],
    ),
]  # fmt: skip

MORE_CAPITALS = (
    ("Portugal", "Lisbon."), ("Greece", "Athens."), ("Norway", "Oslo."), ("Sweden", "Stockholm."),
    ("Poland", "Warsaw."), ("Ireland", "Dublin."), ("Kenya", "Nairobi."), ("Peru", "Lima."),
    ("Austria", "Vienna."), ("Thailand", "Bangkok."), ("South Korea", "Seoul."), ("Argentina", "Buenos Aires."),
    ("Finland", "Helsinki."), ("Hungary", "Budapest."), ("Cuba", "Havana."), ("Chile", "Santiago."),
    ("Denmark", "Copenhagen."), ("Vietnam", "Hanoi."), ("Russia", "Moscow."), ("China", "Beijing."),
)  # fmt: skip
MORE_OPPOSITES = (
    ("light", "Dark."), ("early", "Late."), ("happy", "Sad."), ("wet", "Dry."), ("full", "Empty."),
    ("high", "Low."), ("left", "Right."), ("push", "Pull."), ("win", "Lose."), ("hard", "Soft."),
    ("rich", "Poor."), ("thick", "Thin."), ("buy", "Sell."), ("loud", "Quiet."), ("inside", "Outside."),
    ("begin", "End."),
)  # fmt: skip
MORE_FACTS: tuple[tuple[str, str, str], ...] = (
    ("What do bees make?", "Which food do bees produce?", "Honey."),
    ("What animal says moo?", "Which animal goes moo?", "A cow."),
    ("How many wheels does a bicycle have?", "A bicycle has how many wheels?", "Two."),
    ("What is frozen water called?", "What do we call water when it freezes?", "Ice."),
    ("Which season comes after winter?", "What season follows winter?", "Spring."),
    ("Which season comes after summer?", "What season follows summer?", "Autumn."),
    ("What is the opposite of north?", "Which direction is opposite to north?", "South."),
    (
        "How many letters are in the English alphabet?",
        "The English alphabet has how many letters?",
        "Twenty-six.",
    ),
    ("What do you call a baby cat?", "What is a young cat called?", "A kitten."),
    ("What do you call a baby dog?", "What is a young dog called?", "A puppy."),
    ("Which planet is known as the Red Planet?", "What planet is called the Red Planet?", "Mars."),
    ("What gas do plants take in from the air?", "Which gas do plants absorb?", "Carbon dioxide."),
    ("What is the closest star to Earth?", "Which star is nearest to the Earth?", "The Sun."),
    ("How many days are in a leap year?", "A leap year has how many days?", "366."),
    ("What is the tallest animal?", "Which animal is the tallest?", "The giraffe."),
    ("What is the largest ocean?", "Which ocean is the biggest?", "The Pacific Ocean."),
    (
        "How many players are on a soccer team on the field?",
        "A soccer team fields how many players?",
        "Eleven.",
    ),
    (
        "What is the boiling point of water in Celsius?",
        "Water boils at how many degrees Celsius?",
        "100 degrees.",
    ),
    ("What do cows drink?", "Which drink do cows need most?", "Water."),
    ("Which month comes after June?", "What month follows June?", "July."),
    ("Which day comes after Friday?", "What day follows Friday?", "Saturday."),
    ("What is the plural of mouse?", "What is more than one mouse called?", "Mice."),
    ("What is the past tense of go?", "Give the past tense of the verb go.", "Went."),
    ("How many strings does a standard guitar have?", "A standard guitar has how many strings?", "Six."),
    ("What shape has four equal sides?", "Which shape has four sides of equal length?", "A square."),
)
SMALL_TALK: tuple[tuple[tuple[str, ...], str], ...] = (
    (("Hi!", "Hello!", "Hey there!"), "Hello! How can I help you today?"),
    (("Good morning!", "Morning!"), "Good morning! How can I help?"),
    (("How are you?", "How are you doing today?"), "I'm doing well, thank you for asking."),
    (("Thanks!", "Thank you so much!"), "You're welcome!"),
    (("Goodbye!", "Bye for now."), "Goodbye! Have a great day."),
    (("What is your name?", "Who are you?"), "I am a helpful assistant."),
    (("What can you do?", "How can you help me?"), "I can answer questions and help with simple tasks."),
    (
        ("Tell me a joke.", "Do you know a joke?"),
        "Why did the scarecrow win an award? He was outstanding in his field.",
    ),
    (("Can you help me?", "I need some help."), "Of course. What do you need?"),
    (("Are you a robot?", "Are you human?"), "I am an AI assistant."),
    (("What day is it today?", "Do you know today's date?"), "I do not have access to today's date."),
    (("I am bored.", "I'm so bored."), "You could read a book, take a walk or learn something new."),
    (("Say something nice.", "Cheer me up."), "You are doing great. Keep going!"),
    (("Good night!", "Night night."), "Good night! Sleep well."),
    (("Nice to meet you.", "Pleased to meet you."), "Nice to meet you too!"),
    (("Sorry, my mistake.", "Oops, I was wrong."), "No problem at all."),
    (("What is your favorite color?", "Which color do you like best?"), "I like blue."),
    (("Do you like music?", "Do you enjoy music?"), "Yes, music is wonderful."),
    (
        ("Can you keep a secret?", "Will you keep this private?"),
        "I do not remember our chats after they end.",
    ),
    (("Where are you from?", "Where do you live?"), "I live in the cloud."),
    (("Is it going to rain?", "Will it rain today?"), "I cannot check the weather, sorry."),
    (("Recommend a book.", "What book should I read?"), "Try Pride and Prejudice by Jane Austen."),
    (("How old are you?", "What is your age?"), "I do not have an age."),
    (("Give me a fun fact.", "Tell me something interesting."), "Octopuses have three hearts."),
    (("What should I eat for lunch?", "Any lunch ideas?"), "A salad or a sandwich is a good choice."),
)


def general_corpus(rng: random.Random) -> list[dict[str, Any]]:
    """Chat examples (no system prompt): every canary fact in five phrasings, more facts, small talk."""
    pairs: list[tuple[str, str]] = []
    for question, answer, paraphrases in CANARY_FACTS:
        pairs.extend((q, answer) for q in [question, *paraphrases])
    for country, city in MORE_CAPITALS:
        pairs.extend((p.format(x=country), city) for p in rng.sample(CAPITAL_PHRASES, 2))
    for word, opposite in MORE_OPPOSITES:
        pairs.extend((p.format(x=word), opposite) for p in rng.sample(OPPOSITE_PHRASES, 2))
    for first, second, answer in MORE_FACTS:
        pairs.extend([(first, answer), (second, answer)])
    for phrasings, answer in SMALL_TALK:
        pairs.extend((p, answer) for p in phrasings)
    asked = {normalize.normalize_text(q) for q, _ in pairs}
    arithmetic = 0
    while arithmetic < 60:
        a, b, op = rng.randint(1, 12), rng.randint(1, 12), rng.choice(tuple(OPERATIONS))
        if op == "minus" and b > a:
            a, b = b, a
        first, answer, others = _arithmetic(a, op, b)
        if any(normalize.normalize_text(q) in asked for q in [first, *others]):
            continue  # a canary sum, or one asked already
        question = rng.choice([first, *others])
        asked.add(normalize.normalize_text(question))
        pairs.append((question, answer))
        arithmetic += 1
    examples = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs
    ]
    # A few two-turn chats: small talk, then a question.
    openers = [(p, answer) for phrasings, answer in SMALL_TALK[:2] for p in phrasings]
    for country, city in MORE_CAPITALS:
        opener, reply = rng.choice(openers)
        question = f"What is the capital of {country}?"
        examples.append(
            {
                "messages": [
                    {"role": "user", "content": opener},
                    {"role": "assistant", "content": reply},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": city},
                ]
            }
        )
    rng.shuffle(examples)
    return examples


def canary_set() -> list[dict[str, Any]]:
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a, _ in CANARY_FACTS
    ]


# --------------------------------------------------------------------------------------------------
# Laying out the partitions, planting the dirt.

OLD_STYLE_REPLIES = (
    "Thanks for contacting Acme! An agent will get back to you within 24 hours.",
    "Please call our hotline so a colleague can help you with this.",
    "We have forwarded your message to the right team.",
    "Hello, thanks for reaching out. Could you send us more details?",
)
VAGUE_OPENERS = {
    "billing": "Question about my last payment on order {order}.",
    "shipping": "I have a problem with my order {order}.",
    "account": "Something is wrong with my account.",
    "technical": "The app is acting weird on my {platform}.",
}
FOLLOW_UPS = (
    "No, that's not it. ",
    "That doesn't answer my question. ",
    "Not quite. ",
    "Sorry, I meant this: ",
)


def _path(partition: str, name: str) -> str:
    return f"{RAW_ROOT}/dt={partition}/{name}"


class Layout:
    """The raw files and their records in line order, and the plants inserted into them."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.files: dict[str, list[DemoRecord]] = {}

    def file(self, partition: str, name: str) -> list[DemoRecord]:
        return self.files.setdefault(_path(partition, name), [])

    def plant(
        self, partition: str, name: str, record: DemoRecord, after: DemoRecord | None = None
    ) -> DemoRecord:
        """Insert `record` at a random line of the file (after `after` when that is in the same file)."""
        records = self.file(partition, name)
        low = records.index(after) + 1 if after is not None and after in records else 0
        records.insert(self.rng.randint(low, len(records)), record)
        return record

    def clean_records(self, partition: str, name: str = "part-0000.jsonl") -> list[DemoRecord]:
        return [r for r in self.file(partition, name) if r.kind is None]


def _other_intent(rng: random.Random, intent: Intent, same_category: bool = False) -> Intent:
    pool = [i for i in INTENTS if i is not intent and (not same_category or i.category == intent.category)]
    return rng.choice(pool)


def _lower_and_strip(text: str) -> str:
    """A normalised-equal variant: lower case, and punctuation at word ends dropped."""
    return re.sub(r"[,.!?](?=\s|$)", "", text.lower())


def _spaced(text: str) -> str:
    """A normalised-equal variant: doubled spaces and trailing whitespace."""
    return text.replace(" ", "  ", 3) + "  \n"


def _one_word_changed(text: str, rng: random.Random) -> tuple[str, str]:
    """`text` with exactly one word changed (an order number corrected, or a word swapped)."""
    orders = list(re.finditer(r"#(\d{5})", text))
    if orders and rng.random() < 0.5:
        m = rng.choice(orders)
        digits = m.group(1)
        fixed = (
            digits[:3] + digits[4] + digits[3]
            if digits[3] != digits[4]
            else digits[:4] + str((int(digits[4]) + 1) % 10)
        )
        return text[: m.start(1)] + fixed + text[m.end(1) :], f"order number #{digits} corrected to #{fixed}"
    words = text.split(" ")
    positions = [i for i, w in enumerate(words) if w.strip(".,!?") in WORD_SWAPS]
    if not positions:
        raise RuntimeError("a long message has no swappable word: add one to WORD_SWAPS")
    i = positions[len(positions) // 2]
    bare = words[i].strip(".,!?")
    words[i] = words[i].replace(bare, WORD_SWAPS[bare])
    return " ".join(words), f"the word {bare!r} changed to {WORD_SWAPS[bare]!r}"


PART, LEGACY, CRM = "part-0000.jsonl", "legacy.jsonl", "crm_export.csv"

# (partition, file, how)
MALFORMED_JSON = (
    ("2026-11-16", PART, "truncated"),
    ("2026-11-17", LEGACY, "truncated"),
    ("2026-11-18", PART, "with a trailing comma"),
    ("2026-11-20", PART, "with a trailing comma"),
    ("2026-11-21", PART, "in single quotes"),
    ("2026-11-22", PART, "in single quotes"),
)
# (partition, file, intent, message with characters outside ASCII, written as latin-1)
LATIN_1 = (
    ("2026-11-16", PART, "shipping/damaged_item",
     "Bonjour, my café grinder arrived with a broken lid. Can you send a new one? Merci, Françoise"),
    ("2026-11-18", PART, "account/update_email",
     "Hallo, please change my email, the old one at work closed. Grüße, Jürgen Müller"),
    ("2026-11-19", LEGACY, "billing/refund_status",
     "Hola, still no refund for the jacket I returned. ¿Any update? Saludos, Iñigo"),
    ("2026-11-21", PART, "technical/app_crash", "Olá, the app crashes every time I open my wishlist. Obrigado, João"),
)  # fmt: skip
WRONG_ROLES = (
    ("2026-11-16", "customer"),
    ("2026-11-19", "bot"),
    ("2026-11-20", "customer"),
    ("2026-11-22", "bot"),
)
MISSING_ASSISTANT = ("2026-11-17", "2026-11-19", "2026-11-22")
EMPTY_CONTENT = (("2026-11-16", "assistant"), ("2026-11-18", "user"), ("2026-11-21", "assistant"))
# (partition, file, token, where)
SPECIAL_TOKENS = (
    ("2026-11-16", PART, "<|endoftext|>", "end of the user message"),
    ("2026-11-18", PART, "<|im_start|>", "start of the user message"),
    ("2026-11-20", PART, "<|im_end|>", "end of the assistant message"),
    ("2026-11-21", LEGACY, "<|endoftext|>", "end of the completion"),
)
# (partition, intent, tool, user message, tool result)
VALID_TOOL_CALLS = (
    ("2026-11-17", "shipping/where_is_order", LOOKUP_ORDER,
     "Hi, can you check on order {order} for me? It should have arrived by {date}.",
     '{"status": "in_transit", "carrier": "UPS", "eta": "Nov 24"}'),
    ("2026-11-19", "billing/refund_status", REFUND_STATUS,
     "I returned order {order} last week. Has my refund of {amount} gone through yet?",
     '{"refund": "issued", "amount": "{amount}"}'),
    ("2026-11-22", "technical/sync_issue", SERVICE_STATUS,
     "My cart stopped syncing between my {platform} and my laptop this morning. Is something down on your side?",
     '{"service": "sync", "state": "degraded"}'),
)  # fmt: skip
BROKEN_TOOL_CALLS = (
    ("2026-11-16", "arguments not JSON"), ("2026-11-18", "no function name"),
    ("2026-11-19", "tool reply without its call"), ("2026-11-20", "arguments not JSON"),
    ("2026-11-21", "no function name"), ("2026-11-22", "tool reply without its call"),
)  # fmt: skip
TRACKING_REQUESTS = (
    "Where is order {order}? It was due {date}.",
    "Can you track order {order} please, I paid {amount} for express.",
    "Order {order} still not here, can you look it up?",
)
VALID_WEIGHTS = ("2026-11-16", "2026-11-18", "2026-11-21")
INVALID_WEIGHTS = (
    ("2026-11-17", "weight 2"), ("2026-11-18", 'weight "1"'), ("2026-11-19", "weight on a user message"),
    ("2026-11-20", "weight 2"), ("2026-11-21", 'weight "1"'), ("2026-11-22", "weight on a user message"),
)  # fmt: skip
# (partition, intent, what the user writes before pasting a log)
OVER_LONG = (
    (
        "2026-11-17",
        "technical/app_crash",
        "The app crashes on my {platform} every time I check out. Here is the log:\n",
    ),
    (
        "2026-11-19",
        "technical/sync_issue",
        "Sync has been stuck since {date}. I copied the debug output for you:\n",
    ),
    (
        "2026-11-22",
        "technical/login_error",
        "I can't sign in since version {version}. This is what the console says:\n",
    ),
)
SECRET_MAKERS: dict[str, Callable[[random.Random], str]] = {
    "OpenAI API key": fake_openai_key,
    "AWS access key": fake_aws_access_key,
    "GitHub token": fake_github_token,
    "EC private key block": lambda rng: fake_private_key(rng, "EC"),
    "OpenSSH private key block": lambda rng: fake_private_key(rng, "OPENSSH"),
}
# (partition, file, intent, credential, message)
SECRETS = (
    ("2026-11-16", PART, "technical/login_error", "OpenAI API key",
     "I call your API from a script and sign-in fails. My key is {secret} in case you need it."),
    ("2026-11-18", PART, "technical/sync_issue", "AWS access key",
     "Sync stopped after I connected my backup bucket. The config has aws_access_key_id = {secret} in it, "
     "is that the problem?"),
    ("2026-11-19", CRM, "technical/login_error", "OpenAI API key",
     "Login broken. The developer portal told me to send my key: {secret}"),
    ("2026-11-20", PART, "technical/app_crash", "GitHub token",
     "The beta build crashes on start. I downloaded it with my token {secret} if that helps."),
    ("2026-11-21", LEGACY, "account/close_account", "EC private key block",
     "Please close my account. The security check asked for my key file, here it is:\n{secret}"),
    ("2026-11-22", PART, "technical/login_error", "OpenSSH private key block",
     "Sign-in with my key fails. Here is the key:\n{secret}"),
)  # fmt: skip
# (partition, file, intent, what, message): kept, and redacted on export under the redact policy
PII = (
    ("2026-11-16", PART, "account/update_email", "two email addresses",
     "Please change the email on my account from {email} to {email2}. I lost access to the old one."),
    ("2026-11-17", PART, "shipping/damaged_item", "a phone number",
     "My {product} arrived smashed. Please call me at {phone} to sort out a replacement."),
    ("2026-11-19", PART, "billing/invoice_copy", "an email address",
     "Can you send the invoice for order {order} to {email}? That is our finance team."),
    ("2026-11-19", LEGACY, "shipping/where_is_order", "a phone number",
     "Order {order} hasn't arrived yet. You can text me on {phone} when it ships."),
    ("2026-11-19", CRM, "billing/refund_status", "an email address",
     "Still no refund for order {order}. Reach me at {email} please."),
    ("2026-11-21", PART, "technical/login_error", "a phone number",
     "I can't sign in on my {platform}. The number for my verification code is {phone}."),
)  # fmt: skip
# (partition, file, how the eval question is edited)
EVAL_LEAKS = (
    ("2026-11-17", PART, "exact copy"),
    ("2026-11-18", PART, "lower case, end punctuation dropped"),
    ("2026-11-20", PART, "one word appended"),
    ("2026-11-21", LEGACY, "exact copy as a legacy line"),
)
# (day of the original, day of the copy)
EXACT_DUPLICATES = (("2026-11-16", "2026-11-18"), ("2026-11-17", "2026-11-21"), ("2026-11-19", "2026-11-19"))
NORMALIZED_DUPLICATES = (
    ("2026-11-17", "2026-11-19", "lower case"),
    ("2026-11-16", "2026-11-20", "extra whitespace"),
    ("2026-11-18", "2026-11-22", "punctuation at word ends dropped"),
    ("2026-11-21", "2026-11-21", "keys reordered, compact JSON"),
)
NEAR_DUPLICATES = (
    ("2026-11-16", "2026-11-18"),
    ("2026-11-17", "2026-11-20"),
    ("2026-11-18", "2026-11-21"),
    ("2026-11-19", "2026-11-22"),
)
# The places of one question asked several times: the earlier answers differ, the last is the house answer.
CONTRADICTIONS = (
    ((("2026-11-16", PART), ("2026-11-19", PART)), "lower case"),
    ((("2026-11-17", LEGACY), ("2026-11-20", PART)), ""),
    ((("2026-11-19", CRM), ("2026-11-21", PART)), ""),
    ((("2026-11-16", PART), ("2026-11-18", PART), ("2026-11-22", PART)), ""),
)


def line_object(file: str, user: str, answer: str) -> dict[str, Any]:
    """One question and answer as a line of `file`: legacy prompt/completion or chat."""
    return {"prompt": user, "completion": answer} if file == LEGACY else chat_example(user, answer)


class Planter:
    """Lays out the seven partitions: the clean records first, then each family of dirt at random lines.

    Every clean message comes from the prompt registry, so it is distinct from all the others; the
    plants are made from clean records or fresh messages, as each kind of dirt needs.
    """

    def __init__(
        self, rng: random.Random, registry: PromptRegistry, eval_set: list[tuple[Intent, str]]
    ) -> None:
        self.rng = rng
        self.registry = registry
        self.eval_set = eval_set
        self.layout = Layout(rng)
        self.long_originals: dict[str, DemoRecord] = {}
        self.tickets = rng.sample(range(200000, 999999), 40)

    def run(self) -> Layout:
        self.clean_partitions()
        self.ingest_dirt()
        self.format_dirt()
        self.tool_calls()
        self.weights()
        self.over_long()
        self.secrets_and_pii()
        self.eval_leaks()
        self.duplicates()
        self.contradictions()
        self.stamp_crm_export()
        return self.layout

    def message(
        self, intent: Intent | None = None, *, long: bool = False, short: bool = False
    ) -> tuple[Intent, str]:
        intent = intent or self.rng.choice(INTENTS)
        return intent, self.registry.new_message(intent, self.rng, long=long, short=short)

    def record(self, file: str, user: str, answer: str, **planted: Any) -> DemoRecord:
        """One question and answer as `file` holds it: a chat line, a legacy line or a CRM row."""
        if file == CRM:
            return DemoRecord(row=(f"ACME-{self.tickets.pop()}", "", user, answer), **planted)
        return DemoRecord(raw=to_line(line_object(file, user, answer)), **planted)

    def plant(
        self, partition: str, file: str, record: DemoRecord, after: DemoRecord | None = None
    ) -> DemoRecord:
        return self.layout.plant(partition, file, record, after)

    def originals(self, partition: str) -> list[DemoRecord]:
        """The day's clean chat records not yet chosen as the original of a duplicate."""
        taken = {id(r) for r in self.long_originals.values()}
        return [r for r in self.layout.clean_records(partition) if id(r) not in taken and not r.note]

    def clean_partitions(self) -> None:
        rng = self.rng
        for partition in PARTITIONS:
            counts = {PART: rng.randint(*CHAT_LINES_PER_DAY)}
            if partition in LEGACY_DAYS:
                counts[LEGACY] = rng.randint(*LEGACY_LINES_PER_DAY)
            if partition == CSV_DAY:
                counts[CRM] = CSV_CLEAN_ROWS
            for file, count in counts.items():
                records = self.layout.file(partition, file)
                for _ in range(count):
                    intent, user = self.message()
                    records.append(self.record(file, user, intent.answer))
            if partition <= "2026-11-19":
                # A long message per early day: the original of a near-duplicate planted later.
                intent, user = self.message(long=True)
                self.long_originals[partition] = self.plant(
                    partition, PART, self.record(PART, user, intent.answer)
                )
        # A quoted phrase exercises CSV quoting beyond the newline inside every answer.
        intent = INTENT_BY_NAME["technical/sync_issue"]
        user = 'Tapping "Sync now" on my iPad does nothing, the spinner just keeps going.'
        self.registry.claim(intent, user)
        self.plant(CSV_DAY, CRM, self.record(CRM, user, intent.answer))

    def ingest_dirt(self) -> None:
        rng = self.rng
        for partition, file, how in MALFORMED_JSON:
            intent, user = self.message()
            example = line_object(file, user, intent.answer)
            text = json.dumps(example, ensure_ascii=False)
            if how == "truncated":
                text = text[: rng.randint(len(text) // 3, 2 * len(text) // 3)]
            elif how == "with a trailing comma":
                text = text[:-1] + ",}"
            else:
                text = repr(example)
            planted = DemoRecord(
                raw=text.encode(), kind="malformed_json", note=f"JSON {how}", intended="invalid_json"
            )
            self.plant(partition, file, planted)
        for partition, file, name, user in LATIN_1:
            raw = json.dumps(line_object(file, user, INTENT_BY_NAME[name].answer), ensure_ascii=False).encode(
                "latin-1"
            )
            planted = DemoRecord(
                raw=raw, kind="non_utf8", note="line encoded as latin-1", intended="invalid_encoding"
            )
            self.plant(partition, file, planted)

    def format_dirt(self) -> None:
        for partition, role in WRONG_ROLES:
            intent, user = self.message()
            messages = chat_example(user, intent.answer)["messages"]
            instead = "user" if role == "customer" else "assistant"
            messages[1 if instead == "user" else 2]["role"] = role
            note = f"role {role!r} instead of {instead!r}"
            self.plant(
                partition,
                PART,
                messages_record(messages, kind="wrong_role", note=note, intended="unrecognized_role"),
            )
        for partition in MISSING_ASSISTANT:
            _, user = self.message()
            messages = [system_message(), {"role": "user", "content": user}]
            planted = messages_record(
                messages,
                kind="missing_assistant",
                note="no assistant turn",
                intended="example_missing_assistant_message",
            )
            self.plant(partition, PART, planted)
        for partition, role in EMPTY_CONTENT:
            intent, user = self.message()
            messages = chat_example(user, intent.answer)["messages"]
            messages[1 if role == "user" else 2]["content"] = ""
            note = f'{role} content ""'
            self.plant(
                partition,
                PART,
                messages_record(messages, kind="empty_content", note=note, intended="missing_content"),
            )
        _, user = self.message()
        planted = self.record(
            CRM, user, "", kind="csv_empty_reply", note="empty agent_reply", intended="missing_content"
        )
        self.plant(CSV_DAY, CRM, planted)
        for partition, file, token, where in SPECIAL_TOKENS:
            intent, user = self.message()
            answer = intent.answer
            if where.startswith("start of the user"):
                user = f"{token}user\n{user}"
            elif where.startswith("end of the user"):
                user += token
            else:
                answer += token
            note = f"{token} at the {where}"
            planted = self.record(
                file, user, answer, kind="special_token", note=note, intended="forbidden_special_token"
            )
            self.plant(partition, file, planted)

    def tool_calls(self) -> None:
        rng = self.rng
        for partition, name, tool, template, result in VALID_TOOL_CALLS:
            intent = INTENT_BY_NAME[name]
            values: dict[str, str] = {}
            user = fill(template, rng, values)
            self.registry.claim(intent, user)
            function = tool["function"]
            parameter = next(iter(function["parameters"]["properties"]))
            argument = values["order"].lstrip("#") if parameter == "order_id" else "sync"
            cid = call_id(rng)
            calls = [tool_call(cid, function["name"], json.dumps({parameter: argument}))]
            # On a tool-calling turn the API accepts content null as well as no content at all.
            call: dict[str, Any] = {"role": "assistant", "tool_calls": calls}
            if tool is REFUND_STATUS:
                call = {"role": "assistant", "content": None, "tool_calls": calls}
            messages = [
                system_message(),
                {"role": "user", "content": user},
                call,
                {"role": "tool", "tool_call_id": cid, "content": fill(result, rng, values)},
                {"role": "assistant", "content": intent.answer},
            ]
            note = f"valid tool call to {function['name']}"
            self.plant(partition, PART, messages_record(messages, [tool], kind="tool_call_valid", note=note))
        intent = INTENT_BY_NAME["shipping/where_is_order"]
        for partition, how in BROKEN_TOOL_CALLS:
            values = {}
            user = fill(rng.choice(TRACKING_REQUESTS), rng, values)
            number = values["order"].lstrip("#")
            cid = call_id(rng)
            if how == "arguments not JSON":
                call = tool_call(cid, "lookup_order", f"{{order_id: {number}")
            elif how == "no function name":
                call = tool_call(cid, None, json.dumps({"order_id": number}))
            else:
                call = tool_call(cid, "lookup_order", json.dumps({"order_id": number}))
            messages = [
                system_message(),
                {"role": "user", "content": user},
                {"role": "assistant", "tool_calls": [call]},
                {
                    "role": "tool",
                    "tool_call_id": call_id(rng) if how == "tool reply without its call" else cid,
                    "content": '{"status": "delivered"}',
                },
                {"role": "assistant", "content": intent.answer},
            ]
            planted = messages_record(
                messages, [LOOKUP_ORDER], kind="tool_call_invalid", note=how, intended="invalid_tool_call"
            )
            self.plant(partition, PART, planted)

    def weights(self) -> None:
        rng = self.rng
        for partition in VALID_WEIGHTS:
            intent = rng.choice(INTENTS)
            wrong = _other_intent(rng, intent, same_category=True)
            opener = fill(VAGUE_OPENERS[intent.category], rng)
            follow_up = rng.choice(FOLLOW_UPS) + fill(rng.choice(intent.train), rng)
            self.registry.claim(None, f"{opener} {follow_up}")
            messages = [
                system_message(),
                {"role": "user", "content": opener},
                {"role": "assistant", "content": wrong.answer, "weight": 0},
                {"role": "user", "content": follow_up},
                {"role": "assistant", "content": intent.answer, "weight": 1},
            ]
            note = "valid: weight 0 on a wrong first answer, weight 1 on the right one"
            self.plant(partition, PART, messages_record(messages, kind="weight_valid", note=note))
        for partition, how in INVALID_WEIGHTS:
            intent, user = self.message()
            messages = chat_example(user, intent.answer)["messages"]
            if how == "weight on a user message":
                messages[1]["weight"] = 1
            else:
                messages[2]["weight"] = 2 if how == "weight 2" else "1"
            self.plant(
                partition,
                PART,
                messages_record(messages, kind="weight_invalid", note=how, intended="invalid_weight"),
            )

    def over_long(self) -> None:
        for partition, name, lead in OVER_LONG:
            user = fill(lead, self.rng) + pasted_log(self.rng, self.rng.randint(30, 40))
            planted = self.record(
                PART,
                user,
                INTENT_BY_NAME[name].answer,
                kind="over_long",
                note="user pasted a long log",
                intended="too_long",
            )
            self.plant(partition, PART, planted)

    def secrets_and_pii(self) -> None:
        rng = self.rng
        for partition, file, name, what, template in SECRETS:
            user = template.format(secret=SECRET_MAKERS[what](rng))
            planted = self.record(
                file, user, INTENT_BY_NAME[name].answer, kind="secret", note=what, intended="secret_detected"
            )
            self.plant(partition, file, planted)
        for partition, file, name, what, template in PII:
            intent = INTENT_BY_NAME[name]
            user = fill(
                template, rng, {"email": fake_email(rng), "email2": fake_email(rng), "phone": fake_phone(rng)}
            )
            self.registry.claim(intent, user)
            self.plant(
                partition,
                file,
                self.record(file, user, intent.answer, kind="pii", note=f"pii redacted: {what}"),
            )

    def eval_leaks(self) -> None:
        rng = self.rng
        # Each leak copies a different eval example; the appended word needs one long enough to stay near.
        lines = rng.sample(range(len(self.eval_set)), len(EVAL_LEAKS) - 1)
        long_enough = [
            i for i, (_, user) in enumerate(self.eval_set) if len(user.split()) >= 15 and i not in lines
        ]
        lines.insert(2, rng.choice(long_enough))
        for index, (partition, file, how) in zip(lines, EVAL_LEAKS, strict=True):
            intent, user = self.eval_set[index]
            if how.startswith("lower"):
                user = _lower_and_strip(user)
            elif how == "one word appended":
                user += " Thanks!"
            note = f"eval line {index + 1}: {how}"
            planted = self.record(
                file,
                user,
                intent.answer,
                kind="eval_leak",
                note=note,
                intended="eval_leakage",
                eval_line=index + 1,
            )
            self.plant(partition, file, planted)

    def duplicates(self) -> None:
        rng = self.rng
        for source_day, partition in EXACT_DUPLICATES:
            original = rng.choice(self.originals(source_day))
            original.note = "original of an exact duplicate"
            note = "the same line again" + (" in the same file" if source_day == partition else "")
            copy = DemoRecord(
                raw=original.raw,
                kind="exact_duplicate",
                note=note,
                intended="exact_duplicate",
                target=original,
            )
            self.plant(partition, PART, copy, after=original)
        original = rng.choice(self.originals("2026-11-20"))
        original.note = "original of an exact duplicate"
        user, answer = _question_and_answer(original)
        note = "a chat example again as a legacy line"
        copy = self.record(
            LEGACY,
            user,
            answer,
            kind="exact_duplicate",
            note=note,
            intended="exact_duplicate",
            target=original,
        )
        self.plant("2026-11-21", LEGACY, copy)
        for source_day, partition, how in NORMALIZED_DUPLICATES:
            original = rng.choice(self.originals(source_day))
            original.note = "original of a normalised duplicate"
            user, answer = _question_and_answer(original)
            if how == "lower case":
                raw = to_line(chat_example(user.lower(), answer))
            elif how == "extra whitespace":
                raw = to_line(chat_example(_spaced(user), answer))
            elif how.startswith("punctuation"):
                raw = to_line(chat_example(re.sub(r"[,.!?](?=\s|$)", "", user), answer))
            else:
                messages = [
                    {"content": m["content"], "role": m["role"]}
                    for m in chat_example(user, answer)["messages"]
                ]
                raw = json.dumps({"messages": messages}, ensure_ascii=False, separators=(",", ":")).encode(
                    "utf-8"
                )
            if raw == original.raw:
                raise RuntimeError(f"the {how!r} variant of {original.where} equals it byte for byte")
            copy = DemoRecord(
                raw=raw, kind="normalized_duplicate", note=how, intended="exact_duplicate", target=original
            )
            self.plant(partition, PART, copy, after=original)
        for source_day, partition in NEAR_DUPLICATES:
            original = self.long_originals[source_day]
            original.note = "original of a near-duplicate"
            user, answer = _question_and_answer(original)
            changed, how = _one_word_changed(user, rng)
            copy = self.record(
                PART,
                changed,
                answer,
                kind="near_duplicate",
                note=how,
                intended="near_duplicate",
                target=original,
            )
            self.plant(partition, PART, copy)

    def contradictions(self) -> None:
        rng = self.rng
        for places, variant in CONTRADICTIONS:
            intent, question = self.message(short=True)
            (last_day, last_file), earlier = places[-1], places[:-1]
            latest = question.lower() if variant == "lower case" else question
            kept = self.record(
                last_file,
                latest,
                intent.answer,
                kind="contradiction_kept",
                note="latest answer to a contradicted question",
            )
            self.plant(last_day, last_file, kept)
            other = _other_intent(rng, intent)
            wrong_answers = [
                (other.answer, f"the house reply of {other.name}"),
                (rng.choice(OLD_STYLE_REPLIES), "an old free-form reply"),
            ]
            rng.shuffle(wrong_answers)
            for (partition, file), (wrong, what) in zip(earlier, wrong_answers, strict=False):
                note = f"the same question answered earlier with {what}"
                planted = self.record(
                    file,
                    question,
                    wrong,
                    kind="contradiction",
                    note=note,
                    intended="contradiction",
                    target=kept,
                )
                self.plant(partition, file, planted)

    def stamp_crm_export(self) -> None:
        """The CRM exports its tickets in the order they were created."""
        clock = datetime(2026, 11, 19, 7, 58, 0)
        for record in self.layout.file(CSV_DAY, CRM):
            assert record.row is not None
            clock += timedelta(seconds=self.rng.randint(60, 1500))
            ticket, _, message, reply = record.row
            record.row = (ticket, f"{clock:%Y-%m-%dT%H:%M:%SZ}", message, reply)


def _question_and_answer(record: DemoRecord) -> tuple[str, str]:
    assert record.raw is not None
    messages = json.loads(record.raw)["messages"]
    return messages[1]["content"], messages[2]["content"]


# --------------------------------------------------------------------------------------------------
# Applying the contract to the laid-out records: the answer key, and the checks behind it.


def _assign_positions(layout: Layout) -> list[DemoRecord]:
    records: list[DemoRecord] = []
    for path, file_records in layout.files.items():
        partition = path.split("dt=")[1].split("/")[0]
        for line, record in enumerate(file_records, start=1):
            record.path, record.partition, record.line = f"{REPO_PREFIX}/{path}", partition, line
            records.append(record)
    records.sort(key=lambda r: (r.partition, r.path, r.line))
    return records


def _parse(record: DemoRecord) -> tuple[str | None, dict[str, Any] | None]:
    """(ingest or format reason, the example as the pipeline sees it)."""
    if record.row is not None:
        _, _, message, reply = record.row
        example = chat_example(message, reply)
    else:
        assert record.raw is not None
        try:
            text = record.raw.decode("utf-8")
        except UnicodeDecodeError:
            return "invalid_encoding", None
        try:
            example = json.loads(text)
        except ValueError:
            return "invalid_json", None
    issue = formats.check_example(example)
    if issue is not None:
        return issue.key, example
    if formats.detect_kind(example) == "completion":
        example = formats.completion_to_chat(example, SYSTEM_PROMPT)
    return None, example


def apply_contract(records: list[DemoRecord], eval_examples: list[dict[str, Any]]) -> None:
    """Give every record the reason the precedence (data/README.md) gives it (None: kept)."""
    encoding = tokens.get_encoding(ENCODING)
    parsed = []
    for record in records:
        record.reason, record.example = _parse(record)
        if record.reason is None:
            parsed.append(record)
    for record, n in zip(parsed, tokens.count_tokens([r.chat for r in parsed], encoding), strict=True):
        if n > CONTEXT_LIMIT:
            record.reason = "too_long"
        elif record.kind == "over_long":
            raise RuntimeError(f"{record.where}: planted over-long example has only {n} tokens")
    alive = [r for r in parsed if r.reason is None]
    for record in alive:
        if has_secret(example_text(record.chat)):
            record.reason = "secret_detected"
    alive = [r for r in alive if r.reason is None]
    eval_prompts = [normalized_prompt_answer(e)[0] for e in eval_examples]
    eval_sets = [shingles(p) for p in eval_prompts]
    for record in alive:
        prompt = normalized_prompt_answer(record.chat)[0]
        prompt_set = shingles(prompt)
        if prompt in eval_prompts or any(jaccard(prompt_set, e) >= LEAKAGE_THRESHOLD for e in eval_sets):
            record.reason = "eval_leakage"
    alive = [r for r in alive if r.reason is None]
    first: dict[str, DemoRecord] = {}
    for record in alive:
        key = normalized_example(record.chat)
        if key in first:
            record.reason, record.duplicate_of = "exact_duplicate", first[key]
        else:
            first[key] = record
    alive = [r for r in alive if r.reason is None]
    similarity = jaccard_matrix([shingles(normalized_example(r.chat)) for r in alive])
    kept_so_far: list[int] = []
    for i, record in enumerate(alive):
        similar = [j for j in kept_so_far if similarity[i, j] >= NEAR_DUPLICATE_THRESHOLD]
        if similar:
            record.reason, record.duplicate_of = "near_duplicate", alive[similar[0]]
        else:
            kept_so_far.append(i)
    alive = [r for r in alive if r.reason is None]
    by_prompt: dict[str, list[DemoRecord]] = {}
    for record in alive:
        by_prompt.setdefault(normalized_prompt_answer(record.chat)[0], []).append(record)
    for group in by_prompt.values():
        if len({normalized_prompt_answer(r.chat)[1] for r in group}) > 1:
            for record in group[:-1]:
                record.reason, record.duplicate_of = "contradiction", group[-1]


def check_plants(records: list[DemoRecord], eval_examples: list[dict[str, Any]]) -> None:
    """Every plant got the reason it was planted for; every kept record is clean and distinct in every
    reading of the normalised form; the similarity of planted pairs does not hang on that reading."""
    problems = []
    for r in records:
        if r.reason != r.intended:
            problems.append(f"{r.where} ({r.kind}: {r.note}) gets {r.reason!r}, planted as {r.intended!r}")
        if r.target is not None and r.duplicate_of is not r.target:
            got = r.duplicate_of.where if r.duplicate_of else None
            problems.append(f"{r.where} ({r.kind}) duplicates {got}, planted against {r.target.where}")
    kept = [r for r in records if r.reason is None]
    for reading in READINGS:
        examples = [normalized_example(r.chat, reading) for r in kept]
        if len(set(examples)) != len(examples):
            problems.append(f"two kept records are equal when normalised as {reading}")
        prompts = [normalized_prompt_answer(r.chat, reading)[0] for r in kept]
        if len(set(prompts)) != len(prompts):
            problems.append(f"two kept records share a prompt when normalised as {reading}")
        similarity = jaccard_matrix([shingles(e) for e in examples])
        np.fill_diagonal(similarity, 0.0)
        i, j = np.unravel_index(int(np.argmax(similarity)), similarity.shape)
        if similarity[i, j] >= DISTINCT_BELOW:
            problems.append(
                f"{kept[i].where} and {kept[j].where} have Jaccard {similarity[i, j]:.2f} ({reading})"
            )
        eval_sets = [shingles(normalized_prompt_answer(e, reading)[0]) for e in eval_examples]
        leaks = jaccard_matrix([shingles(p) for p in prompts] + eval_sets)[: len(prompts), len(prompts) :]
        if leaks.size and leaks.max() >= DISTINCT_BELOW:
            problems.append(f"a kept record is {leaks.max():.2f} similar to an eval prompt ({reading})")
        for r in records:
            if r.kind in ("exact_duplicate", "normalized_duplicate") and r.target:
                if normalized_example(r.chat, reading) != normalized_example(r.target.chat, reading):
                    problems.append(f"{r.where} is not equal to its original when normalised as {reading}")
            elif r.kind == "near_duplicate" and r.target:
                a = shingles(normalized_example(r.chat, reading))
                b = shingles(normalized_example(r.target.chat, reading))
                if not PLANTED_SIMILAR_AT_LEAST <= jaccard(a, b) < 1.0:
                    problems.append(
                        f"{r.where} has Jaccard {jaccard(a, b):.3f} with its original ({reading})"
                    )
            elif r.kind == "contradiction" and r.target:
                mine = normalized_prompt_answer(r.chat, reading)
                theirs = normalized_prompt_answer(r.target.chat, reading)
                if mine[0] != theirs[0] or mine[1] == theirs[1]:
                    problems.append(f"{r.where} does not contradict {r.target.where} ({reading})")
            elif r.kind == "eval_leak" and r.eval_line:
                a = shingles(normalized_prompt_answer(r.chat, reading)[0])
                b = shingles(normalized_prompt_answer(eval_examples[r.eval_line - 1], reading)[0])
                if jaccard(a, b) < PLANTED_SIMILAR_AT_LEAST:
                    problems.append(
                        f"{r.where} is only {jaccard(a, b):.3f} similar to eval line {r.eval_line}"
                    )
    for r in kept:
        text = example_text(r.chat)
        if has_pii(text) != (r.kind == "pii"):
            problems.append(
                f"{r.where}: PII {'missing from a planted' if r.kind == 'pii' else 'in an unplanted'} record"
            )
    for kind in REQUIRED_KINDS:
        if sum(r.kind == kind for r in records) < 3:
            problems.append(f"fewer than 3 records of kind {kind}")
    if problems:
        raise RuntimeError("the demo data breaks its own guarantees:\n- " + "\n- ".join(problems))


def answer_key(records: list[DemoRecord]) -> list[dict[str, Any]]:
    def ref(record: DemoRecord | None) -> dict[str, Any] | None:
        return None if record is None else {"source": record.path, "line": record.line}

    return [
        {
            "source": r.path,
            "line": r.line,
            "kind": r.kind,
            "reason": r.reason,
            "duplicate_of": ref(r.duplicate_of),
            "eval_example": None
            if r.eval_line is None
            else {"source": f"{REPO_PREFIX}/{EVAL_PATH}", "line": r.eval_line},
            "note": r.note,
        }
        for r in records
        if r.kind is not None
    ]


# --------------------------------------------------------------------------------------------------
# Writing.


def _jsonl(examples: Sequence[dict[str, Any]]) -> bytes:
    return b"".join(to_line(e) + b"\n" for e in examples)


def _csv(records: Sequence[DemoRecord]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(r.row for r in records if r.row is not None)
    return buffer.getvalue().encode("utf-8")


def _readme(seed: int, records: list[DemoRecord], key: list[dict[str, Any]], sizes: dict[str, int]) -> bytes:
    kept = sum(r.reason is None for r in records)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for entry in key:
        by_kind.setdefault(entry["kind"], []).append(entry)
    rows = []
    for kind, description in DIRT_KINDS.items():
        entries = by_kind.get(kind, [])
        reasons = sorted({str(e["reason"]) if e["reason"] else "kept" for e in entries})
        what = description.replace("|", "\\|")  # a pipe would end the table cell
        rows.append(f"| `{kind}` | {len(entries)} | {', '.join(f'`{r}`' for r in reasons)} | {what} |")
    by_reason: dict[str, int] = {}
    for r in records:
        if r.reason:
            by_reason[r.reason] = by_reason.get(r.reason, 0) + 1
    files = "\n".join(f"| `{path}` | {n} |" for path, n in sizes.items())
    intents = ", ".join(f"`{i.name}`" for i in INTENTS)
    text = f"""# Demo data

Generated by `python -m tuneline.demo_data` (seed {seed}); do not edit by hand. Regenerate with

    .venv/bin/python -m tuneline.demo_data            # --seed N, --out DIR

The same seed writes the same bytes, and a test regenerates the data and compares it with these files.

## The task

Acme's customer-support assistant. Users write about billing, shipping, their account and technical
problems, in many phrasings, with order numbers, products, amounts, dates, greetings, sign-offs and
the odd typo (10-60 words). The assistant answers in a fixed house style, one fixed reply per intent:

    Category: <intent>
    Reply: <the intent's house reply>

Intents ({len(INTENTS)}): {intents}.
Every chat example carries the system prompt of `configs/local.yaml` (`model.system_prompt`):
"{SYSTEM_PROMPT}"

## Files

| file | records |
|---|---|
{files}

- `raw/support/dt=YYYY-MM-DD/part-0000.jsonl`: chat fine-tuning lines (the bulk).
- `raw/support/dt=YYYY-MM-DD/legacy.jsonl` (3 days): legacy `{{"prompt", "completion"}}` lines; validate
  converts them to chat with the system prompt.
- `raw/support/dt={CSV_DAY}/crm_export.csv`: a CRM export with columns {", ".join(CSV_COLUMNS)},
  mapped by `csv_mapping: {{user: customer_message, assistant: agent_reply}}` in `configs/local.yaml`.
- `eval/support_eval.jsonl`: the held-out task eval set, [system, user, expected house answer], every
  intent: tickets held out of the stream, as a team keeps them (the intents' usual sentences with fresh
  order numbers, products and amounts, framed by greetings, contexts and sign-offs no training message
  uses, each far from every training message).
- `eval/support_paraphrases.jsonl`: a stress set in the same shape, written from sentences the training
  data never uses ("My banking app lists the payment two times"): it measures language knowledge that a
  model pretrained only on `general/` cannot have; `python -m tuneline.server.training --demo` reports it.
- `general/canary.jsonl`: general questions with short fixed answers (no system prompt), to detect forgetting.
- `general/general_chat.jsonl`: the small general corpus (no system prompt): every canary fact in five
  phrasings (the canary question among them), more facts, arithmetic and small talk. The server's
  built-in tiny model is pretrained on it, and export mixes some of it into training.
- `planted_defects.json`: the answer key, below.

## Planted dirt

{len(records)} raw records: {kept} are kept, {len(records) - kept} are quarantined. The answer key lists every
planted record: `source` (path from the repository root), `line` (1-based; for the CSV the data row,
header not counted), `kind`, `reason` (the quarantine reason by the precedence below, null when the record
is kept), `duplicate_of` (`{{source, line}}` of the record it duplicates or contradicts; for
contradictions the kept, latest record), `eval_example` (the eval line a leak copies) and `note`.
Every record not in the key is clean and distinct from every other kept record: no exact or normalised
duplicate, no near-duplicate (word-3-shingle Jaccard of the normalised example >= 0.8), no
contradiction, no eval leak, no PII, no credential, at most {CONTEXT_LIMIT} {ENCODING} tokens.

| kind | records | reason | what |
|---|---|---|---|
{chr(10).join(rows)}

Quarantined by reason: {", ".join(f"`{k}` {v}" for k, v in sorted(by_reason.items()))}.

Precedence: the first rule a record breaks is its reason: ingest, then format rules
and `too_long`, then secrets, eval leakage, exact duplicates (normalised: NFKC, casefold, punctuation
removed, whitespace collapsed, all roles and texts), near-duplicates, contradictions (keep-latest: the
earlier answers are quarantined). Of two duplicates the later one, in (partition, source, line) order,
is quarantined.

## Synthetic data for the benchmark

`tuneline.demo_data.synthetic_chat_lines(n, seed, dirt_fraction)` streams n chat lines in the same
style with about 5% dirt (exact and near-duplicates, malformed JSON, format errors) for
`benchmarks/data_plane.py`.
"""
    return text.encode("utf-8")


@dataclass
class DemoData:
    """What `generate` wrote: file contents by path relative to the output folder, and the records."""

    files: dict[str, bytes]
    records: list[DemoRecord] = field(repr=False)
    answer_key: list[dict[str, Any]] = field(repr=False)

    @property
    def kept(self) -> int:
        return sum(r.reason is None for r in self.records)


def build(seed: int = DEFAULT_SEED) -> DemoData:
    """All demo files as bytes, checked against their guarantees; nothing is written."""
    registry = PromptRegistry()
    eval_set = make_eval_set(random.Random(f"{seed}/eval"), registry)
    layout = Planter(random.Random(f"{seed}/raw"), registry, eval_set).run()
    eval_examples = [chat_example(user, intent.answer) for intent, user in eval_set]
    paraphrases = make_eval_set(random.Random(f"{seed}/paraphrases"), registry, PARAPHRASE_BOOK)
    records = _assign_positions(layout)
    apply_contract(records, eval_examples)
    check_plants(records, eval_examples)
    key = answer_key(records)

    files: dict[str, bytes] = {}
    for path, file_records in layout.files.items():
        if path.endswith(".csv"):
            files[path] = _csv(file_records)
        else:
            files[path] = b"".join(r.raw + b"\n" for r in file_records if r.raw is not None)
            if files[path].count(b"\n") != len(file_records):
                raise RuntimeError(f"{path}: a record has no JSONL line")
    files[EVAL_PATH] = _jsonl(eval_examples)
    files[PARAPHRASE_PATH] = _jsonl([chat_example(user, intent.answer) for intent, user in paraphrases])
    files[CANARY_PATH] = _jsonl(canary_set())
    files[GENERAL_PATH] = _jsonl(general_corpus(random.Random(f"{seed}/general")))
    files[ANSWER_KEY_PATH] = (json.dumps(key, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    files = dict(sorted(files.items()))
    sizes = {
        p: len(layout.files[p]) if p in layout.files else files[p].count(b"\n")
        for p in files
        if p != ANSWER_KEY_PATH
    }
    files["README.md"] = _readme(seed, records, key, sizes)
    return DemoData(files=dict(sorted(files.items())), records=records, answer_key=key)


def generate(out: Path = DATA_DIR, seed: int = DEFAULT_SEED) -> DemoData:
    """Write the demo data under `out` (byte-identical for the same seed) and return what was written."""
    data = build(seed)
    for relative, content in data.files.items():
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    return data


# --------------------------------------------------------------------------------------------------
# Synthetic lines for the data-plane benchmark.


def _json_fragment(text: str) -> str:
    """`text` as it stands between the quotes of a JSON string."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


SYNTHETIC_SLOTS = ("order", "product", "amount", "date", "platform", "version")


def synthetic_chat_lines(n: int, seed: int = 0, dirt_fraction: float = 0.05) -> Iterator[str]:
    """n JSONL chat lines (each ending in a newline) in the support style, deterministic for a seed.

    About `dirt_fraction` of them are dirt, in equal parts: exact duplicates of a recent line,
    near-duplicates (a recent line with one word, the sign-off name, changed), malformed JSON (a line
    cut short) and format errors (an unknown role, no assistant turn, or empty content). Clean lines
    draw every part of the message independently, so two of them are rarely near each other. The
    random draws are vectorised, slot values come from tables and the JSON is assembled from
    pre-escaped pieces: a million lines take seconds.
    """
    rng = np.random.default_rng(seed)
    prefix = (
        '{"messages": [{"role": "system", "content": '
        + json.dumps(SYSTEM_PROMPT)
        + '}, {"role": "user", "content": "'
    )
    suffixes = [
        '"}, {"role": "assistant", "content": ' + json.dumps(i.answer, ensure_ascii=False) + "}]}\n"
        for i in INTENTS
    ]
    # Every core sentence with every detail, its {slots} made positional for one str.format call.
    positional = {name: f"{{{k}}}" for k, name in enumerate(SYNTHETIC_SLOTS)}
    bodies = [
        [_json_fragment(f"{c} {d}").format_map(positional) for c in i.train for d in i.details]
        for i in INTENTS
    ]
    greetings, contexts, asks, signoffs, names, products = (
        [_json_fragment(t) for t in texts]
        for texts in (
            TRAIN_BOOK.greetings,
            TRAIN_BOOK.contexts,
            TRAIN_BOOK.asks,
            TRAIN_BOOK.signoffs,
            NAMES,
            PRODUCTS,
        )
    )
    tables = (
        [f"#{k}" for k in range(10000, 100000)],
        products,
        [f"${d}.{c:02d}" for d in range(12, 480) for c in range(100)],
        [f"Oct {d}" for d in range(1, 32)],
        list(PLATFORMS),
        [f"{a}.{b}.{c}" for a in range(3, 6) for b in range(13) for c in range(10)],
    )
    orders, _, amounts, dates, platforms, versions = tables
    sizes = [
        len(bodies[0]),
        len(greetings),
        len(contexts),
        len(contexts),
        len(asks),
        len(products),
        len(dates),
    ]
    sizes += [len(signoffs), len(names), *(len(t) for t in tables), 4, 1 << 30, len(names) - 1]
    history: list[
        tuple[str, str, int, int]
    ] = []  # recent clean lines: (line, message before the name, intent, name)
    remaining = n
    while remaining > 0:
        # Whole chunks whatever n is, so that the first k lines are the same for every n >= k.
        size = 65536
        intents = rng.integers(0, len(INTENTS), size).tolist()
        dirty = (rng.random(size) < dirt_fraction).tolist()
        columns = [rng.integers(0, k, size).tolist() for k in sizes]
        for intent, is_dirty, draw in zip(
            intents[:remaining], dirty, zip(*columns, strict=True), strict=False
        ):
            (body, greet, ctx1, ctx2, ask, ps_product, ps_date, signoff, name,
             order, product, amount, date, platform, version, dirt, pick, rename) = draw  # fmt: skip
            if is_dirty and history and dirt < 2:
                line, stem, old_intent, old_name = history[pick % len(history)]
                if dirt == 0:  # an exact duplicate
                    yield line
                else:  # a near-duplicate: the same message signed with another name
                    yield prefix + stem + names[(old_name + 1 + rename) % len(names)] + suffixes[old_intent]
                continue
            text = bodies[intent][body].format(
                orders[order],
                products[product],
                amounts[amount],
                dates[date],
                platforms[platform],
                versions[version],
            )
            stem = (
                f"{greetings[greet]} {text} {contexts[ctx1]} {contexts[ctx2]} {asks[ask]} P.S. The "
                f"{products[ps_product]} I got on {dates[ps_date]} is great. {signoffs[signoff]}, "
            )
            user = stem + names[name]
            if not is_dirty:
                line = prefix + user + suffixes[intent]
                if len(history) < 4096:
                    history.append((line, stem, intent, name))
                else:
                    history[pick % 4096] = (line, stem, intent, name)
                yield line
            elif dirt == 2:  # malformed JSON: the line cut short
                line = prefix + user + suffixes[intent]
                yield line[: len(line) // 2] + "\n"
            elif pick % 3 == 0:  # format errors
                yield prefix.replace('"role": "user"', '"role": "customer"') + user + suffixes[intent]
            elif pick % 3 == 1:
                yield prefix + user + '"}]}\n'
            else:
                yield prefix + user + '"}, {"role": "assistant", "content": ""}]}\n'
        remaining -= size


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tuneline.demo_data",
        description="Write tuneline's demo data, reproducibly from a seed.",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})"
    )
    parser.add_argument(
        "--out", type=Path, default=DATA_DIR, help="output folder (default: the project's data/)"
    )
    args = parser.parse_args(argv)
    data = generate(args.out, args.seed)
    quarantined = len(data.records) - data.kept
    print(
        f"wrote {len(data.files)} files under {args.out}: {len(data.records)} raw records "
        f"({data.kept} clean, {quarantined} planted for quarantine), answer key {ANSWER_KEY_PATH}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
