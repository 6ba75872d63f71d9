"""The student: built from a preset, a config file or pretrained weights, checked against the cache's tokenizer."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from logitcache.storage import CacheLayout, CacheReader, CacheStore, LMHeadTransform, tokenizer_fingerprint
from logitcache.train.config import DEFAULT_KD, KDSettings
from logitcache.train.fused import fused_distillation_loss
from logitcache.train.losses import LossParts, TeacherTargets, chunked_distillation_loss, kd_loss_per_position
from logitcache.train.packing import decoder_inputs

__all__ = [
    "PRESETS",
    "StudentError",
    "Student",
    "student_kind",
    "load_cache_tokenizer",
    "build_student",
    "DistillModel",
    "EvalSums",
]

log = logging.getLogger(__name__)

# Llama-shaped students initialised from scratch; the vocabulary comes from the cache.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llama": {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "intermediate_size": 128,
        "tie_word_embeddings": True,
    },
    "small-llama": {
        "num_hidden_layers": 4,
        "hidden_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "intermediate_size": 688,
        "tie_word_embeddings": True,
    },
}
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class StudentError(ValueError):
    """The student cannot be trained on this cache; the message says why and what to do."""


@dataclass
class Student:
    model: Any  # a transformers PreTrainedModel (causal LM), float32 weights
    tokenizer: Any  # a transformers PreTrainedTokenizerFast matching the cache
    kind: str  # "preset" | "config" | "pretrained"
    vocab_size: int  # the tokenizer's vocabulary: logits beyond it (padding rows) are ignored


def student_kind(spec: str) -> str:
    """ "preset", "config" (a JSON/YAML model config file) or "pretrained" (a directory or hub id with weights)."""
    if spec in PRESETS:
        return "preset"
    p = Path(spec)
    if p.is_file() and p.suffix.lower() in (".json", ".yaml", ".yml"):
        return "config"
    if p.is_dir() and (p / "config.json").is_file() and not any((p / f).exists() for f in _WEIGHT_FILES):
        return "config"
    return "pretrained"


def _fingerprint(tok: Any, where: str) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise StudentError(f"{where}: a fast (tokenizer.json) tokenizer is needed to check it against the cache")
    return tokenizer_fingerprint(backend.to_str())


def _tokenizer_candidates(reader: CacheReader) -> list[str]:
    """Where the cache's tokenizer may be: local directories first (no hub round trips), then the name as a hub id.

    The manifest's tokenizer.name may be a path relative to where cache-teacher ran, or only the teacher's
    directory name; the capture's resolved config (manifest["config"]["teacher"]) holds the path it was given.
    """
    info = reader.manifest["tokenizer"]
    names = [n for n in (info.get("name"), (reader.manifest.get("config") or {}).get("teacher")) if n]
    local: list[str] = []
    if "://" not in reader.path:
        cache = Path(reader.path)
        local.append(str(CacheLayout(cache).tokenizer_dir))
        for n in names:
            local += [n, str(cache / n), str(cache.parent / n)]
    else:  # on object storage: the cache's own copy, downloaded once, then the names as local paths
        store = CacheStore(reader.path)
        copy = store.local_copy(store.layout.tokenizer_dir, version=str(info.get("fingerprint")))
        local += ([str(copy)] if copy is not None else []) + [str(n) for n in names]
    found = [c for c in dict.fromkeys(local) if (Path(c) / "tokenizer.json").is_file()]
    hub = [str(n) for n in names if not Path(str(n)).exists() and str(n).count("/") == 1]
    return found + hub


def load_cache_tokenizer(reader: CacheReader, override: str | None = None) -> Any:
    """The tokenizer that the cache's ids mean: `override` or the manifest's `tokenizer.name`, fingerprint-checked."""
    from transformers import AutoTokenizer

    info = reader.manifest["tokenizer"]
    name = override or info.get("name")
    candidates = [override] if override else _tokenizer_candidates(reader)
    if not candidates:
        raise StudentError(
            f"{reader.path}: cannot find the cache's tokenizer (manifest tokenizer.name {name!r} is not a directory "
            "here); pass `--tokenizer DIR` with the teacher's tokenizer files"
        )
    errors = []
    for cand in candidates:
        try:
            tok = AutoTokenizer.from_pretrained(cand)
            break
        except Exception as e:  # transformers raises OSError/ValueError/HF errors alike for a missing tokenizer
            errors.append(f"{cand}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    else:
        flag = "`--tokenizer`" if override else f"the manifest's tokenizer.name {name!r}"
        raise StudentError(
            f"cannot load the cache's tokenizer from {flag} ({'; '.join(errors)}); pass `--tokenizer DIR` pointing "
            "at the teacher's tokenizer files"
        )
    got, want = _fingerprint(tok, str(name)), info["fingerprint"]
    if got != want:
        raise StudentError(
            f"tokenizer {name!r} has fingerprint {got}, but the cache {reader.path} was captured with {want}: "
            "pass `--tokenizer` with the teacher's own tokenizer"
        )
    return tok


def _model_config(spec: str, kind: str, reader: CacheReader) -> Any:
    from transformers import AutoConfig

    max_len = int(reader.manifest["capture"].get("max_seq_len") or 2048)
    if kind == "preset":
        return AutoConfig.for_model(
            "llama", vocab_size=reader.padded_vocab_size, max_position_embeddings=max(2048, max_len), **PRESETS[spec]
        )
    p = Path(spec)
    path = p / "config.json" if p.is_dir() else p
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        doc = yaml.safe_load(path.read_text())
    else:
        doc = json.loads(path.read_text())
    if not isinstance(doc, dict):
        raise StudentError(f"`--student {spec}`: expected a mapping of model config fields")
    doc = dict(doc)
    model_type = doc.pop("model_type", "llama")
    doc.setdefault("vocab_size", reader.padded_vocab_size)
    doc.setdefault("max_position_embeddings", max(2048, max_len))
    for key in ("architectures", "transformers_version", "dtype", "torch_dtype"):
        doc.pop(key, None)
    return AutoConfig.for_model(model_type, **doc)


def build_student(spec: str, reader: CacheReader, tokenizer: str | None = None, seed: int = 0) -> Student:
    """The student model and tokenizer for a cache; refuses a tokenizer mismatch, aligns padded vocabularies.

    A pretrained student with its own tokenizer files must have the cache's tokenizer fingerprint. The student may
    have more logits than the tokenizer has tokens (padded embeddings, e.g. 151,936 vs 152,064): the extra rows are
    ignored by the loss. Fewer logits than tokens is an error.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind = student_kind(spec)
    cache_tok = load_cache_tokenizer(reader, tokenizer)
    want = reader.manifest["tokenizer"]["fingerprint"]
    if kind == "pretrained":
        own = None
        if Path(spec).is_dir() and any((Path(spec) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            own = AutoTokenizer.from_pretrained(spec)
        if own is not None:
            got = _fingerprint(own, spec)
            if got != want:
                raise StudentError(
                    f"`--student {spec}` uses a different tokenizer (fingerprint {got}) from the cache {reader.path} "
                    f"({want}): the cached teacher ids would mean other tokens to this student. Distill a student "
                    "that shares the teacher's tokenizer, or recapture the cache with one."
                )
        else:
            log.warning("%s has no tokenizer files; assuming it uses the cache's tokenizer", spec)
        try:
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)
        except Exception as e:
            raise StudentError(
                f"`--student {spec}`: cannot load pretrained weights ({type(e).__name__}: {e}); pass a model "
                f"directory, a config JSON/YAML, or a preset ({', '.join(PRESETS)})"
            ) from None
    else:
        cfg = _model_config(spec, kind, reader)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    width = model.get_output_embeddings().weight.shape[0]
    if width < reader.vocab_size:
        raise StudentError(
            f"`--student {spec}` has {width} output logits, fewer than the cache's {reader.vocab_size} tokens; use a "
            f"student whose vocab_size is at least {reader.vocab_size} (e.g. the cache's padded size "
            f"{reader.padded_vocab_size})"
        )
    model.config.use_cache = False
    return Student(model=model, tokenizer=cache_tok, kind=kind, vocab_size=reader.vocab_size)


class EvalSums(NamedTuple):
    """Held-out sums over a batch's loss positions, float64 scalars (summed over batches and ranks, then divided)."""

    ce: torch.Tensor  # student cross-entropy on the real next tokens
    kl: torch.Tensor  # forward KL(teacher || student) at T=1 on the bucketed support
    top1_agreements: torch.Tensor  # positions where the student's argmax is the teacher's top-1
    positions: torch.Tensor
    teacher_nll: torch.Tensor  # the teacher's own negative log-likelihood of the real next tokens

    @classmethod
    def zeros(cls, device: torch.device) -> EvalSums:
        return cls(*torch.zeros(len(cls._fields), dtype=torch.float64, device=device))

    def __add__(self, other: object) -> EvalSums:  # type: ignore[override]
        assert isinstance(other, EvalSums)
        return EvalSums(*(a + b for a, b in zip(self, other)))


class DistillModel(nn.Module):
    """A causal LM plus the distillation loss, so that DDP/FSDP see the whole step inside one forward.

    The student's full-vocabulary logits are only formed by the loss (`fused_distillation_loss`, or the reference
    `chunked_distillation_loss` with `--no-fused-loss`), a chunk of positions at a time, from the final hidden states
    and the output head sliced to the tokenizer's vocabulary.
    """

    def __init__(self, model: nn.Module, vocab_size: int, settings: KDSettings = DEFAULT_KD) -> None:
        super().__init__()
        self.model: Any = model  # a transformers PreTrainedModel
        self.vocab_size = vocab_size
        self.settings = settings
        self.head_transform = LMHeadTransform.from_config(model.config)

    def head_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The output embedding's weight [vocab_size, D] and bias (or None), padded rows skipped."""
        lm_head = self.model.get_output_embeddings()
        bias = lm_head.bias[: self.vocab_size] if getattr(lm_head, "bias", None) is not None else None
        return lm_head.weight[: self.vocab_size], bias

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """[C, D] hidden states -> [C, vocab_size] logits (padded rows of the output embedding skipped)."""
        return self.head_transform.apply(nn.functional.linear(hidden, *self.head_params()))

    def hidden_at(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Final hidden states [N, D] at `positions` (int64 [N] flat indices into input_ids' [B, L]). A packed batch
        (`attention_mask` numbering each row's sequences) runs with position ids restarted at every sequence and a
        block-causal mask (train/packing.py `decoder_inputs`), so each sequence sees only itself."""
        out = self.model.get_decoder()(input_ids=input_ids, use_cache=False, **decoder_inputs(attention_mask))
        hidden = out.last_hidden_state
        return hidden.reshape(-1, hidden.shape[-1])[positions]

    def forward(
        self, batch: dict[str, torch.Tensor], normalizer: float | None = None, evaluate: bool = False
    ) -> LossParts | EvalSums:
        """Training: the `LossParts` of a `collate` batch already on the device (total / normalizer carries the
        gradient). evaluate=True: its `EvalSums` instead; it runs through forward so that FSDP gathers."""
        hidden = self.hidden_at(batch["input_ids"], batch["attention_mask"], batch["positions"])
        if evaluate:
            return self._eval_sums(hidden, batch)
        return self.loss(hidden, batch, normalizer)

    def loss(
        self, hidden: torch.Tensor, batch: Mapping[str, torch.Tensor], normalizer: float | None = None
    ) -> LossParts:
        """The `LossParts` of final hidden states [N, D] at a batch's N loss positions (its `target_ids`,
        `target_probs`, `tail_mass` and `next_token_ids`): the training loss, also of train/hf.py's `KDTrainer`."""
        teacher = TeacherTargets.from_batch(batch)
        if self.settings.fused_loss:
            return fused_distillation_loss(
                hidden,
                *self.head_params(),
                teacher,
                batch["next_token_ids"],
                self.settings,
                normalizer=normalizer,
                transform=self.head_transform,
            )
        return chunked_distillation_loss(
            hidden, self.head, teacher, batch["next_token_ids"], self.settings, normalizer=normalizer
        )

    @torch.no_grad()
    def _eval_sums(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> EvalSums:
        sums = EvalSums.zeros(hidden.device)
        # forward KL at T=1 (with the tail bucket, unless the targets are sampled), whatever the training loss
        at_t1 = KDSettings(chunk_size=self.settings.chunk_size, target_mode=self.settings.target_mode)
        chunk = at_t1.chunk_size
        teacher = TeacherTargets.from_batch(batch)
        for s in range(0, hidden.shape[0], chunk):
            sl = slice(s, s + chunk)
            logits = self.head(hidden[sl]).float()
            ids, tgt = teacher.ids[sl], batch["next_token_ids"][sl]
            kl = kd_loss_per_position(logits, teacher.rows(sl), at_t1)
            agree = (logits.argmax(dim=-1) == ids[:, 0]) & (ids[:, 0] >= 0)
            sums = sums + EvalSums(
                ce=nn.functional.cross_entropy(logits, tgt, reduction="sum").double(),
                kl=kl.sum().double(),
                top1_agreements=agree.sum().double(),
                positions=torch.tensor(float(tgt.shape[0]), dtype=torch.float64, device=hidden.device),
                teacher_nll=-batch["next_token_logprobs"][sl].double().sum(),
            )
        return sums
