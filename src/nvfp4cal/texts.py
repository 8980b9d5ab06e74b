"""Text sources for calibration, each a ``datasets.Dataset`` with a ``text`` column.

``data.source`` in ``conf/data/*.yaml`` names one of these through ``_target_``; the keys the user
types are ``data.source.<argument>`` (``data=text data.source.path=FILE_OR_GLOB``).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from .numerics.errors import RunStopped, UserError

_LOADERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(UserError):
    pass


def pydoc_texts():
    """The embedded default corpus: the standard library's ``pydoc_data.topics`` (English prose and code)."""
    from pydoc_data.topics import topics

    import datasets

    return datasets.Dataset.from_dict({"text": [topics[k] for k in sorted(topics)]})


def _column(ds, text_field: str, messages: bool, where: str):
    """The one column calibration reads: ``text`` (from ``text_field``) or, for chat data, ``messages``."""
    field = "messages" if messages else text_field
    if field not in ds.column_names:
        hint = "data.chat_template=true reads a 'messages' column" if messages else "set data.source.text_field"
        raise DataError(f"{where} has no {field!r} column (has {ds.column_names}); {hint}")
    ds = ds.select_columns([field])
    return ds.rename_column(field, "text") if field not in ("text", "messages") else ds


def local_texts(path: str, text_field: str = "text", cache_dir: str = ".cache", messages: bool = False):
    """Local text/jsonl/json/parquet files (a path or a glob) through ``datasets``; ``messages``: chat data
    (a ``messages`` column of ``[{role, content}, ...]``, rendered later with the tokenizer's template)."""
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
    return _column(ds, text_field, messages, files[0])


def hub_texts(
    name: str, split: str = "train", text_field: str = "text", config: str | None = None, cache_dir: str = ".cache",
    messages: bool = False,
):  # fmt: skip
    """A data set from the Hugging Face hub (needs network; fails fast when offline)."""
    import datasets

    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DataError(
            f"data=hub (data.source.name={name}) needs the network but HF offline mode is on; use data=text with local files"
        )
    try:
        ds = datasets.load_dataset(name, config, split=split, cache_dir=str(Path(cache_dir).resolve() / "datasets"))
    except RunStopped:
        raise
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one line
        raise DataError(f"cannot load {name} from the hub: {str(err).splitlines()[0]}") from err
    return _column(ds, text_field, messages, name)
