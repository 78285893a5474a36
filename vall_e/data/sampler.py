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
import random
import warnings
from typing import Any, Callable, Iterator, NamedTuple, Sequence

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
        self.costs = [int(c) for c in costs]
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
        self._cache: tuple[int, list[list[int]]] | None = None
        if self.frames_per_batch > 0:
            over = sum(c > self.frames_per_batch for c in self.costs)
            if over:
                warnings.warn(f"{over} of {len(self.costs)} utterances exceed frames_per_batch="
                              f"{self.frames_per_batch} on their own and are skipped; raise "
                              f"hyperparameters.frames_per_batch or lower dataset.duration_range to keep them",
                              stacklevel=2)

    # ----- the batches -----
    def _items(self, epoch: int) -> list[int]:
        items = list(self.epoch_items(epoch)) if self.epoch_items is not None else list(range(len(self.costs)))
        if self.frames_per_batch > 0:
            items = [i for i in items if self.costs[i] <= self.frames_per_batch]
        return items

    def _pack(self, items: list[int]) -> list[list[int]]:
        """Consecutive items (sorted by cost) into batches within the budget or of batch_size."""
        batches: list[list[int]] = []
        if self.frames_per_batch <= 0:
            for i in range(0, len(items), self.batch_size):
                batches.append(items[i:i + self.batch_size])
            return batches
        cur: list[int] = []
        cur_max = 0
        cap = self.max_batch_size or 1 << 62
        for i in items:
            m = max(cur_max, self.costs[i])
            if cur and (m * (len(cur) + 1) > self.frames_per_batch or len(cur) >= cap):
                batches.append(cur)
                cur, m = [], self.costs[i]
            cur.append(i)
            cur_max = m
        if cur:
            batches.append(cur)
        return batches

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of an epoch, in order, before sharding (deterministic)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = random.Random(f"vall_e.sampler:{self.seed}:{epoch}")
        items = self._items(epoch)
        if self.shuffle:
            rng.shuffle(items)
            per_batch = self.batch_size if self.frames_per_batch <= 0 else max(
                1, self.frames_per_batch // max(1, _median([self.costs[i] for i in items] or [1])))
            pool = per_batch * self.pool_batches
        else:
            items.sort()
            pool = len(items) or 1
        batches: list[list[int]] = []
        for start in range(0, len(items), pool):
            chunk = sorted(items[start:start + pool], key=lambda i: self.costs[i])  # stable
            batches.extend(self._pack(chunk))
        if self.drop_last and self.frames_per_batch <= 0:
            full = [b for b in batches if len(b) == self.batch_size]
            batches = full or batches  # a tiny dataset keeps its one short batch
        if self.shuffle:
            rng.shuffle(batches)
        if self.world_size > 1 and batches:
            rem = len(batches) % self.world_size
            if rem and self.drop_last and len(batches) >= self.world_size:
                batches = batches[: len(batches) - rem]
            elif rem:
                pad = self.world_size - rem
                batches = batches + (batches * (pad // len(batches) + 1))[:pad]
        self._cache = (epoch, batches)
        return batches

    def rank_batches(self, epoch: int) -> list[list[int]]:
        return self.global_batches(epoch)[self.rank::self.world_size]

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


def _median(values: list[int]) -> int:
    s = sorted(values)
    return s[len(s) // 2]
