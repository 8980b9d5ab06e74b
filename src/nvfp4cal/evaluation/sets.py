"""Evaluation sets (the ``eval`` config group): text that calibration never saw, cut into rows.

Every run scores the calibration corpus's held-out rows (``data.eval_samples``, disjoint from the
calibration rows) under the name ``corpus``; ``eval.sets`` adds named sets of other text, each read by
the same text sources as calibration (:mod:`nvfp4cal.texts`: the embedded corpora, local text, JSON or
Parquet files and globs) and cut into ``rows`` rows of its own ``seq_len`` tokens (the first rows of the
packed text, in order). The sources are read when the group is built, before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..texts import DataError, pack

CORPUS = "corpus"  # the calibration source's held-out rows


@dataclass
class EvalSet:
    name: str
    source: object  # a datasets.Dataset with a ``text`` column
    rows: int = 8
    seq_len: int = 256


class EvalSets:
    """``eval.*``: the named sets besides the corpus's held-out rows."""

    def __init__(self, sets: dict | None = None):
        self.sets: list[EvalSet] = []
        for name, spec in (sets or {}).items():
            if name == CORPUS:
                raise DataError(f"eval.sets.{CORPUS}: the name is the corpus's held-out rows (data.eval_samples)")
            if not isinstance(spec, dict) or "source" not in spec or set(spec) - {"source", "rows", "seq_len"}:
                raise DataError(f"eval.sets.{name} must be {{source, rows, seq_len}}, got {spec!r}")
            rows, seq_len = spec.get("rows", 8), spec.get("seq_len", 256)
            if not (isinstance(rows, int) and rows >= 1 and isinstance(seq_len, int) and seq_len >= 2):
                raise DataError(f"eval.sets.{name}: rows must be >= 1 and seq_len >= 2, got {rows} and {seq_len}")
            source = spec["source"]
            if not hasattr(source, "column_names") or "text" not in source.column_names:
                raise DataError(f"eval.sets.{name}.source must give texts (a text column)")
            self.sets.append(EvalSet(name, source, rows, seq_len))

    def tokenized(self, tokenizer) -> dict[str, torch.Tensor]:
        """Each set's rows [rows, seq_len] (fewer rows where the text runs out; none: an error naming it)."""
        out = {}
        for s in self.sets:
            chunks, _ = pack([t for t in s.source["text"] if t], tokenizer, s.seq_len, max_rows=s.rows)
            if not len(chunks):
                raise DataError(f"eval.sets.{s.name} holds fewer than seq_len={s.seq_len} tokens; add text or lower it")
            out[s.name] = chunks[: s.rows]
        return out


def batches(rows: torch.Tensor, batch_size: int) -> list[dict]:
    """``rows`` [n, t] in batches as the calibration loader gives them (``{"input_ids": [b, t]}``)."""
    return [{"input_ids": rows[i : i + batch_size]} for i in range(0, len(rows), batch_size)]
