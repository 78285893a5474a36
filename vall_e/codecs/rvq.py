"""Residual k-means vector quantiser: continuous feature frames <-> L code indices per frame.

Used by the offline codecs (e.g. WORLD): features are normalised per dimension (optionally
re-weighted so some dimensions get more of the bits), then level l quantises what levels 0..l-1
left over. Fitting is plain k-means (k-means++ init + Lloyd) in torch, chunked so it runs on CPU
with bounded memory. The fitted quantiser is a few MB of safetensors with its stats as metadata.

Level 0 can be assigned with a switching penalty (`switch_penalty`): a Viterbi pass over each clip
picks the code sequence minimising distortion + penalty x (number of code changes). Plain nearest-code
assignment changes level 0 in more than half the frames of speech, mostly for small feature wiggles
inside one sound; with the penalty level-0 codes hold through steady sounds and change at sound
boundaries, which is what an AR language model over level 0 has to predict. The later levels
quantise what level 0 leaves, so reconstruction barely changes.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from vall_e.utils.errors import UserError
from vall_e.utils.io import atomic_path, remove_stale_temps

FORMAT = "vall_e.rvq"
VERSION = 1
_CHUNK = 8192  # rows per distance block: 8192 x 1024 floats = 32 MB


def _nearest(x: Tensor, c: Tensor, c_sq: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Index of and squared distance to the nearest row of `c` for every row of `x` (chunked)."""
    if c_sq is None:
        c_sq = (c * c).sum(1)
    idx = torch.empty(x.shape[0], dtype=torch.long)
    dist = torch.empty(x.shape[0], dtype=x.dtype)
    for s in range(0, x.shape[0], _CHUNK):
        xb = x[s:s + _CHUNK]
        # ||x||^2 is constant per row, so argmin over ||c||^2 - 2 x.c is enough; add it back for the distance
        d = torch.addmm(c_sq.unsqueeze(0), xb, c.t(), alpha=-2.0)
        m, i = d.min(1)
        idx[s:s + _CHUNK] = i
        dist[s:s + _CHUNK] = (m + (xb * xb).sum(1)).clamp_min_(0.0)
    return idx, dist


def smooth_nearest(x: Tensor, c: Tensor, penalty: float, c_sq: Tensor | None = None) -> Tensor:
    """Code per row of x [T, D] (one clip, in time order) minimising sum of squared distances plus
    `penalty` per change of code between consecutive rows (Viterbi; O(T K) time, T x K bools)."""
    T, K = x.shape[0], c.shape[0]
    if T == 0:
        return torch.empty(0, dtype=torch.long)
    if c_sq is None:
        c_sq = (c * c).sum(1)
    # ||x||^2 is the same for every code of a row, so it does not change the best path
    d = torch.addmm(c_sq.unsqueeze(0), x, c.t(), alpha=-2.0)  # [T, K]
    cost = d[0].clone()
    stay = torch.empty(T, K, dtype=torch.bool)
    best = torch.empty(T, dtype=torch.long)
    for t in range(1, T):
        j = int(cost.argmin())
        best[t] = j
        switch = cost[j] + penalty
        torch.le(cost, switch, out=stay[t])
        cost = torch.minimum(cost, switch).add_(d[t])
    idx = torch.empty(T, dtype=torch.long)
    k = int(cost.argmin())
    for t in range(T - 1, -1, -1):
        idx[t] = k
        if t and not stay[t, k]:
            k = int(best[t])
    return idx


def _kmeans_pp(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding (D^2 sampling); one mat-vec per centre keeps it O(N D) per step."""
    n = x.shape[0]
    x_sq = (x * x).sum(1)
    chosen = torch.empty(k, dtype=torch.long)
    j = int(torch.randint(n, (1,), generator=gen))
    chosen[0] = j
    d2 = (x_sq - 2.0 * (x @ x[j]) + x_sq[j]).clamp_min_(0.0)
    for i in range(1, k):
        cum = torch.cumsum(d2, 0)
        total = float(cum[-1])
        if total <= 0.0:  # every point already coincides with a centre
            j = int(torch.randint(n, (1,), generator=gen))
        else:
            u = torch.rand(1, generator=gen, dtype=cum.dtype) * total
            j = min(int(torch.searchsorted(cum, u)), n - 1)
        chosen[i] = j
        torch.minimum(d2, (x_sq - 2.0 * (x @ x[j]) + x_sq[j]).clamp_min_(0.0), out=d2)
    return x[chosen].clone()


def kmeans(x: Tensor, k: int, iters: int = 25, seed: int = 0, init: str = "kmeans++",
           tol: float = 1e-4, init_points: int = 16) -> Tensor:
    """Fit k centroids to the rows of x [N, D]; returns [k, D].

    With fewer distinct points than k, every point becomes a centroid and the rest repeat them
    (duplicates never win a nearest-neighbour tie, so they are harmless). Empty clusters are
    re-seeded at the points currently worst served. k-means++ runs on a random subset of at most
    `init_points * k` points (plenty for seeding, and it bounds the sequential part); Lloyd
    iterations stop early once the mean distortion improves by less than `tol` (relative).
    """
    x = x.float().contiguous()
    n, dim = x.shape
    if n == 0:
        raise UserError("k-means got no frames to fit (is the corpus empty?)")
    gen = torch.Generator().manual_seed(seed)
    if n <= k:
        reps = torch.arange(k) % n
        return x[reps].clone()
    if init == "kmeans++":
        sub = x if n <= init_points * k else x[torch.randperm(n, generator=gen)[:init_points * k]]
        c = _kmeans_pp(sub, k, gen)
    elif init == "random":
        c = x[torch.randperm(n, generator=gen)[:k]].clone()
    else:
        raise ValueError(f"unknown init {init!r}")
    prev = math.inf
    for _ in range(iters):
        idx, dist = _nearest(x, c)
        sums = torch.zeros(k, dim).index_add_(0, idx, x)
        counts = torch.bincount(idx, minlength=k).float()
        empty = counts == 0
        c = torch.where(empty.unsqueeze(1), c, sums / counts.clamp_min(1).unsqueeze(1))
        n_empty = int(empty.sum())
        if n_empty:
            worst = dist.topk(n_empty).indices
            c[empty] = x[worst]
        inertia = float(dist.mean())
        if n_empty == 0 and math.isfinite(prev) and prev - inertia <= tol * prev:
            break
        prev = inertia
    return c


class ResidualVQ:
    """Per-dimension normalisation + L residual codebooks of K codes each.

    normalised = (x - mean) / std * weight; level l picks the code nearest to the residual left by
    levels < l. `decode` sums the chosen codes, undoes the normalisation and clamps each dimension to
    the range seen in training, so any code combination decodes to plausible features.
    """

    def __init__(self, codebooks: Tensor, mean: Tensor, std: Tensor, weight: Tensor | None = None,
                 lo: Tensor | None = None, hi: Tensor | None = None, info: dict[str, Any] | None = None,
                 switch_penalty: float = 0.0):
        if codebooks.dim() != 3:
            raise ValueError("codebooks must be [levels, codes, dim]")
        self.codebooks = codebooks.float().contiguous()
        d = self.dim
        self.mean = mean.float().reshape(d)
        self.std = std.float().reshape(d)
        self.weight = (torch.ones(d) if weight is None else weight.float()).reshape(d)
        self.lo = (torch.full((d,), -math.inf) if lo is None else lo.float()).reshape(d)
        self.hi = (torch.full((d,), math.inf) if hi is None else hi.float()).reshape(d)
        self.info: dict[str, Any] = dict(info or {})
        if not (math.isfinite(switch_penalty) and switch_penalty >= 0.0):
            raise ValueError(f"switch_penalty must be finite and >= 0, got {switch_penalty}")
        self.switch_penalty = float(switch_penalty)  # level 0's cost per code change (0 = nearest code)
        self._c_sq = (self.codebooks ** 2).sum(-1)  # [L, K]

    @property
    def n_levels(self) -> int:
        return self.codebooks.shape[0]

    @property
    def n_codes(self) -> int:
        return self.codebooks.shape[1]

    @property
    def dim(self) -> int:
        return self.codebooks.shape[2]

    def normalise(self, x: Tensor) -> Tensor:
        return (x.float() - self.mean) / self.std * self.weight

    def denormalise(self, z: Tensor) -> Tensor:
        return z / self.weight * self.std + self.mean

    def encode(self, x: Tensor, n_levels: int | None = None, lengths: list[int] | None = None) -> Tensor:
        """x [T, D] features -> LongTensor [T, L] (greedy residual nearest-code; level 0 smoothed
        when `switch_penalty` > 0). `lengths`: x is several clips back to back, smoothed apart."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features [T, {self.dim}], got {tuple(x.shape)}")
        lengths = [x.shape[0]] if lengths is None else list(lengths)
        if sum(lengths) != x.shape[0]:
            raise ValueError(f"lengths sum to {sum(lengths)}, features have {x.shape[0]} rows")
        levels = self.n_levels if n_levels is None else n_levels
        r = self.normalise(x)
        out = torch.empty(x.shape[0], levels, dtype=torch.long)
        for lvl in range(levels):
            cb = self.codebooks[lvl]
            if lvl == 0 and self.switch_penalty > 0:
                idx = torch.cat([smooth_nearest(part, cb, self.switch_penalty, self._c_sq[0])
                                 for part in r.split(lengths)])
            else:
                idx, _ = _nearest(r, cb, self._c_sq[lvl])
            out[:, lvl] = idx
            r = r - cb[idx]
        return out

    def decode(self, codes: Tensor) -> Tensor:
        """codes [T, L<=n_levels] -> features [T, D]; absent levels contribute nothing."""
        if codes.dim() != 2 or codes.shape[1] > self.n_levels:
            raise ValueError(f"expected codes [T, <= {self.n_levels}], got {tuple(codes.shape)}")
        codes = codes.long().clamp(0, self.n_codes - 1)
        z = torch.zeros(codes.shape[0], self.dim)
        for lvl in range(codes.shape[1]):
            z += self.codebooks[lvl][codes[:, lvl]]
        return torch.maximum(torch.minimum(self.denormalise(z), self.hi), self.lo)

    def fingerprint(self) -> str:
        """sha256 of the tensors' contents: identifies a quantiser wherever it is stored."""
        h = hashlib.sha256()
        for t in self.to_tensors()[0].values():
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    # ---- storage -------------------------------------------------------------------------

    def to_tensors(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """Tensors + string metadata, e.g. to embed in another safetensors file."""
        tensors = {"codebooks": self.codebooks, "mean": self.mean, "std": self.std,
                   "weight": self.weight, "lo": self.lo, "hi": self.hi}
        if self.switch_penalty > 0:  # absent in files without it: they keep encoding as they did
            tensors["switch_penalty"] = torch.tensor([self.switch_penalty])
        meta = {"format": FORMAT, "version": str(VERSION), "n_levels": str(self.n_levels),
                "n_codes": str(self.n_codes), "dim": str(self.dim), "info": json.dumps(self.info)}
        return {k: v.contiguous() for k, v in tensors.items()}, meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: dict[str, str] | None,
                     source: str = "codebooks") -> "ResidualVQ":
        """Rebuild from `to_tensors` output, checking every field; errors name `source`."""
        meta = meta or {}
        if meta.get("format") != FORMAT:
            raise UserError(f"{source}: not a vall_e RVQ codebook file (format={meta.get('format')!r})")
        try:
            version = int(meta.get("version", "0"))
        except ValueError:
            version = -1
        if version != VERSION:
            raise UserError(f"{source}: unsupported RVQ codebook version {meta.get('version')!r} "
                            f"(this vall_e reads version {VERSION})")
        missing = [k for k in ("codebooks", "mean", "std", "weight", "lo", "hi") if k not in tensors]
        if missing:
            raise UserError(f"{source}: codebook file lacks tensors {missing}")
        cb = tensors["codebooks"]
        try:
            info = json.loads(meta.get("info", "{}"))
            want = (int(meta["n_levels"]), int(meta["n_codes"]), int(meta["dim"]))
        except (KeyError, ValueError) as e:
            raise UserError(f"{source}: bad codebook metadata ({e})") from None
        if cb.dim() != 3 or tuple(cb.shape) != want:
            raise UserError(f"{source}: codebooks have shape {tuple(cb.shape)}, metadata says {want}")
        for k in ("mean", "std", "weight", "lo", "hi"):
            if tensors[k].numel() != want[2]:
                raise UserError(f"{source}: tensor {k!r} has {tensors[k].numel()} values, expected {want[2]}")
        if not bool(torch.isfinite(cb).all()) or not bool((tensors["std"] > 0).all()):
            raise UserError(f"{source}: codebook file holds non-finite codes or non-positive std")
        penalty = tensors.get("switch_penalty", torch.zeros(1)).float().reshape(-1)
        if penalty.numel() != 1 or not bool(torch.isfinite(penalty).all()) or float(penalty[0]) < 0:
            raise UserError(f"{source}: bad switch_penalty {penalty.tolist()}")
        return cls(cb, tensors["mean"], tensors["std"], tensors["weight"], tensors["lo"], tensors["hi"], info,
                   switch_penalty=float(penalty[0]))

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically to a safetensors file."""
        tensors, meta = self.to_tensors()
        remove_stale_temps(Path(path).parent, Path(path).name, exact=True)  # left by a killed save
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ResidualVQ":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: codebook file not found")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for truncated/garbage files
            raise UserError(f"{path}: unreadable codebook file ({type(e).__name__}: {e})") from None
        return cls.from_tensors(tensors, meta, source=str(path))


def fit_rvq(x: Tensor, n_levels: int = 8, n_codes: int = 1024, weight: Tensor | None = None,
            iters: int = 25, seed: int = 0, init: str = "kmeans++", clip_margin: float = 0.1,
            info: dict[str, Any] | None = None, progress: bool = True, switch_penalty: float = 0.0) -> ResidualVQ:
    """Fit normalisation stats and L levels of k-means codebooks on features x [N, D].

    `weight` scales normalised dimensions (larger = more of the bits). `clip_margin` widens the
    per-dimension training range (as a fraction of it) that decoded features are clamped to.
    `switch_penalty` (relative): level 0's cost per code change, as a multiple of its mean
    nearest-code distortion on x (see `smooth_nearest`); 0 = plain nearest code. The frames may be
    shuffled, so the later levels are fitted on the nearest-code residual.
    """
    if not (math.isfinite(switch_penalty) and switch_penalty >= 0.0):
        raise UserError(f"switch penalty must be >= 0, got {switch_penalty}")
    x = x.float()
    if x.dim() != 2 or x.shape[0] == 0:
        raise UserError("RVQ fit got no feature frames (is the corpus empty or silent?)")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("RVQ fit: features contain NaN/inf")
    mean = x.mean(0)
    std = x.std(0, unbiased=False).clamp_min(1e-5) if x.shape[0] > 1 else torch.ones(x.shape[1])
    lo, hi = x.min(0).values, x.max(0).values
    span = (hi - lo).clamp_min(1e-3)
    lo, hi = lo - clip_margin * span, hi + clip_margin * span
    w = torch.ones(x.shape[1]) if weight is None else weight.float()
    r = (x - mean) / std * w
    books = []
    penalty = 0.0
    bar = tqdm(range(n_levels), desc="fitting RVQ levels", unit="level", disable=not progress)
    for lvl in bar:
        c = kmeans(r, n_codes, iters=iters, seed=seed + lvl, init=init)
        idx, dist = _nearest(r, c)
        if lvl == 0:
            penalty = switch_penalty * float(dist.mean())
        r = r - c[idx]
        books.append(c)
        bar.set_postfix(residual=f"{float(dist.mean()) / max(float((w * w).sum()), 1e-12):.4f}")
    return ResidualVQ(torch.stack(books), mean, std, w, lo, hi, info, switch_penalty=penalty)
