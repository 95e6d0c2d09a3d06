"""Resumable batch sources the training loop reads (see `train/loop.py` for the contract).

- `TokenWindowSource`: fixed-length windows over a flat token stream (the shards `data prepare` writes) —
  pretraining. Documents are concatenated with EOS between them and windows cross document boundaries, as in
  the LLaMA/GPT recipes: no segment ids, every position trains.
- `ExampleBatchSource`: variable-length examples (token ids + loss mask) — SFT. Either *packed*: several
  examples share one row, with `segment_ids` so attention never crosses an example and `positions` restarting
  at 0 for each one (no pad tokens to waste compute on); or *padded*: one example per row, right-padded, with
  an `attention_mask`.

Both are deterministic functions of (seed, global batch index): rank r of W takes rows
[r*B, (r+1)*B) of every global batch of W*B rows, so W processes with micro-batch B see exactly the rows one
process with micro-batch W*B sees. `state_dict()` is {"batches": n} (how many batches were handed out), which
is all a resumed run needs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor


def rank_and_world_for(rank: int | None, world: int | None) -> tuple[int, int]:
    """The given (rank, world size), else the initialised process group's, else (0, 1)."""
    if rank is not None and world is not None:
        return rank, world
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class TokenWindowSource:
    """Batches of `micro_batch_size` windows of `seq_len` tokens (+1 for the shifted labels).

    Windows start every `seq_len` tokens of the concatenated shards. With shuffle=True (training) the source
    is endless: epoch e visits all windows in a permutation seeded by (seed, e). With shuffle=False (validation)
    it yields the windows in order once."""

    def __init__(self, shards: Sequence[np.ndarray | str | Path], seq_len: int, micro_batch_size: int, *,
                 shuffle: bool = True, seed: int = 0, dtype: str | np.dtype | None = None,
                 rank: int | None = None, world_size: int | None = None) -> None:
        self.arrays = [np.memmap(s, dtype=dtype or np.uint16, mode="r") if isinstance(s, (str, Path)) else s
                       for s in shards]
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.shuffle, self.seed = shuffle, seed
        self._rank, self._world = rank, world_size
        # (shard, start) of every full window; a window needs seq_len + 1 tokens.
        starts = [(i, s) for i, a in enumerate(self.arrays) for s in range(0, len(a) - seq_len, seq_len)]
        if not starts:
            longest = max((len(a) for a in self.arrays), default=0)
            raise ValueError(f"no shard holds a full window of {seq_len + 1} tokens (longest has {longest}); "
                             "use a smaller --seq-len or more data")
        self.starts = np.array(starts, dtype=np.int64)
        self.batches = 0

    @property
    def n_windows(self) -> int:
        return len(self.starts)

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches = int(state["batches"])

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_windows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)

    def _window(self, index: int) -> np.ndarray:
        shard, start = self.starts[index]
        return np.asarray(self.arrays[shard][start:start + self.seq_len + 1], dtype=np.int64)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        rank, world = rank_and_world_for(self._rank, self._world)
        B = self.micro_batch_size
        if not self.shuffle:
            self.batches = 0
        cached_epoch, order = -1, np.empty(0, dtype=np.int64)
        while True:
            first = (self.batches * world + rank) * B  # global row index of this rank's first row
            rows = []
            for g in range(first, first + B):
                epoch, pos = divmod(g, self.n_windows)
                if not self.shuffle and epoch > 0:
                    break
                if epoch != cached_epoch:
                    cached_epoch, order = epoch, self._order(epoch)
                rows.append(self._window(int(order[pos])))
            if not rows:
                return
            data = torch.from_numpy(np.stack(rows))
            self.batches += 1
            yield {"input_ids": data[:, :-1].contiguous(), "labels": data[:, 1:].contiguous()}
            if not self.shuffle and first + B >= self.n_windows:
                return


class MixedWindowSource:
    """Windows from two token streams in a fixed ratio: a `ratio` share of all rows comes from `secondary`
    (e.g. English text mixed into continued pretraining on Korean, to limit forgetting).

    Global row g is a secondary row when floor((g + 1) * ratio) > floor(g * ratio), so every batch holds the
    ratio to within one row and the choice depends on g alone; each stream is its own endless, seeded
    `TokenWindowSource` of single rows (rank r of W still gets its own rows of every global batch)."""

    def __init__(self, primary: Sequence[np.ndarray], secondary: Sequence[np.ndarray], ratio: float, seq_len: int,
                 micro_batch_size: int, *, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None) -> None:
        if not 0 < ratio < 1:
            raise ValueError(f"mix ratio must be in (0, 1), got {ratio}")
        self.ratio, self.micro_batch_size = ratio, micro_batch_size
        self._rank, self._world = rank, world_size
        self.streams = [TokenWindowSource(a, seq_len, 1, seed=seed + i, rank=0, world_size=1)
                        for i, a in enumerate((primary, secondary))]
        self._orders: list[tuple[int, np.ndarray]] = [(-1, np.empty(0, dtype=np.int64))] * 2
        self.batches = 0

    def _is_secondary(self, g: int) -> bool:
        return int((g + 1) * self.ratio) > int(g * self.ratio)

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches = int(state["batches"])

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        rank, world = rank_and_world_for(self._rank, self._world)
        B = self.micro_batch_size
        while True:
            rows = []
            for j in range(B):
                g = (self.batches * world + rank) * B + j  # this rank's global row
                which = int(self._is_secondary(g))
                # The stream's own row index: how many earlier global rows came from it (a closed form, so
                # resuming needs only the batch count).
                k = int((g + 1) * self.ratio) - 1 if which else g - int(g * self.ratio)
                stream = self.streams[which]
                epoch, pos = divmod(k, stream.n_windows)
                if self._orders[which][0] != epoch:
                    self._orders[which] = (epoch, stream._order(epoch))
                rows.append(stream._window(int(self._orders[which][1][pos])))
            self.batches += 1
            data = torch.from_numpy(np.stack(rows))
            yield {"input_ids": data[:, :-1].contiguous(), "labels": data[:, 1:].contiguous()}


class Example:
    """One tokenized training example: ids and a same-length bool mask of tokens the loss should predict."""

    __slots__ = ("ids", "loss_mask")

    def __init__(self, ids: Sequence[int], loss_mask: Sequence[bool] | None = None) -> None:
        self.ids = list(ids)
        self.loss_mask = [True] * len(self.ids) if loss_mask is None else [bool(m) for m in loss_mask]
        if len(self.loss_mask) != len(self.ids):
            raise ValueError("loss_mask must have one entry per token")

    def __len__(self) -> int:
        return len(self.ids)


def _shifted(example: Example, seq_len: int) -> tuple[list[int], list[int]]:
    """(inputs, labels) of at most seq_len positions: labels[t] = ids[t+1] where the mask says to learn it."""
    ids, mask = example.ids[:seq_len + 1], example.loss_mask[:seq_len + 1]
    labels = [tok if m else -100 for tok, m in zip(ids[1:], mask[1:])]
    return ids[:-1], labels


class ExampleBatchSource:
    """Batches of SFT examples, packed (default) or padded; see the module docstring."""

    def __init__(self, examples: Sequence[Example], seq_len: int, micro_batch_size: int, *, pack: bool = True,
                 pad_id: int = 0, shuffle: bool = True, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None) -> None:
        usable = [e for e in examples if len(e) >= 2]
        if not usable:
            raise ValueError("no example has at least 2 tokens")
        self.examples = usable
        self.seq_len, self.micro_batch_size, self.pack = seq_len, micro_batch_size, pack
        self.pad_id, self.shuffle, self.seed = pad_id, shuffle, seed
        self._rank, self._world = rank, world_size
        self.truncated = sum(1 for e in usable if len(e) > seq_len + 1)
        self.batches = 0
        self._epoch_rows: tuple[int, list[list[int]]] | None = None
        self.packed_rows = self._pack()
        self.rows_per_epoch = len(self.packed_rows)

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches = int(state["batches"])

    def _pack(self) -> list[list[int]]:
        """Rows of example indices (one per row when padding), fixed for the whole run. Packing greedily in a
        seeded shuffled order mixes lengths; epochs then reshuffle rows, so every epoch has the same row count."""
        order = (np.random.default_rng([self.seed, 0]).permutation(len(self.examples)) if self.shuffle
                 else np.arange(len(self.examples)))
        if not self.pack:
            return [[int(i)] for i in order]
        rows: list[list[int]] = []
        current: list[int] = []
        used = 0
        for i in order:
            n = min(len(self.examples[i]) - 1, self.seq_len)
            if current and used + n > self.seq_len:
                rows.append(current)
                current, used = [], 0
            current.append(int(i))
            used += n
        if current:
            rows.append(current)
        return rows

    def _rows(self, epoch: int) -> list[list[int]]:
        if self._epoch_rows is not None and self._epoch_rows[0] == epoch:
            return self._epoch_rows[1]
        rows = self.packed_rows
        if self.shuffle and epoch > 0:
            rows = [rows[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(rows))]
        self._epoch_rows = (epoch, rows)
        return rows

    def _collate(self, rows: list[list[int]]) -> dict[str, Tensor]:
        # Rows are padded to the longest in the batch, not to seq_len: padding carries no loss and attends to
        # nothing, so a small data set packed into part of one row does not pay for a whole row.
        T = max(sum(min(len(self.examples[i]) - 1, self.seq_len) for i in r) for r in rows)
        B = len(rows)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), -100, dtype=torch.long)
        segment_ids = torch.zeros((B, T), dtype=torch.long)
        positions = torch.zeros((B, T), dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.bool)
        for b, row in enumerate(rows):
            t = 0
            for seg, idx in enumerate(row, start=1):
                inp, lab = _shifted(self.examples[idx], self.seq_len)
                n = len(inp)
                input_ids[b, t:t + n] = torch.tensor(inp)
                labels[b, t:t + n] = torch.tensor(lab)
                segment_ids[b, t:t + n] = seg
                positions[b, t:t + n] = torch.arange(n)
                attention_mask[b, t:t + n] = True
                t += n
            # Padding at the end of a packed row forms its own segment (id 0) and carries no loss.
            if t < T:
                positions[b, t:] = torch.arange(T - t)
        if self.pack:
            return {"input_ids": input_ids, "labels": labels, "segment_ids": segment_ids, "positions": positions}
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        rank, world = rank_and_world_for(self._rank, self._world)
        B = self.micro_batch_size
        if not self.shuffle:
            self.batches = 0
        while True:
            first = (self.batches * world + rank) * B
            rows = []
            for g in range(first, first + B):
                epoch, pos = divmod(g, self.rows_per_epoch)
                if not self.shuffle and epoch > 0:
                    break
                rows.append(self._rows(epoch)[pos])
            if not rows:
                return
            self.batches += 1
            yield self._collate(rows)
            if not self.shuffle and first + B >= self.rows_per_epoch:
                return
