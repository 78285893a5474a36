"""A length-bucketing batch sampler with a frame budget, rank sharding and an exact resumable position.

Mixed utterance lengths in fixed-size batches cause padding waste and out-of-memory spikes. Here
items of similar cost (text + prompt + response frames) share a batch, and with `frames_per_batch`
each batch's padded size `max(cost) * len(batch)` stays within the budget, so memory stays flat.

Every epoch's batches are a pure function of (seed, epoch), so all ranks agree on them without
communicating, and a saved (epoch, position) resumes exactly. Each yielded item is an `ItemKey`
that also carries a per-item random seed, so a dataset's random choices (prompt pieces) do not
depend on which DataLoader worker serves the item.
"""
from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
from torch.utils.data import Sampler


class ItemKey(NamedTuple):
    """What a batch holds per item: the dataset index, its random seed, and where it sits."""

    index: int
    seed: int
    epoch: int
    position: int  # this rank's batches done in `epoch` once this item's batch is consumed


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A stable 63-bit seed for one item in one epoch (identical in every process)."""
    h = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


class LengthBucketSampler(Sampler[list[ItemKey]]):
    """Batches of indices grouped by cost, within `frames_per_batch` (or `batch_size` items each).

    costs: one number per dataset index (an upper bound on its padded sequence length).
    epoch_items: epoch -> the indices that make up that epoch (default: every index once); the
        datasets use it for speaker/group sampling.
    pool_batches: items are shuffled, cut into pools of about this many batches, sorted by cost
        inside a pool and packed; the batches are then shuffled. Larger pools waste less padding,
        smaller pools mix lengths more.
    drop_last: fixed-size mode drops the one incomplete batch (unless it is the only one); with
        several ranks, batches that do not divide evenly are dropped (else, or when there are
        fewer batches than ranks, the list is padded by repeating its start, as DistributedSampler
        does), so every rank runs the same number of steps.
    """

    def __init__(
        self,
        costs: Sequence[int],
        *,
        batch_size: int = 8,
        frames_per_batch: int = 0,
        max_batch_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        epoch_items: Callable[[int], Sequence[int]] | None = None,
        pool_batches: int = 64,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank {rank} for world size {world_size}")
        if frames_per_batch <= 0 and batch_size < 1:
            raise ValueError("batch_size must be positive when frames_per_batch is 0")
        self.costs = np.asarray(costs, dtype=np.int64).reshape(-1)
        self.batch_size = int(batch_size)
        self.frames_per_batch = int(frames_per_batch)
        self.max_batch_size = max_batch_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch_items = epoch_items
        self.pool_batches = max(1, pool_batches)
        self.epoch = 0
        self.position = 0
        self._cache: tuple[int, Batches] | None = None
        if self.frames_per_batch > 0:
            over = int((self.costs > self.frames_per_batch).sum())
            if over:
                warnings.warn(f"{over} of {len(self.costs)} utterances exceed frames_per_batch="
                              f"{self.frames_per_batch} on their own and are skipped; raise "
                              f"hyperparameters.frames_per_batch or lower dataset.duration_range to keep them",
                              stacklevel=2)

    # ----- the batches -----
    def _items(self, epoch: int) -> np.ndarray:
        items = (np.asarray(self.epoch_items(epoch), dtype=np.int64).reshape(-1) if self.epoch_items is not None
                 else np.arange(len(self.costs), dtype=np.int64))
        if self.frames_per_batch > 0:
            items = items[self.costs[items] <= self.frames_per_batch]
        return items

    def _pack(self, costs: np.ndarray, pool: int) -> np.ndarray:
        """Batch ends of the greedy frame-budget packing of items sorted by cost (ascending) inside each
        pool of `pool` items: an item joins while max cost x count stays within the budget and the cap
        allows. Every possible batch start's end is found at once (a vectorised binary search; the
        batch [s, e) costs c[e-1] * (e - s), which grows with e), then the chain of starts is walked."""
        n = len(costs)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        step = pool * max(1, (1 << 20) // pool)  # whole pools, about a million items at a time: bounded memory
        if n > step:
            return np.concatenate([lo + self._pack(costs[lo:lo + step], pool) for lo in range(0, n, step)])
        budget = self.frames_per_batch
        s = np.arange(n, dtype=np.int64)
        c = costs.astype(np.int64)
        hi = np.minimum((s // pool + 1) * pool, n)
        if self.max_batch_size:
            hi = np.minimum(hi, s + self.max_batch_size)
        hi = np.minimum(hi, s + np.maximum(1, budget // np.maximum(1, c)))
        lo = s + 1  # one item always fits (longer ones were filtered out)
        open_ = np.nonzero(lo < hi)[0]
        while len(open_):
            l, h = lo[open_], hi[open_]
            mid = (l + h + 1) // 2
            ok = c[mid - 1] * (mid - open_) <= budget
            lo[open_] = np.where(ok, mid, l)
            hi[open_] = np.where(ok, h, mid - 1)
            open_ = open_[lo[open_] < hi[open_]]
        ends: list[int] = []
        for start in range(0, n, pool):  # the chain of batch starts, one pool (a short list) at a time
            nxt = (lo[start:start + pool] - start).tolist()
            stop, e = len(nxt), 0
            while e < stop:
                e = nxt[e]
                ends.append(start + e)
        return np.asarray(ends, dtype=np.int64)

    def global_batches(self, epoch: int) -> "Batches":
        """All ranks' batches of an epoch, in order, before sharding (deterministic)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        h = hashlib.blake2b(f"vall_e.sampler:{self.seed}:{epoch}".encode(), digest_size=8).digest()
        rng = np.random.Generator(np.random.PCG64(int.from_bytes(h, "little")))
        items = self._items(epoch)
        n = len(items)
        if self.shuffle:
            items = items[rng.permutation(n)]
            if self.frames_per_batch > 0 and n:
                c = self.costs[items]
                median = int(np.partition(c, n // 2)[n // 2])
                per_batch = max(1, self.frames_per_batch // max(1, median))
            else:
                per_batch = self.batch_size
            pool = per_batch * self.pool_batches
        else:
            items = np.sort(items)
            pool = n or 1
        # sort by cost inside each pool (stable: ties keep the shuffled order)
        c = self.costs[items]
        key = (np.arange(n, dtype=np.int64) // pool) * (int(c.max(initial=0)) + 1) + c  # (pool, cost) in one int64
        items = items[np.argsort(key, kind="stable")]
        del c, key
        if self.frames_per_batch > 0:
            end = self._pack(self.costs[items], pool)
            start = np.concatenate([[0], end[:-1]]).astype(np.int64) if len(end) else end
        else:
            start = np.concatenate([np.arange(lo, min(n, lo + pool), self.batch_size) for lo in range(0, n, pool)]) \
                if n else np.zeros(0, dtype=np.int64)
            end = np.minimum(start + self.batch_size, np.minimum((start // pool + 1) * pool, n))
            if self.drop_last:
                full = (end - start) == self.batch_size
                if full.any():  # a tiny dataset keeps its one short batch
                    start, end = start[full], end[full]
        if self.shuffle and len(start):
            perm = rng.permutation(len(start))
            start, end = start[perm], end[perm]
        nb = len(start)
        if self.world_size > 1 and nb:
            rem = nb % self.world_size
            if rem and self.drop_last and nb >= self.world_size:
                start, end = start[: nb - rem], end[: nb - rem]
            elif rem:
                pad = np.arange(self.world_size - rem) % nb
                start, end = np.concatenate([start, start[pad]]), np.concatenate([end, end[pad]])
        batches = Batches(items, start, end)
        self._cache = (epoch, batches)
        return batches

    def rank_batches(self, epoch: int) -> "Batches":
        g = self.global_batches(epoch)
        return Batches(g.items, g.start[self.rank::self.world_size], g.end[self.rank::self.world_size])

    # ----- iteration and state -----
    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning on the next iteration."""
        self.epoch, self.position = int(epoch), 0

    def __len__(self) -> int:
        return len(self.rank_batches(self.epoch))

    def __iter__(self) -> Iterator[list[ItemKey]]:
        batches = self.rank_batches(self.epoch)
        if batches and self.position >= len(batches):  # resumed exactly at an epoch's end
            self.epoch, self.position = self.epoch + 1, 0
            batches = self.rank_batches(self.epoch)
        epoch = self.epoch
        while self.position < len(batches):
            pos = self.position
            self.position = pos + 1
            yield [ItemKey(i, item_seed(self.seed, epoch, i), epoch, pos + 1) for i in batches[pos]]
        self.epoch, self.position = epoch + 1, 0

    def state_dict(self, batch: dict[str, Any] | None = None) -> dict[str, int]:
        """The position to resume from: after the last batch yielded, or after `batch` when given.

        With DataLoader workers the sampler runs ahead of training by the prefetched batches, so a
        trainer should pass the last batch it actually trained on (its `epoch`/`position` keys).
        """
        epoch, pos = self.epoch, self.position
        if batch is not None:
            epoch, pos = int(batch["epoch"]), int(batch["position"])
        return {"seed": self.seed, "epoch": epoch, "position": pos, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume where `state_dict` was taken; a different world size keeps the global position."""
        self.seed = int(state.get("seed", self.seed))
        self._cache = None
        self.epoch = int(state["epoch"])
        pos = int(state["position"])
        old_ws = int(state.get("world_size", self.world_size))
        if old_ws != self.world_size:
            pos = pos * old_ws // self.world_size
        self.position = pos


class Batches(Sequence):
    """Batches as slices of one item array (no per-batch lists): batch k = items[start[k]:end[k]]."""

    def __init__(self, items: np.ndarray, start: np.ndarray, end: np.ndarray) -> None:
        self.items, self.start, self.end = items, np.asarray(start, dtype=np.int64), np.asarray(end, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.start)

    def __getitem__(self, k: Any) -> Any:
        if isinstance(k, slice):
            return Batches(self.items, self.start[k], self.end[k])
        return self.items[int(self.start[k]):int(self.end[k])].tolist()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Batches | list | tuple):
            return len(self) == len(other) and all(a == list(b) for a, b in zip(self, other))
        return NotImplemented

    def sizes(self) -> np.ndarray:
        return self.end - self.start
