"""Text sources for calibration, each a ``datasets.Dataset`` with a ``text`` column.

``data.source`` in ``conf/data/*.yaml`` names one of these through ``_target_``; the keys the user
types are ``data.source.<argument>`` (``data=text data.source.path=FILE_OR_GLOB``).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import torch

from .numerics.errors import RunStopped, UserError

_LOADERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(UserError):
    pass


def check_counts(num_samples, seq_len, batch_size) -> None:
    """``data.num_samples``, ``data.seq_len`` and ``data.batch_size`` are counts of at least one."""
    for key, v in (("num_samples", num_samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        if int(v) < 1:
            raise DataError(f"data.{key} must be >= 1, got {v}")


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


def leading_bos(tokenizer) -> int | None:
    """The BOS id the tokenizer puts before every input (Gemma, Llama 3, ...), or None where it adds none
    (GPT-2-style tokenizers such as SmolLM2's, the tiny models' byte tokenizer)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a").input_ids
    return bos if ids and ids[0] == bos else None


def pack(texts: list[str], tokenizer, seq_len: int, max_rows: int | None = None) -> tuple[torch.Tensor, dict]:
    """Token ids of all texts joined by EOS, cut into [n, seq_len] (the ragged tail is dropped), and
    what packing did: texts, tokens, samples, tokens dropped, texts longer than one sample, ``bos``.

    Rows are what the model reads in use: where the tokenizer starts every input with BOS
    (:func:`leading_bos`), each row is BOS + ``seq_len - 1`` tokens of the stream (a text that starts with
    BOS, e.g. a rendered chat template, loses that one); otherwise rows are plain cuts of the stream.
    ``max_rows``: stop reading texts once that many rows are full (the first rows are the same)."""
    eos, bos = tokenizer.eos_token_id, leading_bos(tokenizer)
    body = seq_len - (bos is not None)
    if body < 1:
        raise DataError(f"seq_len={seq_len} leaves no token after the tokenizer's BOS; use seq_len >= 2")
    ids: list[int] = []
    used = longer = 0
    for t in texts:
        if t and t.strip():
            piece = tokenizer(t, add_special_tokens=False).input_ids
            if bos is not None and piece[:1] == [bos]:
                piece = piece[1:]
            ids.extend(piece)
            used += 1
            longer += len(piece) + (eos is not None) > body
            if eos is not None:
                ids.append(eos)
            if max_rows is not None and len(ids) >= max_rows * body:
                break
    n = len(ids) // body if max_rows is None else min(len(ids) // body, max_rows)
    stats = {"texts": used, "tokens": len(ids), "samples": n, "tokens_dropped": len(ids) - n * body,
             "texts_split_across_samples": longer, "bos": bos is not None}  # fmt: skip
    rows = torch.tensor(ids[: n * body], dtype=torch.long).reshape(n, body)
    if bos is not None:
        rows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), rows], dim=1)
    return rows, stats


# stdlib modules whose source is the embedded "code" evaluation set (ships with every Python)
CODE_MODULES = ("argparse", "calendar", "difflib", "fractions", "heapq", "pprint", "shlex", "statistics",
                "string", "textwrap")  # fmt: skip


def python_code_texts(modules: list[str] | tuple[str, ...] = CODE_MODULES):
    """Python source code that no calibration corpus here contains: the files of a few standard-library
    modules (an evaluation set of another kind of text than the embedded prose corpus; nothing to download)."""
    import importlib.util

    import datasets

    texts = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            raise DataError(f"python_code_texts: no Python source for module {name!r}")
        texts.append(Path(spec.origin).read_text(encoding="utf-8"))
    return datasets.Dataset.from_dict({"text": texts})
