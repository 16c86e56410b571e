"""The raw partitions of the demo: clean records laid out day by day, then every kind of dirt of
content/dirt.yaml planted at random lines.

Each planted record carries what it was planted as: its `kind`, the quarantine `reason` it is made to
get (None for plants that must be kept), the record it copies or contradicts (`duplicate_of`) and the
eval line it leaks. The answer key is written from these, and guarantees.py checks that every plant
shows its defect and nothing else.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from tuneline.demo.content import (
    CRM,
    DIRT,
    INTENT_BY_NAME,
    INTENTS,
    LEGACY,
    PART,
    STREAM,
    SUPPORT,
    SYSTEM_PROMPT,
    TOOLS,
    Intent,
)
from tuneline.demo.fakes import CREDENTIAL_MAKERS, call_id, fake_email, fake_phone, pasted_log, tool_call
from tuneline.demo.messages import PromptRegistry, chat_example, fill

RAW_ROOT = "raw/support"
# Answer-key paths are given as committed in the repository, whatever --out is.
REPO_PREFIX = "data"


@dataclass(eq=False)
class DemoRecord:
    """One raw record (a JSONL line or a CSV row) and what was planted in it."""

    raw: bytes | None = None  # a JSONL line without its newline
    row: tuple[str, str, str, str] | None = None  # a CSV row
    kind: str | None = None  # a kind of content/dirt.yaml; None for an ordinary clean record
    note: str = ""
    reason: str | None = None  # the quarantine reason the plant is made to get; None: kept
    duplicate_of: DemoRecord | None = None  # the original it copies, or the kept answer it contradicts
    eval_line: int | None = None  # the eval line it leaks
    # Filled in when the files are laid out:
    path: str = ""
    partition: str = ""
    line: int = 0

    @property
    def where(self) -> str:
        return f"line {self.line} of {self.path}"

    @property
    def order(self) -> tuple[str, str, int]:
        """The record order of the data contract: (partition, source, line)."""
        return self.partition, self.path, self.line


def to_line(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def line_object(file: str, user: str, answer: str) -> dict[str, Any]:
    """One question and answer as a line of `file`: legacy prompt/completion or chat."""
    return {"prompt": user, "completion": answer} if file == LEGACY else chat_example(user, answer)


def messages_record(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, **planted: Any
) -> DemoRecord:
    obj: dict[str, Any] = {"messages": messages}
    if tools is not None:
        obj["tools"] = tools
    return DemoRecord(raw=to_line(obj), **planted)


def system_message() -> dict[str, Any]:
    return {"role": "system", "content": SYSTEM_PROMPT}


def question_and_answer(record: DemoRecord) -> tuple[str, str]:
    assert record.raw is not None
    messages = json.loads(record.raw)["messages"]
    return messages[1]["content"], messages[2]["content"]


# --------------------------------------------------------------------------------------------------
# Laying out the partitions, planting the dirt.


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

    def clean_records(self, partition: str, name: str = PART) -> list[DemoRecord]:
        return [r for r in self.file(partition, name) if r.kind is None]

    def records(self) -> list[DemoRecord]:
        """Every record, its path, partition and line set, in the contract's record order."""
        records: list[DemoRecord] = []
        for path, file_records in self.files.items():
            partition = path.split("dt=")[1].split("/")[0]
            for line, record in enumerate(file_records, start=1):
                record.path, record.partition, record.line = f"{REPO_PREFIX}/{path}", partition, line
                records.append(record)
        records.sort(key=lambda r: r.order)
        return records


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
    swaps = SUPPORT.word_swaps
    words = text.split(" ")
    positions = [i for i, w in enumerate(words) if w.strip(".,!?") in swaps]
    if not positions:
        raise RuntimeError("a long message has no swappable word: add one to word_swaps in support.yaml")
    i = positions[len(positions) // 2]
    bare = words[i].strip(".,!?")
    words[i] = words[i].replace(bare, swaps[bare])
    return " ".join(words), f"the word {bare!r} changed to {swaps[bare]!r}"


def _normalized_variant(original: DemoRecord, how: str) -> bytes:
    """The line of `original` changed as `how` says, equal to it once normalised."""
    user, answer = question_and_answer(original)
    if how == "lower case":
        return to_line(chat_example(user.lower(), answer))
    if how == "extra whitespace":
        return to_line(chat_example(_spaced(user), answer))
    if how.startswith("punctuation"):
        return to_line(chat_example(re.sub(r"[,.!?](?=\s|$)", "", user), answer))
    messages = [{"content": m["content"], "role": m["role"]} for m in chat_example(user, answer)["messages"]]
    return json.dumps({"messages": messages}, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class Planter:
    """Lays out the partitions: the clean records first, then each family of dirt at random lines.

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
        near_originals = {near.original_day for near in DIRT.near_duplicate}
        for partition in STREAM.days:
            counts = {PART: rng.randint(*STREAM.chat_lines_per_day)}
            if partition in STREAM.legacy_days:
                counts[LEGACY] = rng.randint(*STREAM.legacy_lines_per_day)
            if partition == STREAM.csv_day:
                counts[CRM] = STREAM.csv_clean_rows
            for file, count in counts.items():
                records = self.layout.file(partition, file)
                for _ in range(count):
                    intent, user = self.message()
                    records.append(self.record(file, user, intent.answer))
            if partition in near_originals:
                # A long message per early day: the original of a near-duplicate planted later.
                intent, user = self.message(long=True)
                self.long_originals[partition] = self.plant(
                    partition, PART, self.record(PART, user, intent.answer)
                )
        # A quoted phrase exercises CSV quoting beyond the newline inside every answer.
        quoted = DIRT.quoted_csv_message
        intent = INTENT_BY_NAME[quoted.intent]
        self.registry.claim(intent, quoted.message)
        self.plant(STREAM.csv_day, CRM, self.record(CRM, quoted.message, intent.answer))

    def ingest_dirt(self) -> None:
        rng = self.rng
        for entry in DIRT.malformed_json:
            intent, user = self.message()
            example = line_object(entry.file, user, intent.answer)
            text = json.dumps(example, ensure_ascii=False)
            if entry.how == "truncated":
                text = text[: rng.randint(len(text) // 3, 2 * len(text) // 3)]
            elif entry.how == "with a trailing comma":
                text = text[:-1] + ",}"
            else:
                text = repr(example)
            planted = DemoRecord(
                raw=text.encode(), kind="malformed_json", note=f"JSON {entry.how}", reason="invalid_json"
            )
            self.plant(entry.day, entry.file, planted)
        for latin in DIRT.non_utf8:
            obj = line_object(latin.file, latin.message, INTENT_BY_NAME[latin.intent].answer)
            raw = json.dumps(obj, ensure_ascii=False).encode("latin-1")
            planted = DemoRecord(
                raw=raw, kind="non_utf8", note="line encoded as latin-1", reason="invalid_encoding"
            )
            self.plant(latin.day, latin.file, planted)

    def format_dirt(self) -> None:
        for wrong in DIRT.wrong_role:
            intent, user = self.message()
            messages = chat_example(user, intent.answer)["messages"]
            instead = "user" if wrong.role == "customer" else "assistant"
            messages[1 if instead == "user" else 2]["role"] = wrong.role
            note = f"role {wrong.role!r} instead of {instead!r}"
            self.plant(
                wrong.day,
                PART,
                messages_record(messages, kind="wrong_role", note=note, reason="unrecognized_role"),
            )
        for missing in DIRT.missing_assistant:
            _, user = self.message()
            messages = [system_message(), {"role": "user", "content": user}]
            planted = messages_record(
                messages,
                kind="missing_assistant",
                note="no assistant turn",
                reason="example_missing_assistant_message",
            )
            self.plant(missing.day, PART, planted)
        for empty in DIRT.empty_content:
            intent, user = self.message()
            messages = chat_example(user, intent.answer)["messages"]
            messages[1 if empty.role == "user" else 2]["content"] = ""
            note = f'{empty.role} content ""'
            self.plant(
                empty.day,
                PART,
                messages_record(messages, kind="empty_content", note=note, reason="missing_content"),
            )
        _, user = self.message()
        planted = self.record(
            CRM, user, "", kind="csv_empty_reply", note="empty agent_reply", reason="missing_content"
        )
        self.plant(STREAM.csv_day, CRM, planted)
        for special in DIRT.special_token:
            intent, user = self.message()
            answer, token = intent.answer, special.token
            if special.where.startswith("start of the user"):
                user = f"{token}user\n{user}"
            elif special.where.startswith("end of the user"):
                user += token
            else:
                answer += token
            note = f"{token} at the {special.where}"
            planted = self.record(
                special.file, user, answer, kind="special_token", note=note, reason="forbidden_special_token"
            )
            self.plant(special.day, special.file, planted)

    def tool_calls(self) -> None:
        rng = self.rng
        for valid in DIRT.tool_call_valid:
            intent = INTENT_BY_NAME[valid.intent]
            values: dict[str, str] = {}
            user = fill(valid.message, rng, values)
            self.registry.claim(intent, user)
            tool = DIRT.tools[valid.tool]
            argument = values["order"].lstrip("#") if valid.argument is None else valid.argument
            cid = call_id(rng)
            calls = [tool_call(cid, valid.tool, json.dumps({tool.parameter: argument}))]
            call: dict[str, Any] = {"role": "assistant", "tool_calls": calls}
            if valid.content_null:
                call = {"role": "assistant", "content": None, "tool_calls": calls}
            messages = [
                system_message(),
                {"role": "user", "content": user},
                call,
                {"role": "tool", "tool_call_id": cid, "content": fill(valid.result, rng, values)},
                {"role": "assistant", "content": intent.answer},
            ]
            note = f"valid tool call to {valid.tool}"
            planted = messages_record(messages, [TOOLS[valid.tool]], kind="tool_call_valid", note=note)
            self.plant(valid.day, PART, planted)
        intent = INTENT_BY_NAME["shipping/where_is_order"]
        for broken in DIRT.tool_call_invalid:
            values = {}
            user = fill(rng.choice(DIRT.tracking_requests), rng, values)
            number = values["order"].lstrip("#")
            cid = call_id(rng)
            if broken.how == "arguments not JSON":
                call = tool_call(cid, "lookup_order", f"{{order_id: {number}")
            elif broken.how == "no function name":
                call = tool_call(cid, None, json.dumps({"order_id": number}))
            else:
                call = tool_call(cid, "lookup_order", json.dumps({"order_id": number}))
            messages = [
                system_message(),
                {"role": "user", "content": user},
                {"role": "assistant", "tool_calls": [call]},
                {
                    "role": "tool",
                    "tool_call_id": call_id(rng) if broken.how == "tool reply without its call" else cid,
                    "content": '{"status": "delivered"}',
                },
                {"role": "assistant", "content": intent.answer},
            ]
            planted = messages_record(
                messages,
                [TOOLS["lookup_order"]],
                kind="tool_call_invalid",
                note=broken.how,
                reason="invalid_tool_call",
            )
            self.plant(broken.day, PART, planted)

    def weights(self) -> None:
        rng = self.rng
        for valid in DIRT.weight_valid:
            intent = rng.choice(INTENTS)
            wrong = _other_intent(rng, intent, same_category=True)
            opener = fill(DIRT.vague_openers[intent.category], rng)
            follow_up = rng.choice(DIRT.follow_ups) + fill(rng.choice(intent.train), rng)
            self.registry.claim(None, f"{opener} {follow_up}")
            messages = [
                system_message(),
                {"role": "user", "content": opener},
                {"role": "assistant", "content": wrong.answer, "weight": 0},
                {"role": "user", "content": follow_up},
                {"role": "assistant", "content": intent.answer, "weight": 1},
            ]
            note = "valid: weight 0 on a wrong first answer, weight 1 on the right one"
            self.plant(valid.day, PART, messages_record(messages, kind="weight_valid", note=note))
        for invalid in DIRT.weight_invalid:
            intent, user = self.message()
            messages = chat_example(user, intent.answer)["messages"]
            if invalid.how == "weight on a user message":
                messages[1]["weight"] = 1
            else:
                messages[2]["weight"] = 2 if invalid.how == "weight 2" else "1"
            self.plant(
                invalid.day,
                PART,
                messages_record(messages, kind="weight_invalid", note=invalid.how, reason="invalid_weight"),
            )

    def over_long(self) -> None:
        for long in DIRT.over_long:
            user = fill(long.lead, self.rng) + pasted_log(self.rng, self.rng.randint(30, 40))
            planted = self.record(
                PART,
                user,
                INTENT_BY_NAME[long.intent].answer,
                kind="over_long",
                note="user pasted a long log",
                reason="too_long",
            )
            self.plant(long.day, PART, planted)

    def secrets_and_pii(self) -> None:
        rng = self.rng
        for secret in DIRT.secret:
            user = secret.message.format(secret=CREDENTIAL_MAKERS[secret.credential](rng))
            planted = self.record(
                secret.file,
                user,
                INTENT_BY_NAME[secret.intent].answer,
                kind="secret",
                note=secret.credential,
                reason="secret_detected",
            )
            self.plant(secret.day, secret.file, planted)
        for pii in DIRT.pii:
            intent = INTENT_BY_NAME[pii.intent]
            user = fill(
                pii.message,
                rng,
                {"email": fake_email(rng), "email2": fake_email(rng), "phone": fake_phone(rng)},
            )
            self.registry.claim(intent, user)
            self.plant(
                pii.day,
                pii.file,
                self.record(pii.file, user, intent.answer, kind="pii", note=f"pii redacted: {pii.what}"),
            )

    def eval_leaks(self) -> None:
        rng = self.rng
        # Each leak copies a different eval example; the appended word needs one long enough to stay near.
        leaks = DIRT.eval_leak
        appended = [i for i, leak in enumerate(leaks) if leak.how == "one word appended"]
        lines = rng.sample(range(len(self.eval_set)), len(leaks) - len(appended))
        long_enough = [
            i for i, (_, user) in enumerate(self.eval_set) if len(user.split()) >= 15 and i not in lines
        ]
        for position in appended:
            lines.insert(position, rng.choice([i for i in long_enough if i not in lines]))
        for index, leak in zip(lines, leaks, strict=True):
            intent, user = self.eval_set[index]
            if leak.how.startswith("lower"):
                user = _lower_and_strip(user)
            elif leak.how == "one word appended":
                user += " Thanks!"
            note = f"eval line {index + 1}: {leak.how}"
            planted = self.record(
                leak.file,
                user,
                intent.answer,
                kind="eval_leak",
                note=note,
                reason="eval_leakage",
                eval_line=index + 1,
            )
            self.plant(leak.day, leak.file, planted)

    def duplicates(self) -> None:
        rng = self.rng
        for copy_of in DIRT.exact_duplicate:
            original = rng.choice(self.originals(copy_of.original_day))
            original.note = "original of an exact duplicate"
            if copy_of.file == LEGACY:
                user, answer = question_and_answer(original)
                note = "a chat example again as a legacy line"
                copy = self.record(LEGACY, user, answer, note=note)
            else:
                same_file = copy_of.original_day == copy_of.day
                note = "the same line again" + (" in the same file" if same_file else "")
                copy = DemoRecord(raw=original.raw, note=note)
            copy.kind, copy.reason, copy.duplicate_of = "exact_duplicate", "exact_duplicate", original
            # A copy in the same file comes after its original; in another file, its day decides.
            self.plant(copy_of.day, copy_of.file, copy, after=original)
        for variant in DIRT.normalized_duplicate:
            original = rng.choice(self.originals(variant.original_day))
            raw = _normalized_variant(original, variant.how)
            if raw == original.raw:  # e.g. a message already in lower case: draw among those it changes
                candidates = [
                    r
                    for r in self.originals(variant.original_day)
                    if _normalized_variant(r, variant.how) != r.raw
                ]
                original = rng.choice(candidates)
                raw = _normalized_variant(original, variant.how)
            original.note = "original of a normalised duplicate"
            copy = DemoRecord(
                raw=raw,
                kind="normalized_duplicate",
                note=variant.how,
                reason="exact_duplicate",
                duplicate_of=original,
            )
            self.plant(variant.day, PART, copy, after=original)
        for near in DIRT.near_duplicate:
            original = self.long_originals[near.original_day]
            original.note = "original of a near-duplicate"
            user, answer = question_and_answer(original)
            changed, how = _one_word_changed(user, rng)
            copy = self.record(
                PART,
                changed,
                answer,
                kind="near_duplicate",
                note=how,
                reason="near_duplicate",
                duplicate_of=original,
            )
            self.plant(near.day, PART, copy)

    def contradictions(self) -> None:
        rng = self.rng
        for contradiction in DIRT.contradiction:
            intent, question = self.message(short=True)
            last, earlier = contradiction.places[-1], contradiction.places[:-1]
            latest = question.lower() if contradiction.variant == "lower case" else question
            kept = self.record(
                last.file,
                latest,
                intent.answer,
                kind="contradiction_kept",
                note="latest answer to a contradicted question",
            )
            self.plant(last.day, last.file, kept)
            other = _other_intent(rng, intent)
            wrong_answers = [
                (other.answer, f"the house reply of {other.name}"),
                (rng.choice(DIRT.old_style_replies), "an old free-form reply"),
            ]
            rng.shuffle(wrong_answers)
            for place, (wrong, what) in zip(earlier, wrong_answers, strict=False):
                note = f"the same question answered earlier with {what}"
                planted = self.record(
                    place.file,
                    question,
                    wrong,
                    kind="contradiction",
                    note=note,
                    reason="contradiction",
                    duplicate_of=kept,
                )
                self.plant(place.day, place.file, planted)

    def stamp_crm_export(self) -> None:
        """The CRM exports its tickets in the order they were created."""
        day = datetime.fromisoformat(STREAM.csv_day)
        clock = day.replace(hour=7, minute=58)
        for record in self.layout.file(STREAM.csv_day, CRM):
            assert record.row is not None
            clock += timedelta(seconds=self.rng.randint(60, 1500))
            ticket, _, message, reply = record.row
            record.row = (ticket, f"{clock:%Y-%m-%dT%H:%M:%SZ}", message, reply)
