"""What calibration and the post-calibration steps found: one :class:`Results` per run, and one per unit
(a decoder layer in a layer-by-layer run) that merges into the run's with :meth:`Results.merge`.

The report's sections of the same names come from :meth:`Results.as_dict`; a layer's record (kept in the
layer state for a resume) is a dict of the same shape, read back with :meth:`Results.from_record`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class SweepSummary:
    """The FP8-scale sweep over a unit's weights (plain or Hessian-weighted)."""

    kernel: list[str]
    weights: int
    blocks: int
    ranks: int = 1
    method: str | None = None  # "hessian_mse" for the Hessian-weighted sweep
    fallback: list[str] | None = None  # experts with no token: the plain sweep's choices

    def merge(self, other: SweepSummary) -> None:
        self.kernel = sorted(set(self.kernel) | set(other.kernel))
        self.weights += other.weights
        self.blocks += other.blocks
        if other.fallback is not None:
            self.fallback = sorted(set(self.fallback or []) | set(other.fallback))

    def as_dict(self) -> dict:
        out = {"kernel": self.kernel, "weights": self.weights, "blocks": self.blocks, "ranks": self.ranks}
        if self.method is not None:
            out["method"] = self.method
        if self.fallback is not None:
            out["fallback"] = self.fallback
        return out


@dataclass
class GptqSummary:
    """GPTQ rounding over a unit's weights."""

    weights: int
    fallback: list[str]
    hessian_error_vs_rtn_mean: float | None = None

    def merge(self, other: GptqSummary) -> None:
        self.weights += other.weights
        self.fallback = sorted(self.fallback + other.fallback)
        self.hessian_error_vs_rtn_mean = None  # a mean of means would mislead; per weight in results.weights

    def as_dict(self) -> dict:
        out = {"weights": self.weights, "fallback": self.fallback}
        if self.hessian_error_vs_rtn_mean is not None:
            out["hessian_error_vs_rtn_mean"] = self.hessian_error_vs_rtn_mean
        return out


@dataclass
class TuneSummary:
    """Layer-output tuning: per layer, the losses at the start and at the kept iterate (training batches, and
    the held-out validation batches that chose it), so that fitting shows."""

    layers: list[dict]

    @classmethod
    def of_layer(cls, name: str, record: dict) -> TuneSummary:
        return cls([{"layer": name, **record}])

    def merge(self, other: TuneSummary) -> None:
        self.layers = self.layers + other.layers

    def as_dict(self) -> dict:
        return {"layers": self.layers}


SECTIONS = {"sweep": SweepSummary, "gptq": GptqSummary, "tune": TuneSummary}  # the algorithms' summaries, by report key


def _stage_sum(total: dict, part: dict) -> None:
    for k, v in part.items():
        t = total.setdefault(k, {"seconds": 0.0})
        t["seconds"] = round(t["seconds"] + v["seconds"], 3)
        for key in ("gpu_peak_gib", "cpu_peak_rss_gib"):
            if key in v:
                t[key] = max(t.get(key, 0.0), v[key])


@dataclass
class Results:
    """What the steps found (the report's sections of the same names)."""

    stages: dict[str, dict] = field(default_factory=dict)  # step name -> seconds and memory peaks
    experts: list[dict] = field(default_factory=list)
    weights: dict[str, dict] = field(default_factory=dict)  # weight -> {"max": errors, "mse": errors, ...}
    sections: dict[str, SweepSummary | GptqSummary | TuneSummary] = field(default_factory=dict)  # algorithms' summaries
    exports: list[dict] = field(default_factory=list)
    perplexity: dict[str, float] = field(default_factory=dict)  # the corpus's held-out rows (top line)
    max_token_nll: dict[str, torch.Tensor] = field(default_factory=dict)  # set -> per-token losses under max
    evaluation: dict[str, dict] = field(default_factory=dict)  # evaluation set -> compare.Comparison.result()
    sharding: dict | None = None  # trainer=fsdp: what each rank holds
    gpu_peak_gib_per_rank: list[float] | None = None  # several GPUs: each rank's highest stage peak

    def add(self, key: str, summary) -> None:
        """An algorithm's summary for this unit, merged into one already there."""
        if key in self.sections:
            self.sections[key].merge(summary)
        else:
            self.sections[key] = summary

    def merge(self, other: Results) -> None:
        """One unit's results into the run's: lists extend, per-weight errors update, summaries merge,
        stage times add up (memory peaks: the highest)."""
        self.experts += other.experts
        for w, e in other.weights.items():
            self.weights.setdefault(w, {}).update(e)
        for k, s in other.sections.items():
            self.add(k, s)
        _stage_sum(self.stages, other.stages)
        self.perplexity.update(other.perplexity)

    def as_dict(self) -> dict:
        out = {"experts": self.experts, "weights": self.weights, "exports": self.exports}
        out["perplexity"] = self.perplexity
        if self.evaluation:
            out["evaluation"] = self.evaluation
        for key, s in self.sections.items():
            out[key] = s.as_dict()
        for key in ("sharding", "gpu_peak_gib_per_rank"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def record(self) -> dict:
        """A unit's results as plain data (the layer state keeps it for a resume)."""
        return {**self.as_dict(), "stages": self.stages}

    @classmethod
    def from_record(cls, record: dict) -> Results:
        sections = {k: SECTIONS[k](**record[k]) for k in SECTIONS if k in record}
        return cls(stages=record.get("stages", {}), experts=list(record.get("experts", [])),
                   weights=dict(record.get("weights", {})), sections=sections)  # fmt: skip
