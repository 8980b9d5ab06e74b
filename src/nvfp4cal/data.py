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

from .texts import DataError

log = logging.getLogger("nvfp4cal")


def pack(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Token ids of all texts joined by EOS, cut into [n, seq_len] (the ragged tail is dropped)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        if t and t.strip():
            ids.extend(tokenizer(t, add_special_tokens=False).input_ids)
            if eos is not None:
                ids.append(eos)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)


class CalibrationData(L.LightningDataModule):
    """Calibration batches for ``Trainer.validate`` and a held-out split for evaluation.

    Built from the ``data`` group through ``_target_``; the model's tokenizer is passed when it is
    built (``instantiate(cfg.data, tokenizer=...)``), as it is known only once the model is loaded.
    """

    def __init__(
        self,
        source,
        tokenizer=None,
        num_samples: int = 64,
        seq_len: int = 256,
        batch_size: int = 4,
        seed: int = 0,
        eval_samples: int = 8,
    ):
        super().__init__()
        for key, v in (("num_samples", num_samples), ("seq_len", seq_len), ("batch_size", batch_size)):
            if int(v) < 1:
                raise DataError(f"data.{key} must be >= 1, got {v}")
        self.source, self.tokenizer = source, tokenizer
        self.num_samples, self.seq_len, self.batch_size = int(num_samples), int(seq_len), int(batch_size)
        self.seed, self.eval_samples = int(seed), int(eval_samples)
        self.calib: torch.Tensor | None = None
        self.held_out: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.calib is not None:
            return
        if self.tokenizer is None:
            raise DataError("CalibrationData needs the model's tokenizer")
        texts = list(self.source["text"])
        chunks = pack(texts, self.tokenizer, self.seq_len)
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

    def _loader(self, x: torch.Tensor) -> DataLoader:
        return DataLoader(
            list(x), batch_size=self.batch_size, shuffle=False, collate_fn=lambda b: {"input_ids": torch.stack(b)}
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.calib)

    def eval_dataloader(self) -> DataLoader:
        return self._loader(self.held_out)
