"""`text_similarity`: the rendered input scored against the rendered reference by a similarity metric,
0.0 to 1.0, with the well-kept library for each metric:

- `fuzzy_match`: rapidfuzz's `WRatio` (its general-purpose blend of edit-distance ratios) on both
  texts after `rapidfuzz.utils.default_process` (lowercase, non-alphanumerics to spaces, trimmed), / 100.
- `bleu`: NLTK's `sentence_bleu` (up to 4-grams, uniform weights, reweighted to the answer's length when
  it is shorter than 4 words) with Chen & Cherry's smoothing method 1, so a
  short answer missing a 4-gram scores low instead of exactly 0.
- `gleu`: NLTK's `sentence_gleu` (Google-BLEU, 1- to 4-grams).
- `rouge_1` .. `rouge_5`, `rouge_l`: the F-measure of Google's `rouge-score` (its tokenizer: lowercase
  ASCII letters and digits; no stemming).

BLEU and GLEU tokens are words and punctuation marks (`\\w+|[^\\w\\s]`, lowercased): NLTK's own word
tokenizer needs the `punkt` data, which is downloaded, and this server never downloads.

Refused when the grader is parsed, with a 400 naming why: `cosine` (it needs an embeddings model, which
this server does not serve) and `meteor` (NLTK's METEOR needs the WordNet corpus, a download).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from tuneline.server.graders import template
from tuneline.server.graders.base import Grade, GraderError, refuse_unknown, require_choice, require_string

METRICS = (
    "cosine",
    "fuzzy_match",
    "bleu",
    "gleu",
    "meteor",
    "rouge_1",
    "rouge_2",
    "rouge_3",
    "rouge_4",
    "rouge_5",
    "rouge_l",
)
UNSUPPORTED = {
    "cosine": "it needs an embeddings model, and this server serves none",
    "meteor": "NLTK's METEOR needs the WordNet corpus, which this server does not download",
}
WORDS = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return WORDS.findall(text.lower())


def fuzzy_match(text: str, reference: str) -> float:
    from rapidfuzz import fuzz, utils

    return float(fuzz.WRatio(text, reference, processor=utils.default_process)) / 100.0


def bleu(text: str, reference: str) -> float:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    hypothesis, expected = words(text), words(reference)
    if not hypothesis or not expected:
        return float(hypothesis == expected)
    smoothing = SmoothingFunction().method1
    return float(sentence_bleu([expected], hypothesis, smoothing_function=smoothing, auto_reweigh=True))


def gleu(text: str, reference: str) -> float:
    from nltk.translate.gleu_score import sentence_gleu

    hypothesis, expected = words(text), words(reference)
    if not hypothesis or not expected:
        return float(hypothesis == expected)
    return float(sentence_gleu([expected], hypothesis))


@cache
def rouge_scorer(kind: str) -> Any:
    from rouge_score import rouge_scorer as scorers

    return scorers.RougeScorer([kind], use_stemmer=False)


def rouge(kind: str) -> Callable[[str, str], float]:
    def score(text: str, reference: str) -> float:
        return float(rouge_scorer(kind).score(reference, text)[kind].fmeasure)

    return score


SCORERS: dict[str, Callable[[str, str], float]] = {
    "fuzzy_match": fuzzy_match,
    "bleu": bleu,
    "gleu": gleu,
    **{f"rouge_{n}": rouge(f"rouge{n}") for n in range(1, 6)},
    "rouge_l": rouge("rougeL"),
}


@dataclass
class TextSimilarityGrader:
    name: str
    input: str
    reference: str
    evaluation_metric: str
    param: str = "grader"
    type: str = "text_similarity"

    def grade(self, sample: Mapping[str, Any], item: Mapping[str, Any]) -> float:
        text = template.render(self.input, sample, item, f"{self.param}.input")
        reference = template.render(self.reference, sample, item, f"{self.param}.reference")
        return min(1.0, max(0.0, SCORERS[self.evaluation_metric](text, reference)))

    def evaluate(self, sample: Mapping[str, Any], item: Mapping[str, Any]) -> Grade:
        return Grade(self.grade(sample, item))

    def spec(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "name": self.name,
            "input": self.input,
            "reference": self.reference,
            "evaluation_metric": self.evaluation_metric,
        }


def parse(spec: Mapping[str, Any], param: str) -> TextSimilarityGrader:
    refuse_unknown(spec, param, ("type", "name", "input", "reference", "evaluation_metric"))
    name = require_string(spec, "name", param)
    text = require_string(spec, "input", param)
    reference = require_string(spec, "reference", param)
    metric = require_choice(spec, "evaluation_metric", param, METRICS)
    assert name is not None and text is not None and reference is not None
    if metric in UNSUPPORTED:
        raise GraderError(
            f"Invalid value for '{param}.evaluation_metric': {metric!r} is not supported on this server "
            f"({UNSUPPORTED[metric]}); use one of {', '.join(SCORERS)}.",
            f"{param}.evaluation_metric",
        )
    template.check(text, f"{param}.input")
    template.check(reference, f"{param}.reference")
    return TextSimilarityGrader(name, text, reference, metric, param)
