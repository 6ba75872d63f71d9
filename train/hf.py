"""Training from a cache inside Hugging Face `Trainer` and TRL `SFTTrainer`, with train-student's own loss.

Three pieces, each usable alone:
- `CacheDataset` (map-style, one item per cached sequence) and `CacheSequenceStream` (iterable: train/data.py's
  rank/worker-disjoint, block-shuffled, resumable stream, one sequence at a time). An item holds the sequence's
  tokens, its loss mask and labels, and the sparse target view of every position as the cache stores it
  (`sequence_item`). `to_hf_dataset` turns either into a `datasets.Dataset` / `IterableDataset` (TRL wants those).
- `KDCollator`: pads items into [B, T] tokens and labels and [B, T, M] teacher targets (`KDCollator.__call__`),
  through train/data.py's `collate_rows`, so the ids folded into the tail are those train-student folds.
- `KDTrainer` (`transformers.Trainer`) and `KDTrainerMixin` (for `class MySFT(KDTrainerMixin, trl.SFTTrainer)`):
  `compute_loss` runs the wrapped model's own forward (DDP/accelerate hooks, autocast, gradient checkpointing as
  configured), takes the decoder's final hidden states at the loss positions and calls `DistillModel.loss`, the
  loss of train-student (the fused one unless `KDSettings(fused_loss=False)`).

Position convention (the cache's): entry t of `target_ids[b]` is the teacher's distribution that predicts token t+1,
so it trains where `labels[b, t + 1] != -100` (labels are unshifted, as HF causal LMs take them).

Normalisation: the loss is the sum over loss positions divided by `num_items_in_batch` (the Trainer's count of
labels != -100 over every micro-batch of the optimizer step, and over ranks with `average_tokens_across_devices`),
i.e. the mean over every loss position of the step, as train-student's `--grad-accum` computes it.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import Trainer

from logitcache.storage import CacheReader
from logitcache.storage.records import TargetRowGroup
from logitcache.train.config import DEFAULT_KD, KDSettings
from logitcache.train.data import CacheStream, Decoded, collate_rows, held_out_mask

__all__ = [
    "IGNORE_INDEX",
    "KDSettings",
    "sequence_item",
    "CacheDataset",
    "CacheSequenceStream",
    "to_hf_dataset",
    "KDCollator",
    "flat_targets",
    "KDTrainerMixin",
    "KDTrainer",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # labels of tokens that do not train (HF's convention)
_SPLITS = ("all", "train", "eval")


def sequence_item(group: TargetRowGroup, i: int) -> dict[str, Any]:
    """Sequence i of a decoded row group as a dataset item (copies, so the group can be freed).

    `input_ids` int64 [L]; `loss_mask` bool [L]; `labels` int64 [L] (input_ids where the token trains, -100 elsewhere
    and at token 0, which no position predicts); per position t (L-1 of them, predicting token t+1): `target_ids`
    int32 [L-1, M] (-1 padding), `target_probs` float32 [L-1, M], `tail_mass` float32 [L-1], `next_token_logprobs`
    float32 [L-1]; `sequence_id` and `num_samples` (draws per position of a sampled cache, else 0) ints.
    """
    t0, t1 = int(group.token_offsets[i]), int(group.token_offsets[i + 1])
    p0, p1 = int(group.position_offsets[i]), int(group.position_offsets[i + 1])
    input_ids = group.input_ids[t0:t1].astype(np.int64)
    loss_mask = group.loss_mask[t0:t1].copy()
    labels = np.where(loss_mask, input_ids, IGNORE_INDEX)
    labels[0] = IGNORE_INDEX
    return {
        "sequence_id": int(group.sequence_id[i]),
        "input_ids": input_ids,
        "loss_mask": loss_mask,
        "labels": labels,
        "target_ids": group.target_ids[p0:p1].copy(),
        "target_probs": group.target_probs[p0:p1].copy(),
        "tail_mass": group.tail_mass[p0:p1].copy(),
        "next_token_logprobs": group.next_token_logprobs[p0:p1].copy(),
        "num_samples": int(group.num_samples),
    }


def _array(value: Any, dtype: Any) -> np.ndarray:
    """An item's field as an array: numpy already, or nested lists (a `datasets` row without a numpy format)."""
    out = np.asarray(value)
    if out.dtype == object:  # a list of per-position arrays
        out = np.stack([np.asarray(v) for v in value])
    return out.astype(dtype, copy=False)


def _items_group(items: Sequence[Mapping[str, Any]]) -> TargetRowGroup:
    """Items (`sequence_item` dicts, or `datasets` rows of them) as one TargetRowGroup, in the given order."""
    ids = [_array(it["input_ids"], np.int64) for it in items]
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    token_offsets = np.concatenate([[0], np.cumsum(lengths)])

    def per_position(key: str, dtype: Any) -> np.ndarray:
        return np.concatenate([_array(it[key], dtype).reshape(len(x) - 1, -1) for it, x in zip(items, ids)])

    return TargetRowGroup(
        sequence_id=np.array([int(it["sequence_id"]) for it in items], dtype=np.int64),
        token_offsets=token_offsets,
        position_offsets=token_offsets - np.arange(len(items) + 1),
        input_ids=np.concatenate(ids),
        loss_mask=np.concatenate([_array(it["loss_mask"], bool) for it in items]),
        next_token_logprobs=np.concatenate([_array(it["next_token_logprobs"], np.float32) for it in items]),
        target_ids=per_position("target_ids", np.int32),
        target_probs=per_position("target_probs", np.float32),
        tail_mass=np.concatenate([_array(it["tail_mass"], np.float32) for it in items]),
        num_samples=max(int(it.get("num_samples", 0)) for it in items),
    )


class _CacheInfo:
    """What a collator and trainer need to know about a cache: its vocabulary, target mode and tokenizer."""

    cache: str
    vocab_size: int
    target_mode: str
    content_id: str

    def _read_info(self, reader: CacheReader) -> None:
        self.cache = reader.path
        self.vocab_size = reader.vocab_size
        self.target_mode = reader.targets.mode
        self.content_id = reader.content_id

    def collator(self, top_k_used: int | None = None) -> KDCollator:
        """The `KDCollator` of this cache (its vocabulary and target mode); `top_k_used` as train-student's flag."""
        return KDCollator(vocab_size=self.vocab_size, top_k_used=top_k_used, target_mode=self.target_mode)

    def load_tokenizer(self, tokenizer: str | None = None) -> Any:
        """The cache's tokenizer (fingerprint-checked, as train-student loads it): the `processing_class` to pass."""
        from logitcache.train.student import load_cache_tokenizer

        return load_cache_tokenizer(CacheReader(self.cache), tokenizer)


class CacheDataset(_CacheInfo, Dataset):
    """Map-style dataset of a finished cache: item i is the i-th sequence of `split` in storage order.

    split: "all" (every sequence), "train" or "eval": train-student's held-out split (`eval_fraction` of the
    documents, by a hash of the document id), so an HF eval set is the one `train-student --eval-fraction` holds out.
    Items are `sequence_item` dicts, read by decoding a whole row group (kept in an LRU of `cached_groups` groups):
    random access over a large cache decodes about one row group per item, so prefer `CacheSequenceStream` there.
    """

    def __init__(
        self, cache_dir: str, *, split: str = "all", eval_fraction: float = 0.0, cached_groups: int = 8
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {', '.join(_SPLITS)}, got {split!r}")
        if split != "all" and not 0.0 <= eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
        if cached_groups < 1:
            raise ValueError(f"cached_groups must be >= 1 (decoded row groups kept), got {cached_groups}")
        reader = CacheReader(cache_dir)
        self._read_info(reader)
        self.split, self.eval_fraction, self.cached_groups = split, eval_fraction, cached_groups
        self._groups: list[tuple[int, int]] = []
        where, rows = [], []
        for shard, group, n in reader.row_groups():
            if n == 0:
                continue
            keep = np.arange(n, dtype=np.int64)
            if split != "all":
                ids = reader.parquet_file(shard).read_row_group(group, columns=["sequence_id"]).column(0)
                held = held_out_mask(ids.to_numpy(), eval_fraction)
                keep = np.flatnonzero(held if split == "eval" else ~held)
            where.append(np.full(len(keep), len(self._groups), dtype=np.int64))
            rows.append(keep)
            self._groups.append((shard, group))
        self._where = np.concatenate(where) if where else np.zeros(0, dtype=np.int64)
        self._rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        self._reader: CacheReader | None = None
        self._lru: OrderedDict[int, TargetRowGroup] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} sequences")
        g = int(self._where[index])
        return sequence_item(self._group(g), int(self._rows[index]))

    def _group(self, g: int) -> TargetRowGroup:
        if g in self._lru:
            self._lru.move_to_end(g)
            return self._lru[g]
        if self._reader is None:  # opened in the process that reads (a DataLoader worker has its own)
            self._reader = CacheReader(self.cache)
        group = self._reader.read_targets(*self._groups[g])
        self._lru[g] = group
        if len(self._lru) > self.cached_groups:
            self._lru.popitem(last=False)
        return group

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None, "_lru": OrderedDict()}


class CacheSequenceStream(_CacheInfo, CacheStream):
    """The training (or held-out) stream of train/data.py, one `sequence_item` at a time: rank/worker-disjoint parts,
    shuffled per (seed, epoch) in blocks of `shuffle_parts`, endless for split="train" (give the Trainer `max_steps`),
    one pass for split="eval", with a `state_dict` of its position. Under HF `Trainer`/accelerate leave rank and
    world_size at 0 and 1: accelerate shards an iterable dataset over processes itself."""

    def __init__(
        self,
        cache_dir: str,
        *,
        seed: int = 0,
        split: str = "train",
        eval_fraction: float = 0.0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_parts: int = 8,
        max_sequences: int = 0,
    ) -> None:
        super().__init__(
            cache_dir,
            seed=seed,
            batch_count=1,
            batch_unit="sequences",
            eval_fraction=eval_fraction,
            split=split,
            rank=rank,
            world_size=world_size,
            max_sequences=max_sequences,
            shuffle_parts=shuffle_parts,
        )
        self._read_info(CacheReader(cache_dir))

    def _collate(self, pending: list[tuple[Decoded, int]], packer: Any, vocab: int, epoch: int = 0) -> Any:
        (part, row), *rest = pending  # batch_count=1: one sequence per "batch"
        assert not rest
        return sequence_item(part.group, row)


def _generate_items(source: CacheDataset | CacheSequenceStream, content_id: str) -> Iterator[dict[str, Any]]:
    """Every item of `source` (a module-level generator: `datasets` hashes it, and `content_id`, to cache the table)."""
    if isinstance(source, CacheDataset):
        yield from (source[i] for i in range(len(source)))
    else:
        yield from source


def to_hf_dataset(source: CacheDataset | CacheSequenceStream, cache_dir: str | None = None) -> Any:
    """`source` as a `datasets.Dataset` (from a CacheDataset: written once to an Arrow table in `cache_dir`, keyed by
    the cache's content id) or a `datasets.IterableDataset` (from a CacheSequenceStream: nothing copied). TRL's
    `SFTTrainer` takes only these; pass `SFTConfig(dataset_kwargs={"skip_prepare_dataset": True})` so it does not
    tokenize, and `data_collator=source.collator()`. Rows come back as nested lists; `KDCollator` takes them as is."""
    import datasets

    kwargs = {"source": source, "content_id": source.content_id}
    if isinstance(source, CacheDataset):
        return datasets.Dataset.from_generator(_generate_items, gen_kwargs=kwargs, cache_dir=cache_dir)
    return datasets.IterableDataset.from_generator(_generate_items, gen_kwargs=kwargs)


@dataclasses.dataclass(frozen=True)
class KDCollator:
    """Pads dataset items (`sequence_item` dicts) into a batch for `KDTrainer`; B items, T = the longest.

    Returns `input_ids` int64 [B, T] (`pad_token_id`-padded), `attention_mask` int64 [B, T] (1 = token),
    `labels` int64 [B, T] (-100 where the token does not train), and at the positions that train (t with
    labels[b, t+1] != -100; -1 / 0 elsewhere) the sparse target view: `target_ids` int64 [B, T, M] (-1 padding),
    `target_probs` float32 [B, T, M], `tail_mass` float32 [B, T], `next_token_logprobs` float32 [B, T]; and
    `sequence_id` int64 [B]. Built by train/data.py's `collate_rows`: entries beyond `top_k_used` and ids outside the
    tokenizer's `vocab_size` are folded into the tail exactly as train-student folds them (refused on sampled caches).
    """

    vocab_size: int  # the tokenizer's vocabulary (the cache's `tokenizer.vocab_size`)
    top_k_used: int | None = None  # the first K entries per position (the rest joins the tail); None: all
    target_mode: str = "topk"  # the cache's target mode (KDTrainer sets its KDSettings.target_mode from it)
    pad_token_id: int = 0  # fills input_ids past a sequence's end (never attended to nor trained)

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("KDCollator got an empty list of items")
        part = Decoded(_items_group(items))
        flat = collate_rows([(part, i) for i in range(len(items))], self.vocab_size, self.top_k_used)
        input_ids, attention = flat["input_ids"], flat["attention_mask"]
        batch, width = input_ids.shape
        positions = flat["positions"]
        labels = torch.full((batch * width,), IGNORE_INDEX, dtype=torch.int64)
        labels[positions + 1] = flat["next_token_ids"]

        def dense(values: torch.Tensor, fill: float) -> torch.Tensor:
            out = torch.full((batch * width, *values.shape[1:]), fill, dtype=values.dtype)
            out[positions] = values
            return out.reshape(batch, width, *values.shape[1:])

        return {
            "input_ids": input_ids.masked_fill(attention == 0, self.pad_token_id),
            "attention_mask": attention,
            "labels": labels.reshape(batch, width),
            "target_ids": dense(flat["target_ids"], -1),
            "target_probs": dense(flat["target_probs"], 0.0),
            "tail_mass": dense(flat["tail_mass"], 0.0),
            "next_token_logprobs": dense(flat["next_token_logprobs"], 0.0),
            "sequence_id": flat["sequence_id"],
        }


def flat_targets(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `KDCollator` batch at its N loss positions, in row-major order: the per-position keys of train/data.py's
    `collate` (`positions` int64 [N] flat into [B, T], `next_token_ids` [N], `target_ids` [N, M], `target_probs`
    [N, M], `tail_mass` [N], `next_token_logprobs` [N]), which `DistillModel.loss` takes."""
    labels = batch["labels"]
    width = labels.shape[1]
    trains = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
    b, t = trains.nonzero(as_tuple=True)
    positions = b * width + t

    def at(key: str) -> torch.Tensor:
        v = batch[key]
        return v.reshape(-1, *v.shape[2:])[positions]

    return {
        "positions": positions,
        "next_token_ids": labels[:, 1:][trains],
        "target_ids": at("target_ids"),
        "target_probs": at("target_probs"),
        "tail_mass": at("tail_mass"),
        "next_token_logprobs": at("next_token_logprobs"),
    }


class KDTrainerMixin:
    """Makes a `transformers.Trainer` subclass train on a cache with train-student's loss: put it first,
    `class MySFT(KDTrainerMixin, trl.SFTTrainer)`; `KDTrainer` is it on `transformers.Trainer`.

    Keyword arguments on top of the Trainer's: `kd` (`KDSettings`: loss, beta, temperature, alpha, no_tail,
    chunk_size, fused_loss; its target_mode is taken from the collator). `data_collator` must be a `KDCollator`
    (default: `train_dataset.collator()` when that is a CacheDataset/CacheSequenceStream). Sets
    `args.remove_unused_columns = False` (the targets are not arguments of the model's forward). `compute_loss_func`
    and label smoothing are refused: the loss is train-student's.
    """

    # Annotations of what the Trainer provides, for type checkers.
    args: Any
    accelerator: Any
    data_collator: Any
    model_accepts_loss_kwargs: bool

    def __init__(self, model: Any = None, *, kd: KDSettings | None = None, **kwargs: Any) -> None:
        collator = kwargs.get("data_collator")
        train_dataset = kwargs.get("train_dataset")
        if collator is None and isinstance(train_dataset, _CacheInfo):
            collator = kwargs["data_collator"] = train_dataset.collator()
        if not isinstance(collator, KDCollator):
            raise TypeError(
                f"{type(self).__name__} needs `data_collator=KDCollator(...)` (e.g. `CacheDataset(cache).collator()`), "
                f"got {type(collator).__name__}: the loss reads the teacher targets that KDCollator batches"
            )
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                f"{type(self).__name__} computes train-student's loss itself; drop `compute_loss_func` (choose the "
                "loss with `kd=KDSettings(loss=..., temperature=..., alpha=...)`)"
            )
        training_args = kwargs.get("args")
        if training_args is None:
            raise ValueError(f"{type(self).__name__} needs `args=TrainingArguments(...)` (or a TRL SFTConfig)")
        _check_args(type(self), training_args)
        self.kd_settings = dataclasses.replace(kd or DEFAULT_KD, target_mode=collator.target_mode)
        self.kd_vocab_size = collator.vocab_size
        self._distill: Any = None
        self._kd_sums = torch.zeros(3, dtype=torch.float64)  # kd sum, ce sum, positions since the last log
        super().__init__(model, **kwargs)  # type: ignore[call-arg]
        if self.args.n_gpu > 1:
            raise ValueError(
                f"{type(self).__name__} does not support nn.DataParallel (several GPUs in one process): launch one "
                "process per GPU with `torchrun` or `accelerate launch` (DDP), or set CUDA_VISIBLE_DEVICES to one GPU"
            )
        # compute_loss takes `num_items_in_batch` (so the Trainer counts it and leaves accumulation to the loss)
        self.model_accepts_loss_kwargs = True

    def _distill_model(self, model: Any) -> Any:
        """train-student's `DistillModel` around the unwrapped student (built once): its head slicing and loss."""
        from logitcache.train.student import DistillModel

        unwrapped = self.accelerator.unwrap_model(model)
        if self._distill is None or self._distill.model is not unwrapped:
            self._distill = DistillModel(unwrapped, self.kd_vocab_size, self.kd_settings)
        return self._distill

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        """train-student's loss of a `KDCollator` batch: alpha T^2 KD + (1 - alpha) CE summed over the loss positions,
        divided by `num_items_in_batch` (all micro-batches of the step) or, without it, by this batch's positions."""
        dm = self._distill_model(model)
        flat = flat_targets(inputs)
        hidden, outputs = _final_hidden(model, dm.model, inputs)
        n = int(flat["positions"].shape[0])
        norm = float(num_items_in_batch) if num_items_in_batch is not None else float(n)
        with self.accelerator.autocast():  # as train-student: the loss's matmuls in the bf16 flag's dtype
            parts = dm.loss(hidden.reshape(-1, hidden.shape[-1])[flat["positions"]], flat, max(norm, 1.0))
        loss = parts.total
        if getattr(self.args, "average_tokens_across_devices", False) and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # the count is over every rank; DDP averages the gradients
        if model.training:
            self._kd_sums += torch.tensor([float(parts.kd_sum), float(parts.ce_sum), float(n)], dtype=torch.float64)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds `kd_loss` and `ce_loss` (means per loss position on this rank since the last log) to training logs."""
        kd, ce, n = self._kd_sums.tolist()
        if "loss" in logs and n > 0:
            logs = {**logs, "kd_loss": kd / n, "ce_loss": ce / n}
            self._kd_sums.zero_()
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


def _check_args(cls: type, args: Any) -> None:
    """Refuses TrainingArguments that would break the loss; sets `remove_unused_columns=False`."""
    if getattr(args, "label_smoothing_factor", 0.0):
        raise ValueError(f"{cls.__name__}: label_smoothing_factor does not apply to distillation; set it to 0")
    if hasattr(cls, "_prepare_dataset"):  # TRL's SFTTrainer: it would tokenize (and truncate) the dataset
        kwargs = getattr(args, "dataset_kwargs", None)
        if not isinstance(kwargs, dict) or not kwargs.get("skip_prepare_dataset"):
            raise ValueError(
                f"{cls.__name__}: the cache is already tokenized and aligned with its targets; pass "
                "`args=SFTConfig(..., dataset_kwargs={'skip_prepare_dataset': True})` so that SFTTrainer does not "
                "tokenize, truncate or pack it"
            )
    if args.remove_unused_columns:
        log.info("setting remove_unused_columns=False: the teacher targets are not arguments of the model's forward")
        args.remove_unused_columns = False


def _final_hidden(model: Any, unwrapped: Any, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
    """(the decoder's last hidden states [B, T, D], the model's outputs) from one call of the (wrapped) model.

    The model's own forward runs, so DDP, accelerate's autocast and gradient checkpointing see the step; a forward
    hook on its decoder takes the hidden states train-student's `DistillModel.hidden_at` uses, and only the last
    position's logits are formed (`logits_to_keep=1`, where the model takes it)."""
    captured: list[torch.Tensor] = []

    def hook(module: Any, args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    kwargs: dict[str, Any] = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    params = inspect.signature(type(unwrapped).forward).parameters
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    if "use_cache" in params:
        kwargs["use_cache"] = False
    handle = unwrapped.get_decoder().register_forward_hook(hook)
    try:
        outputs = model(**kwargs)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(
            f"{type(unwrapped).__name__}: expected its decoder (get_decoder()) to run once per forward, saw "
            f"{len(captured)} calls; this model can't be trained through KDTrainer"
        )
    return captured[0], outputs


class KDTrainer(KDTrainerMixin, Trainer):
    """`transformers.Trainer` distilling from a cache with train-student's loss (see `KDTrainerMixin`)."""
