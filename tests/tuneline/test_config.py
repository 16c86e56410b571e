from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

import pytest
import yaml

from tuneline.config import DEFAULT_CONFIG, Config, ConfigError, load_config, parse_config

MINIMAL: dict[str, Any] = {"data": {"sources": [{"name": "chat", "uri": "data/raw/*.jsonl"}]}}


def with_(section: str, values: dict[str, Any]) -> dict[str, Any]:
    return {**MINIMAL, section: values}


def message(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    return str(caught.value)


def test_the_default_config_loads() -> None:
    config = load_config()
    assert isinstance(config, Config)
    assert config.model.base == "tuneline-tiny"
    assert [s.name for s in config.data.sources] == ["support-chat", "support-csv"]
    csv = config.data.sources[1].csv_mapping
    assert csv is not None and (csv.user, csv.assistant) == ("customer_message", "agent_reply")


def test_config_hash_ignores_layout_and_sees_values(tmp_path: Path) -> None:
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    reordered = tmp_path / "reordered.yaml"
    reordered.write_text(yaml.safe_dump(dict(reversed(list(raw.items()))), sort_keys=False))
    assert load_config(reordered).config_hash() == load_config().config_hash()
    changed = load_config(overrides={"dedupe.near_duplicate_threshold": 0.9})
    assert changed.config_hash() != load_config().config_hash()
    assert len(changed.config_hash()) == 64


def test_overrides_are_dotted_keys() -> None:
    config = load_config(overrides={"data.as_of": "2025-03-04", "validation.too_long": "truncate"})
    assert config.data.as_of == date(2025, 3, 4)
    assert config.validation.too_long == "truncate"
    with pytest.raises(ConfigError, match=r"data\.as_of"):
        load_config(overrides={"data.as_of": "yesterday"})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (with_("dedupe", {"near_duplicate_treshold": 0.9}), "dedupe.near_duplicate_treshold: unknown key"),
        ({**MINIMAL, "extra_section": {}}, "extra_section: unknown key"),
        ({}, "data: required key is missing"),
        (
            with_("dedupe", {"contradictions": "keep-first"}),
            "dedupe.contradictions: should be 'keep-latest', 'keep-majority' or 'quarantine-all' (got 'keep-first')",
        ),
        (
            with_("dedupe", {"near_duplicate_threshold": 2}),
            "dedupe.near_duplicate_threshold: should be less than or equal to 1 (got 2)",
        ),
        (
            with_("validation", {"too_long": "drop"}),
            "validation.too_long: should be 'quarantine' or 'truncate'",
        ),
        (with_("export", {"validation_fraction": 1.0}), "export.validation_fraction: should be less than 1"),
        (
            with_("training", {"hyperparameters": {"n_epochs": 0}}),
            "training.hyperparameters.n_epochs: should be 'auto' or should be greater than or equal to 1",
        ),
        ({"data": {"sources": []}}, "data.sources:"),
        (
            {"data": {"sources": [{"name": "a", "uri": "b", "csv_mapping": {"user": "u"}}]}},
            "data.sources.0.csv_mapping: Value error, map either prompt+completion or user+assistant",
        ),
        ({"data": {"sources": [{"name": "a", "uri": "b", "format": "xml"}]}}, "data.sources.0.format:"),
        (
            with_("execution", {"object_store_memory": 2**20}),
            "execution.object_store_memory: should be greater than or equal to 78643200",  # Ray's least
        ),
    ],
)
def test_errors_name_the_key_path_and_what_is_allowed(raw: dict[str, Any], expected: str) -> None:
    got = message(raw)
    assert got.startswith("config: ") and expected in got
    assert "\n" not in got


def test_more_errors_are_counted_not_listed() -> None:
    got = message({"data": {"sources": [{"nmae": "a", "uri": "b"}]}, "dedupe": {"num_perm": 1}})
    assert got.endswith("more keys to fix)") or got.endswith("more key to fix)")


def test_csv_mapping_takes_one_shape() -> None:
    both = {"prompt": "p", "completion": "c", "user": "u", "assistant": "a"}
    assert "csv_mapping" in message({"data": {"sources": [{"name": "a", "uri": "b", "csv_mapping": both}]}})
    ok = parse_config(
        {"data": {"sources": [{"name": "a", "uri": "b", "csv_mapping": {"prompt": "q", "completion": "r"}}]}}
    )
    assert ok.data.sources[0].csv_mapping is not None


def test_file_problems_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data:\n  sources: [\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listed)
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text(yaml.safe_dump({**MINIMAL, "cost": {"max_estimated_cost_usd": -1}}))
    with pytest.raises(
        ConfigError, match=rf"^{bad_key}: cost\.max_estimated_cost_usd: should be greater than or equal to 0"
    ):
        load_config(bad_key)


def test_sections_are_frozen() -> None:
    config = parse_config(MINIMAL)
    with pytest.raises(ValueError, match="frozen"):
        config.dedupe.num_perm = 1  # type: ignore[misc]


def test_dates_are_parsed_by_the_schema_so_an_impossible_one_names_its_key(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "data:\n  sources: [{name: a, uri: b}]\n  as_of: 2026-11-22\ncost:\n  prices_as_of: 2025-07-01\n"
    )
    loaded = load_config(config)
    assert loaded.data.as_of == date(2026, 11, 22) and loaded.cost.prices_as_of == date(2025, 7, 1)
    config.write_text("data:\n  sources: [{name: a, uri: b}]\n  as_of: 2026-13-45\n")
    with pytest.raises(
        ConfigError, match=r"data\.as_of: .*\(got '2026-13-45'\); write a date as YYYY-MM-DD$"
    ):
        load_config(config)


def test_the_default_config_is_the_project_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELINE_PROJECT", str(tmp_path))
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: no configs/local.yaml in the project folder"):
        load_config()
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "local.yaml").write_text(yaml.safe_dump({**MINIMAL, "project": "elsewhere"}))
    assert load_config().project == "elsewhere"
    monkeypatch.delenv("TUNELINE_PROJECT")
    monkeypatch.chdir(tmp_path)  # without the variable: the working directory
    assert load_config().project == "elsewhere"


# --- training.method: supervised | dpo | reinforcement -------------------------------------------------

STRING_CHECK = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.reference_answer}}",
    "operation": "eq",
}


def test_supervised_is_the_default_and_hashes_as_before_the_methods() -> None:
    config = parse_config(MINIMAL)
    assert config.training.method == "supervised"
    assert config.training.dpo is None and config.training.grader is None
    explicit = parse_config(with_("training", {"method": "supervised"}))
    assert explicit.config_hash() == config.config_hash()
    dpo = parse_config(with_("training", {"method": "dpo"}))
    assert dpo.config_hash() != config.config_hash()


def test_dpo_and_reinforcement_configs_load() -> None:
    dpo = parse_config(with_("training", {"method": "dpo", "dpo": {"beta": 0.2}}))
    assert dpo.training.dpo is not None and dpo.training.dpo.beta == 0.2
    rft = parse_config(
        with_(
            "training",
            {"method": "reinforcement", "grader": STRING_CHECK, "reinforcement": {"eval_samples": 2}},
        )
    )
    assert rft.training.grader == STRING_CHECK
    assert rft.training.reinforcement is not None and rft.training.reinforcement.eval_samples == 2


@pytest.mark.parametrize(
    ("training", "expected"),
    [
        ({"method": "ppo"}, "training.method: should be 'supervised', 'dpo' or 'reinforcement'"),
        (
            {"method": "dpo", "dpo": {"beta": 0}},
            "training.dpo.beta: should be 'auto' or should be greater than 0",
        ),
        ({"method": "dpo", "dpo": {"betta": 0.1}}, "training.dpo.betta: unknown key"),
        ({"dpo": {"beta": 0.1}}, "training.dpo: only used with training.method: dpo"),
        (
            {"method": "dpo", "grader": STRING_CHECK},
            "training.grader: only used with training.method: reinforcement",
        ),
        ({"reinforcement": {}}, "training.reinforcement: only used with training.method: reinforcement"),
        ({"method": "reinforcement"}, "training.grader: required with training.method: reinforcement"),
        (
            {"method": "reinforcement", "grader": {**STRING_CHECK, "type": "regex"}},
            "training.grader.type: must be one of string_check, text_similarity, python, score_model, multi",
        ),
        (
            {
                "method": "reinforcement",
                "grader": {k: v for k, v in STRING_CHECK.items() if k != "reference"},
            },
            "training.grader.reference: required for a string_check grader",
        ),
        (
            {
                "method": "reinforcement",
                "grader": {
                    "type": "multi",
                    "name": "m",
                    "calculate_output": "a",
                    "graders": {"a": {"type": "python"}},
                },
            },
            "training.grader.graders.a.name: required for a python grader",
        ),
    ],
)
def test_a_bad_method_config_names_its_key(training: dict[str, Any], expected: str) -> None:
    text = message(with_("training", training))
    assert text.startswith(f"config: {expected}"), text
    assert "\n" not in text


def test_dpo_refuses_the_general_mix() -> None:
    raw = {**with_("training", {"method": "dpo"}), "export": {"general_mix_fraction": 0.2}}
    assert message(raw).startswith("config: export.general_mix_fraction: must be 0 with training.method: dpo")


def test_a_bad_method_config_exits_2_from_the_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tuneline.cli import app

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**MINIMAL, "training": {"method": "reinforcement"}}))
    outcome = CliRunner().invoke(app, ["prepare", "--config", str(bad), "--out", str(tmp_path / "o")])
    assert outcome.exit_code == 2, outcome.output
    assert "training.grader: required with training.method: reinforcement" in outcome.output
    assert not (tmp_path / "o").exists()
