"""The committed demo data is exactly what the generator (tuneline/demo/) makes; its answer key covers
every kind of dirt; every planted record shows its defect when read back from the files; every record
the key does not quarantine is clean and distinct. The checks read the committed files and use their
own plain, exact normalisation and Jaccard (punctuation replaced by a space, where the generator
removes it), not the generator's or the dedupe stage's code. The generator's own guarantee checks
refuse data that breaks them (shown by breaking generated data on purpose)."""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tuneline import formats, tokens
from tuneline.config import load_config
from tuneline.demo import content, generator, guarantees, synthetic
from tuneline.demo.messages import chat_example

REPOSITORY = Path(__file__).resolve().parents[2]
DATA_DIR = REPOSITORY / "data"

# Every kind of dirt the task asks for, with the quarantine reason the precedence in data/README.md gives it
# (None: the record is kept).
KIND_REASONS: dict[str, str | None] = {
    "malformed_json": "invalid_json",
    "non_utf8": "invalid_encoding",
    "wrong_role": "unrecognized_role",
    "missing_assistant": "example_missing_assistant_message",
    "empty_content": "missing_content",
    "tool_call_valid": None,
    "tool_call_invalid": "invalid_tool_call",
    "weight_valid": None,
    "weight_invalid": "invalid_weight",
    "special_token": "forbidden_special_token",
    "over_long": "too_long",
    "exact_duplicate": "exact_duplicate",
    "normalized_duplicate": "exact_duplicate",
    "near_duplicate": "near_duplicate",
    "contradiction": "contradiction",
    "eval_leak": "eval_leakage",
    "secret": "secret_detected",
    "pii": None,
}
# The variants each kind must show, by words of its note.
KIND_VARIANTS = {
    "malformed_json": ("truncated", "trailing comma", "single quotes"),
    "wrong_role": ("'customer'", "'bot'"),
    "tool_call_invalid": ("arguments not JSON", "no function name", "tool reply without its call"),
    "weight_invalid": ("weight 2", 'weight "1"', "weight on a user message"),
    "special_token": ("<|endoftext|>", "<|im_start|>"),
    "secret": ("OpenAI API key", "AWS access key", "GitHub token", "private key"),
    "pii": ("email", "phone"),
    "eval_leak": ("exact copy", "appended"),
    "normalized_duplicate": ("lower case", "whitespace", "punctuation", "JSON"),
}
SECRET = re.compile(
    r"sk-proj-[A-Za-z0-9_-]{40}|AKIA[0-9A-Z]{16}|ghp_[A-Za-z0-9]{36}|-----BEGIN [A-Z ]*PRIVATE KEY-----"
)
EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")
PHONE = re.compile(r"\+?\(?\d{2,4}\)?[ .-]\d{3,4}[ .-]\d{4}")
LIMIT = guarantees.CONTEXT_LIMIT
DISTINCT_BELOW = 0.8
PLANTED_AT_LEAST = 0.9


def normalized(text: str) -> str:
    folded = unicodedata.normalize("NFKC", text).casefold()
    return " ".join("".join(" " if unicodedata.category(c).startswith("P") else c for c in folded).split())


def example_key(example: dict[str, Any]) -> str:
    parts = []
    for message in example["messages"]:
        parts += [message["role"], formats.message_text(message)]
        parts += [call["function"].get("arguments", "") for call in message.get("tool_calls") or ()]
    return normalized(" ".join(parts))


def prompt_and_answer(example: dict[str, Any]) -> tuple[str, str]:
    prompt, answer = formats.prompt_and_answer(example)
    return normalized(prompt), normalized(answer)


def shingle_set(text: str) -> frozenset[str]:
    words = text.split()
    return frozenset(" ".join(words[i : i + 3]) for i in range(max(1, len(words) - 2)))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    shared = len(a & b)
    return shared / (len(a) + len(b) - shared)


def order(source: str, line: int) -> tuple[str, str, int]:
    """The contract's record order: (partition, source, line)."""
    return re.search(r"dt=([\d-]+)", source).group(1), source, line  # type: ignore[union-attr]


def read_raw(data_dir: Path) -> dict[tuple[str, int], bytes | dict[str, str]]:
    """Every raw record by (source as in the answer key, line): JSONL lines as bytes, CSV rows as dicts."""
    records: dict[tuple[str, int], bytes | dict[str, str]] = {}
    for path in sorted((data_dir / "raw").rglob("*")):
        if not path.is_file():
            continue
        source = f"data/{path.relative_to(data_dir).as_posix()}"
        if path.suffix == ".csv":
            rows = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"), newline=""))
            records.update(((source, n), row) for n, row in enumerate(rows, start=1))
        else:
            lines = path.read_bytes().split(b"\n")
            assert lines[-1] == b"", f"{source} must end with a newline"
            records.update(((source, n), line) for n, line in enumerate(lines[:-1], start=1))
    return records


def as_line(raw: bytes | dict[str, str]) -> Any:
    """The record as the validate stage reads it (a JSON value), for records that are valid JSON."""
    if isinstance(raw, dict):
        return chat_example(raw["customer_message"], raw["agent_reply"])
    return json.loads(raw.decode("utf-8"))


def as_chat(line: dict[str, Any]) -> dict[str, Any]:
    if formats.detect_kind(line) == "completion":
        return formats.completion_to_chat(line, content.SYSTEM_PROMPT)
    return line


def read_jsonl(relative: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (DATA_DIR / relative).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def answer_key() -> list[dict[str, Any]]:
    return json.loads((DATA_DIR / "planted_defects.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def raw_records() -> dict[tuple[str, int], bytes | dict[str, str]]:
    return read_raw(DATA_DIR)


@pytest.fixture(scope="module")
def encoding() -> Any:
    return tokens.get_encoding(guarantees.ENCODING)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, generator.DemoData]:
    """The demo data generated once for the module: (the folder it was written to, what was written)."""
    out = tmp_path_factory.mktemp("generated")
    return out, generator.generate(out)


def test_regenerating_gives_the_committed_files_byte_for_byte(
    generated: tuple[Path, generator.DemoData],
) -> None:
    out, data = generated
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted(data.files)
    for relative in written:
        committed = DATA_DIR / relative
        assert committed.is_file(), f"data/{relative} is missing: run tuneline demo-data"
        assert committed.read_bytes() == (out / relative).read_bytes(), (
            f"data/{relative} differs from what the generator makes: run tuneline demo-data"
        )
    # No stray file in the raw partitions, where ingest would read it.
    committed_raw = sorted(
        p.relative_to(DATA_DIR).as_posix() for p in (DATA_DIR / "raw").rglob("*") if p.is_file()
    )
    assert committed_raw == [p for p in written if p.startswith("raw/")]


def test_another_seed_makes_other_data_that_keeps_every_guarantee(tmp_path: Path) -> None:
    # main() refuses to write data that breaks a guarantee, so this runs every check for seed 7 too.
    assert generator.main(["--seed", "7", "--out", str(tmp_path)]) == 0
    for relative in ("raw/support/dt=2026-11-16/part-0000.jsonl", "eval/support_eval.jsonl"):
        assert (tmp_path / relative).read_bytes() != (DATA_DIR / relative).read_bytes()
    key = json.loads((tmp_path / "planted_defects.json").read_text(encoding="utf-8"))
    counts = Counter(entry["kind"] for entry in key)
    assert all(counts[kind] >= 3 for kind in KIND_REASONS)


def test_the_data_matches_the_default_config() -> None:
    config = load_config()
    assert config.model.system_prompt == content.SYSTEM_PROMPT
    limit = tokens.context_limit(
        config.model.base, config.validation.context_limits, config.validation.default_context_limit
    )
    assert limit == guarantees.CONTEXT_LIMIT == 512
    assert config.data.eval_set == f"data/{generator.EVAL_PATH}"
    assert config.data.canary_set == f"data/{generator.CANARY_PATH}"
    assert config.data.general_corpus == f"data/{generator.GENERAL_PATH}"
    mappings = [s.csv_mapping for s in config.data.sources if s.csv_mapping is not None]
    assert [(m.user, m.assistant) for m in mappings] == [("customer_message", "agent_reply")]
    assert {"customer_message", "agent_reply"} <= set(content.STREAM.csv_columns)


def test_the_raw_partitions_hold_enough_records_of_every_format(
    raw_records: dict[tuple[str, int], Any],
) -> None:
    sources = Counter(source for source, _ in raw_records)
    assert len(raw_records) >= 700
    assert sorted({order(s, 0)[0] for s in sources}) == [f"2026-11-{d}" for d in range(16, 23)]
    assert sum(s.endswith("/legacy.jsonl") for s in sources) == 3
    assert [n for s, n in sources.items() if s.endswith(".csv")] == [pytest.approx(30, abs=3)]
    csv_text = next(
        (DATA_DIR / s.removeprefix("data/")).read_text(encoding="utf-8")
        for s in sources
        if s.endswith(".csv")
    )
    assert csv_text.startswith(",".join(content.STREAM.csv_columns) + "\n")
    assert '"Category: ' in csv_text  # answers hold a newline, so they are quoted


def test_the_answer_key_covers_every_kind_of_dirt_three_times(answer_key: list[dict[str, Any]]) -> None:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for entry in answer_key:
        assert set(entry) == {"source", "line", "kind", "reason", "duplicate_of", "eval_example", "note"}
        by_kind.setdefault(entry["kind"], []).append(entry)
    for kind, reason in KIND_REASONS.items():
        entries = by_kind.get(kind, [])
        assert len(entries) >= 3, f"only {len(entries)} records of {kind}"
        assert {e["reason"] for e in entries} == {reason}, kind
        assert len({order(e["source"], e["line"])[0] for e in entries}) >= 2, (
            f"{kind} is not spread over days"
        )
    for kind, variants in KIND_VARIANTS.items():
        notes = " | ".join(e["note"] for e in by_kind[kind])
        assert all(v in notes for v in variants), f"{kind}: {notes}"
    assert all(e["note"] == "pii redacted" or e["note"].startswith("pii redacted:") for e in by_kind["pii"])
    assert all(e["note"].startswith("valid") for e in by_kind["tool_call_valid"] + by_kind["weight_valid"])
    assert {e["reason"] for e in by_kind["csv_empty_reply"]} == {"missing_content"}
    assert {e["source"].rsplit("/", 1)[1] for e in answer_key} == {
        "part-0000.jsonl",
        "legacy.jsonl",
        "crm_export.csv",
    }


def test_each_planted_record_shows_its_defect(
    answer_key: list[dict[str, Any]], raw_records: dict[tuple[str, int], Any], encoding: Any
) -> None:
    evals = read_jsonl(generator.EVAL_PATH)
    for entry in answer_key:
        where = f"line {entry['line']} of {entry['source']} ({entry['kind']}: {entry['note']})"
        raw = raw_records[(entry["source"], entry["line"])]
        reason = entry["reason"]
        if reason == "invalid_encoding":
            with pytest.raises(UnicodeDecodeError):
                raw.decode("utf-8")
            continue
        if reason == "invalid_json":
            with pytest.raises(ValueError):
                json.loads(raw.decode("utf-8"))
            continue
        line = as_line(raw)
        issue = formats.check_example(line)
        if reason in formats.RULES:
            assert issue is not None and issue.key == reason, where
            continue
        assert issue is None, f"{where}: {issue}"
        example = as_chat(line)
        n_tokens = tokens.count_tokens([example], encoding)[0]
        assert (n_tokens > LIMIT) == (reason == "too_long"), f"{where}: {n_tokens} tokens"
        text = "\n".join(formats.example_texts(example))
        assert bool(SECRET.search(text)) == (reason == "secret_detected"), where
        if entry["kind"] == "pii":
            assert EMAIL.search(text) or PHONE.search(text), where
        if reason == "eval_leakage":
            leaked = evals[entry["eval_example"]["line"] - 1]
            similarity = jaccard(
                shingle_set(prompt_and_answer(example)[0]), shingle_set(prompt_and_answer(leaked)[0])
            )
            assert similarity >= PLANTED_AT_LEAST, f"{where}: {similarity:.3f}"
        if reason in ("exact_duplicate", "near_duplicate", "contradiction"):
            other_ref = entry["duplicate_of"]
            other = as_chat(as_line(raw_records[(other_ref["source"], other_ref["line"])]))
            mine_first = order(entry["source"], entry["line"]) < order(other_ref["source"], other_ref["line"])
            # Of two duplicates the later is quarantined; of contradicting answers the earlier ones.
            assert mine_first == (reason == "contradiction"), where
            if reason == "exact_duplicate":
                assert example_key(example) == example_key(other), where
            elif reason == "near_duplicate":
                similarity = jaccard(shingle_set(example_key(example)), shingle_set(example_key(other)))
                assert PLANTED_AT_LEAST <= similarity < 1.0, f"{where}: {similarity:.3f}"
            else:
                (my_prompt, my_answer), (prompt, answer) = (
                    prompt_and_answer(example),
                    prompt_and_answer(other),
                )
                assert my_prompt == prompt and my_answer != answer, where
                assert order(entry["source"], 0)[0] != order(other_ref["source"], 0)[0], (
                    f"{where}: same partition"
                )


def test_kept_records_are_clean_and_distinct(
    answer_key: list[dict[str, Any]], raw_records: dict[tuple[str, int], Any], encoding: Any
) -> None:
    quarantined = {(e["source"], e["line"]) for e in answer_key if e["reason"]}
    pii = {(e["source"], e["line"]) for e in answer_key if e["kind"] == "pii"}
    kept = {ref: as_chat(as_line(raw)) for ref, raw in raw_records.items() if ref not in quarantined}
    assert len(kept) == len(raw_records) - len(quarantined)
    for ref, example in kept.items():
        assert formats.check_example(example) is None, ref
        text = "\n".join(formats.example_texts(example))
        assert not SECRET.search(text), ref
        assert bool(EMAIL.search(text) or PHONE.search(text)) == (ref in pii), ref
    counts = tokens.count_tokens(list(kept.values()), encoding)
    assert max(counts) <= LIMIT

    keys = [example_key(e) for e in kept.values()]
    assert len(set(keys)) == len(keys), "two kept records are exact or normalised duplicates"
    prompts = [prompt_and_answer(e)[0] for e in kept.values()]
    assert len(set(prompts)) == len(prompts), (
        "two kept records ask the same question (duplicate or contradiction)"
    )

    # Exact Jaccard over every pair; a pair can only reach the bar when their sizes are close.
    refs = list(kept)
    sets = sorted(((shingle_set(k), ref) for k, ref in zip(keys, refs, strict=True)), key=lambda s: len(s[0]))
    for i, (a, ref_a) in enumerate(sets):
        for b, ref_b in sets[i + 1 :]:
            if len(a) < DISTINCT_BELOW * len(b):
                break
            assert jaccard(a, b) < DISTINCT_BELOW, f"{ref_a} and {ref_b} are near-duplicates"

    eval_prompts = [shingle_set(prompt_and_answer(e)[0]) for e in read_jsonl(generator.EVAL_PATH)]
    for ref, prompt in zip(refs, prompts, strict=True):
        mine = shingle_set(prompt)
        assert all(jaccard(mine, e) < DISTINCT_BELOW for e in eval_prompts), f"{ref} leaks an eval example"


def test_the_eval_set_covers_every_intent_in_the_house_style() -> None:
    evals = read_jsonl(generator.EVAL_PATH)
    answers = {intent.answer: intent.name for intent in content.INTENTS}
    assert 70 <= len(evals) <= 90
    covered: Counter[str] = Counter()
    for example in evals:
        assert formats.check_example(example) is None
        system, user, assistant = example["messages"]
        assert (system["role"], system["content"]) == ("system", content.SYSTEM_PROMPT)
        assert user["role"] == "user" and 10 <= len(user["content"].split()) <= 60
        assert assistant["role"] == "assistant" and assistant["content"] in answers
        assert re.fullmatch(r"Category: [a-z]+/[a-z_]+\nReply: [^\n]+", assistant["content"])
        covered[answers[assistant["content"]]] += 1
    assert set(covered) == {i.name for i in content.INTENTS} and min(covered.values()) >= 3
    assert len({normalized(e["messages"][1]["content"]) for e in evals}) == len(evals)
    for intent in content.INTENTS:
        assert 15 <= len(intent.reply.split()) <= 30, intent.name


def test_the_general_corpus_teaches_every_canary_fact() -> None:
    canary = read_jsonl(generator.CANARY_PATH)
    general = read_jsonl(generator.GENERAL_PATH)
    assert 30 <= len(canary) <= 50 and 400 <= len(general) <= 600
    for example in canary + general:
        assert formats.check_example(example) is None
        assert all(m["role"] != "system" for m in example["messages"])
    # A question always gets the same answer, so the tiny model can learn it.
    answers: dict[str, set[str]] = {}
    for example in general:
        messages = example["messages"]
        for question, answer in zip(messages[::2], messages[1::2], strict=True):
            answers.setdefault(question["content"], set()).add(answer["content"])
    assert all(len(a) == 1 for a in answers.values())
    by_answer = Counter(a for found in answers.values() for a in found)
    for example in canary:
        question, answer = (m["content"] for m in example["messages"])
        assert len(answer.split()) <= 3
        assert answers.get(question) == {answer}, question
        assert by_answer[answer] >= 5, f"{question} is not taught in several phrasings"
    assert len({json.dumps(e, sort_keys=True) for e in general}) == len(general)


def classify(lines: list[str]) -> Counter[str]:
    """Each synthetic line's kind, judged from the line alone and the lines before it."""
    kinds: Counter[str] = Counter()
    seen: set[str] = set()
    stems: dict[str, str] = {}
    house_answers = {intent.answer for intent in content.INTENTS}
    for line in lines:
        try:
            example = json.loads(line)
        except ValueError:
            kinds["invalid_json"] += 1
            continue
        if formats.check_example(example) is not None:
            kinds["format_error"] += 1
            continue
        assert example["messages"][-1]["content"] in house_answers
        stem = example["messages"][1]["content"].rsplit(" ", 1)[0]
        if line in seen:
            kinds["exact_duplicate"] += 1
        elif stem in stems:
            kinds["near_duplicate"] += 1
        else:
            kinds["clean"] += 1
        seen.add(line)
        stems[stem] = line
    return kinds


def test_synthetic_chat_lines_are_deterministic_with_about_five_percent_dirt() -> None:
    lines = list(synthetic.synthetic_chat_lines(20000, seed=5))
    assert len(lines) == 20000
    assert all(line.endswith("\n") and line.count("\n") == 1 for line in lines)
    assert lines == list(synthetic.synthetic_chat_lines(20000, seed=5))
    assert lines[:100] == list(synthetic.synthetic_chat_lines(100, seed=5))
    assert lines != list(synthetic.synthetic_chat_lines(20000, seed=6))
    assert list(synthetic.synthetic_chat_lines(0)) == []
    kinds = classify(lines)
    dirt = sum(n for kind, n in kinds.items() if kind != "clean") / len(lines)
    assert 0.04 <= dirt <= 0.06, kinds
    assert all(
        kinds[k] >= 0.005 * len(lines)
        for k in ("invalid_json", "format_error", "exact_duplicate", "near_duplicate")
    )
    assert classify(list(synthetic.synthetic_chat_lines(5000, seed=1, dirt_fraction=0.0))) == {"clean": 5000}


def test_no_credential_is_written_literally_in_the_source() -> None:
    # Credential-looking strings are made at run time: a hook greps diffs for them.
    package = REPOSITORY / "tuneline" / "demo"
    sources = [p for p in package.rglob("*") if p.is_file() and p.suffix in (".py", ".yaml", ".template")]
    assert len(sources) >= 10
    for source in sources:
        text = source.read_text(encoding="utf-8")
        assert not re.search(r"sk-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|ghp_[A-Za-z0-9]{36}", text), source


def test_the_content_lives_in_data_files_installed_with_the_package() -> None:
    pyproject = (REPOSITORY / "pyproject.toml").read_text(encoding="utf-8")
    assert '"tuneline.demo" = ["content/*"]' in pyproject
    files = {p.name for p in (REPOSITORY / "tuneline" / "demo" / "content").iterdir()}
    assert {"support.yaml", "general.yaml", "dirt.yaml", "README.md.template"} <= files
    # The code holds no sentence of the task: every house reply and core sentence comes from the YAML.
    code = "".join(p.read_text(encoding="utf-8") for p in (REPOSITORY / "tuneline" / "demo").glob("*.py"))
    for intent in content.INTENTS:
        assert intent.reply[:40] not in code and intent.train[0] not in code


@pytest.fixture(scope="module")
def built(generated: tuple[Path, generator.DemoData]) -> generator.DemoData:
    """generator.build()'s records and files (generate() is build() plus writing the files)."""
    return generated[1]


@pytest.fixture(scope="module")
def intact_evals(built: generator.DemoData) -> list[Any]:
    """The eval set as built, once the data as built is seen to keep every guarantee."""
    evals = [json.loads(line) for line in built.files[generator.EVAL_PATH].decode().splitlines()]
    guarantees.check(built.records, evals)  # the data as built keeps every guarantee
    return evals


def test_the_answer_key_is_what_was_planted(built: generator.DemoData) -> None:
    planted = [r for r in built.records if r.kind is not None]
    assert [(e["source"], e["line"], e["kind"], e["reason"]) for e in built.answer_key] == [
        (r.path, r.line, r.kind, r.reason) for r in planted
    ]
    for entry, record in zip(built.answer_key, planted, strict=True):
        target = record.duplicate_of
        assert entry["duplicate_of"] == (
            None if target is None else {"source": target.path, "line": target.line}
        )


def _broken(built: generator.DemoData, how: str) -> list[Any]:
    """The built records with one guarantee broken on purpose (copies: `built` stays as it is)."""
    import copy

    records = copy.deepcopy(built.records)
    kept = [r for r in records if r.kind is None and r.raw is not None]
    if how == "a secret in a kept record":
        example = json.loads(kept[0].raw)
        example["messages"][1]["content"] += " my key: " + "sk-" + "proj-" + "A1b2C3d4" * 5
        kept[0].raw = json.dumps(example).encode()
    elif how == "an unplanted duplicate":
        kept[1].raw = kept[0].raw
    elif how == "a leak marked as kept":
        next(r for r in records if r.kind == "eval_leak").reason = None
    elif how == "a near-duplicate marked as an exact one":
        next(r for r in records if r.kind == "near_duplicate").reason = "exact_duplicate"
    elif how == "a format error marked with another rule":
        next(r for r in records if r.kind == "wrong_role").reason = "missing_content"
    elif how == "a contradiction kept earlier than its rival":
        record = next(r for r in records if r.kind == "contradiction")
        record.partition = "2026-12-31"
    return records


@pytest.mark.parametrize(
    ("how", "found"),
    [
        ("a secret in a kept record", "secret:"),
        ("an unplanted duplicate", "equal when normalised"),
        ("a leak marked as kept", "like an eval prompt"),
        ("a near-duplicate marked as an exact one", "differs from its original"),
        ("a format error marked with another rule", "breaks format rule unrecognized_role"),
        ("a contradiction kept earlier than its rival", "shares its question with"),
    ],
)
def test_the_generator_refuses_data_that_breaks_a_guarantee(
    built: generator.DemoData, intact_evals: list[Any], how: str, found: str
) -> None:
    with pytest.raises(RuntimeError, match="breaks its own guarantees") as refused:
        guarantees.check(_broken(built, how), intact_evals)
    assert found in str(refused.value), str(refused.value)
