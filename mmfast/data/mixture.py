"""Training on several sources in set proportions (`data.sources`, `data.mixture`): the sampling
probabilities (weights, or temperature over the sources' sizes, as multilingual and multimodal mixes
are set) and each step's global batch as rows of the sources held one after another in memory.

Each step's share of every source is drawn from a generator seeded by (seed, step) alone, and each
source is read in its own per-epoch permutation; the position in every source after step s is found
by replaying the per-step counts from step 0 (numbers only, no data), so a resumed run draws the
uninterrupted run's batches. A source may be capped at a number of epochs (`data.max_epochs`): once
it has given that many, its share goes to the others.
"""
from __future__ import annotations

import math

import torch


def mixture_probabilities(sizes: dict[str, int], weights: dict[str, float] | None = None,
                          temperature: float = 0.0) -> dict[str, float]:
    """Each source's probability: `weights` normalized; else, with a `temperature` T > 0, proportional to
    size^(1/T) (T = 1: as if concatenated; larger T: closer to uniform); else proportional to size."""
    names = list(sizes)
    if weights:
        unknown = sorted(set(weights) - set(names))
        missing = [name for name in names if name not in weights]
        if unknown or missing:
            raise ValueError(f"config: data.mixture must give a weight to each of data.sources {names}, "
                             f"got {sorted(weights)} (unknown {unknown}, missing {missing})")
        if temperature:
            raise ValueError("config: data.mixture (weights) and data.mixture_temperature exclude each other, "
                             f"got both (temperature {temperature})")
        bad = {name: value for name, value in weights.items() if not (value >= 0 and math.isfinite(value))}
        if bad or not sum(weights.values()) > 0:
            raise ValueError(f"config: data.mixture weights must be >= 0 and not all 0, got {weights}")
        raw = {name: float(weights[name]) for name in names}
    else:
        if temperature < 0:
            raise ValueError(f"config: data.mixture_temperature must be > 0 (or 0: by size), got {temperature}")
        power = 1.0 / temperature if temperature else 1.0
        raw = {name: float(sizes[name]) ** power for name in names}
    total = sum(raw.values())
    return {name: value / total for name, value in raw.items()}


class Mixture:
    """The global batches of a run over several in-memory sources, as rows into their concatenation
    (source i's rows start at the sum of the sizes before it). Ask for steps in increasing order from
    any start: the first call replays the counts of the steps before it."""

    def __init__(self, sizes: dict[str, int], probabilities: dict[str, float], batch: int, seed: int,
                 max_epochs: dict[str, float] | None = None):
        max_epochs = dict(max_epochs or {})
        unknown = sorted(set(max_epochs) - set(sizes))
        if unknown:
            raise ValueError(f"config: data.max_epochs names sources that data.sources does not have: {unknown} "
                             f"(sources {list(sizes)})")
        empty = [name for name, size in sizes.items() if size < 1]
        if empty:
            raise ValueError(f"mmfast train: data.sources {empty} have no readable samples")
        for name, cap in max_epochs.items():
            if not cap > 0:
                raise ValueError(f"config: data.max_epochs.{name} must be > 0, got {cap}")
        self.names, self.batch, self.seed = list(sizes), batch, seed
        self.sizes = torch.tensor([sizes[name] for name in self.names])
        self.offsets = torch.cumsum(self.sizes, 0) - self.sizes
        self.probabilities = torch.tensor([probabilities[name] for name in self.names], dtype=torch.float64)
        self.capacity = torch.tensor([math.floor(max_epochs[name] * sizes[name]) if name in max_epochs else -1
                                      for name in self.names])  # -1: no cap
        self.used = torch.zeros(len(self.names), dtype=torch.long)  # samples given, per source
        self.next_step = 0
        self._orders: dict[tuple[int, int], torch.Tensor] = {}

    def _available(self) -> torch.Tensor:
        return (self.capacity < 0) | (self.used < self.capacity)

    def _counts(self, step: int) -> torch.Tensor:
        """How many rows of each source the global batch of `step` takes (advances the positions)."""
        generator = torch.Generator().manual_seed(self.seed * 1000003 + step)
        counts = torch.zeros(len(self.names), dtype=torch.long)
        left = self.batch
        while left:
            open_sources = self._available() & (self.probabilities > 0)
            if not open_sources.any():
                raise ValueError(f"mmfast train: at step {step} every source of data.sources has reached its "
                                 f"data.max_epochs (given {dict(zip(self.names, self.used.tolist()))}); raise a "
                                 "cap, add a source without one, or train fewer steps")
            weights = torch.where(open_sources, self.probabilities, torch.zeros_like(self.probabilities))
            drawn = torch.bincount(torch.multinomial(weights, left, replacement=True, generator=generator),
                                   minlength=len(self.names))
            room = torch.where(self.capacity < 0, drawn, (self.capacity - self.used).clamp(min=0))
            taken = torch.minimum(drawn, room)  # a capped source gives what it has left; the rest is redrawn
            counts += taken
            self.used += taken
            left -= int(taken.sum())
        return counts

    def _order(self, source: int, epoch: int) -> torch.Tensor:
        key = (source, epoch)
        if key not in self._orders:
            generator = torch.Generator().manual_seed((self.seed * 1000003 + source) * 100003 + epoch)
            self._orders = {k: v for k, v in self._orders.items() if k[0] != source}  # one epoch per source kept
            self._orders[key] = torch.randperm(int(self.sizes[source]), generator=generator)
        return self._orders[key]

    def rows(self, step: int) -> torch.Tensor:
        """The rows of the global batch of `step` (>= every step asked before), sources interleaved."""
        if step < self.next_step:
            raise ValueError(f"Mixture.rows: steps must be asked in order, got {step} after {self.next_step - 1}")
        while self.next_step < step:  # replay: positions only
            self._counts(self.next_step)
            self.next_step += 1
        start = self.used.clone()
        counts = self._counts(step)
        self.next_step = step + 1
        parts = []
        for source in range(len(self.names)):
            positions = torch.arange(int(start[source]), int(start[source] + counts[source]))
            epochs, within = positions // self.sizes[source], positions % self.sizes[source]
            for epoch in epochs.unique().tolist():
                chosen = within[epochs == epoch]
                parts.append(self._order(source, epoch)[chosen] + self.offsets[source])
        rows = torch.cat(parts)
        shuffle = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.seed * 1000003 + step + 7))
        return rows[shuffle]  # every rank's and accumulation slice's share a mix, not one source

    def seen(self) -> dict[str, float]:
        """Per source, the samples given so far and the epochs they make (after the last step asked)."""
        record = {}
        for name, used, size in zip(self.names, self.used.tolist(), self.sizes.tolist()):
            record[f"samples_{name}"] = used
            record[f"epochs_{name}"] = used / size
        return record
