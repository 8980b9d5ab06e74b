"""Calibration data: text sources as ``datasets.Dataset`` and the LightningDataModule.

Texts are tokenized, joined with EOS, cut into ``seq_len`` chunks, shuffled with ``seed``;
the first ``eval_samples`` chunks are held out for evaluation and the next ``num_samples`` are
the calibration set. Same seed, same samples.
"""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from .errors import UserError

log = logging.getLogger("nvfp4cal")
_LOADERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(UserError):
    pass


def pydoc_texts():
    """The embedded default corpus: the standard library's ``pydoc_data.topics`` (English prose and code)."""
    from pydoc_data.topics import topics

    import datasets

    return datasets.Dataset.from_dict({"text": [topics[k] for k in sorted(topics)]})


def local_texts(path: str, text_field: str = "text", cache_dir: str = ".cache"):
    """Local text/jsonl/json/parquet files (a path or a glob) through ``datasets``."""
    import datasets

    if path in (None, "", "???"):
        raise DataError("data=text needs data.source.path=FILE_OR_GLOB (text, json, jsonl or parquet)")
    files = sorted(glob.glob(os.path.expanduser(str(path)), recursive=True))
    files = [f for f in files if Path(f).is_file()]
    if not files:
        raise DataError(f"data path {path!r} matches no file; pass data.source.path=FILE_OR_GLOB")
    kinds = {_LOADERS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise DataError(f"data files {files[:3]} must all be one of {sorted(_LOADERS)}")
    kind = kinds.pop()
    ds = datasets.load_dataset(
        kind, data_files=files, split="train", cache_dir=str(Path(cache_dir).resolve() / "datasets")
    )
    if text_field not in ds.column_names:
        raise DataError(f"{files[0]} has no {text_field!r} column (has {ds.column_names}); set data.source.text_field")
    return ds.select_columns([text_field]).rename_column(text_field, "text") if text_field != "text" else ds


def hub_texts(
    name: str, split: str = "train", text_field: str = "text", config: str | None = None, cache_dir: str = ".cache"
):
    """A data set from the Hugging Face hub (needs network; fails fast when offline)."""
    import datasets

    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DataError(
            f"data=hub ({name}) needs the network but HF offline mode is on; use data=text with local files"
        )
    try:
        ds = datasets.load_dataset(name, config, split=split, cache_dir=str(Path(cache_dir).resolve() / "datasets"))
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one line
        raise DataError(f"cannot load {name} from the hub: {str(err).splitlines()[0]}") from err
    return ds.select_columns([text_field]).rename_column(text_field, "text") if text_field != "text" else ds


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
    """Calibration batches for ``Trainer.validate`` and a held-out split for evaluation."""

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
