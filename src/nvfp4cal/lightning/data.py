"""Calibration data: the LightningDataModule over a text source (:mod:`nvfp4cal.texts`).

Texts are tokenized, joined with EOS, cut into ``seq_len`` chunks, shuffled with ``seed``;
the first ``eval_samples`` chunks are held out for evaluation and the next ``num_samples`` are
the calibration set. Same seed, same samples.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch.utils.data import DataLoader

from ..texts import DataError, check_counts, pack

log = logging.getLogger("nvfp4cal")


def _shares(total: int, weights: list[float]) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainder; ties to the earlier source)."""
    exact = [total * w / sum(weights) for w in weights]
    out = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: (-(exact[i] - out[i]), i))[: total - sum(out)]:
        out[i] += 1
    return out


class CalibrationData(L.LightningDataModule):
    """Calibration batches for ``Trainer.validate`` and a held-out split for evaluation.

    Built from the ``data`` group through ``_target_`` before the model loads (so that a missing file or
    a bad count fails at once); the model's tokenizer is set (``data.tokenizer = ...``) once it is known.
    ``source``: one data set (a ``text`` column, or ``messages`` with ``chat_template=True``: each row
    rendered with the tokenizer's chat template). ``sources``: several, ``[{name, weight, source}]``,
    mixed by weight: each is packed on its own and gives its share of the calibration and held-out
    samples, then all are shuffled together (deterministic for ``seed``). ``stats`` says how many
    texts, tokens and samples came from where.
    """

    def __init__(
        self,
        source=None,
        tokenizer=None,
        num_samples: int = 64,
        seq_len: int = 256,
        batch_size: int = 4,
        seed: int = 0,
        eval_samples: int = 8,
        chat_template: bool = False,
        sources: list[dict] | None = None,
    ):
        super().__init__()
        check_counts(num_samples, seq_len, batch_size)
        if (source is None) == (sources is None):
            raise DataError("give the calibration data as data.source or as data.sources=[{name, weight, source}]")
        if sources is not None:
            for i, s in enumerate(sources):
                if not isinstance(s, dict) or set(s) != {"name", "weight", "source"}:
                    raise DataError(f"data.sources[{i}] must be {{name, weight, source}}, got {s!r}")
                if not (isinstance(s["weight"], (int, float)) and s["weight"] > 0):
                    raise DataError(f"data.sources[{i}].weight must be > 0, got {s['weight']!r}")
        self.source, self.sources, self.tokenizer = source, sources, tokenizer
        self.num_samples, self.seq_len, self.batch_size = int(num_samples), int(seq_len), int(batch_size)
        self.seed, self.eval_samples, self.chat_template = int(seed), int(eval_samples), bool(chat_template)
        self.calib: torch.Tensor | None = None
        self.held_out: torch.Tensor | None = None
        self.stats: dict = {}

    def _texts(self, ds, where: str, chat: bool | None = None) -> list[str]:
        """The texts of one source: its ``text`` column, or its ``messages`` rendered with the chat
        template (``chat``: what this source must hold; None: whichever it has)."""
        cols = ds.column_names
        if chat is None:
            chat = "messages" in cols
        if not chat:
            if "text" not in cols:
                raise DataError(f"{where} has no 'text' column (has {cols})")
            return list(ds["text"])
        if "messages" not in cols:
            raise DataError(f"data.chat_template=true: {where} has no 'messages' column (has {cols})")
        if not self.chat_template:
            raise DataError(f"{where} holds chat messages: pass data.chat_template=true to render them")
        if not getattr(self.tokenizer, "chat_template", None):
            raise DataError(
                "data.chat_template=true but the tokenizer has no chat template; set data.chat_template=false"
            )
        out = []
        for i, m in enumerate(ds["messages"]):
            if not (isinstance(m, list) and all(isinstance(x, dict) and {"role", "content"} <= set(x) for x in m)):
                raise DataError(f"data.chat_template=true: {where} row {i} is not a list of {{role, content}} messages")
            out.append(self.tokenizer.apply_chat_template(m, tokenize=False))
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.calib is not None:
            return
        if self.tokenizer is None:
            raise DataError("CalibrationData needs the model's tokenizer")
        if self.sources is not None:
            return self._setup_mixed()
        chunks, stats = pack(self._texts(self.source, "the data", self.chat_template), self.tokenizer, self.seq_len)
        if len(chunks) == 0:
            raise DataError(
                f"the data holds fewer than data.seq_len={self.seq_len} tokens; add text or lower data.seq_len"
            )
        order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(self.seed))
        chunks = chunks[order]
        n_eval = min(self.eval_samples, len(chunks) // 2)
        self.held_out, rest = chunks[:n_eval], chunks[n_eval:]
        if len(rest) < self.num_samples:
            log.warning(
                "data has %d samples of %d tokens, fewer than data.num_samples=%d; using all of them",
                len(rest),
                self.seq_len,
                self.num_samples,
            )
        self.calib = rest[: self.num_samples]
        self.stats = {"sources": {"data": {**stats, "calibration": len(self.calib), "held_out": n_eval}}}

    def _setup_mixed(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        weights = [float(s["weight"]) for s in self.sources]
        want_calib = _shares(self.num_samples, weights)
        want_eval = _shares(self.eval_samples, weights)
        calib, held, self.stats = [], [], {"sources": {}}
        if self.chat_template and not any("messages" in s["source"].column_names for s in self.sources):
            raise DataError("data.chat_template=true but no data source has a 'messages' column")
        for s, n_calib, n_eval in zip(self.sources, want_calib, want_eval, strict=True):
            chunks, stats = pack(self._texts(s["source"], f"data source {s['name']!r}"), self.tokenizer, self.seq_len)
            chunks = chunks[torch.randperm(len(chunks), generator=g)]
            n_eval = min(n_eval, len(chunks) // 2)
            if len(chunks) - n_eval < n_calib:
                log.warning(
                    "data source %r gives %d samples, fewer than its share %d", s["name"], len(chunks) - n_eval, n_calib
                )
            held.append(chunks[:n_eval])
            calib.append(chunks[n_eval : n_eval + n_calib])
            self.stats["sources"][s["name"]] = {**stats, "calibration": len(calib[-1]), "held_out": n_eval}
        calib, held = torch.cat(calib), torch.cat(held)
        if len(calib) == 0:
            raise DataError(f"the data sources hold fewer than data.seq_len={self.seq_len} tokens each")
        self.calib = calib[torch.randperm(len(calib), generator=g)]
        self.held_out = held[torch.randperm(len(held), generator=g)] if len(held) else held

    def _loader(self, x: torch.Tensor) -> DataLoader:
        return DataLoader(
            list(x), batch_size=self.batch_size, shuffle=False, collate_fn=lambda b: {"input_ids": torch.stack(b)}
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.calib)

    def eval_dataloader(self) -> DataLoader:
        return self._loader(self.held_out)
