"""Evaluation sets (the ``eval`` config group): text that calibration never saw, cut into rows.

Every run scores the calibration corpus's held-out rows (``data.eval_samples``, disjoint from the
calibration rows) under the name ``corpus``; ``eval.sets`` adds named sets of other text, each read by
the same text sources as calibration (:mod:`nvfp4cal.texts`: the embedded corpora, local text, JSON or
Parquet files and globs) and cut into ``rows`` rows of its own ``seq_len`` tokens (the first rows of the
packed text, in order); a source of chat data (``local_texts(..., messages=true)``: a ``messages`` column) is
rendered with the tokenizer's chat template first. The sources are read when the group is built, before any model loads.
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
            cols = getattr(source, "column_names", None) or []
            if "text" not in cols and "messages" not in cols:
                raise DataError(f"eval.sets.{name}.source must give texts (a text column, or chat messages)")
            self.sets.append(EvalSet(name, source, rows, seq_len))

    def texts(self, s: EvalSet, tokenizer) -> list[str]:
        """A set's texts: its ``text`` column, or its ``messages`` rendered with the tokenizer's chat template
        (chat data is judged as the model reads it in use)."""
        if "text" in s.source.column_names:
            return [t for t in s.source["text"] if t]
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"eval.sets.{s.name} holds chat messages but the tokenizer has no chat template")
        out = []
        for i, m in enumerate(s.source["messages"]):
            if not (isinstance(m, list) and all(isinstance(x, dict) and {"role", "content"} <= set(x) for x in m)):
                raise DataError(f"eval.sets.{s.name} row {i} is not a list of {{role, content}} messages")
            out.append(tokenizer.apply_chat_template(m, tokenize=False))
        return out

    def tokenized(self, tokenizer) -> dict[str, torch.Tensor]:
        """Each set's rows [rows, seq_len] (fewer rows where the text runs out; none: an error naming it)."""
        out = {}
        for s in self.sets:
            chunks, _ = pack(self.texts(s, tokenizer), tokenizer, s.seq_len, max_rows=s.rows)
            if not len(chunks):
                raise DataError(f"eval.sets.{s.name} holds fewer than seq_len={s.seq_len} tokens; add text or lower it")
            out[s.name] = chunks[: s.rows]
        return out


def batches(rows: torch.Tensor, batch_size: int) -> list[dict]:
    """``rows`` [n, t] in batches as the calibration loader gives them (``{"input_ids": [b, t]}``)."""
    return [{"input_ids": rows[i : i + batch_size]} for i in range(0, len(rows), batch_size)]
