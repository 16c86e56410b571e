"""tasks/preference.py on tuneline-tiny's real weights: the score of an answer is its log-probability as
the trainer encodes it (checked against the model's own cross-entropy loss), and the accuracy on pairs
whose preferred answer the model learnt (the canary set) against scrambled ones is high, with a Wilson CI."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tuneline.config import parse_config
from tuneline.tasks.preference import local_model_path, local_scorer, preference_accuracies

CANARY = Path(__file__).resolve().parents[2] / "data" / "general" / "canary.jsonl"


def canary_pairs(n: int) -> list[dict[str, Any]]:
    pairs = []
    for line in CANARY.read_text().splitlines()[:n]:
        user, assistant = json.loads(line)["messages"]
        scrambled = "".join(reversed(assistant["content"])).lower()
        pairs.append(
            {
                "input": {"messages": [user]},
                "preferred_output": [assistant],
                "non_preferred_output": [{"role": "assistant", "content": scrambled}],
            }
        )
    return pairs


def test_an_answer_scores_its_log_probability_as_trained(builtin_model: Path) -> None:
    from tuneline.server.chat_template import IGNORE_INDEX
    from tuneline.server.modeling import ChatModel

    pair = canary_pairs(1)[0]
    ((good, bad),) = local_scorer(builtin_model)([pair])
    chat = ChatModel.load(builtin_model)
    encoded = chat.format.encode_example(
        {"messages": [*pair["input"]["messages"], *pair["preferred_output"]]}, chat.context_length
    )
    trained = sum(1 for label in encoded.labels if label != IGNORE_INDEX)
    with torch.inference_mode():
        loss = chat.model(
            input_ids=torch.tensor([encoded.input_ids]), labels=torch.tensor([encoded.labels])
        ).loss
    assert good == pytest.approx(-float(loss) * trained, rel=1e-4)
    assert good < 0 and bad < 0


def test_preference_accuracy_with_a_wilson_interval(builtin_model: Path, tmp_path: Path) -> None:
    from tuneline.server.store import Store

    state = tmp_path / "state"
    shutil.copytree(builtin_model, state / "models" / "tuneline-tiny")
    Store(state)  # the server's records, as after a first start
    pairs_file = tmp_path / "validation.jsonl"
    pairs_file.write_text("".join(json.dumps(p) + "\n" for p in canary_pairs(12)))
    raw = {"data": {"sources": [{"name": "x", "uri": "x"}]}, "training": {"method": "dpo"}}
    config = parse_config({**raw, "server": {"state_dir": str(state)}})
    assert local_model_path(config, "tuneline-tiny") == state / "models" / "tuneline-tiny"
    found, note = preference_accuracies(
        config, {"base": "tuneline-tiny"}, pairs_file, logging.getLogger("test")
    )
    assert note is None
    base = found["base"]
    assert base.accuracy.n == 12 and base.correct >= 10 and base.mean_margin > 0
    assert 0 < base.accuracy.low < base.accuracy.mean <= base.accuracy.high <= 1
    # A model the server never recorded: said, not crashed, and nothing is built.
    found, note = preference_accuracies(
        config, {"candidate": "ft:nowhere"}, pairs_file, logging.getLogger("t")
    )
    assert found == {} and note is not None and "ft:nowhere" in note
    elsewhere = parse_config({**raw, "server": {"state_dir": str(tmp_path / "none")}})
    assert (
        preference_accuracies(elsewhere, {"base": "tuneline-tiny"}, pairs_file, logging.getLogger("t"))[0]
        == {}
    )
    assert not (tmp_path / "none").exists()
    openai = parse_config({**raw, "provider": {"kind": "openai"}})
    found, note = preference_accuracies(openai, {"base": "gpt-4.1-mini"}, pairs_file, logging.getLogger("t"))
    assert found == {} and note is not None and "logprobs" in note
