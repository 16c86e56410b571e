"""The evaluate stage: eval-set loading, few-shot prompts, scoring, logging, and requests against a real
`tuneline serve` (the built-in model) through a provider from tuneline/provider.py."""

from __future__ import annotations

import gzip
import io
import json
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import mlflow
import pytest
from PIL import Image

from tuneline import tracking
from tuneline.answer_cache import AnswerCache, answer_key
from tuneline.config import Config, EvaluationConfig, load_config
from tuneline.provider import Provider, connect
from tuneline.server.launcher import ServerProcess, free_port, start_server
from tuneline.tasks.eval_review import (
    comparison_chart,
    intervals_table,
    label_table,
    log_result,
    report_document,
    review_rows,
)
from tuneline.tasks.evaluate import (
    ChatRequest,
    EvalItem,
    EvalSet,
    EvaluationError,
    FewShot,
    ask_all,
    evaluate,
    judge_request,
    load_eval_set,
    read_train_examples,
    run_judge,
    select_few_shot,
    with_few_shot,
)

SYSTEM = "You are the Acme support assistant."
BILLING = "Category: billing/double_charge\nReply: Sorry about the duplicate charge."
SHIPPING = "Category: shipping/late\nReply: Your parcel is on its way."


def chat(user: str, answer: str, system: bool = True) -> dict[str, Any]:
    messages = [{"role": "system", "content": SYSTEM}] if system else []
    return {
        "messages": [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    }


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


# -- eval sets and prompts (no server) ----------------------------------------------------------------


def test_eval_set_keeps_good_lines_and_names_every_bad_one(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "eval.jsonl",
        [
            chat("I was charged twice", BILLING),
            '{"messages": [',
            {"messages": [{"role": "user", "content": "hello"}]},
            {"prompt": "Where is my parcel?", "completion": SHIPPING},
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"},
                ]
            },
            "",
        ],
    )
    eval_set = load_eval_set("task", path, system_prompt=SYSTEM)
    assert [item.example_id for item in eval_set.items] == ["task:1", "task:4"]
    first, legacy = eval_set.items
    assert first.reference == BILLING and first.question == "I was charged twice"
    assert [m["role"] for m in first.messages] == ["system", "user"]
    # A legacy prompt/completion line gets the configured system prompt, as in training.
    assert legacy.messages[0] == {"role": "system", "content": SYSTEM} and legacy.reference == SHIPPING
    assert len(eval_set.problems) == 3
    assert eval_set.problems[0].startswith("line 2 of eval.jsonl: not valid JSON (invalid_json)")
    assert (
        "line 3 of eval.jsonl" in eval_set.problems[1]
        and "example_missing_assistant_message" in eval_set.problems[1]
    )
    assert "line 5 of eval.jsonl" in eval_set.problems[2] and "eval_missing_answer" in eval_set.problems[2]


def test_eval_set_errors_name_the_file_and_fix(tmp_path: Path) -> None:
    with pytest.raises(
        EvaluationError, match=r"canary eval set .*missing.jsonl not found \(set data.canary_set"
    ):
        load_eval_set("canary", tmp_path / "missing.jsonl")
    with pytest.raises(EvaluationError, match=r"no usable examples \(line 1 of bad.jsonl: not valid JSON"):
        load_eval_set("task", write_jsonl(tmp_path / "bad.jsonl", ["{"]))


def test_eval_sets_and_training_files_are_read_from_any_fsspec_url() -> None:
    """An s3:// eval set works in evaluation as in prepare's leakage check: both read through fsspec."""
    fs = fsspec.filesystem("memory")
    root = f"/eval-{uuid.uuid4().hex}"
    body = (json.dumps(chat("I was charged twice", BILLING)) + "\n").encode()
    fs.pipe(f"{root}/eval.jsonl.gz", gzip.compress(body))
    fs.pipe(f"{root}/train.jsonl", body * 2)
    try:
        eval_set = load_eval_set("task", f"memory://{root}/eval.jsonl.gz", SYSTEM)
        assert eval_set.path == f"memory://{root}/eval.jsonl.gz"
        assert [item.reference for item in eval_set.items] == [BILLING]
        assert (
            read_train_examples(f"memory://{root}/train.jsonl") == [chat("I was charged twice", BILLING)] * 2
        )
        with pytest.raises(
            EvaluationError, match=r"task eval set memory://.*/nope.jsonl not found \(set data.eval_set"
        ):
            load_eval_set("task", f"memory://{root}/nope.jsonl")
    finally:
        fs.rm(root, recursive=True)


def test_few_shot_covers_labels_in_turn_and_goes_after_the_system_prompt() -> None:
    train = [
        chat("charged twice", BILLING),
        chat("charged twice again", BILLING),
        chat("late parcel", SHIPPING),
        {
            "messages": [
                {"role": "user", "content": "multi"},
                {"role": "assistant", "content": "x"},
                {"role": "user", "content": "y"},
                {"role": "assistant", "content": "z"},
            ]
        },
        chat("hello there", "General kenobi", system=False),
    ]
    # One per label in turn, shortest first; the unlabelled general chat is not a task example.
    shots = select_few_shot(train, 3)
    assert [s.user for s in shots] == ["charged twice", "late parcel", "charged twice again"]
    assert len(select_few_shot(train, 8)) == 3
    assert select_few_shot(train, 0) == ()
    # Without labels, every single-turn example may be a shot.
    unlabelled = [chat("hello there, how are you", "Fine"), chat("hi", "Hello")]
    assert [s.user for s in select_few_shot(unlabelled, 2)] == ["hi", "hello there, how are you"]

    item = EvalItem(
        "task:1", ({"role": "system", "content": SYSTEM}, {"role": "user", "content": "Q"}), BILLING
    )
    prompt = with_few_shot(item, [FewShot("u1", "a1"), FewShot("u2", "a2")])
    assert [(m["role"], m["content"]) for m in prompt] == [
        ("system", SYSTEM),
        ("user", "u1"),
        ("assistant", "a1"),
        ("user", "u2"),
        ("assistant", "a2"),
        ("user", "Q"),
    ]


# -- against a real server ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, seeded_state: Callable[[Path], Path]
) -> Iterator[ServerProcess]:
    state = seeded_state(tmp_path_factory.mktemp("server"))
    with start_server(state, api_key=secrets.token_urlsafe(16)) as running:
        yield running


def config_for(base_url: str, tmp: Path, **evaluation: Any) -> Config:
    overrides: dict[str, Any] = {
        "provider.kind": "compatible",
        "provider.base_url": base_url,
        "evaluation.bootstrap_samples": 200,
        "evaluation.max_retries": 1,
        "tracking.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
        "tracking.artifact_location": str(tmp / "artifacts"),
    }
    overrides |= {f"evaluation.{k}": v for k, v in evaluation.items()}
    return load_config(None, overrides=overrides)


@pytest.fixture
def provider(server: ServerProcess, tmp_path: Path) -> Iterator[Provider]:
    with connect(config_for(server.base_url, tmp_path), api_key=server.api_key) as connected:
        yield connected


def chat_requests_logged(server: ServerProcess) -> int:
    return server.log_path.read_text(encoding="utf-8", errors="replace").count("POST /v1/chat/completions")


def small_sets(tmp_path: Path) -> list[EvalSet]:
    task = write_jsonl(
        tmp_path / "task.jsonl",
        [chat("I was charged twice for one order", BILLING), chat("My parcel is late", SHIPPING)],
    )
    canary = write_jsonl(
        tmp_path / "canary.jsonl", [chat("What is the capital of France?", "Paris", system=False)]
    )
    return [load_eval_set("task", task, SYSTEM), load_eval_set("canary", canary)]


def test_evaluate_asks_every_model_once_per_prompt_and_scores_it(
    server: ServerProcess, provider: Provider, tmp_path: Path
) -> None:
    settings = EvaluationConfig(bootstrap_samples=200, concurrency=4)
    before = chat_requests_logged(server)
    result = evaluate(
        provider,
        {"candidate": "tuneline-tiny", "base": "tuneline-tiny"},
        small_sets(tmp_path),
        [FewShot("My card was billed twice", BILLING)],
        settings,
    )
    # candidate and base are the same model: 2 task + 1 canary prompts once, plus 2 few-shot prompts.
    deadline = time.monotonic() + 10
    while chat_requests_logged(server) - before < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert chat_requests_logged(server) - before == 5
    assert result.roles("task") == ["candidate", "base", "few_shot"]
    assert result.roles("canary") == ["candidate", "base"]
    frame = result.answers
    assert len(frame) == 2 * 3 + 1 * 2
    assert frame["error"].isna().all()
    candidate = frame[frame["role"] == "candidate"].sort_values(["set", "position"])["answer"].tolist()
    base = frame[frame["role"] == "base"].sort_values(["set", "position"])["answer"].tolist()
    assert candidate == base  # temperature 0 + seed: one model, one answer

    figures = result.all_figures()
    for role in ("candidate", "base", "few_shot"):
        for metric in ("exact_match", "normalized_match", "token_f1"):
            key = f"eval/task/{role}/{metric}"
            assert figures[f"{key}_ci_low"] <= figures[key] <= figures[f"{key}_ci_high"]
    assert figures["eval/task/n_examples"] == 2 and figures["eval/canary/n_examples"] == 1
    assert "eval/task/candidate/label_accuracy/billing_double_charge" in figures
    assert not any("label_accuracy" in k for k in figures if k.startswith("eval/canary"))
    # The run's metrics are the headline figures only: exact match per set and model, and counts.
    assert sorted(result.metrics()) == [
        "eval/canary/base/exact_match",
        "eval/canary/candidate/exact_match",
        "eval/canary/n_examples",
        "eval/task/base/exact_match",
        "eval/task/candidate/exact_match",
        "eval/task/few_shot/exact_match",
        "eval/task/n_examples",
        "eval/unanswered",
    ]
    intervals = intervals_table(result)
    assert len(intervals) == (3 + 2) * 3 and (intervals["ci_low"] <= intervals["mean"]).all()
    assert set(label_table(result)["label"]) >= {"billing/double_charge"}
    table = result.side_by_side("task")
    assert list(table.columns[:3]) == ["example_id", "question", "reference"]
    assert {"candidate_answer", "base_answer", "few_shot_answer"} <= set(table.columns)


def test_the_answer_cache_asks_an_unchanged_model_nothing_twice(
    server: ServerProcess, provider: Provider, tmp_path: Path
) -> None:
    cache = AnswerCache(tmp_path / "answers.sqlite")
    models: dict[Any, str] = {"candidate": "tuneline-tiny", "base": "tuneline-tiny"}
    shots = [FewShot("My card was billed twice", BILLING)]
    settings = EvaluationConfig(bootstrap_samples=200, concurrency=4)
    before = chat_requests_logged(server)

    def requests_reach(n: int) -> None:
        deadline = time.monotonic() + 10
        while chat_requests_logged(server) - before < n and time.monotonic() < deadline:
            time.sleep(0.05)

    first = evaluate(provider, models, small_sets(tmp_path), shots, settings, cache=cache)
    requests_reach(5)
    assert len(cache) == 5  # 2 task + 1 canary + 2 few-shot prompts, each answered once

    # The same models (same id, same created time) and the same requests: nothing is sent.
    again = evaluate(provider, models, small_sets(tmp_path), shots, settings, cache=cache)
    assert again.answers["answer"].tolist() == first.answers["answer"].tolist()
    assert len(cache) == 5

    # Another seed is another request: all five are sent and kept. The server then counts exactly the
    # ten requests of the first and the last run, so the second sent none.
    reseeded = settings.model_copy(update={"seed": settings.seed + 1})
    evaluate(provider, models, small_sets(tmp_path), shots, reseeded, cache=cache)
    requests_reach(10)
    assert len(cache) == 10
    assert chat_requests_logged(server) - before == 10
    cache.close()


def test_an_answer_key_changes_with_everything_the_answer_depends_on() -> None:
    asked = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0.0, "seed": 1}
    key = answer_key("local", "tuneline-tiny", 1700000000, asked)
    assert key == answer_key("local", "tuneline-tiny", 1700000000, dict(reversed(asked.items())))
    assert key != answer_key("local", "tuneline-tiny", 1700000001, asked)  # rebuilt weights
    assert key != answer_key("openai-api.openai.com", "tuneline-tiny", 1700000000, asked)
    assert key != answer_key("local", "ft:tuneline-tiny:x", 1700000000, asked)
    assert key != answer_key("local", "tuneline-tiny", 1700000000, {**asked, "seed": 2})


def test_unknown_model_stops_the_evaluation_with_the_providers_answer(
    provider: Provider, tmp_path: Path
) -> None:
    with pytest.raises(EvaluationError, match=r"evaluating ft:tuneline-tiny:nobody:x:00000000: .*404"):
        evaluate(
            provider,
            {"candidate": "ft:tuneline-tiny:nobody:x:00000000", "base": "tuneline-tiny"},
            small_sets(tmp_path),
            [],
            EvaluationConfig(bootstrap_samples=200),
        )


def test_unreachable_provider_leaves_answers_unanswered_not_lost(tmp_path: Path) -> None:
    config = config_for(f"http://127.0.0.1:{free_port()}/v1", tmp_path, max_retries=1)
    with connect(config, api_key="sk-nothing-listens") as nowhere:
        answers = ask_all(
            nowhere, [ChatRequest("tuneline-tiny", ({"role": "user", "content": "hi"},))], config.evaluation
        )
    assert answers[0].text == ""
    assert answers[0].error is not None and "could not connect" in answers[0].error


def test_transient_faults_are_retried_until_answered(
    tmp_path: Path, seeded_state: Callable[[Path], Path]
) -> None:
    key = secrets.token_urlsafe(16)
    with start_server(seeded_state(tmp_path / "faulty"), api_key=key, fault_rate=0.3) as faulty:
        config = config_for(faulty.base_url, tmp_path, max_retries=10, concurrency=4)
        requests = [
            ChatRequest("tuneline-tiny", ({"role": "user", "content": f"question {i}"},)) for i in range(12)
        ]
        with connect(config, api_key=key) as provider:
            answers = ask_all(provider, requests, config.evaluation)
        log = faulty.log_tail(100_000)
    assert all(a.error is None for a in answers)
    assert any(f"POST /v1/chat/completions -> {status}" in log for status in (429, 500, 503))


def test_results_are_logged_for_a_reviewer(provider: Provider, tmp_path: Path) -> None:
    config = config_for(provider.base_url, tmp_path)
    result = evaluate(
        provider,
        {"candidate": "tuneline-tiny", "base": "tuneline-tiny"},
        small_sets(tmp_path),
        [],
        config.evaluation,
    )
    run_log = tracking.RunLog.start(config.tracking, flow="evaluate", name="eval")
    run_id = run_log.run_id
    log_result(run_log, result)
    run = tracking.read_run(config.tracking, run_id)
    assert (
        run.metrics["eval/task/candidate/exact_match"]
        == result.estimate("task", "candidate", "exact_match").mean
    )
    assert not any(k.endswith("_ci_high") for k in run.metrics)  # intervals are a table, not 60 charts
    artifacts = tracking.list_artifacts(config.tracking, run_id)
    assert {
        "eval/task_outputs.json",
        "eval/canary_outputs.json",
        "eval/intervals.json",
        "eval/label_accuracy.json",
        "eval/comparison.png",
        "eval/report.json",
    } <= set(artifacts)
    # MLflow's GenAI evaluation of the same answers: one trace per example, each model's answer in its
    # outputs and each model's verdict as an assessment.
    traces = mlflow.search_traces(
        locations=[tracking.configure(config.tracking)], run_id=run_id, return_type="list"
    )
    assert len(traces) == len(review_rows(result)) == 3
    by_example = {json.loads(t.data.request)["example_id"]: t for t in traces}
    task_trace = by_example["task:1"]
    assert (
        json.loads(task_trace.data.response)["candidate"]
        == result.side_by_side("task")["candidate_answer"][0]
    )
    verdicts = {a.name: a.value for a in task_trace.info.assessments if a.name.startswith("candidate/")}
    assert verdicts["candidate/exact_match"] == result.scores("task", "candidate", "exact_match")[0]
    assert {"candidate/normalized_match", "candidate/token_f1", "candidate/label_correct"} <= set(verdicts)
    assert tracking.read_run(config.tracking, run_id).status == "RUNNING"  # left open for the flow to close
    table = json.loads(
        (tracking.download_artifact(config.tracking, run_id, "eval/task_outputs.json", tmp_path)).read_text()
    )
    assert "candidate_answer" in table["columns"] and len(table["data"]) == 2
    png = io.BytesIO()
    comparison_chart(result).savefig(png, format="png")
    assert Image.open(io.BytesIO(png.getvalue())).size[0] > 500
    assert report_document(result)["models"] == {"candidate": "tuneline-tiny", "base": "tuneline-tiny"}


def test_the_judge_sees_each_pair_in_both_orders(
    server: ServerProcess, provider: Provider, tmp_path: Path
) -> None:
    settings = EvaluationConfig(bootstrap_samples=200, judge={"enabled": True, "model": "tuneline-tiny"})  # type: ignore[arg-type]
    items = small_sets(tmp_path)[0].items
    first = judge_request(settings.judge, items[0], "mine", "theirs").messages[1]["content"]
    swapped = judge_request(settings.judge, items[0], "theirs", "mine").messages[1]["content"]
    assert first.index("Answer A:\nmine") < first.index("Answer B:\ntheirs")
    assert swapped.index("Answer A:\ntheirs") < swapped.index("Answer B:\nmine")

    before = chat_requests_logged(server)
    scores = run_judge(
        provider, items, ["Category: billing", "no idea"], ["Paris", "Category: shipping"], settings
    )
    deadline = time.monotonic() + 10
    while chat_requests_logged(server) - before < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert chat_requests_logged(server) - before == 4  # two examples, each judged in both orders
    assert len(scores) == 2 and set(scores) <= {0.0, 0.25, 0.5, 0.75, 1.0}

    # Within an evaluation: identical answers score 0.5 whatever the judge's position preference.
    result = evaluate(
        provider, {"candidate": "tuneline-tiny", "base": "tuneline-tiny"}, small_sets(tmp_path), [], settings
    )
    assert list(result.judge_scores["candidate_vs_base"]) == [0.5, 0.5]
    assert result.metrics()["eval/task/judge/candidate_vs_base"] == 0.5
    assert [row["outputs"]["judge"] for row in review_rows(result) if row["inputs"]["set"] == "task"] == [
        {"candidate_vs_base": 0.5}
    ] * 2
    assert "judge_candidate_vs_base" in result.side_by_side("task").columns
    no_model = EvaluationConfig(judge={"enabled": True})  # type: ignore[arg-type]
    with pytest.raises(EvaluationError, match=r"needs evaluation\.judge\.model"):
        evaluate(
            provider,
            {"candidate": "tuneline-tiny", "base": "tuneline-tiny"},
            small_sets(tmp_path),
            [],
            no_model,
        )
