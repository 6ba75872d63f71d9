"""TrainConfig: every option of `logitcache train-student`, validated at once (no torch: the CLI imports it)."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from dataclasses import dataclass, field, fields
from typing import Any

from logitcache.storage.options import option, settings_from
from logitcache.storage.targets import TARGET_MODES

__all__ = [
    "LOSSES",
    "SCHEDULES",
    "DTYPES",
    "REPORT_TO",
    "TARGET_MODES",
    "TrainConfig",
    "KDSettings",
    "DEFAULT_KD",
    "EvalSettings",
    "ConfigError",
    "parse_batch_size",
]

LOSSES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl")
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("auto", "float32", "bfloat16")
REPORT_TO = ("none", "tensorboard", "wandb")
# Why a sampled cache trains with forward KL at T=1 only (the messages of KDSettings and TrainConfig.cache_problems).
_SAMPLED_LOSS_WHY = (
    "needs the teacher's probability of the student's own tokens, which a sampled cache does not hold (only "
    "forward KL, linear in the teacher's probabilities, has an unbiased gradient from sampled tokens)"
)
_SAMPLED_TEMPERATURE_WHY = "the tokens were drawn from the teacher at T=1 (a tempered proposal is not built)"
_BATCH_RE = re.compile(r"^\s*(\d+)\s*(seq|seqs|sequences|tok|tokens|t)?\s*$")


class ConfigError(ValueError):
    """Invalid training options; the message lists every problem with the flag that caused it."""


@dataclass(frozen=True)
class KDSettings:
    """How the distillation loss is computed: built once (`TrainConfig.kd_settings()`) and passed to the loss, the
    model wrapper, evaluation and the benchmarks. The defaults are those of `train-student`."""

    loss: str = "forward_kl"  # divergence on the bucketed support: one of LOSSES
    beta: float | None = None  # jsd / skew_kl mixing weight in (0, 1)
    temperature: float = 1.0  # T > 0; the KD term is scaled by T^2
    alpha: float = 1.0  # weight of the KD term against CE on the real next tokens (1 = pure KD)
    no_tail: bool = False  # drop the tail bucket and renormalise the teacher head (the biased baseline)
    chunk_size: int = 512  # positions whose full-vocabulary logits exist at once
    fused_loss: bool = True  # train/fused.py (one pass, closed-form gradient); False: the reference in train/losses.py
    # The cache's target mode (its TargetSpec.mode). "sampled": the weights stand for the whole distribution, there
    # is no tail bucket, and forward KL is soft cross-entropy against the student's full-vocabulary log-softmax
    # (forward_kl at T=1 only). "topk"/"adaptive": the head + tail buckets, every loss.
    target_mode: str = "topk"

    def __post_init__(self) -> None:
        errors = []
        if self.loss not in LOSSES:
            errors.append(f"loss {self.loss!r} is unknown; choose one of {', '.join(LOSSES)}")
        if self.loss in ("jsd", "skew_kl") and (self.beta is None or not 0.0 < self.beta < 1.0):
            errors.append(f"loss {self.loss!r} needs beta in (0, 1), got {self.beta!r}")
        if not self.temperature > 0:
            errors.append(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            errors.append(f"alpha must be in [0, 1], got {self.alpha}")
        if self.chunk_size < 1:
            errors.append(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.target_mode not in TARGET_MODES:
            errors.append(f"target_mode {self.target_mode!r} is unknown; choose one of {', '.join(TARGET_MODES)}")
        if self.sampled:
            if self.loss != "forward_kl":
                errors.append(f"loss {self.loss!r} can't train on sampled targets: it {_SAMPLED_LOSS_WHY}")
            if self.temperature != 1.0:
                errors.append(
                    f"temperature {self.temperature} can't be used with sampled targets: {_SAMPLED_TEMPERATURE_WHY}"
                )
            if self.no_tail:
                errors.append("no_tail does not apply to sampled targets: they have no tail bucket to drop")
        if errors:
            raise ConfigError("invalid KD settings: " + "; ".join(errors))

    @property
    def sampled(self) -> bool:
        """Whether the targets are sampled: no tail bucket, forward KL as soft cross-entropy (see target_mode)."""
        return self.target_mode == "sampled"


DEFAULT_KD = KDSettings()  # the defaults; frozen, so safe to share as a default argument


@dataclass(frozen=True)
class EvalSettings:
    """Which held-out sequences an evaluation reads and how it batches them: built once
    (`TrainConfig.eval_settings()`) and passed to `evaluate`."""

    eval_fraction: float  # share of sequence ids held out (chosen by hash, never trained on)
    batch_count: int = 8  # sequences or tokens per batch (`batch_unit`)
    batch_unit: str = "sequences"
    max_sequences: int = 0  # at most this many held-out sequences (0: all)


def parse_batch_size(value: str | int) -> tuple[int, str]:
    """ "8" / "8seq" -> (8, "sequences"); "4096tok" / "4096t" -> (4096, "tokens"). Raises ConfigError otherwise."""
    m = _BATCH_RE.match(str(value))
    if not m:
        raise ConfigError(
            f"`--batch-size {value}`: expected a number of sequences (e.g. 8) or of tokens (e.g. 4096tok)"
        )
    unit = "tokens" if (m.group(2) or "").startswith("t") else "sequences"
    return int(m.group(1)), unit


@dataclass(frozen=True)
class TrainConfig:
    """Options of one student run; each field is the CLI flag of the same name (underscores -> dashes)."""

    cache: str = option(help="Cache directory (or URL) written by `logitcache cache-teacher`.")
    student: str = option(
        help="HF causal LM to train: a directory/hub id with weights, a config JSON/YAML to initialise from scratch, or a preset (`tiny-llama`, `small-llama`) initialised from scratch with the cache's padded vocabulary."
    )
    output: str = option(help="Run directory: config.json, metrics.jsonl, curves.png, checkpoints/step-N/, final/.")
    tokenizer: str | None = option(
        None, "Tokenizer directory or id; default: the manifest's `tokenizer.name`. Must match the cache's fingerprint."
    )
    loss: str = option(
        "forward_kl", "KD divergence on the bucketed support: forward_kl, reverse_kl, jsd, tvd or skew_kl."
    )
    beta: float | None = option(
        None, "Mixing weight in (0, 1) for `jsd` (M = beta P + (1-beta) Q) and `skew_kl`; unused by the other losses."
    )
    temperature: float = option(1.0, "Distillation temperature T > 0; the KD term is scaled by T^2.")
    alpha: float = option(
        1.0,
        "Weight of the KD term: 1 = pure distillation, 0 = plain cross-entropy on the real next tokens. Default 1: the best of 0, 0.25, 0.5, 0.75, 1 at equal steps on the demo (BENCHMARKS.md, 'Choosing alpha').",
    )
    top_k_used: int | None = option(
        None, "Use only the first K cached entries per position (the rest joins the tail bucket); default: all."
    )
    no_tail: bool = option(
        False, "Drop the tail bucket and renormalise the teacher's head (the biased baseline, for comparisons)."
    )
    steps: int | None = option(None, "Optimizer steps to train; exclusive with `epochs`. Default: one epoch.")
    epochs: float | None = option(
        None, "Passes over the training split (converted to steps from the cache's counts); exclusive with `steps`."
    )
    batch_size: str = option("8", 'Micro-batch per rank: sequences ("8") or a padded-token budget ("4096tok").')
    grad_accum: int = option(1, "Micro-batches per optimizer step.")
    lr: float | None = option(
        None, "Peak learning rate; default 1e-3 for a student initialised from scratch, 5e-5 for pretrained weights."
    )
    warmup: float = option(0.05, "Warmup: a number of steps (>= 1) or a fraction of the steps (< 1).")
    schedule: str = option("cosine", "Learning-rate decay after warmup: cosine, linear or constant.")
    weight_decay: float = option(0.01, "AdamW weight decay (not applied to biases and norms).")
    max_grad_norm: float = option(1.0, "Gradient clipping threshold (L2 norm); 0 disables it.")
    seed: int = option(0, "Seeds the data order (with the epoch) and the student's initialisation.")
    dtype: str = option(
        "auto", "Autocast dtype: auto (bfloat16 on CUDA, float32 on CPU), float32 or bfloat16. Weights stay float32."
    )
    grad_checkpointing: bool = option(
        False, "Recompute the student's layer activations in backward (less memory, ~30% more compute)."
    )
    compile: bool = option(False, "torch.compile the student.")
    fsdp: bool = option(False, "Shard the student with FSDP2 (`fully_shard`) instead of DDP; CUDA only.")
    kd_chunk_size: int = option(512, "Positions whose full-vocabulary logits are materialised at once in the loss.")
    fused_loss: bool = option(
        True,
        "Compute the loss and its gradient in one pass per chunk (train/fused.py); `--no-fused-loss` runs the reference implementation (autograd, recomputed in backward), for comparisons.",
    )
    shuffle_parts: int = option(
        8,
        "Parts (row groups, or slices of one) whose sequences each reader shuffles together: a shuffle buffer; more mixes better, each costs one decoded row group of memory.",
    )
    pack: bool = option(
        True,
        "Pack several sequences per batch row (first fit, rows as wide as the batch's longest sequence) with position ids restarted and attention kept inside each sequence, so padding costs no compute. Used where it is exact: checked on the student at start-up (a packed probe against the same sequences padded); otherwise batches are padded, with a warning. With a token budget a packed batch takes more sequences.",
    )
    eval_fraction: float = option(
        0.05, "Share of sequence ids held out (by a hash of the id) for evaluation; never trained on."
    )
    eval_every: int = option(0, "Evaluate on the held-out split every N steps (0: only at the end).")
    eval_max_sequences: int = option(256, "At most this many held-out sequences per evaluation (0: all).")
    save_every: int = option(200, "Write a resumable checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = option(2, "How many step-N checkpoints to keep (the oldest are deleted).")
    num_workers: int = option(1, "DataLoader worker processes per rank (0: load in the training process).")
    log_every: int = option(1, "Write a metrics.jsonl line (and refresh the progress bar) every N steps.")
    resume: bool = option(
        False, "Continue the run in `output` from its latest checkpoint, with exactly the batches it would have seen."
    )
    init_from: str | None = option(
        None,
        "A previous run directory to continue from on this --cache (an on-policy round): the student's weights, the optimizer state and the learning-rate schedule come from its latest checkpoint, steps are numbered on from its step, and --steps/--epochs are this run's additional steps. --student is then not needed.",
    )
    schedule_steps: int | None = option(
        None,
        "Steps the warmup + decay schedule spans. Default: this run's last step, or with --init-from the previous run's schedule (so chained rounds follow one schedule: give the first round R x --steps).",
    )
    progress: bool = option(True, "Show a progress bar (rank 0 only).")
    report_to: str = option(
        "none",
        "Also report the metrics (rank 0) to `tensorboard` (RUN_DIR/tensorboard) or `wandb` (mode from WANDB_MODE, files in RUN_DIR/wandb), or `none`; metrics.jsonl and curves.png are written either way. Needs `pip install 'logitcache[tracking]'` (tensorboard) or wandb.",
    )
    batch_unit: str = field(default="sequences", init=False)
    """Derived from `batch_size`: "sequences" or "tokens"."""
    batch_count: int = field(default=8, init=False)
    """Derived from `batch_size`: the number of sequences or tokens."""

    def __post_init__(self) -> None:
        errors: list[str] = []
        if not self.cache:
            errors.append("`--cache` is required: the cache directory written by `logitcache cache-teacher`")
        if not self.student and not self.init_from:
            errors.append("`--student` is required: a model directory, a config JSON/YAML, or a preset (tiny-llama)")
        if not self.output:
            errors.append("`--output` is required: the run directory to write")
        if self.loss not in LOSSES:
            errors.append(f"`--loss {self.loss}` is unknown; choose one of {', '.join(LOSSES)}")
        if self.loss in ("jsd", "skew_kl"):
            if self.beta is None or not 0.0 < self.beta < 1.0:
                errors.append(f"Can't use `--loss {self.loss}` without `--beta` in (0, 1), got {self.beta}")
        elif self.beta is not None:
            errors.append(f"`--beta` only applies to `--loss jsd` or `--loss skew_kl`, not `--loss {self.loss}`")
        if not self.temperature > 0:
            errors.append(f"`--temperature` must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            errors.append(f"`--alpha` must be in [0, 1] (1 = pure KD, 0 = plain CE), got {self.alpha}")
        if self.top_k_used is not None and self.top_k_used < 1:
            errors.append(f"`--top-k-used` must be >= 1, got {self.top_k_used}")
        if self.steps is not None and self.epochs is not None:
            errors.append("Can't provide both `--steps` and `--epochs`. Choose one.")
        if self.steps is not None and self.steps < 1:
            errors.append(f"`--steps` must be >= 1, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            errors.append(f"`--epochs` must be > 0, got {self.epochs}")
        try:
            count, unit = parse_batch_size(self.batch_size)
            if count < 1:
                errors.append(f"`--batch-size` must be >= 1, got {self.batch_size}")
            object.__setattr__(self, "batch_count", count)
            object.__setattr__(self, "batch_unit", unit)
        except ConfigError as e:
            errors.append(str(e))
        for name in ("grad_accum", "kd_chunk_size", "keep_checkpoints", "log_every", "shuffle_parts"):
            if getattr(self, name) < 1:
                errors.append(f"`--{name.replace('_', '-')}` must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "num_workers", "eval_max_sequences", "max_grad_norm", "weight_decay"):
            if getattr(self, name) < 0:
                errors.append(f"`--{name.replace('_', '-')}` must be >= 0, got {getattr(self, name)}")
        if self.seed < 0:
            errors.append(f"`--seed` must be >= 0, got {self.seed}")
        if self.lr is not None and not self.lr > 0:
            errors.append(f"`--lr` must be > 0, got {self.lr}")
        if self.schedule_steps is not None and self.schedule_steps < 1:
            errors.append(f"`--schedule-steps` must be >= 1, got {self.schedule_steps}")
        if self.init_from is not None and self.student:
            errors.append(
                f"Can't provide both `--student {self.student}` and `--init-from {self.init_from}`: the student is the "
                "previous run's. Choose one."
            )
        if self.warmup < 0:
            errors.append(f"`--warmup` must be >= 0 (steps, or a fraction < 1 of the steps), got {self.warmup}")
        if self.schedule not in SCHEDULES:
            errors.append(f"`--schedule {self.schedule}` is unknown; choose one of {', '.join(SCHEDULES)}")
        if self.report_to not in REPORT_TO:
            errors.append(f"`--report-to {self.report_to}` is unknown; choose one of {', '.join(REPORT_TO)}")
        elif self.report_to != "none" and importlib.util.find_spec(self.report_to) is None:
            errors.append(
                f"`--report-to {self.report_to}` needs the {self.report_to} package: pip install "
                + ("'logitcache[tracking]'" if self.report_to == "tensorboard" else "wandb")
            )
        if self.dtype not in DTYPES:
            errors.append(f"`--dtype {self.dtype}` is unknown; choose one of {', '.join(DTYPES)}")
        if not 0.0 <= self.eval_fraction < 1.0:
            errors.append(f"`--eval-fraction` must be in [0, 1), got {self.eval_fraction}")
        if self.eval_every and self.eval_fraction == 0:
            errors.append("Can't use `--eval-every` with `--eval-fraction 0`: there is no held-out split")
        if errors:
            raise ConfigError("invalid training options:\n  - " + "\n  - ".join(errors))

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.init]

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> TrainConfig:
        """A config from a mapping of field names (dashes or underscores); unknown keys are an error."""
        known = set(cls.field_names())
        clean = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(clean) - known - {"batch_unit", "batch_count"})
        if unknown:
            raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**{k: v for k, v in clean.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def cache_problems(self, target_mode: str, cache_top_k: int, cache: str) -> list[str]:
        """What these options can't do with a cache of this target mode and width M (`cache_top_k`), each naming the
        flag, the cache's mode and why; empty when the run can start. Checked before training starts."""
        out = []
        if self.top_k_used is not None and self.top_k_used > cache_top_k:
            out.append(f"`--top-k-used {self.top_k_used}` exceeds the cache's top_k {cache_top_k}; use at most that")
        if target_mode != "sampled":
            return out
        where = f"the cache {cache} holds sampled targets (targets mode 'sampled')"
        if self.loss != "forward_kl":
            out.append(
                f"Can't use `--loss {self.loss}`: {where}, and {self.loss} {_SAMPLED_LOSS_WHY}. Use `--loss "
                "forward_kl`, or a cache captured with `--targets topk` or `adaptive`"
            )
        if self.temperature != 1.0:
            out.append(
                f"Can't use `--temperature {self.temperature}`: {where}, and {_SAMPLED_TEMPERATURE_WHY}. Use "
                "`--temperature 1`"
            )
        if self.top_k_used is not None:
            out.append(
                f"Can't use `--top-k-used {self.top_k_used}`: {where}; folding entries into the tail is wrong there "
                "(a sampled token's weight stands for a share of the residual mass, and the sampled loss has no tail "
                "bucket to fold into). Drop `--top-k-used`"
            )
        if self.no_tail:
            out.append(f"Can't use `--no-tail`: {where}, which have no tail bucket to drop. Drop `--no-tail`")
        return out

    def kd_settings(self, target_mode: str = "topk") -> KDSettings:
        """The loss settings of this run on a cache of `target_mode` (its TargetSpec.mode)."""
        return settings_from(KDSettings, self, chunk_size=self.kd_chunk_size, target_mode=target_mode)

    def eval_settings(self) -> EvalSettings:
        """The held-out evaluation of this run (`--eval-fraction`, `--eval-max-sequences`, the batch size)."""
        return settings_from(EvalSettings, self, max_sequences=self.eval_max_sequences)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)
