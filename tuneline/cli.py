"""`tuneline`: one command per stage of the life cycle. The only module that reaches up to flows/.

Exit codes: 0 success (a rejected candidate is a decision, not a failure), 1 a failed run or gate,
2 bad usage or config (one line naming the key and the fix). Expected failures (a failed gate, a
refused or failing provider, a failed job, a config error) are reported in a few lines without a
traceback, Prefect's included; an unexpected one keeps its traceback. What can be checked before any
work is: the config, the date window holding data, the provider's key and that its endpoint answers.

Every command works on a project folder (configs/, data/, .tuneline/): the working directory, or
`--project DIR` (tuneline/paths.py).

Over 600 lines on purpose: it is the whole command surface (about 20 commands, their options, help text
and the one error policy above), each command a thin call into a flow or a module; splitting it would
split that error policy and typer's one `app`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console

from tuneline.config import Config, ConfigError, load_config

# Offline by default: no telemetry from Prefect or anything else.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A busy machine can take longer than Prefect's default to start its ephemeral API server.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

# No local variables in tracebacks: they can hold an API key.
app = typer.Typer(
    add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_show_locals=False
)
console = Console(stderr=True)

ConfigOption = typer.Option(None, "--config", "-c", help="YAML config (default configs/local.yaml).")


def usage_error(message: str) -> NoReturn:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def read_config(path: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """The validated config, or exit 2 with one line naming the key and the fix."""
    try:
        return load_config(path, overrides={k: v for k, v in (overrides or {}).items() if v is not None})
    except ConfigError as exc:
        usage_error(str(exc))


@app.callback()
def main(
    project: Path | None = typer.Option(
        None,
        "--project",
        "-P",
        help="The project folder, holding configs/ and data/ (default: the working directory).",
    ),
) -> None:
    from tuneline.paths import PROJECT_ENV

    if project is not None:
        if not project.is_dir():
            usage_error(f"--project {project}: not a folder (give the folder that holds configs/ and data/)")
        # In the environment, so that flows, the server a run starts and every subprocess agree.
        os.environ[PROJECT_ENV] = str(project.resolve())


def window_problem(cfg: Config, day: date) -> str | None:
    """Why the date window holds no data (one line with the window, the newest partition and the fix),
    or None. Lists the sources' files only; reads none."""
    from tuneline.paths import project_root
    from tuneline.tasks import ingest

    lookback = cfg.data.lookback_days
    if ingest.select_files(cfg.data.sources, day, lookback).files:
        return None
    every = ingest.select_files(cfg.data.sources, date.max, (date.max - date.min).days)
    if not every.files:
        return (
            f"data.sources name no data file in {project_root()} (check data.sources[].uri, or run in "
            "the project folder, or pass --project DIR)"
        )
    start, end = ingest.window(day, lookback)
    newest = every.partitions[-1] if every.partitions else None
    fix = f"pass --as-of {newest} (or set data.as_of)" if newest else "pass --as-of YYYY-MM-DD"
    return (
        f"no partition of data.sources falls in the window ({start}, {end}] (as of {day}, "
        f"data.lookback_days {lookback}); the newest partition found is {newest}: {fix}"
    )


def check_provider(cfg: Config) -> None:
    """Exit 2 before any work when the run could not reach its provider: no API key, or an endpoint
    that does not answer (refused, unknown host)."""
    from tuneline import provider

    problem = provider.key_problem(cfg.provider)
    if problem:
        usage_error(problem)
    if cfg.provider.kind == "local" and not cfg.provider.base_url:
        return  # the run starts its own server
    try:
        provider.check_reachable(cfg.provider)
    except provider.ProviderError as exc:
        usage_error(str(exc))


def expected_failures() -> tuple[type[Exception], ...]:
    """What a command reports in a few lines, without a traceback: a config or usage error, a failed
    gate or cost cap, a provider that refused or kept failing after its retries, a failed job, an
    evaluation that cannot produce a result, a refused registry move, an incomplete backfill, no room
    on disk for the batch's texts."""
    from tuneline.flows.backfill import BackfillError, BackfillIncomplete
    from tuneline.flows.prepare import InputNotFound, PrepareFailed
    from tuneline.provider import ProviderError
    from tuneline.tasks.evaluate import EvaluationError
    from tuneline.tasks.train import TrainingFailed
    from tuneline.text_store import NoRoomForTexts
    from tuneline.tracking import RegistryError

    return (
        ConfigError,
        InputNotFound,
        PrepareFailed,
        ProviderError,
        TrainingFailed,
        EvaluationError,
        RegistryError,
        BackfillError,
        BackfillIncomplete,
        NoRoomForTexts,
    )


class _WithoutTraceback(logging.Filter):
    """Keeps Prefect's one-line record of an expected failure, drops its traceback."""

    def __init__(self, expected: tuple[type[Exception], ...]) -> None:
        super().__init__()
        self.expected = expected

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], self.expected):
            record.exc_info, record.exc_text = None, None
        return True


@contextmanager
def reporting_failures() -> Iterator[tuple[type[Exception], ...]]:
    """While a flow runs: Prefect logs an expected failure without its traceback (the command reports
    it); yields the expected kinds for the command's `except`."""
    expected = expected_failures()
    quiet = _WithoutTraceback(expected)
    loggers = [logging.getLogger(name) for name in ("prefect.flow_runs", "prefect.task_runs")]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield expected
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


def failed(what: str, exc: BaseException) -> NoReturn:
    """An expected failure of a run: its message, exit 1 (2 for a config or usage error)."""
    from tuneline.flows.prepare import InputNotFound

    if isinstance(exc, ConfigError | InputNotFound):
        usage_error(str(exc))
    console.print(f"[red]{what}:[/red] ", end="")
    console.print(str(exc), highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(1)


@app.command()
def prepare(
    config: Path | None = ConfigOption,
    as_of: str | None = typer.Option(
        None, "--as-of", help="The run's day, YYYY-MM-DD (default: data.as_of, else today)."
    ),
    inputs: list[str] | None = typer.Option(
        None, "--input", "-i", help="Path, glob or fsspec URL read instead of data.sources (repeatable)."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Folder for train/validation/quarantine.jsonl, manifest.json, report.html."
    ),
) -> None:
    """Ingest, validate, deduplicate and export the data as a Prefect flow. Exit 1 when the gate fails."""
    day = None
    if as_of is not None:
        try:
            day = date.fromisoformat(as_of)
        except ValueError:
            usage_error(f"--as-of: {as_of!r} is not a date (use YYYY-MM-DD)")
    cfg = read_config(config)  # exit 2 on a bad config before anything starts
    if not inputs:
        problem = window_problem(cfg, day or cfg.data.as_of or date.today())
        if problem:
            usage_error(problem)
    from tuneline.flows.prepare import PrepareFailed
    from tuneline.flows.prepare import prepare as prepare_flow

    with reporting_failures() as expected:
        try:
            with console.status("preparing the dataset: ingest, validate, dedupe, export"):
                result = prepare_flow(
                    config_path=str(config) if config else None,
                    as_of=day,
                    inputs=inputs or None,
                    out_dir=str(out),
                )
        except PrepareFailed as stopped:
            _print_prepare_summary(stopped.result)
            console.print("[red]stopped:[/red] nothing may be uploaded", highlight=False)
            for problem in stopped.result.problems:
                console.print(f"  - {problem}", highlight=False, soft_wrap=True)
            console.print(f"  see {stopped.result.report_file}", highlight=False)
            raise typer.Exit(1) from None
        except expected as exc:
            failed("prepare failed", exc)
    _print_prepare_summary(result)


def _print_prepare_summary(result: Any) -> None:
    """Counts by reason, tokens, cost, dataset hash and where the files are, on stdout."""
    from rich.table import Table

    out = Console(soft_wrap=True)  # long lines stay whole: the summary is read and grepped
    manifest = result.manifest
    counts, tokens, cost = manifest["counts"], manifest["tokens"], manifest["cost"]
    verdict = "[green]published[/green]" if result.published else "[red]stopped[/red]"
    out.print(f"prepare as of {manifest['as_of']}: {verdict}", highlight=False)
    out.print(
        f"records: {counts['input_records']:,} in, {counts['kept']:,} kept "
        f"({counts['train'] - counts['general_mixed']:,} train, {counts['validation']:,} validation; "
        f"{counts['general_mixed']:,} general examples mixed into train), {counts['quarantined']:,} quarantined",
        highlight=False,
    )
    if counts["quarantined_by_reason"]:
        table = Table("quarantine reason", "records", box=None, pad_edge=False)
        by_count = sorted(counts["quarantined_by_reason"].items(), key=lambda item: (-item[1], item[0]))
        for reason, n in by_count:
            table.add_row(reason, f"{n:,}")
        out.print(table)
    out.print(
        f"tokens: {tokens['train_total']:,} train, {tokens['validation_total']:,} validation "
        f"({tokens['encoding']}; longest example {tokens['max_example']:,} of {tokens['context_limit']:,})",
        highlight=False,
    )
    price = cost["estimated_cost_usd"]
    shown = f"${price:,.2f}" if price is not None else "unknown (no price for the model)"
    out.print(
        f"estimated training cost: {shown} for {cost['billed_tokens']:,} billed tokens "
        f"({cost['n_epochs']} epochs of {cost['model']}, prices as of {cost['prices_as_of']}; "
        f"cap ${cost['max_estimated_cost_usd']:,.2f})",
        highlight=False,
    )
    out.print(f"dataset hash: {manifest['dataset_hash']}", highlight=False)
    names = ["train.jsonl", "validation.jsonl"] if result.published else []
    names += ["quarantine.jsonl", "manifest.json", "report.html"]
    out.print(f"files in {result.out_dir}: {', '.join(names)}", highlight=False)
    if result.mlflow_run_id:
        out.print(f"MLflow run: {result.mlflow_run_id} (`tuneline ui` to browse)", highlight=False)


@app.command()
def backfill(
    start: str = typer.Option(..., "--start", help="First date, YYYY-MM-DD."),
    end: str = typer.Option(..., "--end", help="Last date, YYYY-MM-DD (inclusive)."),
    mode: str = typer.Option(
        "prepare",
        "--mode",
        help="prepare: record each date's data quality; retrain: retrain as of each date.",
    ),
    config: Path | None = ConfigOption,
) -> None:
    """Replay a range of dates as the nightly run saw them. Exit 1 when a date failed or was stopped."""
    from tuneline.flows.backfill import BackfillError, BackfillIncomplete, backfill_dates, check_mode

    try:
        backfill_dates(start, end)
        check_mode(mode)
    except BackfillError as exc:
        usage_error(str(exc))
    cfg = read_config(config)  # exit 2 on a bad config before anything starts
    if mode == "retrain":
        check_provider(cfg)
    from tuneline.flows.backfill import backfill as backfill_flow

    with reporting_failures() as expected:
        try:
            with console.status(f"backfill {start}..{end} ({mode})"):
                result = backfill_flow(
                    start=start, end=end, mode=mode, config=str(config) if config else None
                )
        except BackfillIncomplete as incomplete:
            _print_backfill(cfg, incomplete.result)
            console.print("[red]not done:[/red] ", end="")
            console.print(str(incomplete), highlight=False, markup=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except expected as exc:
            failed("backfill failed", exc)
    _print_backfill(cfg, result)


def _print_backfill(cfg: Config, result: Any) -> None:
    """One line per date on stdout, then where the backfill's MLflow run is."""
    from tuneline import tracking

    out = Console()
    for day in result.days:
        counts = (day.manifest or {}).get("counts") or {}
        quality = f"{counts['kept']:,} kept, {counts['quarantined']:,} quarantined" if counts else ""
        digest = f"dataset {day.dataset_hash[:12]}" if day.dataset_hash else ""
        candidate = ""
        if day.retrain:
            verdict = {True: "promoted", False: "rejected"}.get(day.retrain.promoted, "not evaluated")
            candidate = f"candidate {day.retrain.candidate_model} {verdict}"
        detail = day.detail or ""
        facts = "; ".join(f for f in (quality, digest, candidate, detail) if f)
        out.print(f"{day.as_of}  {day.outcome:<10} {facts}", highlight=False, markup=False, soft_wrap=True)
    out.print(f"MLflow run: {tracking.run_url(cfg.tracking, result.parent_run_id)}", highlight=False)


@app.command()
def ui(
    config: Path | None = ConfigOption,
    port: int = typer.Option(5000, "--port", min=1, max=65535, help="Loopback port for the MLflow UI."),
) -> None:
    """Serve the MLflow UI on the configured store (loopback only) and say how to open the Prefect UI."""
    import signal
    import subprocess

    from tuneline import tracking

    cfg = read_config(config)
    prefect_hint = "Prefect UI: run `prefect server start` and open http://127.0.0.1:4200"
    if tracking.has_tracking_server(cfg.tracking):
        console.print(
            f"MLflow UI: {tracking.ui_url(cfg.tracking)} (served by the tracking server)\n{prefect_hint}"
        )
        return
    console.print(
        f"MLflow store: {tracking.store_location(cfg.tracking)}\n"
        f"MLflow UI: {tracking.ui_url(cfg.tracking, port)} (Ctrl-C stops it)\n{prefect_hint}",
        highlight=False,
    )

    def stop_on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_on_sigterm)
    # Its own process group, so that stopping it also stops the workers `mlflow server` starts.
    server = subprocess.Popen(tracking.ui_command(cfg.tracking, port), start_new_session=True)
    try:
        code = server.wait()
    except KeyboardInterrupt:
        code = 0
        for stop_signal, grace_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            try:
                os.killpg(server.pid, stop_signal)
                server.wait(timeout=grace_s)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
    raise typer.Exit(code)


def served_models(cfg: Any, extra: list[str]) -> list[Any]:
    """The catalog entries of server.models plus each --model (named by its hub id without a revision,
    or by its folder); ValueError (one line naming the key) for a bad entry."""
    from tuneline.server.catalog import CatalogEntry

    entries = []
    for name, value in cfg.models.items():
        settings = {"source": value} if isinstance(value, str) else value.model_dump()
        entries.append(CatalogEntry(name=name, **settings))
    for source in extra:
        local = Path(source).expanduser()
        name = local.resolve().name if local.is_dir() else source.partition("@")[0]
        if any(entry.name == name for entry in entries):
            continue
        entries.append(CatalogEntry(name=name, source=str(local.resolve()) if local.is_dir() else source))
    return entries


@app.command()
def serve(
    config: Path | None = ConfigOption,
    host: str | None = typer.Option(None, "--host", help="Address to bind (config server.host, 127.0.0.1)."),
    port: int | None = typer.Option(
        None, "--port", min=1, max=65535, help="Port (config server.port, 8000)."
    ),
    state_dir: Path | None = typer.Option(
        None, "--state-dir", help="Files, jobs and models (server.state_dir)."
    ),
    model_dir: list[Path] | None = typer.Option(
        None, "--model-dir", help="A Hugging Face checkpoint directory to serve as a base model (repeatable)."
    ),
    model: list[str] | None = typer.Option(
        None,
        "--model",
        help="A hub id (org/name, optionally @revision) or directory to serve, named by itself; added to "
        "server.models (repeatable). Downloaded into the model cache once; offline it must be cached.",
    ),
    model_cache: Path | None = typer.Option(
        None,
        "--model-cache",
        help="Where hub models are kept (server.model_cache; HF_HUB_CACHE, else STATE_DIR/hub).",
    ),
    fault_rate: float | None = typer.Option(
        None, "--fault-rate", min=0.0, max=1.0, help="Answer this fraction of requests with 429/500/503."
    ),
    fault_seed: int | None = typer.Option(
        None, "--fault-seed", help="Seed of the fault RNG (reproducible faults)."
    ),
    latency: float | None = typer.Option(
        None, "--latency", min=0.0, help="Milliseconds added to chat completions."
    ),
    concurrent_jobs: int | None = typer.Option(
        None, "--concurrent-jobs", min=1, max=16, help="Jobs trained at once."
    ),
) -> None:
    """Run the OpenAI-compatible fine-tuning server (needs the `server` extra of tuneline).

    Clients authenticate with `Authorization: Bearer $TUNELINE_API_KEY`. Without TUNELINE_API_KEY the
    server only binds a loopback address and accepts any key there.
    """
    from tuneline.paths import resolve

    cfg = read_config(config).server
    try:
        from tuneline.server.app import run_server
        from tuneline.server.settings import API_KEY_ENV, ServerSettings, startup_problem
        from tuneline.server.state_lock import StateDirBusy
    except ImportError as exc:
        usage_error(
            f"the server needs its extra dependencies ({exc.name} is missing): pip install 'tuneline\\[server]'"
        )
    try:
        catalog = served_models(cfg, model or [])
    except ValueError as exc:
        usage_error(str(exc))
    root = state_dir.resolve() if state_dir else resolve(cfg.state_dir)
    if catalog:
        from tuneline.server.hub import ModelNotCached, ModelUnavailable, default_cache, resolve_catalog

        cache = (
            model_cache.resolve()
            if model_cache
            else (resolve(cfg.model_cache) if cfg.model_cache else default_cache(root))
        )
        try:
            catalog = list(resolve_catalog(catalog, cache))
        except (ValueError, ModelNotCached, ModelUnavailable) as exc:
            usage_error(str(exc))
    try:
        settings = ServerSettings(
            state_dir=root,
            models=tuple(catalog),
            host=host or cfg.host,
            port=port or cfg.port,
            model_dirs=tuple(p.resolve() for p in model_dir)
            if model_dir
            else tuple(resolve(p) for p in cfg.model_dirs),
            api_key=os.environ.get(API_KEY_ENV) or None,
            fault_rate=cfg.fault_rate if fault_rate is None else fault_rate,
            fault_seed=fault_seed,
            latency_ms=cfg.latency_ms if latency is None else latency,
            concurrent_jobs=concurrent_jobs or cfg.concurrent_jobs,
            max_upload_bytes=cfg.max_upload_bytes,
            max_request_bytes=cfg.max_request_bytes,
            allowed_origins=tuple(cfg.allowed_origins),
            lora_above_params=cfg.lora_above_params,
            gpus_per_job=cfg.gpus_per_job,
        )
        from tuneline.server.services.graders import grader_settings

        grader_settings(settings)  # the TUNELINE_PYTHON_GRADER_* limits, checked before starting
    except ValueError as exc:
        usage_error(str(exc))
    for path in settings.model_dirs:
        if not path.is_dir():
            usage_error(f"--model-dir {path}: not a directory (give a Hugging Face checkpoint directory)")
    problem = startup_problem(settings)
    if problem:
        usage_error(problem)
    try:
        run_server(settings)
    except StateDirBusy as exc:  # another server holds the state directory
        usage_error(str(exc))


@app.command("export-model")
def export_model(
    model_id: str = typer.Argument(
        ..., help="A fine-tuned model or checkpoint id (ft:...) of the local server."
    ),
    fmt: str = typer.Option("merged", "--format", help="adapter (a LoRA fine-tune's adapter) or merged."),
    out: Path = typer.Option(..., "--out", help="A new folder to write the model to."),
    config: Path | None = ConfigOption,
    state_dir: Path | None = typer.Option(
        None, "--state-dir", help="The server's state directory (server.state_dir)."
    ),
) -> None:
    """Write a model of the local server as a folder transformers, peft and vLLM load; prints its path."""
    from tuneline.paths import resolve

    cfg = read_config(config).server
    try:
        from tuneline.server.export import ExportError
        from tuneline.server.export import export_model as write_export
    except ImportError as exc:
        usage_error(
            f"export needs the server's extra dependencies ({exc.name} is missing): pip install 'tuneline\\[server]'"
        )
    root = state_dir.resolve() if state_dir else resolve(cfg.state_dir)
    if not (root / "tuneline.db").is_file():
        usage_error(f"no server state in {root}: pass --state-dir or set server.state_dir")
    try:
        written = write_export(root, model_id, fmt, out)
    except ExportError as exc:
        usage_error(str(exc))
    typer.echo(str(written))


@app.command()
def gateway(
    config: Path | None = ConfigOption,
    host: str | None = typer.Option(None, "--host", help="Address to bind (config serving.host, 127.0.0.1)."),
    port: int | None = typer.Option(
        None, "--port", min=1, max=65535, help="Port (config serving.port, 8100)."
    ),
    workers: int | None = typer.Option(
        None, "--workers", min=1, max=64, help="Processes serving the port (config serving.workers, 1)."
    ),
) -> None:
    """Serve the registered model's champion (A/B against a challenger), trace answers, take feedback.

    Clients call `POST /v1/chat/completions` with `model` set to the registered model's name (or
    NAME@ALIAS, NAME@VERSION) and send feedback to `POST /v1/feedback`. With TUNELINE_GATEWAY_API_KEY
    (else TUNELINE_API_KEY) set, clients authenticate with `Authorization: Bearer <key>`; without one the
    gateway only binds a loopback address.
    """
    cfg = read_config(config)
    try:
        from tuneline.gateway.app import API_KEY_ENVS, GatewaySettings, run_gateway
    except ImportError as exc:
        usage_error(
            f"the gateway needs its extra dependencies ({exc.name} is missing): pip install 'tuneline\\[gateway]'"
        )
    from tuneline.server.settings import is_loopback

    key_env = next((name for name in API_KEY_ENVS if name in os.environ), None)
    key = os.environ.get(key_env) if key_env else None
    bind = host or cfg.serving.host
    if key is not None and not key.strip():
        usage_error(f"{key_env} is set but empty: set it to a secret value or unset it (loopback only)")
    if key is None and not is_loopback(bind):
        usage_error(
            f"refusing to listen on {bind} without an API key: set TUNELINE_GATEWAY_API_KEY (or "
            "TUNELINE_API_KEY), or bind 127.0.0.1 (serving.host)"
        )
    # A tracking server that is down must not hold the trace exporter for minutes of HTTP retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    run_gateway(
        GatewaySettings(cfg, key.strip() if key else None, bind, port or cfg.serving.port),
        config_path=config.resolve() if config else None,
        workers=workers or cfg.serving.workers,
    )


@app.command()
def run(
    config: Path | None = ConfigOption,
    as_of: str | None = typer.Option(
        None, "--as-of", help="Last day of data to train on (YYYY-MM-DD; default today)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Stop after prepare and print the cost estimate."),
) -> None:
    """prepare -> upload -> train (the `retrain` flow); prints the candidate model id on stdout."""
    cfg = read_config(config, {"data.as_of": as_of})  # a bad config or date exits 2 before anything runs
    problem = window_problem(cfg, cfg.data.as_of or date.today())
    if problem:
        usage_error(problem)
    if not dry_run:
        check_provider(cfg)
    from tuneline.flows.retrain import retrain

    with reporting_failures() as expected:
        try:
            result = retrain(config_path=str(config) if config else None, as_of=as_of, dry_run=dry_run)
        except expected as exc:  # a ConfigError, e.g. an eval set the config names is missing, exits 2
            failed("run failed", exc)
    console.print(
        f"MLflow run {result.mlflow_run_id}; files in {result.export_dir}", highlight=False, soft_wrap=True
    )
    if dry_run:
        estimate = result.estimated_cost_usd
        cost = "unknown (no price for this model)" if estimate is None else f"${estimate:,.4f}"
        console.print(
            f"dry run: dataset {result.dataset_hash}, estimated training cost {cost}",
            highlight=False,
            soft_wrap=True,
        )
        typer.echo(cost)
        return
    console.print(
        f"job {result.job_id}: fine-tuned model {result.fine_tuned_model}, {result.trained_tokens} trained tokens, "
        f"actual cost {result.actual_cost_usd} USD (estimated {result.estimated_cost_usd})",
        highlight=False,
        soft_wrap=True,
    )
    _print_decision(result)
    typer.echo(result.candidate_model)


def _print_decision(result: Any) -> None:
    """Promoted or rejected, the run succeeded: the gate's decision and every rule's figures."""
    if result.decision is None:
        return
    verdict = "PROMOTED" if result.promoted else "REJECTED"
    if result.promoted and result.decision.get("alias") == "challenger":
        verdict = "PROMOTED to challenger (A/B test: `tuneline monitor` decides)"
    rules = "\n".join(
        f"  {'PASS' if rule['passed'] else 'FAIL'} {rule['rule']}: {rule['detail']}"
        for rule in result.decision["rules"]
    )
    console.print(
        f"{verdict} {result.candidate_model} against the {result.decision['reference']} "
        f"({result.decision['reference_model']}); champion: version {result.champion_version or '(none)'}\n{rules}",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def evaluate(
    model: str = typer.Option(
        ..., "--model", "-m", help="Model id to evaluate (ft:..., a checkpoint or a base model)."
    ),
    config: Path | None = ConfigOption,
    train_file: Path | None = typer.Option(
        None, "--train-file", help="A prepared train.jsonl for the few-shot baseline (skipped without one)."
    ),
) -> None:
    """Evaluate one model against the base model (zero- and few-shot) and the champion; promotes nothing."""
    cfg = read_config(config)
    if train_file is not None and not train_file.is_file():
        usage_error(
            f"--train-file {train_file}: no such file (give a train.jsonl written by `tuneline prepare`)"
        )
    check_provider(cfg)
    from tuneline.flows.evaluate import evaluate as evaluate_flow

    with reporting_failures() as expected:
        try:
            result = evaluate_flow(
                model=model,
                config=str(config) if config else None,
                train_file=str(train_file) if train_file else None,
            )
        except expected as exc:
            failed("evaluation failed", exc)
    typer.echo(result.summary_table().to_string(index=False))


@app.command()
def rollback(
    config: Path | None = ConfigOption,
    to: str | None = typer.Option(
        None, "--to", help="Version to make champion (default: the `previous` version)."
    ),
    reason: str = typer.Option("manual rollback", "--reason", help="Why (recorded on the model version)."),
) -> None:
    """Move the registry's `champion` alias back to `previous` (or --to VERSION), recording who, when and why."""
    read_config(config)
    from tuneline.flows.rollback import rollback as rollback_flow

    with reporting_failures() as expected:
        try:
            outcome = rollback_flow(config=str(config) if config else None, to_version=to, reason=reason)
        except expected as exc:
            failed("rollback refused", exc)
    typer.echo(
        f"champion: version {outcome.to_version} ({outcome.model_id}); previous: version {outcome.from_version}"
    )


@app.command()
def monitor(
    config: Path | None = ConfigOption,
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Decide and record the decision, but move no alias."
    ),
    no_harvest: bool = typer.Option(
        False, "--no-harvest", help="Do not turn users' corrections into a raw data partition."
    ),
    as_of: str | None = typer.Option(
        None, "--as-of", help="Day (YYYY-MM-DD) the harvested corrections are filed under (default: today)."
    ),
) -> None:
    """Decide the A/B test (promotion.rollout: ab) on the gateway's traces: promote the challenger, keep
    collecting (and how much more), or end the test; and turn corrections from feedback into data."""
    read_config(config)
    day = None
    if as_of:
        try:
            day = date.fromisoformat(as_of)
        except ValueError:
            usage_error(f"--as-of: {as_of!r} is not a date (write it as YYYY-MM-DD)")
    from tuneline.flows.monitor import monitor as monitor_flow

    with reporting_failures() as expected:
        try:
            report = monitor_flow(
                config=str(config) if config else None, apply=not dry_run, harvest=not no_harvest, as_of=day
            )
        except expected as exc:
            failed("monitor failed", exc)
    decision = report.decision
    if decision is None:
        typer.echo(f"{report.registered_model}: no challenger, no A/B test to decide")
        return
    typer.echo(f"{decision.action}: {decision.reason}")
    if decision.needed_rated_per_variant is not None:
        typer.echo(
            f"still needed: about {decision.needed_rated_per_variant} rated answers per variant"
            + (f" (~{decision.needed_requests} requests)" if decision.needed_requests is not None else "")
        )
    if report.outcome is not None:
        typer.echo(
            f"champion: version {report.outcome.champion}"
            + (f"; previous: version {report.outcome.previous}" if report.outcome.previous else "")
        )


DEMO_NIGHTS = ("2026-11-21", "2026-11-22")  # two consecutive days of the demo data in data/raw/support


@app.command()
def demo(
    config: Path | None = ConfigOption,
    traffic: bool = typer.Option(
        False,
        "--traffic",
        help="After the two nights: simulated users talk to the gateway and rate its answers; the monitor decides.",
    ),
) -> None:
    """Two nights of the nightly job on the demo data: night 1 trains and promotes the first champion,
    night 2 sees a new day of data, trains a candidate, compares it with the champion and decides.
    With --traffic, users then talk to `tuneline gateway` (A/B: champion vs challenger), rate the answers
    from the demo's answer key, and the monitor decides the test (README: A/B rollout)."""
    import time

    from tuneline.flows.retrain import retrain

    cfg = read_config(config)
    for as_of in DEMO_NIGHTS:
        problem = window_problem(cfg, date.fromisoformat(as_of))
        if problem:
            usage_error(f"{problem} (generate the demo data with `tuneline demo-data`)")
    check_provider(cfg)
    started = time.monotonic()
    for night, as_of in enumerate(DEMO_NIGHTS, start=1):
        console.rule(f"night {night}: retrain as of {as_of}")
        with reporting_failures() as expected:
            try:
                result = retrain(config_path=str(config) if config else None, as_of=as_of, dry_run=False)
            except expected as exc:
                failed(f"night {night} failed", exc)
        _print_decision(result)
    from tuneline.tracking import store_location

    if traffic:
        _demo_traffic(cfg, config)
    console.rule("done")
    console.print(
        f"{'two nights and the traffic' if traffic else 'two nights'} in {time.monotonic() - started:.0f} s. "
        f"MLflow store: {store_location(cfg.tracking)}\n"
        f"open the UI with: .venv/bin/tuneline ui{f' --config {config}' if config else ''}",
        highlight=False,
        soft_wrap=True,
    )


DEMO_TRAFFIC_DAY = "2026-11-23"  # the day the users' corrections are filed under (the night after night 2)
DEMO_FEEDBACK_DIR = ".tuneline/demo/feedback/support"


def _demo_traffic(cfg: Config, config: Path | None) -> None:
    """The traffic part of `tuneline demo --traffic` (tuneline/demo/traffic.py), then the monitor."""
    from tuneline.demo.traffic import ensure_challenger, run_traffic
    from tuneline.flows.monitor import monitor as monitor_flow

    console.rule("traffic: users talk to the gateway, the monitor decides")
    with reporting_failures() as expected:
        try:
            champion, challenger, stand_in = ensure_challenger(cfg)
            if stand_in:
                console.print(
                    f"night 2 made no challenger: version {challenger}, the untuned base model "
                    f"{cfg.model.base}, stands in (tagged tuneline.demo) against champion version {champion}",
                    highlight=False,
                )
            else:
                console.print(
                    f"challenger version {challenger} vs champion version {champion}", highlight=False
                )
            outcome = run_traffic(cfg, log=lambda line: console.print(line, highlight=False))
            for variant in sorted(outcome.by_variant):
                rated = outcome.rated[variant]
                console.print(
                    f"  {variant}: {outcome.by_variant[variant]} answers, {rated} rated, "
                    f"{outcome.positive[variant]} up",
                    highlight=False,
                )
            console.print(
                f"  {outcome.corrections} corrections, {outcome.failed} failed requests", highlight=False
            )
            # Filed apart from the committed demo data (data/ is what `tuneline demo-data` writes, byte for byte).
            report = monitor_flow(
                config=str(config) if config else None,
                as_of=date.fromisoformat(DEMO_TRAFFIC_DAY),
                feedback_dir=DEMO_FEEDBACK_DIR,
            )
        except expected as exc:
            failed("the traffic demo failed", exc)
    if report.decision is not None:
        console.print(f"monitor: {report.decision.action}: {report.decision.reason}", highlight=False)
        if report.outcome is not None:
            moved = "is now" if report.outcome.action == "promoted" else "stays"
            console.print(f"champion {moved} version {report.outcome.champion}", highlight=False)
    console.print(
        f"users' corrections: {DEMO_FEEDBACK_DIR}/dt={DEMO_TRAFFIC_DAY}/feedback.jsonl (the demo keeps them "
        "out of data/; a real deployment files them under its data source, where the next nightly run "
        "reads them)",
        highlight=False,
    )


@app.command("demo-data")
def demo_data(
    out: Path | None = typer.Option(None, "--out", help="Where to write the demo data (default: data/)."),
    seed: int | None = typer.Option(None, "--seed", help="Generator seed (default: the committed data's)."),
    preferences: bool = typer.Option(
        False,
        "--preferences",
        help="Also write raw/support_preferences/: preference (DPO) lines for configs/local-dpo.yaml.",
    ),
) -> None:
    """Regenerate the demo data (partitions with planted dirt, eval, canary and general sets)."""
    from tuneline.demo import generator
    from tuneline.paths import data_dir

    target = out if out is not None else data_dir()
    data = generator.generate(target, seed if seed is not None else generator.DEFAULT_SEED, preferences)
    console.print(generator.summary(data, target), highlight=False, soft_wrap=True)


if __name__ == "__main__":
    app()
