"""The demo's literal content, read once from the YAML files of `content/` beside this module.

- `support.yaml`: the task (system prompt, intents with their house replies and the sentences users
  write them with, names, products, platforms, the phrasebooks of greetings and sign-offs) and the
  shape of the raw stream (days, files, counts);
- `general.yaml`: the canary set and the general corpus (facts in several phrasings, small talk);
- `dirt.yaml`: every kind of planted dirt with what it is, and where and how each is planted.

Each file is validated on load by the models below (unknown keys, unknown dirt variants, days outside
the stream and intents that do not exist are refused with the path of the bad entry), so the
generator's code meets only well-formed content. The files are package data: a non-editable install
carries them.
"""

from __future__ import annotations

from functools import cached_property
from importlib import resources
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PART, LEGACY, CRM = "part-0000.jsonl", "legacy.jsonl", "crm_export.csv"
FileName = Literal["part-0000.jsonl", "legacy.jsonl", "crm_export.csv"]
JsonlFile = Literal["part-0000.jsonl", "legacy.jsonl"]


class Content(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------------
# support.yaml


class Intent(Content):
    name: str = Field(pattern=r"^[a-z]+/[a-z_]+$")
    reply: str
    train: tuple[str, ...] = Field(min_length=1)  # core sentences of the training data and the eval set
    held_out: tuple[str, ...] = Field(min_length=1)  # core sentences only the paraphrase stress set uses
    details: tuple[str, ...]
    held_out_details: tuple[str, ...]

    @property
    def category(self) -> str:
        return self.name.split("/")[0]

    @property
    def answer(self) -> str:
        """The house answer: the one assistant text the model must produce for this intent."""
        return f"Category: {self.name}\nReply: {self.reply}"


class Phrasebook(Content):
    """The framing around a core sentence; training and eval messages draw their framing from disjoint
    books. `held_out` marks an eval book; `paraphrases` also takes the intent's held-out core sentences
    and details, which no training message uses."""

    greetings: tuple[str, ...]
    contexts: tuple[str, ...]
    asks: tuple[str, ...]
    signoffs: tuple[str, ...]
    held_out: bool = False
    paraphrases: bool = False

    def cores(self, intent: Intent) -> tuple[str, ...]:
        return intent.held_out if self.paraphrases else intent.train

    def details(self, intent: Intent) -> tuple[str, ...]:
        return intent.held_out_details if self.paraphrases else intent.details


class Stream(Content):
    days: tuple[str, ...] = Field(min_length=1)
    legacy_days: tuple[str, ...]
    csv_day: str
    csv_columns: tuple[str, str, str, str]
    chat_lines_per_day: tuple[int, int]
    legacy_lines_per_day: tuple[int, int]
    csv_clean_rows: int = Field(ge=1)
    eval_examples: int = Field(ge=1)

    @model_validator(mode="after")
    def _days_of_the_stream(self) -> Stream:
        unknown = sorted(set(self.legacy_days) - set(self.days)) + [
            d for d in (self.csv_day,) if d not in self.days
        ]
        if unknown:
            raise ValueError(f"days outside stream.days: {unknown}")
        return self


class Support(Content):
    system_prompt: str
    stream: Stream
    intents: tuple[Intent, ...] = Field(min_length=2)
    names: tuple[str, ...]
    products: tuple[str, ...]
    platforms: tuple[str, ...]
    months: tuple[str, ...]
    phrasebooks: dict[Literal["train", "eval"], Phrasebook]
    word_swaps: dict[str, str]


# --------------------------------------------------------------------------------------------------
# general.yaml

FamilyName = Literal["capital", "arithmetic", "opposite", "color"]
Operation = Literal["plus", "minus", "times"]


class Written(Content):
    question: str
    answer: str
    paraphrases: tuple[str, ...]


class FamilyFacts(Content):
    family: FamilyName
    facts: tuple[tuple[str, str], ...]


class WrittenFacts(Content):
    written: tuple[Written, ...]


class ArithmeticFacts(Content):
    arithmetic: tuple[tuple[int, Operation, int], ...]


class Fact(Content):
    questions: tuple[str, str]
    answer: str


class SmallTalk(Content):
    phrasings: tuple[str, ...]
    answer: str


class General(Content):
    phrasings: dict[FamilyName, tuple[str, ...]]
    canary: tuple[FamilyFacts | WrittenFacts | ArithmeticFacts, ...]
    more_capitals: tuple[tuple[str, str], ...]
    more_opposites: tuple[tuple[str, str], ...]
    more_facts: tuple[Fact, ...]
    small_talk: tuple[SmallTalk, ...] = Field(min_length=2)


# --------------------------------------------------------------------------------------------------
# dirt.yaml: each list entry plants one record (contradictions: one per place).


class Planted(Content):
    day: str


class InFile(Planted):
    file: FileName


class MalformedJson(InFile):
    file: JsonlFile
    how: Literal["truncated", "with a trailing comma", "in single quotes"]


class Latin1(InFile):
    file: JsonlFile
    intent: str
    message: str


class WrongRole(Planted):
    role: Literal["customer", "bot"]


class EmptyContent(Planted):
    role: Literal["user", "assistant"]


class SpecialToken(InFile):
    token: str
    where: Literal[
        "start of the user message",
        "end of the user message",
        "end of the assistant message",
        "end of the completion",
    ]


class Tool(Content):
    description: str
    parameter: str
    parameter_description: str

    def as_tool(self, name: str) -> dict[str, Any]:
        """The tool as a fine-tuning example's `tools` entry."""
        return {
            "type": "function",
            "function": {
                "name": name,
                "description": self.description,
                "parameters": {
                    "type": "object",
                    "properties": {
                        self.parameter: {"type": "string", "description": self.parameter_description}
                    },
                    "required": [self.parameter],
                },
            },
        }


class ValidToolCall(Planted):
    intent: str
    tool: str
    message: str
    result: str
    # On a tool-calling turn the API accepts content null as well as no content at all.
    content_null: bool = False
    # The call's argument; None: the order number of the message, without its #.
    argument: str | None = None


class BrokenToolCall(Planted):
    how: Literal["arguments not JSON", "no function name", "tool reply without its call"]


class InvalidWeight(Planted):
    how: Literal["weight 2", 'weight "1"', "weight on a user message"]


class OverLong(Planted):
    intent: str
    lead: str  # what the user writes before pasting a log


Credential = Literal[
    "OpenAI API key", "AWS access key", "GitHub token", "EC private key block", "OpenSSH private key block"
]


class Secret(InFile):
    intent: str
    credential: Credential
    message: str  # {secret} marks the credential


class Pii(InFile):
    intent: str
    what: str
    message: str  # {email}, {email2}, {phone} and the usual slots


class EvalLeak(InFile):
    how: Literal[
        "exact copy",
        "lower case, end punctuation dropped",
        "one word appended",
        "exact copy as a legacy line",
    ]


class Copy(Planted):
    original_day: str


class ExactCopy(Copy):
    file: JsonlFile = (
        "part-0000.jsonl"  # a copy in the legacy file is the chat example as a prompt/completion line
    )


class NormalizedCopy(Copy):
    how: Literal[
        "lower case", "extra whitespace", "punctuation at word ends dropped", "keys reordered, compact JSON"
    ]


class Place(InFile):
    pass


class Contradiction(Content):
    places: tuple[Place, ...] = Field(min_length=2)  # the earlier ones get wrong answers; the last is kept
    variant: Literal["", "lower case"] = ""


class QuotedMessage(Content):
    intent: str
    message: str


class EmailParts(Content):
    first_names: tuple[str, ...]
    last_names: tuple[str, ...]
    domains: tuple[str, ...]


class Dirt(Content):
    kinds: dict[str, str]
    malformed_json: tuple[MalformedJson, ...]
    non_utf8: tuple[Latin1, ...]
    wrong_role: tuple[WrongRole, ...]
    missing_assistant: tuple[Planted, ...]
    empty_content: tuple[EmptyContent, ...]
    special_token: tuple[SpecialToken, ...]
    tools: dict[str, Tool]
    tool_call_valid: tuple[ValidToolCall, ...]
    tool_call_invalid: tuple[BrokenToolCall, ...]
    tracking_requests: tuple[str, ...]
    weight_valid: tuple[Planted, ...]
    weight_invalid: tuple[InvalidWeight, ...]
    vague_openers: dict[str, str]
    follow_ups: tuple[str, ...]
    over_long: tuple[OverLong, ...]
    log_lines: tuple[str, ...]
    secret: tuple[Secret, ...]
    pii: tuple[Pii, ...]
    eval_leak: tuple[EvalLeak, ...]
    exact_duplicate: tuple[ExactCopy, ...]
    normalized_duplicate: tuple[NormalizedCopy, ...]
    near_duplicate: tuple[Copy, ...]
    contradiction: tuple[Contradiction, ...]
    old_style_replies: tuple[str, ...]
    quoted_csv_message: QuotedMessage
    email: EmailParts

    @cached_property
    def days(self) -> set[str]:
        """Every day a plant names."""
        found: set[str] = set()
        for name in type(self).model_fields:
            value = getattr(self, name)
            for entry in value if isinstance(value, tuple) else ():
                if isinstance(entry, Planted):
                    found.add(entry.day)
                if isinstance(entry, Copy):
                    found.add(entry.original_day)
                if isinstance(entry, Contradiction):
                    found.update(place.day for place in entry.places)
        return found

    def intents(self) -> set[str]:
        """Every intent a plant names."""
        named = {self.quoted_csv_message.intent}
        for group in (self.non_utf8, self.tool_call_valid, self.over_long, self.secret, self.pii):
            named.update(entry.intent for entry in group)
        return named


# --------------------------------------------------------------------------------------------------
# Loading.


class ContentError(ValueError):
    """A content file breaks its schema: the message names the file, the entry and the problem."""


def _read(name: str) -> Any:
    text = resources.files(__package__).joinpath("content", name).read_text(encoding="utf-8")
    return yaml.safe_load(text)


def _load(model: type[Content], name: str) -> Any:
    try:
        return model.model_validate(_read(name))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ContentError(f"tuneline/demo/content/{name}: {where}: {first['msg']}") from None


def _check_references(support: Support, dirt: Dirt) -> None:
    intents = {i.name for i in support.intents}
    unknown = sorted(dirt.intents() - intents)
    if unknown:
        raise ContentError(f"tuneline/demo/content/dirt.yaml names intents that do not exist: {unknown}")
    days = sorted(dirt.days - set(support.stream.days))
    if days:
        raise ContentError(f"tuneline/demo/content/dirt.yaml names days outside stream.days: {days}")
    tools = sorted({call.tool for call in dirt.tool_call_valid} - set(dirt.tools))
    if tools:
        raise ContentError(f"tuneline/demo/content/dirt.yaml calls tools it does not define: {tools}")
    categories = {i.category for i in support.intents}
    if set(dirt.vague_openers) != categories:
        raise ContentError(
            f"tuneline/demo/content/dirt.yaml: vague_openers must name each of {sorted(categories)}"
        )


SUPPORT: Support = _load(Support, "support.yaml")
GENERAL: General = _load(General, "general.yaml")
DIRT: Dirt = _load(Dirt, "dirt.yaml")
_check_references(SUPPORT, DIRT)

SYSTEM_PROMPT = SUPPORT.system_prompt
STREAM = SUPPORT.stream
INTENTS = SUPPORT.intents
INTENT_BY_NAME = {intent.name: intent for intent in INTENTS}
TRAIN_BOOK = SUPPORT.phrasebooks["train"]
EVAL_BOOK = SUPPORT.phrasebooks["eval"].model_copy(update={"held_out": True})
PARAPHRASE_BOOK = EVAL_BOOK.model_copy(update={"paraphrases": True})
TOOLS = {name: tool.as_tool(name) for name, tool in DIRT.tools.items()}
