"""evaluate: the candidate against the base model (zero-shot and few-shot) and the current champion.

Asking the models is tasks/eval_requests.py; how the result is laid out in MLflow (the GenAI evaluation
view, tables, chart, report) is tasks/eval_review.py; this module builds the requests and scores them.

Guarantees:
- every model answers the same prompts through the provider's chat completions, at temperature 0 with a
  fixed seed by default, at most `evaluation.concurrency` requests in flight, each retried up to
  `evaluation.max_retries` times on transient failures (429, 5xx, timeouts, lost connections);
- two eval sets: the task set (does it do the job?) and the general canary set (did it forget?); the
  few-shot baseline (k training examples as prior turns) runs on the task set only;
- a request that still fails is never dropped: it stays in the outputs with its error, scores 0 and is
  counted as `unanswered` (the gate refuses to decide on gaps); an eval line that cannot be used is
  reported with its line number and rule, never silently skipped. A model the provider does not know,
  or a key it refuses, stops the evaluation with the provider's answer;
- identical requests (same model, same messages) are sent once, e.g. when the candidate is the champion;
  with `evaluation.answer_cache` set, a request some earlier run already had answered by the same model
  (same id and `created` time) is not sent again (tuneline/answer_cache.py): the base model, the few-shot
  baseline and the champion are asked once, not every night;
- every metric comes with a bootstrap confidence interval; labels (`Category: x`) get per-label accuracy;
- with training.method dpo, beside the task metrics: each model's preference accuracy on the held-out
  pairs (the prepared validation file): does it give the preferred answer the higher log-probability,
  with a Wilson interval (tasks/preference.py says how it is scored, and why only on provider local).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tuneline import jsonl, records, tracking
from tuneline.answer_cache import AnswerCache
from tuneline.config import Config, EvaluationConfig, JudgeConfig
from tuneline.formats import check_example, completion_to_chat, detect_kind, message_text
from tuneline.metrics import (
    METRICS,
    Estimate,
    LabelAccuracy,
    MetricName,
    answer_label,
    answers_are_labels,
    bootstrap_ci,
    pairwise_judge_score,
    parse_judge_verdict,
    per_label_accuracy,
    score_answers,
)
from tuneline.paths import resolve
from tuneline.provider import Provider
from tuneline.tasks.eval_requests import (
    CachedAnswers,
    ChatRequest,
    EvaluationError,
    ask_all,
    model_created,
)
from tuneline.tasks.eval_review import log_result
from tuneline.tasks.preference import PreferenceAccuracy, Scorer, preference_accuracies
from tuneline.tracking import RunLog

Role = Literal["candidate", "champion", "base", "few_shot"]
ROLES: tuple[Role, ...] = ("candidate", "champion", "base", "few_shot")
SetName = Literal["task", "canary"]
SETS: tuple[SetName, ...] = ("task", "canary")

DEFAULT_LOG = logging.getLogger("tuneline.evaluate")


@dataclass(frozen=True)
class EvalItem:
    """One eval example: the conversation up to the answer, and the reference answer."""

    example_id: str  # "<set>:<line>"
    messages: tuple[Mapping[str, Any], ...]
    reference: str

    @property
    def question(self) -> str:
        users = [message_text(dict(m)) for m in self.messages if m.get("role") == "user"]
        return users[-1] if users else ""


@dataclass(frozen=True)
class EvalSet:
    name: SetName
    path: str
    items: tuple[EvalItem, ...]
    problems: tuple[str, ...] = ()  # lines that could not be used, each naming line and rule


@dataclass(frozen=True)
class FewShot:
    """A solved example shown to the base model as a prior user/assistant exchange."""

    user: str
    assistant: str


def parse_eval_line(example: Any, system_prompt: str | None) -> tuple[tuple[dict[str, Any], ...], str]:
    """The prompt messages and the reference answer of a valid chat or prompt/completion line."""
    if detect_kind(example) == "completion":
        example = completion_to_chat(example, system_prompt)
    messages = example["messages"]
    last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
    return tuple(messages[:last]), message_text(messages[last])


def load_eval_set(name: SetName, path: str | Path, system_prompt: str | None = None) -> EvalSet:
    """Read an eval JSONL file (a path or any fsspec URL, as prepare's leakage check reads it); lines
    that are not valid examples with a final answer are reported."""
    uri = str(path)
    location = jsonl.location(uri)
    if not jsonl.exists(uri):
        key = "eval_set" if name == "task" else f"{name}_set"
        raise EvaluationError(f"{name} eval set {location} not found (set data.{key} in the config)")
    items: list[EvalItem] = []
    problems: list[str] = []
    for line in jsonl.read_lines(uri):
        where = f"line {line.number} of {jsonl.name_of(location)}"
        if line.reason == records.INVALID_ENCODING:
            problems.append(f"{where}: not valid UTF-8 ({line.reason}); re-save the file as UTF-8")
            continue
        if line.reason is not None:
            problems.append(f"{where}: not valid JSON ({line.reason}); fix the line")
            continue
        example = line.value
        issue = check_example(example, allowed=("chat", "completion"))
        if (
            issue is None
            and detect_kind(example) == "chat"
            and example["messages"][-1]["role"] != "assistant"
        ):
            problems.append(f"{where}: the last message must be the reference answer (eval_missing_answer)")
            continue
        if issue is not None:
            problems.append(f"{where}: {issue}; fix or remove the line")
            continue
        messages, reference = parse_eval_line(example, system_prompt)
        items.append(EvalItem(f"{name}:{line.number}", messages, reference))
    if not items:
        detail = f" ({problems[0]})" if problems else ""
        raise EvaluationError(f"{name} eval set {location} has no usable examples{detail}")
    return EvalSet(name, location, tuple(items), tuple(problems))


def select_few_shot(train_examples: Iterable[Mapping[str, Any]], k: int) -> tuple[FewShot, ...]:
    """k single-turn examples, one per label in turn (labels in order of first appearance, the shortest
    examples of each label first) so that the prompt shows as many categories as fit; when some examples
    are labelled, unlabelled ones (general data mixed into training) are not shots. Deterministic for a
    given training file."""
    by_label: dict[str | None, list[FewShot]] = {}
    for example in train_examples:
        if "input" in example:  # a preference line: its input and the preferred answer
            example = {"messages": [*example["input"]["messages"], *example["preferred_output"][:1]]}
        messages = [m for m in example.get("messages", ()) if m.get("role") != "system"]
        if len(messages) != 2 or [m.get("role") for m in messages] != ["user", "assistant"]:
            continue
        shot = FewShot(message_text(dict(messages[0])), message_text(dict(messages[1])))
        if shot.user and shot.assistant:
            by_label.setdefault(answer_label(shot.assistant), []).append(shot)
    if any(label is not None for label in by_label):
        by_label.pop(None, None)  # labelled task examples exist: general (unlabelled) ones are not the task
    for shots in by_label.values():
        shots.sort(key=lambda shot: len(shot.user) + len(shot.assistant))  # stable: ties keep file order
    chosen: list[FewShot] = []
    depth = 0
    while len(chosen) < k and any(depth < len(shots) for shots in by_label.values()):
        chosen.extend(shots[depth] for shots in by_label.values() if depth < len(shots))
        depth += 1
    return tuple(chosen[:k])


def read_train_examples(path: str | Path) -> list[dict[str, Any]]:
    """The chat examples of a prepared train.jsonl, a path or fsspec URL (lines that are not JSON
    objects are passed over: prepare only writes valid lines, and few-shot needs only a handful)."""
    return [e for e in jsonl.read_set(str(path)).values if isinstance(e, dict)]


def with_few_shot(item: EvalItem, shots: Sequence[FewShot]) -> tuple[Mapping[str, Any], ...]:
    """The item's conversation with the shots as prior turns, after its system prompt."""
    system = tuple(m for m in item.messages if m.get("role") in {"system", "developer"})
    rest = tuple(m for m in item.messages if m.get("role") not in {"system", "developer"})
    turns: list[Mapping[str, Any]] = []
    for shot in shots:
        turns += [{"role": "user", "content": shot.user}, {"role": "assistant", "content": shot.assistant}]
    return (*system, *turns, *rest)


@dataclass(frozen=True)
class EvaluationResult:
    """Every answer of every model (long form) and the figures computed from them."""

    models: Mapping[Role, str]
    answers: pd.DataFrame  # set, example_id, position, role, model, question, reference, answer, error, ...
    estimates: Mapping[tuple[SetName, Role, MetricName], Estimate]
    label_accuracy: Mapping[tuple[SetName, Role], Mapping[str, LabelAccuracy]]
    champion_version: str | None = None
    judge: Mapping[str, Estimate] = field(default_factory=dict)  # "candidate_vs_<role>" -> win rate
    judge_scores: Mapping[str, np.ndarray] = field(default_factory=dict)
    problems: tuple[str, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    # training.method dpo: each role's preference accuracy on held-out pairs, or why it is missing.
    preference: Mapping[str, PreferenceAccuracy] = field(default_factory=dict)
    preference_note: str | None = None

    def roles(self, set_name: SetName) -> list[Role]:
        present = set(self.answers.loc[self.answers["set"] == set_name, "role"])
        return [role for role in ROLES if role in present]

    def scores(self, set_name: SetName, role: Role, metric: MetricName) -> np.ndarray:
        """Per-example scores in eval-set order (aligned across roles for paired tests)."""
        rows = self.answers[(self.answers["set"] == set_name) & (self.answers["role"] == role)]
        if rows.empty:
            raise KeyError(f"no {role} answers on the {set_name} set")
        return rows.sort_values("position")[metric].to_numpy(dtype=float)

    def estimate(self, set_name: SetName, role: Role, metric: MetricName) -> Estimate:
        return self.estimates[(set_name, role, metric)]

    def unanswered(self, set_name: SetName, role: Role) -> int:
        rows = self.answers[(self.answers["set"] == set_name) & (self.answers["role"] == role)]
        return int(rows["error"].notna().sum())

    def metrics(self) -> dict[str, float]:
        """The run's headline metrics, few and readable: exact match per set and model, the examples
        per set, the unanswered requests, the judge's win rate and (dpo) the preference figures. The other metrics, intervals and
        per-label figures are tables (tasks/eval_review.py); every figure is in all_figures
        and eval/report.json."""
        flat = {
            f"eval/{set_name}/{role}/{metric}": estimate.mean
            for (set_name, role, metric), estimate in self.estimates.items()
            if metric == "exact_match"
        }
        for set_name in SETS:
            n = int(((self.answers["set"] == set_name) & (self.answers["role"] == "candidate")).sum())
            if n:
                flat[f"eval/{set_name}/n_examples"] = float(n)
        flat["eval/unanswered"] = float(self.answers["error"].notna().sum())
        for name, estimate in self.judge.items():
            flat[f"eval/task/judge/{name}"] = estimate.mean
        # A dpo run's own headline: each model's preference accuracy (with its interval) and margin.
        flat.update({k: v for k, v in self.all_figures().items() if k.startswith("eval/preference/")})
        return flat

    def all_figures(self) -> dict[str, float]:
        """Every figure, flat: eval/<set>/<role>/<metric> (+ _ci_low, _ci_high), unanswered, labels."""
        flat: dict[str, float] = {}
        for (set_name, role, metric), estimate in self.estimates.items():
            prefix = f"eval/{set_name}/{role}/{metric}"
            flat[prefix] = estimate.mean
            flat[f"{prefix}_ci_low"] = estimate.low
            flat[f"{prefix}_ci_high"] = estimate.high
        for set_name in SETS:
            for role in self.roles(set_name):
                flat[f"eval/{set_name}/{role}/unanswered"] = float(self.unanswered(set_name, role))
            n = int(((self.answers["set"] == set_name) & (self.answers["role"] == "candidate")).sum())
            if n:
                flat[f"eval/{set_name}/n_examples"] = float(n)
        for (set_name, role), labels in self.label_accuracy.items():
            for label, accuracy in labels.items():
                flat[f"eval/{set_name}/{role}/label_accuracy/{metric_safe(label)}"] = accuracy.accuracy
        for name, found in self.preference.items():
            prefix = f"eval/preference/{name}"
            flat[f"{prefix}/accuracy"] = found.accuracy.mean
            flat[f"{prefix}/accuracy_ci_low"] = found.accuracy.low
            flat[f"{prefix}/accuracy_ci_high"] = found.accuracy.high
            flat[f"{prefix}/mean_margin"] = found.mean_margin
            if found.reward_accuracy is not None:
                flat[f"{prefix}/reward_accuracy"] = found.reward_accuracy.mean
                flat[f"{prefix}/reward_accuracy_ci_low"] = found.reward_accuracy.low
                flat[f"{prefix}/reward_accuracy_ci_high"] = found.reward_accuracy.high
            flat["eval/preference/n_pairs"] = float(found.accuracy.n)
        for name, estimate in self.judge.items():
            flat[f"eval/task/judge/{name}"] = estimate.mean
            flat[f"eval/task/judge/{name}_ci_low"] = estimate.low
            flat[f"eval/task/judge/{name}_ci_high"] = estimate.high
        return flat

    def side_by_side(self, set_name: SetName) -> pd.DataFrame:
        """One row per example: question, reference and every model's answer and exact match."""
        rows = self.answers[self.answers["set"] == set_name]
        table = (
            rows[rows["role"] == rows["role"].iloc[0]]
            .sort_values("position")[["example_id", "question", "reference"]]
            .reset_index(drop=True)
        )
        for role in self.roles(set_name):
            mine = rows[rows["role"] == role].sort_values("position").reset_index(drop=True)
            table[f"{role}_answer"] = mine["answer"]
            table[f"{role}_exact_match"] = mine["exact_match"]
            if role == "few_shot":
                table["few_shot_shots"] = mine["shots"]  # fewer than k where the prompt had to shrink
            if mine["error"].notna().any():
                table[f"{role}_error"] = mine["error"]
        if set_name == "task":
            for name, scores in self.judge_scores.items():
                table[f"judge_{name}"] = scores
        return table

    def summary_table(self) -> pd.DataFrame:
        """One row per set and model: every metric with its interval, and the unanswered count."""
        records = []
        for set_name in SETS:
            for role in self.roles(set_name):
                record: dict[str, Any] = {"set": set_name, "role": role, "model": self.models[role]}
                for metric in METRICS:
                    record[metric] = str(self.estimate(set_name, role, metric))
                record["unanswered"] = self.unanswered(set_name, role)
                records.append(record)
        return pd.DataFrame.from_records(records)


def metric_safe(name: str) -> str:
    """A label as an MLflow metric-name segment (letters, digits, _ - . and spaces only)."""
    return re.sub(r"[^\w\-. ]", "_", name).strip() or "_"


def score_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The answers frame with one column per metric (unanswered requests score 0 on every metric)."""
    scores = score_answers(frame["answer"].tolist(), frame["reference"].tolist())
    scored = frame.copy()
    failed = scored["error"].notna().to_numpy()
    for metric, values in scores.items():
        scored[metric] = np.where(failed, 0.0, values)
    return scored


def summarize(
    frame: pd.DataFrame, settings: EvaluationConfig
) -> tuple[
    dict[tuple[SetName, Role, MetricName], Estimate], dict[tuple[SetName, Role], dict[str, LabelAccuracy]]
]:
    """Bootstrap estimates for every (set, role, metric) and per-label accuracy where answers are labels."""
    estimates: dict[tuple[SetName, Role, MetricName], Estimate] = {}
    labels: dict[tuple[SetName, Role], dict[str, LabelAccuracy]] = {}
    for (set_name, role), rows in frame.groupby(["set", "role"], sort=False):
        rows = rows.sort_values("position")
        for metric in METRICS:
            estimates[(set_name, role, metric)] = bootstrap_ci(
                rows[metric].to_numpy(dtype=float),
                samples=settings.bootstrap_samples,
                confidence=settings.confidence,
                seed=settings.seed,
            )
        references = rows["reference"].tolist()
        if answers_are_labels(references):
            labels[(set_name, role)] = per_label_accuracy(rows["answer"].tolist(), references)
    return estimates, labels


JUDGE_INSTRUCTIONS = (
    "You compare two answers to the same request. {rubric}\n"
    "Reply with exactly one word: A if answer A is better, B if answer B is better, TIE if neither is."
)


def judge_request(judge: JudgeConfig, item: EvalItem, first: str, second: str) -> ChatRequest:
    """The judge's prompt for one ordering of two answers (the reference answer is shown as a guide)."""
    content = (
        f"Request:\n{item.question}\n\nReference answer:\n{item.reference}\n\n"
        f"Answer A:\n{first}\n\nAnswer B:\n{second}"
    )
    return ChatRequest(
        judge.model or "",
        (
            {"role": "system", "content": JUDGE_INSTRUCTIONS.format(rubric=judge.rubric)},
            {"role": "user", "content": content},
        ),
    )


def run_judge(
    provider: Provider,
    items: Sequence[EvalItem],
    candidate_answers: Sequence[str],
    reference_answers: Sequence[str],
    settings: EvaluationConfig,
) -> np.ndarray:
    """Pairwise judge scores for the candidate (1 win, 0.5 tie, 0 loss), each example judged twice with
    the order swapped; a judge request that fails counts as a tie in that order."""
    requests = []
    for item, mine, theirs in zip(items, candidate_answers, reference_answers, strict=True):
        requests.append(judge_request(settings.judge, item, mine, theirs))
        requests.append(judge_request(settings.judge, item, theirs, mine))
    verdicts = [
        parse_judge_verdict(a.text) if a.error is None else "tie"
        for a in ask_all(provider, requests, settings)
    ]
    return np.array([pairwise_judge_score(verdicts[2 * i], verdicts[2 * i + 1]) for i in range(len(items))])


def evaluate(
    provider: Provider,
    models: Mapping[Role, str],
    eval_sets: Sequence[EvalSet],
    shots: Sequence[FewShot],
    settings: EvaluationConfig,
    champion_version: str | None = None,
    log: logging.Logger | logging.LoggerAdapter = DEFAULT_LOG,
    cache: AnswerCache | None = None,
) -> EvaluationResult:
    """Ask every model every eval question and score the answers (see the module docstring).

    `models` maps roles to model ids: `candidate` and `base` are required; `champion` is optional; the
    `few_shot` role is the base model with `shots` and is added when shots are given."""
    if "candidate" not in models or "base" not in models:
        raise EvaluationError("evaluation needs a candidate and a base model")
    roles: dict[Role, str] = {role: models[role] for role in ROLES if role in models and role != "few_shot"}
    if shots:
        roles["few_shot"] = models["base"]
    records: list[dict[str, Any]] = []
    requests: list[ChatRequest] = []
    for eval_set in eval_sets:
        for role, model in roles.items():
            if role == "few_shot" and eval_set.name != "task":
                continue  # the shots are task examples: on the canary set they would only mislead
            for position, item in enumerate(eval_set.items):
                if role == "few_shot":
                    # Fewer shots when the prompt exceeds the model's context (down to one shot).
                    shorter = tuple(with_few_shot(item, shots[:k]) for k in range(len(shots) - 1, 0, -1))
                    requests.append(ChatRequest(model, with_few_shot(item, shots), shorter))
                else:
                    requests.append(ChatRequest(model, item.messages))
                records.append(
                    {
                        "set": eval_set.name,
                        "example_id": item.example_id,
                        "position": position,
                        "role": role,
                        "model": model,
                        "question": item.question,
                        "reference": item.reference,
                    }
                )
    progress_step = max(1, len({r.key() for r in requests}) // 10)

    def on_answer(done: int, total: int) -> None:
        if done % progress_step == 0 or done == total:
            log.info("evaluation: %d/%d distinct requests answered", done, total)

    started = time.perf_counter()
    cached = None
    if cache is not None:
        cached = CachedAnswers(
            cache, {model: model_created(provider, model) for model in set(roles.values())}
        )
    answers = ask_all(provider, requests, settings, on_answer, cached)
    log.info(
        "evaluation: %d requests in %.1fs (%d distinct answers from the answer cache)",
        len(requests),
        time.perf_counter() - started,
        len({r.key() for r, a in zip(requests, answers, strict=True) if a.cached}),
    )
    frame = pd.DataFrame.from_records(records)
    frame["answer"] = [a.text for a in answers]
    frame["error"] = pd.Series([a.error for a in answers], dtype=object)
    frame["latency_s"] = [a.latency_s for a in answers]
    frame["shots"] = [
        len(shots) - a.fallback if role == "few_shot" else 0
        for a, role in zip(answers, frame["role"], strict=True)
    ]
    frame = score_frame(frame)
    estimates, labels = summarize(frame, settings)

    judge: dict[str, Estimate] = {}
    judge_scores: dict[str, np.ndarray] = {}
    task_set = next((s for s in eval_sets if s.name == "task"), None)
    if settings.judge.enabled and task_set is not None:
        if not settings.judge.model:
            raise EvaluationError(
                "evaluation.judge.enabled needs evaluation.judge.model (the judge's model id)"
            )
        opponent: Role = "champion" if "champion" in roles else "base"
        task_rows = frame[frame["set"] == "task"]

        def answers_of(role: Role) -> list[str]:
            return task_rows[task_rows["role"] == role].sort_values("position")["answer"].tolist()

        scores = run_judge(provider, task_set.items, answers_of("candidate"), answers_of(opponent), settings)
        name = f"candidate_vs_{opponent}"
        judge_scores[name] = scores
        judge[name] = bootstrap_ci(scores, settings.bootstrap_samples, settings.confidence, settings.seed)

    problems = tuple(p for s in eval_sets for p in s.problems)
    for problem in problems:
        log.warning("eval set line not used: %s", problem)
    return EvaluationResult(
        models=dict(roles),
        answers=frame,
        estimates=estimates,
        label_accuracy=labels,
        champion_version=champion_version,
        judge=judge,
        judge_scores=judge_scores,
        problems=problems,
        settings={
            **settings.model_dump(mode="json"),
            "few_shot_examples": len(shots),
            "eval_sets": {s.name: s.path for s in eval_sets},
        },
    )


def load_inputs(config: Config, train_file: str | Path | None) -> tuple[list[EvalSet], tuple[FewShot, ...]]:
    """The two eval sets from the config and the few-shot examples from a prepared train.jsonl."""
    system_prompt = config.model.system_prompt
    eval_sets = [
        load_eval_set("task", config.data.eval_set, system_prompt),
        load_eval_set("canary", config.data.canary_set, None),
    ]
    shots: tuple[FewShot, ...] = ()
    if train_file is not None and config.evaluation.few_shot_k > 0:
        shots = select_few_shot(read_train_examples(train_file), config.evaluation.few_shot_k)
    return eval_sets, shots


def run_evaluation(
    config: Config,
    provider: Provider,
    candidate_model: str,
    run: RunLog | None,
    train_file: str | Path | None,
    log: logging.Logger | logging.LoggerAdapter = DEFAULT_LOG,
    pairs_file: str | Path | None = None,
    scorer_for: Callable[[str], Scorer] | None = None,
) -> EvaluationResult:
    """Evaluate `candidate_model` against the base model, the few-shot baseline and the registry's
    champion (when there is one), and log it all to `run` when given. With training.method dpo, also
    each model's preference accuracy on `pairs_file` (default: the validation.jsonl beside
    `train_file`)."""
    eval_sets, shots = load_inputs(config, train_file)
    champion = tracking.alias_version(config.tracking, tracking.CHAMPION)
    models: dict[Role, str] = {"candidate": candidate_model, "base": config.model.base}
    if champion is not None:
        if not champion.model_id:
            raise EvaluationError(
                f"champion version {champion.version} of {champion.name!r} has no {tracking.MODEL_ID_TAG} tag: "
                f"move the alias with `tuneline rollback --to VERSION`"
            )
        models["champion"] = champion.model_id
    if train_file is None and config.evaluation.few_shot_k > 0:
        log.warning("no training file given: the few-shot baseline is skipped")
    cache_path = config.evaluation.answer_cache
    cache = AnswerCache(resolve(cache_path)) if cache_path else None
    try:
        result = evaluate(
            provider,
            models,
            eval_sets,
            shots,
            config.evaluation,
            champion_version=champion.version if champion else None,
            log=log,
            cache=cache,
        )
    finally:
        if cache is not None:
            cache.close()
    if config.training.method == "dpo":
        if pairs_file is None and train_file is not None and "://" not in str(train_file):
            pairs_file = Path(train_file).with_name("validation.jsonl")
        roles = {str(role): model for role, model in result.models.items() if role != "few_shot"}
        preference, note = preference_accuracies(config, roles, pairs_file, log, scorer_for)
        if note:
            log.warning("preference accuracy not computed: %s", note)
        result = dataclasses.replace(result, preference=preference, preference_note=note)
    if run is not None:
        log_result(run, result)
    return result


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(
    config: Config, provider: Provider, candidate_model: str, run: RunLog, train_file: str | None
) -> EvaluationResult:
    log = get_run_logger()
    result = run_evaluation(config, provider, candidate_model, run, train_file, log=log)
    log.info("evaluation of %s:\n%s", candidate_model, result.summary_table().to_string(index=False))
    return result
