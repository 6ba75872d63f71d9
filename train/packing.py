"""Sequence packing: several sequences per batch row, attention kept inside each sequence.

A padded batch of sequences of unequal lengths spends compute on padding: a row is as wide as the batch's longest
sequence. Packing places the sequences of a batch one after the other in rows of that width (first fit, in the
batch's order), so fewer rows carry the same tokens. The student must then see each sequence as if it were alone:
its position ids restart at 0 at every sequence, and no token attends to another sequence's tokens.

How a packed batch says so (`collate(..., pack=True)`): `attention_mask` numbers the sequences of each row 1, 2, ...
(0 = padding) instead of holding 1 for every real token. `decoder_inputs` turns that into what transformers' causal
LMs take for packed input: `position_ids` restarting at each sequence and `attention_mask=None`, from which
`masking_utils.create_causal_mask` builds a block-causal mask (`find_packed_sequence_indices`: a new sequence starts
wherever the position ids do not step by 1). A batch whose rows hold one sequence each keeps the plain 0/1 mask and
is passed as before. Whether a model honours restarted position ids this way is measured, not assumed:
`packing_problem` runs its decoder on a packed probe and on the same sequences padded.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["RowPacker", "first_fit", "decoder_inputs", "packed_position_ids", "packing_problem"]

# Packed and padded hidden states of the probe agree to float32 rounding when packing is exact; a model that lets
# the second sequence attend to the first, or ignores the restarted positions, is off by O(1).
_PROBE_TOLERANCE = 1e-4


class RowPacker:
    """Rows of a batch filled first-fit in arrival order: a sequence goes to the first row with room for it in the
    row width (the longest sequence so far), else to a new row. Incremental, so a token budget can be checked before
    each sequence is added, and the stream and `collate` lay a batch out the same way. `pack=False` only counts the
    sequences and the longest (a padded batch's layout needs no search)."""

    def __init__(self, pack: bool = True) -> None:
        self.pack = pack
        self.width = self.count = 0
        self.fills: list[int] = []  # tokens in each row
        self.rows: list[list[int]] = []  # each row's sequences, as indices in arrival order

    def _row_for(self, length: int, width: int) -> int:
        """The row a sequence of `length` tokens would go to at row width `width` (len(rows): a new row)."""
        return next((r for r, fill in enumerate(self.fills) if fill + length <= width), len(self.fills))

    def cost(self, length: int) -> int:
        """Padded tokens (rows x width) of the batch once a sequence of `length` tokens is added."""
        width = max(self.width, length)
        return (len(self.fills) + (self._row_for(length, width) == len(self.fills))) * width

    def add(self, length: int) -> None:
        self.width = max(self.width, length)
        self.count += 1
        if not self.pack:
            return
        r = self._row_for(length, self.width)
        if r == len(self.fills):
            self.fills.append(0)
            self.rows.append([])
        self.fills[r] += length
        self.rows[r].append(self.count - 1)

    def __len__(self) -> int:
        return self.count


def first_fit(lengths: list[int]) -> list[list[int]]:
    """The `RowPacker` layout of sequences of these lengths: each row's sequences, as indices into `lengths`."""
    packer = RowPacker()
    for n in lengths:
        packer.add(n)
    return packer.rows


def packed_position_ids(segments: torch.Tensor) -> torch.Tensor:
    """int64 [R, W] position ids restarting at 0 wherever the segment number changes along a row (the padding after
    a row's last sequence is a segment of its own)."""
    width = segments.shape[1]
    index = torch.arange(width, device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def decoder_inputs(attention_mask: torch.Tensor) -> dict[str, Any]:
    """The decoder's mask arguments for a batch's attention_mask: a packed batch's sequence numbers (some > 1) become
    restarted `position_ids` and no mask (block-causal, see the module docstring); a 0/1 mask passes as it is.
    (A look at the mask's maximum: one device sync per forward on CUDA.)"""
    if attention_mask.numel() and int(attention_mask.max()) > 1:
        return {"attention_mask": None, "position_ids": packed_position_ids(attention_mask)}
    return {"attention_mask": attention_mask}


def packing_problem(model: Any) -> str | None:
    """Why packed batches would not give this causal LM the hidden states of the same sequences padded (None: they
    do, to float32 rounding). Runs its decoder, in eval mode and without gradients, on two short random sequences
    packed into one row and padded into two rows, through `decoder_inputs` as training does."""
    if getattr(model.config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model"
    decoder = model.get_decoder()
    vocab = int(model.get_input_embeddings().weight.shape[0])
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    first, second = torch.randint(0, vocab, (5,), generator=gen), torch.randint(0, vocab, (3,), generator=gen)
    padded = torch.zeros((2, 5), dtype=torch.int64)
    padded[0], padded[1, :3] = first, second
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    packed, segments = torch.cat([first, second])[None], torch.tensor([[1, 1, 1, 1, 1, 2, 2, 2]])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = decoder(input_ids=padded.to(device), use_cache=False, **decoder_inputs(mask.to(device)))
            try:
                got = decoder(input_ids=packed.to(device), use_cache=False, **decoder_inputs(segments.to(device)))
            except Exception as e:  # a model-specific refusal of packed arguments means: don't pack this model
                why = str(e).splitlines()[0] if str(e) else ""
                return f"its decoder refused packed input ({type(e).__name__}: {why})"
    finally:
        model.train(was_training)
    want = torch.cat([ref.last_hidden_state[0], ref.last_hidden_state[1, :3]]).float()
    err = float((got.last_hidden_state[0].float() - want).abs().max())
    if not err <= _PROBE_TOLERANCE * max(1.0, float(want.abs().max())):
        return (
            f"its attention does not keep packed sequences apart with restarted position ids (packed vs padded hidden "
            f"states differ by {err:.3g})"
        )
    return None
