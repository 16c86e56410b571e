"""Typed configuration: one YAML file per environment (configs/local.yaml is the default).

Every section forbids unknown keys, so a typo stops the run with one line naming the key path and
what is allowed, instead of being silently ignored. Secrets never live here: only the *name* of the
environment variable (or Prefect Secret block) that holds them.
"""

from __future__ import annotations

import hashlib
import json
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tuneline.paths import project_root, resolve

# Relative to the project folder (tuneline/paths.py).
DEFAULT_CONFIG = Path("configs") / "local.yaml"

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Auto = Literal["auto"]


class ConfigError(Exception):
    """A bad config file or value: the message is one line naming the key path and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CsvMapping(Section):
    """How a CSV's columns become an example: prompt/completion, or user/assistant chat turns."""

    prompt: str | None = None
    completion: str | None = None
    user: str | None = None
    assistant: str | None = None
    system: str | None = None

    @model_validator(mode="after")
    def _one_shape(self) -> CsvMapping:
        legacy = self.prompt is not None and self.completion is not None
        chat = self.user is not None and self.assistant is not None
        if legacy == chat:
            raise ValueError("map either prompt+completion or user+assistant columns")
        return self


class Source(Section):
    name: str
    # A path, glob or fsspec URL. Folders are read recursively; `dt=YYYY-MM-DD` folders are partitions.
    uri: str
    format: Literal["auto", "jsonl", "csv", "parquet"] = "auto"
    csv_mapping: CsvMapping | None = None


class DataConfig(Section):
    sources: list[Source] = Field(min_length=1)
    as_of: date | None = None  # None = today
    lookback_days: int = Field(default=7, ge=1, le=3650)
    eval_set: str = "data/eval/support_eval.jsonl"
    canary_set: str = "data/general/canary.jsonl"
    general_corpus: str = "data/general/general_chat.jsonl"


class ModelConfig(Section):
    base: str = "tuneline-tiny"
    # Legacy prompt/completion records become chat with this system prompt (chat models only).
    system_prompt: str = "You are the support assistant. Answer with the category and the house reply."
    tokenizer: Literal["auto", "o200k_base", "cl100k_base"] = "auto"


class ValidationConfig(Section):
    min_examples: int = Field(default=10, ge=1)
    max_quarantine_fraction: Probability = 0.5
    too_long: Literal["quarantine", "truncate"] = "quarantine"
    # Training context per example, tokens. Models not listed use `default_context_limit`.
    context_limits: dict[str, int] = Field(
        default_factory=lambda: {
            "gpt-4o": 65536,
            "gpt-4o-mini": 65536,
            "gpt-4.1": 65536,
            "gpt-4.1-mini": 65536,
            "gpt-4.1-nano": 32768,
            "gpt-3.5-turbo": 16385,
            "tuneline-tiny": 512,
        }
    )
    default_context_limit: int = Field(default=65536, ge=16)


class DedupeConfig(Section):
    near_duplicate_threshold: Probability = 0.85
    num_perm: int = Field(default=64, ge=16, le=512)
    shingle_size: int = Field(default=3, ge=1, le=10)
    contradictions: Literal["keep-latest", "keep-majority", "quarantine-all"] = "keep-latest"
    leakage_threshold: Probability = 0.85
    pii: Literal["allow", "redact", "quarantine"] = "redact"


class ExportConfig(Section):
    validation_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    # The share of the training file that is general data (replayed against forgetting).
    general_mix_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0

    def general_examples_for(self, n_task_examples: int) -> int:
        """How many general examples make up `general_mix_fraction` of a training file that holds
        `n_task_examples` task examples."""
        fraction = self.general_mix_fraction
        return round(n_task_examples * fraction / (1 - fraction))


class CostConfig(Section):
    prices_as_of: date = date(2025, 7, 1)
    # USD per 1M training tokens (provider list prices on `prices_as_of`).
    training_price_per_1m_tokens: dict[str, float] = Field(
        default_factory=lambda: {
            "gpt-4.1": 25.0,
            "gpt-4.1-mini": 5.0,
            "gpt-4.1-nano": 1.5,
            "gpt-4o": 25.0,
            "gpt-4o-mini": 3.0,
            "gpt-3.5-turbo": 8.0,
            "davinci-002": 6.0,
            "babbage-002": 0.4,
            "tuneline-tiny": 0.0,
        }
    )
    max_estimated_cost_usd: float = Field(default=50.0, ge=0.0)


class ProviderConfig(Section):
    kind: Literal["local", "openai", "azure", "compatible"] = "local"
    base_url: str | None = None
    # Names of environment variables (or Prefect Secret blocks), never the secrets themselves.
    api_key_env: str = "TUNELINE_API_KEY"
    api_key_secret_block: str | None = None
    organization: str | None = None
    project: str | None = None
    azure_endpoint: str | None = None
    azure_api_version: str | None = None
    timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=4, ge=0, le=20)
    file_processing_timeout_s: float = Field(default=600.0, gt=0)
    poll_interval_s: float = Field(default=1.0, gt=0)
    max_poll_interval_s: float = Field(default=30.0, gt=0)
    job_timeout_s: float = Field(default=6 * 3600.0, gt=0)
    max_concurrent_jobs: int = Field(default=3, ge=1)


class Hyperparameters(Section):
    n_epochs: Auto | Annotated[int, Field(ge=1, le=50)] = "auto"
    batch_size: Auto | Annotated[int, Field(ge=1, le=256)] = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0)] = "auto"


TrainingMethod = Literal["supervised", "dpo", "reinforcement"]
TRAINING_METHODS: tuple[str, ...] = ("supervised", "dpo", "reinforcement")
GRADER_TYPES = ("string_check", "text_similarity", "python", "score_model", "multi")
# The keys each hosted grader type needs (FineTuneReinforcementMethod.grader in the OpenAPI contract).
GRADER_REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "string_check": ("name", "input", "reference", "operation"),
    "text_similarity": ("name", "input", "reference", "evaluation_metric"),
    "python": ("name", "source"),
    "score_model": ("name", "model", "input"),
    "multi": ("name", "graders", "calculate_output"),
}


class DpoConfig(Section):
    """`training.dpo`: what DPO adds to training.hyperparameters (FineTuneDPOHyperparameters)."""

    # Weight of the penalty that keeps the policy near the reference (the base model); hosted: (0, 2].
    beta: Auto | Annotated[float, Field(gt=0.0, le=2.0)] = "auto"


class ReinforcementConfig(Section):
    """`training.reinforcement`: what reinforcement adds to training.hyperparameters
    (FineTuneReinforcementHyperparameters)."""

    eval_interval: Auto | Annotated[int, Field(ge=1)] = "auto"
    eval_samples: Auto | Annotated[int, Field(ge=1)] = "auto"
    compute_multiplier: Auto | Annotated[float, Field(ge=0.00001, le=10.0)] = "auto"
    reasoning_effort: Literal["default", "low", "medium", "high"] = "default"


class TrainingConfig(Section):
    # supervised: chat (or prompt/completion) lines; dpo: preference lines; reinforcement: prompts
    # (`messages` plus the fields the grader reads as {{item.*}}) and `grader`.
    method: TrainingMethod = "supervised"
    hyperparameters: Hyperparameters = Hyperparameters()
    dpo: DpoConfig | None = None
    reinforcement: ReinforcementConfig | None = None
    # The hosted grader object (string_check, text_similarity, python, score_model, multi): required
    # with method reinforcement, refused otherwise.
    grader: dict[str, Any] | None = None
    suffix: str | None = Field(default="support", max_length=64)
    seed: int | None = Field(default=42, ge=0, le=2**31 - 1)
    # Overfitting guard: pick the checkpoint with the lowest full validation loss as the candidate.
    choose_best_checkpoint: bool = True
    # `tuneline run` writes each flow run's prepared files (train.jsonl, manifest.json, ...) under here.
    runs_dir: str = ".tuneline/runs"


class JudgeConfig(Section):
    enabled: bool = False
    model: str | None = None
    rubric: str = "Which answer is more correct, helpful and in the house style?"


class EvaluationConfig(Section):
    few_shot_k: int = Field(default=4, ge=0, le=64)
    concurrency: int = Field(default=8, ge=1, le=256)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    seed: int = 1234
    # Room for the longest house answer: about 115 tokens with tuneline-tiny's small vocabulary.
    max_tokens: int = Field(default=192, ge=1)
    bootstrap_samples: int = Field(default=1000, ge=100)
    confidence: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.95
    # Retries per eval request (429, 5xx, timeouts; backoff honours retry-after); then it counts as unanswered.
    max_retries: int = Field(default=4, ge=0, le=20)
    request_timeout_s: float = Field(default=60.0, gt=0)
    # A SQLite file of answers kept across runs (tuneline/answer_cache.py): a model whose id and created
    # time are unchanged is not asked the same request again. None: every request is sent every run.
    answer_cache: str | None = None
    judge: JudgeConfig = JudgeConfig()


class MonitorConfig(Section):
    """The A/B monitor (flows/monitor.py): when the challenger has earned `champion`, or lost its test."""

    # One-sided significance of the feedback-rate difference, each way (better -> promote, worse -> end).
    alpha: Probability = 0.05
    # Power the "sample size still needed" estimate is computed for.
    power: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.8
    # The smallest difference in the positive-feedback rate worth detecting (absolute).
    min_effect: Annotated[float, Field(gt=0.0, le=1.0)] = 0.05
    # Fewer rated answers than this on either variant decide nothing yet.
    min_feedback_per_variant: int = Field(default=30, ge=1)
    # With this many rated answers per variant and still no significant difference, the test ends.
    max_feedback_per_variant: int = Field(default=5000, ge=1)
    # Guard rails that end a test whatever the feedback says: the challenger's error rate significantly
    # above the champion's, or its p95 latency over this multiple of the champion's.
    max_latency_ratio_p95: float = Field(default=2.0, gt=1.0)
    # The latest traces per variant sent through mlflow.genai.evaluate for the UI's comparison (0: off).
    evaluate_max_traces: int = Field(default=500, ge=0)
    # The registered-model experiment traces are read from is `serving/<registered model>`.
    trace_experiment_prefix: str = "serving/"
    # Where feedback corrections become raw data (a `dt=YYYY-MM-DD/feedback.jsonl` partition);
    # None: the folder of the first configured source.
    feedback_dir: str | None = None


class PromotionConfig(Section):
    # direct: a candidate that passes the gate becomes `champion`; ab: it becomes `challenger`, and the
    # monitor flow promotes it (or ends its test) on what users said (the first model becomes champion).
    rollout: Literal["direct", "ab"] = "direct"
    monitor: MonitorConfig = MonitorConfig()
    primary_metric: Literal["exact_match", "normalized_match", "token_f1"] = "exact_match"
    min_delta: float = Field(default=0.02, ge=0.0)
    alpha: Probability = 0.05
    max_canary_drop: Probability = 0.1
    # The candidate must also match the base model prompted with few_shot_k training examples.
    beat_few_shot: bool = True


class TrackingConfig(Section):
    tracking_uri: str = "sqlite:///.tuneline/mlflow.db"
    artifact_location: str = ".tuneline/mlartifacts"
    experiment: str = "tuneline"
    registered_model: str = "support-assistant"


class ServedModel(Section):
    """One entry of server.models: where the model comes from and how it is trained and served."""

    # A hub id (`Qwen/Qwen2.5-0.5B-Instruct`, optionally `@revision`), a checkpoint directory, or
    # `tuneline-tiny` (the built-in model).
    source: str = Field(min_length=1)
    revision: str | None = None
    # lora | full | auto (auto: LoRA above lora_above_params parameters).
    training: Literal["auto", "lora", "full"] = "auto"
    # Trained and served within this many tokens (unset: the checkpoint's own; larger is capped at it).
    context_length: int | None = Field(default=None, ge=16)
    # Served in (auto: bfloat16/float16 on a GPU, float32 on a CPU).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class ServerConfig(Section):
    """The embedded `tuneline serve` (provider.kind = local)."""

    state_dir: str = ".tuneline/server"
    # The catalog: model name -> a hub id or directory (or a ServedModel with its settings). When
    # given, it decides what /v1/models lists and what jobs may name (tuneline-tiny only if listed).
    models: dict[str, str | ServedModel] = Field(default_factory=dict)
    # Where hub models are downloaded to (huggingface_hub's cache layout); unset: HF_HUB_CACHE when set,
    # else <state_dir>/hub.
    model_cache: str | None = None
    model_dirs: list[str] = Field(default_factory=list)
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, ge=1)
    # A JSON request body; a larger one is refused (413) before it is read whole.
    max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # Web origins (https://app.example) whose pages may call the server; any other Origin is refused.
    allowed_origins: list[str] = Field(default_factory=list)
    concurrent_jobs: int = Field(default=1, ge=1, le=16)
    # Above this many parameters a model is fine-tuned with LoRA instead of full fine-tuning.
    lora_above_params: int = Field(default=300_000_000, ge=0)
    # GPUs one training job uses (data parallel, or sharded when a full fine-tune does not fit one
    # GPU); unset = every visible GPU. Ignored on a CPU.
    gpus_per_job: int | None = Field(default=None, ge=1)
    # Loopback by default; any other address needs TUNELINE_API_KEY set or the server refuses to start.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # For testing clients: a fraction of requests answered 429/500/503, and delay added to chat completions.
    fault_rate: Probability = 0.0
    latency_ms: float = Field(default=0.0, ge=0.0)


class ServingConfig(Section):
    """`tuneline gateway`: the endpoint that serves the registered model's `champion`, A/B tests a
    `challenger`, traces every answer to MLflow and takes feedback (tuneline/gateway/)."""

    # Loopback by default; any other address needs TUNELINE_API_KEY set or the gateway refuses to start.
    host: str = "127.0.0.1"
    port: int = Field(default=8100, ge=1, le=65535)
    # Processes serving the port (one event loop each, one core's worth of requests).
    workers: int = Field(default=1, ge=1, le=64)
    # Registered models the gateway serves (default: tracking.registered_model).
    models: list[str] = Field(default_factory=list)
    # The share of users (sticky: a hash of the request's `user`, or of `user_header`) sent to the
    # version holding the alias `challenger`, while one does.
    challenger_share: Probability = 0.0
    user_header: str = "x-tuneline-user"
    session_header: str = "x-tuneline-session"
    # How long an alias -> version lookup is reused: a moved alias is served within this many seconds.
    alias_ttl_s: float = Field(default=5.0, gt=0.0, le=3600.0)
    # Upstream retries (429, 5xx, connection errors, timeouts) before falling back or answering 502.
    upstream_retries: int = Field(default=2, ge=0, le=10)
    upstream_timeout_s: float = Field(default=60.0, gt=0.0)
    # Connections kept per upstream provider (one shared async client each).
    max_connections: int = Field(default=1000, ge=1, le=100_000)
    # When the upstream fails past its retries: answer from the version holding `previous`.
    fallback_to_previous: bool = True
    # The `tuneline serve` that versions trained on an embedded server (provider kind `local`, no
    # recorded base URL) are served from; default http://<server.host>:<server.port>/v1.
    local_base_url: str | None = None
    # Traces: on, the export queue's bound (a full queue drops and counts), and the store they go to
    # (default: tracking.tracking_uri), in the experiment `serving/<registered model>`.
    tracing: bool = True
    trace_queue_size: int = Field(default=10_000, ge=1, le=10_000_000)
    # Who writes traces: a child process (MLflow's work off the gateway's interpreter) or its threads.
    trace_export: Literal["process", "thread"] = "process"
    trace_uri: str | None = None
    # Acknowledged feedback is written here (fsync) before it goes to MLflow, and retried from here.
    feedback_spool: str = ".tuneline/gateway/feedback"
    # A request body over this many bytes is refused (413).
    max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)


class BackfillConfig(Section):
    """`tuneline backfill`: where each date's results live and how many dates are prepared at once."""

    # Per-date prepared data and the cached task results that make a rerun reuse them.
    work_dir: str = ".tuneline/backfill"
    # Dates prepared at the same time (retrain dates always run one after another, in date order).
    concurrency: int = Field(default=2, ge=1, le=32)


class ExecutionConfig(Section):
    """Where the data plane's per-partition work runs (tuneline/engines/): `local`, on this machine's
    cores (the default; needs no Ray), or `ray`, as Ray tasks (`pip install 'tuneline[ray]'`). The
    engine never changes a result, so this section is left out of the config hash."""

    engine: Literal["local", "ray"] = "local"
    # The Ray cluster: None starts a local Ray on demand (in this process's machine); "auto" joins the
    # cluster of this machine (`ray start --head`); "ray://HOST:10001" a remote cluster's Ray Client
    # (a KubeRay head service). Its workers need tuneline installed, at the same version.
    address: str | None = None
    # CPUs of the local Ray started on demand (None: every core); ignored when `address` is set.
    num_cpus: int | None = Field(default=None, ge=1, le=4096)
    # Bytes of the object store of the local Ray started on demand (None: Ray's default, 30% of the
    # machine's memory); objects beyond it spill to disk. Ignored when `address` is set (a cluster's
    # is set where it starts: `ray start --object-store-memory`).
    object_store_memory: int | None = Field(default=None, ge=75 * 2**20)  # Ray's least
    # Files per block: each block of input is read, validated and screened by one task (a Ray task,
    # or a process of the local engine).
    files_per_task: int = Field(default=1, ge=1, le=100_000)
    # An uncompressed JSONL file larger than this is read as parts of about this size, each a block
    # of its own, so one large file is spread over every core. What a worker holds grows with it: on
    # 2 cores, the screen of 1M chats peaked at 2.2 GiB (the flow and its workers) with 32 MiB blocks,
    # 1.6 with 8, 1.5 with 4, in the same time within the noise.
    block_bytes: int = Field(default=8 * 2**20, ge=1)
    # Processes of the local engine (None: one per core of this machine; 1: all in the flow's process).
    # Input of a single block is always read in the flow's process.
    workers: int | None = Field(default=None, ge=1, le=1024)
    # Records per map task of the near-duplicate search (band keys of a block of signatures), and
    # reduce tasks of its shuffle (None: one per map task, at least one per CPU of the cluster).
    block_records: int = Field(default=250_000, ge=1)
    shuffle_partitions: int | None = Field(default=None, ge=1, le=4096)
    # Tries of a task whose worker died (killed, out of memory, node lost) before the run fails.
    max_retries: int = Field(default=3, ge=0, le=100)
    # Threads of the flow's own process for the batch-wide rules' numpy work (tuneline/threads.py);
    # above 1, a large batch's quarantine lines and quality check are also made in processes of their
    # own beside the flow's (export.py's _QuarantineBeside, quality.py's QualityCheck). None: the
    # engine's choice. `local`: one per core, up to threads.MAX_FLOW_THREADS. `ray`: 1, since
    # its flow holds a batch too large for one machine, and each thread keeps its allocations in a
    # glibc arena of its own, which raised the ten-million-chat run's peak from 7.72 to 8.38 GiB. Set
    # it on a flow machine with memory to spare: there, the near-duplicate rules of ten million took
    # 347 s with 2 threads and 522 s with 1.
    flow_threads: int | None = Field(default=None, ge=1, le=64)


class Config(Section):
    project: str = "support-assistant"
    data: DataConfig
    model: ModelConfig = ModelConfig()
    validation: ValidationConfig = ValidationConfig()
    dedupe: DedupeConfig = DedupeConfig()
    export: ExportConfig = ExportConfig()
    cost: CostConfig = CostConfig()
    provider: ProviderConfig = ProviderConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    promotion: PromotionConfig = PromotionConfig()
    tracking: TrackingConfig = TrackingConfig()
    server: ServerConfig = ServerConfig()
    serving: ServingConfig = ServingConfig()
    backfill: BackfillConfig = BackfillConfig()
    execution: ExecutionConfig = ExecutionConfig()

    def config_hash(self) -> str:
        """sha256 of the canonical JSON form: equal configs hash equal whatever their YAML layout.
        `execution` and `serving` are left out: where the work runs and how the champion is served never
        change what a run produces. The method's keys
        are left out while they are unset, so a supervised config hashes as it did before the methods
        existed."""
        dumped = self.model_dump(mode="json", exclude={"execution", "serving"})
        training = dumped["training"]
        method_keys = ("method", "dpo", "reinforcement", "grader")
        if training["method"] == "supervised" and all(training[k] is None for k in method_keys[1:]):
            for key in method_keys:
                del training[key]
        canonical = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def method_problem(config: Config) -> str | None:
    """The first way the training method and the keys that go with it disagree, as `key: problem (fix)`;
    None when they agree. Checked after the schema, so each message names one key."""
    training = config.training
    method = training.method
    if training.dpo is not None and method != "dpo":
        return f"training.dpo: only used with training.method: dpo (remove it, or set method: dpo; method is {method})"
    if training.reinforcement is not None and method != "reinforcement":
        return (
            "training.reinforcement: only used with training.method: reinforcement (remove it, or set "
            f"method: reinforcement; method is {method})"
        )
    if training.grader is not None and method != "reinforcement":
        return (
            "training.grader: only used with training.method: reinforcement (remove it, or set "
            f"method: reinforcement; method is {method})"
        )
    if method == "reinforcement":
        if training.grader is None:
            return (
                "training.grader: required with training.method: reinforcement (add a grader object, e.g. "
                "{type: string_check, name: exact, input: '{{sample.output_text}}', reference: "
                "'{{item.reference_answer}}', operation: eq})"
            )
        problem = grader_problem(training.grader)
        if problem:
            return problem
    if method != "supervised" and config.export.general_mix_fraction > 0:
        return (
            f"export.general_mix_fraction: must be 0 with training.method: {method} (the general corpus "
            "holds chat examples, which a preference or reinforcement file cannot mix in; set it to 0)"
        )
    return None


def grader_problem(grader: dict[str, Any], path: str = "training.grader") -> str | None:
    """What is wrong with a hosted grader object, naming its key; None when it looks right.

    The shape (type, the keys that type needs, nested graders of a multi grader) is checked here, so
    a config without the server installed is checked too; when `tuneline serve`'s graders
    (tuneline/server/graders/) are installed, they parse it as the server will (templates, operations,
    metrics, the python source), so a grader the server would refuse stops the run before any upload.
    """
    kind = grader.get("type")
    if kind not in GRADER_TYPES:
        return f"{path}.type: must be one of {', '.join(GRADER_TYPES)} (got {kind!r})"
    for key in GRADER_REQUIRED_KEYS[str(kind)]:
        if key not in grader:
            return f"{path}.{key}: required for a {kind} grader (add it)"
    if kind == "multi":
        graders = grader["graders"]
        if not isinstance(graders, dict) or not graders:
            return f"{path}.graders: must be a mapping of names to graders (add at least one)"
        for name, inner in graders.items():
            if not isinstance(inner, dict):
                return f"{path}.graders.{name}: must be a grader object"
            problem = grader_problem(inner, f"{path}.graders.{name}")
            if problem:
                return problem
    if path != "training.grader":
        return None
    try:
        from tuneline.server.graders import GraderError, parse_grader  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # the server's graders are not installed: the shape above is what can be checked
        return None
    try:
        parse_grader(grader, "grader")
    except GraderError as exc:
        param = str(getattr(exc, "param", "") or "grader")
        key = "training." + (param if param.startswith("grader") else f"grader.{param}")
        return f"{key}: {getattr(exc, 'message', None) or exc} (fix the grader)"
    return None


class _ConfigLoader(yaml.SafeLoader):
    """YAML without implicit timestamps: `as_of: 2026-11-22` stays a string until the schema parses it,
    so an impossible date (2026-13-45) is an error naming its key, where PyYAML would raise a bare
    ValueError from inside the parser."""


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _field_path(error: Any) -> str:
    # Union branches appear in `loc` as tags like "literal['auto']" or "int": they are not keys.
    keys = [str(p) for p in error["loc"] if isinstance(p, int) or ("[" not in p and p not in _UNION_TAGS)]
    return ".".join(keys) or "(top level)"


_UNION_TAGS = {"int", "float", "str", "bool", "date", "constrained-int", "constrained-float"}


def parse_config(raw: dict[str, Any], origin: str = "config") -> Config:
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        path = _field_path(errors[0])
        same_field = [e for e in errors if _field_path(e) == path]
        first = errors[0]
        if first["type"] == "extra_forbidden":
            problem = "unknown key (check its spelling or remove it)"
        elif first["type"] == "missing":
            problem = "required key is missing"
        else:
            problem = " or ".join(dict.fromkeys(e["msg"].removeprefix("Input ") for e in same_field))
            got = first.get("input")
            if got is not None and not isinstance(got, dict | list):
                problem += f" (got {got!r})"
            if first["type"].startswith(("date_", "datetime_")):
                problem += "; write a date as YYYY-MM-DD"
        more = len({_field_path(e) for e in errors}) - 1
        tail = f" (and {more} more key{'s' if more > 1 else ''} to fix)" if more else ""
        raise ConfigError(f"{origin}: {path}: {problem}{tail}") from None
    mismatch = method_problem(config)
    if mismatch:
        raise ConfigError(f"{origin}: {mismatch}")
    return config


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate a YAML config; `overrides` are dotted keys (`data.as_of`) set on top."""
    if not path:
        path = resolve(DEFAULT_CONFIG)
        if not path.is_file():
            raise ConfigError(
                f"{project_root()}: no {DEFAULT_CONFIG.as_posix()} in the project folder (run tuneline in "
                "the folder that holds configs/ and data/, or pass --project DIR or --config FILE)"
            )
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (pass --config with an existing YAML file)")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_ConfigLoader) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where} (fix the syntax)") from None
    except (ValueError, RecursionError) as exc:  # a value PyYAML itself cannot build
        raise ConfigError(f"{path}: not valid YAML ({exc}; fix the value)") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return parse_config(raw, origin=str(path))
