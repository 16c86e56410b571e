"""Preference accuracy: on held-out preference pairs, how often a model gives the preferred answer a
higher log-probability than the non-preferred one (DPO's "reward accuracy" on data it never trained
on), with a Wilson interval (tuneline/metrics.py).

Why the weights are scored here rather than asked over the API: a chat completion's `logprobs` are the
log-probabilities of the tokens the model *samples*, never of an answer the caller gives (chat
completions have no `echo`), so no hosted provider can score the two answers of a pair; and
`tuneline serve` refuses `logprobs` altogether. With `provider: local` the pipeline and the server
share the machine and the state directory, so the model's weights (a fine-tune or checkpoint the
server recorded, or a base model) are loaded read-only with the server's own code
(tuneline/server/modeling.py) and each answer is scored as the trainer encodes it
(`ChatFormat.encode_example`: the assistant tokens after the input, end-of-turn token included). On any
other provider the figure is not computed, and the evaluation says why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneline import formats, jsonl
from tuneline.config import Config
from tuneline.metrics import Estimate, wilson_interval
from tuneline.paths import resolve

# (preferred, non-preferred) log-probabilities of every pair, in order.
Scorer = Callable[[Sequence[Mapping[str, Any]]], list[tuple[float, float]]]


@dataclass(frozen=True)
class PreferenceAccuracy:
    """One model on the held-out pairs: the share preferred correctly (Wilson CI) and the mean margin
    log p(preferred) - log p(non-preferred), in nats. `reward_accuracy` (models other than the base):
    DPO's reward accuracy against the base model as reference, the share of pairs whose margin grew
    over the base model's (Wilson CI); unlike the plain accuracy it does not favour the shorter answer,
    whose summed log-probability is higher whatever its content."""

    model: str
    accuracy: Estimate
    correct: int
    mean_margin: float
    reward_accuracy: Estimate | None = None

    def __str__(self) -> str:
        reward = f", reward accuracy vs the base {self.reward_accuracy}" if self.reward_accuracy else ""
        return (
            f"{self.accuracy} ({self.correct}/{self.accuracy.n}, mean margin {self.mean_margin:+.3f} nats"
            f"{reward})"
        )


def read_pairs(path: str | Path) -> list[dict[str, Any]]:
    """The valid preference lines of a prepared file (validation.jsonl): the held-out pairs."""
    if not Path(path).is_file():
        return []
    return [
        example
        for example in jsonl.read_set(str(path)).values
        if isinstance(example, dict) and formats.check_for_method(example, "dpo") is None
    ]


def accuracy_of(
    model: str,
    scores: Sequence[tuple[float, float]],
    confidence: float,
    reference: Sequence[tuple[float, float]] | None = None,
) -> PreferenceAccuracy:
    """A tie is not a preference: only a strictly higher log-probability counts as correct.
    `reference`: the base model's scores of the same pairs, for the reward accuracy."""
    correct = sum(1 for good, bad in scores if good > bad)
    margins = [good - bad for good, bad in scores]
    reward = None
    if reference is not None:
        grew = sum(
            1
            for (good, bad), (ref_good, ref_bad) in zip(scores, reference, strict=True)
            if (good - ref_good) - (bad - ref_bad) > 0
        )
        reward = wilson_interval(grew, len(scores), confidence)
    return PreferenceAccuracy(
        model=model,
        accuracy=wilson_interval(correct, len(scores), confidence),
        correct=correct,
        mean_margin=sum(margins) / len(margins) if margins else float("nan"),
        reward_accuracy=reward,
    )


def local_model_path(config: Config, model_id: str) -> Path | None:
    """Where `tuneline serve` keeps a model's weights in config.server.state_dir (the embedded server's,
    or that of a `tuneline serve` started with the same config): a fine-tune or checkpoint it recorded,
    or a base model already there; None when it is not there (nothing is created or built)."""
    from tuneline.server.catalog import model_dir_of

    state_dir = resolve(config.server.state_dir)
    if not (state_dir / "tuneline.db").is_file():
        return None
    from tuneline.server.store import Store

    record = Store(state_dir).get_model(model_id)
    if record is not None:
        return Path(record.path) if Path(record.path).is_dir() else None
    built_in = state_dir / "models" / model_id
    if (built_in / "config.json").is_file():
        return built_in
    return model_dir_of(model_id, [resolve(d) for d in config.server.model_dirs])


def local_scorer(path: Path) -> Scorer:
    """Scores pairs with the model at `path` (full checkpoint or LoRA adapter), as the trainer encodes
    each answer: the sum of the log-probabilities of its trained tokens given the input."""
    import torch

    from tuneline.server.chat_template import IGNORE_INDEX
    from tuneline.server.modeling import ChatModel

    chat = ChatModel.load(path)

    def answer_logprob(messages: list[Mapping[str, Any]]) -> float:
        encoded = chat.format.encode_example({"messages": messages}, chat.context_length)
        ids = torch.tensor([encoded.input_ids], device=chat.device)
        labels = torch.tensor(encoded.labels[1:], device=chat.device)
        with torch.inference_mode():
            logits = chat.model(input_ids=ids).logits[0, :-1].float()
        picked = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        return float(picked[labels != IGNORE_INDEX].sum())

    def score(pairs: Sequence[Mapping[str, Any]]) -> list[tuple[float, float]]:
        scores = []
        for pair in pairs:
            asked = list(pair["input"]["messages"])
            scores.append(
                (
                    answer_logprob([*asked, *pair["preferred_output"]]),
                    answer_logprob([*asked, *pair["non_preferred_output"]]),
                )
            )
        return scores

    return score


def preference_accuracies(
    config: Config,
    models: Mapping[str, str],
    pairs_file: str | Path | None,
    log: logging.Logger | logging.LoggerAdapter,
    scorer_for: Callable[[str], Scorer] | None = None,
) -> tuple[dict[str, PreferenceAccuracy], str | None]:
    """Each role's preference accuracy on the pairs of `pairs_file`, and why none was computed (None
    when it was). `scorer_for(model_id)` scores with that model; default: the local server's weights."""
    if config.training.method != "dpo":
        return {}, None
    if config.provider.kind != "local" and scorer_for is None:
        return {}, (
            f"preference accuracy needs the model's weights, which provider {config.provider.kind} does not "
            "give (chat completion logprobs score sampled tokens, not a given answer)"
        )
    pairs = read_pairs(pairs_file) if pairs_file is not None else []
    if not pairs:
        return {}, "no held-out preference pairs (the prepared validation file is empty or missing)"
    if scorer_for is None:
        paths = {model_id: local_model_path(config, model_id) for model_id in set(models.values())}
        missing = sorted(model_id for model_id, path in paths.items() if path is None)
        if missing:
            return {}, (
                f"the weights of {', '.join(missing)} are not in server.state_dir "
                f"({config.server.state_dir}): point it at the state directory of the server that trained them"
            )

        def scorer_for(model_id: str) -> Scorer:
            path = paths[model_id]
            assert path is not None
            return local_scorer(path)

    results: dict[str, PreferenceAccuracy] = {}
    scored: dict[str, list[tuple[float, float]]] = {}
    for model_id in dict.fromkeys(models.values()):
        scored[model_id] = scorer_for(model_id)(pairs)
    base = config.model.base
    for role, model_id in models.items():
        reference = scored.get(base) if model_id != base else None
        results[role] = accuracy_of(model_id, scored[model_id], config.evaluation.confidence, reference)
        log.info(
            "preference accuracy of %s (%s) on %d held-out pairs: %s",
            role,
            model_id,
            len(pairs),
            results[role],
        )
    return results, None
