"""Model sources: any local HF directory, tiny random models (the packaged real models: :mod:`.packaged`).

Nothing here downloads: every loader passes ``local_files_only=True``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights

from ..numerics.errors import UserError
from .source_formats import SCALE_SUFFIX, dequantize_rows, source_format
from .view import model_tensors, saved_layout

log = logging.getLogger("nvfp4cal")


class ModelError(UserError):
    pass


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    # a model built on the meta device (sharded runs): fill(param, out, start, stop, rows) writes
    # rows [start, stop) of dim 0 of a parameter with ``rows`` rows into ``out``
    fill: Callable[[str, torch.Tensor, int, int, int], None] | None = None
    source_format: dict | None = None  # a quantized source checkpoint (source_formats.source_format), or None


def _dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return getattr(torch, dtype)
    except AttributeError:
        raise ModelError(
            f"model.dtype={dtype!r} is not a torch dtype; use bfloat16, float16, float32 or auto"
        ) from None


def _on_meta(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``build()`` with its parameters on the meta device and its buffers (RoPE tables) real
    (accelerate's ``init_empty_weights``), tied parameters tied again: the context re-wraps every
    parameter it sees registered, which unties ``lm_head`` from the embedding."""
    with init_empty_weights(include_buffers=False):
        model = build()
    model.tie_weights()
    return model


def load_hf(path: str, dtype: str = "auto", trust_remote_code: bool = False, sharded: bool = False) -> LoadedModel:
    """Load a local Hugging Face causal-LM directory (config.json, weights, tokenizer).

    ``sharded=True`` (``trainer=fsdp``): only the model's structure is built (parameters on the meta
    device); each rank later reads its own rows from the safetensors files (:class:`CheckpointRows`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if path in (None, "", "???"):
        raise ModelError("model=hf needs model.path=DIR (a local Hugging Face model directory)")
    p = Path(os.path.expanduser(str(path)))
    if not p.is_dir():
        raise ModelError(f"model.path {p} is not a directory; pass model.path=DIR with a Hugging Face model")
    if not (p / "config.json").is_file():
        raise ModelError(f"model.path {p} has no config.json; is it a Hugging Face model directory?")
    kw = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    raw = json.loads((p / "config.json").read_text())
    fmt = source_format(raw.get("quantization_config"), f"model.path {p}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p), **kw)
        if sharded or fmt is not None:  # built on the meta device, filled by our reader
            config = AutoConfig.from_pretrained(str(p), **kw)
            if hasattr(config, "quantization_config"):
                del config.quantization_config  # plain Linear layers: the weights arrive dequantized
            dt = _dtype(dtype)
            if dt == "auto":
                dt = getattr(config, "dtype", None) or torch.float32
                dt = getattr(torch, dt.replace("torch.", "")) if isinstance(dt, str) else dt
            model = _on_meta(
                lambda: AutoModelForCausalLM.from_config(config, dtype=dt, trust_remote_code=trust_remote_code)
            )
            fill = CheckpointRows(p, model, fmt)
            if not sharded:  # the whole model, here
                _fill_all(model, fill)
                fill = None
        else:
            model = AutoModelForCausalLM.from_pretrained(str(p), dtype=_dtype(dtype), **kw)
            fill = None
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load {p}: {str(err).splitlines()[0]}") from err
    model.eval()
    if fmt is not None:
        log.info("model.path %s: %s weights (blocks %s) dequantized to %s as read", p, fmt["quant_method"],
                 fmt["weight_block_size"], next(model.parameters()).dtype)  # fmt: skip
    return LoadedModel(model, tokenizer, p.name, fill, source_format=fmt)


def _fill_all(model: torch.nn.Module, fill) -> None:
    """Make a meta-device model real on the CPU from ``fill`` (tied parameters read once, tied again)."""
    params = list(model.named_parameters())  # before to_empty: tied parameters appear once
    keep = {n: b.detach().clone() for n, b in model.named_buffers() if not b.is_meta}
    model.to_empty(device="cpu")
    with torch.no_grad():
        for n, b in keep.items():
            model.get_buffer(n).copy_(b)
        for n, _ in params:
            p = model.get_parameter(n)
            rows = p.shape[0] if p.dim() else 1
            fill(n, p, 0, rows, rows)
    model.tie_weights()


class CheckpointRows:
    """Reads rows of a model's parameters straight from a HF checkpoint's safetensors files.

    Saved names map to parameter slices as ``save_pretrained`` would write them
    (:func:`view.saved_layout`: per-expert tensors of fused experts, ...); only the rows
    asked for are read. Persistent buffers (e.g. a router's score bias) are loaded whole right away.
    """

    def __init__(self, path: Path, model: torch.nn.Module, format: dict | None = None):
        self.format = format  # a quantized source (source_formats.source_format), or None
        index = path / "model.safetensors.index.json"
        if index.is_file():
            files = {k: path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif (path / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(path / "model.safetensors"), "pt") as f:
                files = {k: path / "model.safetensors" for k in f.keys()}  # noqa: SIM118
        else:
            raise ModelError(f"trainer=fsdp reads safetensors weights, and {path} has none")
        self.files, self.handles = files, {}
        self.pieces: dict[str, list] = {}
        for saved, sl in saved_layout(model, model_tensors(model)).items():
            if saved not in files:
                raise ModelError(
                    f"{path}: the checkpoint has no tensor {saved} (needed for {sl.param}); re-save it with transformers 5"
                )
            self.pieces.setdefault(sl.param, []).append((saved, sl))
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            for name, pieces in self.pieces.items():
                if name in buffers:
                    buffers[name].copy_(self._file(pieces[0][0]).get_tensor(pieces[0][0]).to(buffers[name].dtype))

    def _file(self, saved: str):
        from safetensors import safe_open

        f = self.files[saved]
        if f not in self.handles:
            self.handles[f] = safe_open(str(f), "pt")
        return self.handles[f]

    def _rows(self, saved: str, a: int, b: int, dtype) -> torch.Tensor:
        """Rows ``[a, b)`` of saved tensor ``saved`` (a 0-d one whole), dequantized when the source is FP8."""
        t = self._file(saved).get_slice(saved)
        scale = saved + SCALE_SUFFIX
        if self.format is None or scale not in self.files:
            return t[:] if not t.get_shape() else t[a:b]
        br = self.format["weight_block_size"][0]
        s = self._file(scale).get_slice(scale)[a // br : (b - 1) // br + 1] if b > a else None
        q = t[a:b]
        return dequantize_rows(q, s, a, self.format["weight_block_size"], dtype) if s is not None else q.to(dtype)

    def __call__(self, name: str, out: torch.Tensor, start: int, stop: int, total: int) -> None:
        pieces = self.pieces.get(name)
        if not pieces:
            raise ModelError(f"the checkpoint holds no tensor for parameter {name}")
        for saved, s in pieces:
            n = self._file(saved).get_slice(saved).get_shape()
            n = n[0] if n else 1
            if out.dim() == 0:
                out.copy_(self._rows(saved, 0, 1, out.dtype))
            elif s.expert is not None:  # one expert's rows of a fused [E, rows, in] parameter
                if start <= s.expert < stop:
                    out[s.expert - start, s.start : s.stop].copy_(self._rows(saved, 0, n, out.dtype))
            elif s.full:
                out.copy_(self._rows(saved, start, stop, out.dtype))
            else:  # rows [s.start, s.stop) of dim 0
                a, b = max(start, s.start), min(stop, s.stop)
                if a < b:
                    out[a - start : b - start].copy_(self._rows(saved, a - s.start, b - s.start, out.dtype))


def byte_tokenizer(bos: bool = False):
    """A byte-level tokenizer (256 bytes + <|endoftext|>) for tiny random models; nothing to download.
    ``bos``: it also has ``<bos>`` and starts every input with it, as Gemma's and Llama 3's do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    if bos:
        vocab["<bos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if not bos:
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def build_tiny(
    config_class: str,
    config: dict,
    seed: int = 0,
    dtype: str = "float32",
    name: str = "tiny",
    device: str = "cpu",
    init: str = "transformers",
    sharded: bool = False,
    bos: bool = False,
) -> LoadedModel:
    """A random model from a transformers config class (e.g. ``LlamaConfig``) and a byte tokenizer.

    ``device="cuda"`` builds and initializes it on the GPU (a multi-billion-parameter random model
    in seconds instead of minutes of CPU init; under torchrun on this rank's GPU).
    ``init="per_param"``: every parameter drawn from its own seeded generator (:class:`RandomRows`),
    so the weights do not depend on how the model is split; with ``sharded=True`` (``trainer=fsdp``)
    the model stays on the meta device and each rank draws only its rows - a random model larger
    than one GPU. ``bos``: its tokenizer starts every input with a BOS token (rows begin with it).
    """
    import transformers
    from transformers import AutoModelForCausalLM

    if init not in ("transformers", "per_param"):
        raise ModelError(f"model.init={init!r} unknown; use transformers or per_param")
    cls = getattr(transformers, config_class, None)
    if cls is None:
        raise ModelError(f"transformers has no config class {config_class!r}")
    tok = byte_tokenizer(bos)
    cfg = cls(**{"vocab_size": len(tok), **dict(config)})
    cfg.pad_token_id = tok.pad_token_id
    cfg.eos_token_id = tok.eos_token_id
    cfg.bos_token_id = tok.bos_token_id if bos else tok.eos_token_id
    torch.manual_seed(seed)
    if device != "cpu" and not torch.cuda.is_available():
        raise ModelError(f"model.device={device} but no CUDA device is available; use model.device=cpu")
    if device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if init == "transformers":
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=_dtype(dtype))
        return LoadedModel(model.eval(), tok, name)
    model = _on_meta(lambda: AutoModelForCausalLM.from_config(cfg, dtype=_dtype(dtype)))
    fill = RandomRows(seed, getattr(cfg, "initializer_range", 0.02))
    if not sharded:  # draw every parameter whole, here
        keep = {n: b.clone() for n, b in model.named_buffers()}
        model.to_empty(device=device)
        with torch.no_grad():
            for n, b in keep.items():
                model.get_buffer(n).copy_(b)
            for n, p in model.named_parameters():
                fill(n, p, 0, p.shape[0] if p.dim() else 1, p.shape[0] if p.dim() else 1)
        model.tie_weights()  # to_empty gave tied parameters (lm_head = embedding) storage of their own
        fill = None
    return LoadedModel(model.eval(), tok, name, fill)


class RandomRows:
    """Seeded random parameters, reproducible row by row: norms 1, biases 0, others N(0, std).

    A 3-D (fused experts) parameter draws each expert from its own generator, smaller ones are
    drawn whole and sliced, so any split of the rows across ranks gives the same weights.
    """

    def __init__(self, seed: int, std: float):
        self.seed, self.std = seed, std

    def _gen(self, device: torch.device, *key) -> torch.Generator:
        import zlib

        return torch.Generator(device=device).manual_seed(zlib.crc32(repr((self.seed, *key)).encode()))

    def __call__(self, name: str, out: torch.Tensor, start: int, stop: int, total: int) -> None:
        if out.dim() <= 1 and not name.endswith("embed_tokens.weight"):
            out.fill_(0.0 if name.endswith("bias") else 1.0)
        elif out.dim() == 3:
            for e in range(start, stop):
                x = torch.empty(out.shape[1:], dtype=torch.float32, device=out.device)
                out[e - start].copy_(x.normal_(0.0, self.std, generator=self._gen(out.device, name, e)))
        else:
            x = torch.empty((total, *out.shape[1:]), dtype=torch.float32, device=out.device)
            x.normal_(0.0, self.std, generator=self._gen(out.device, name))
            out.copy_(x[start:stop])


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


def fill_from_memory(model: torch.nn.Module) -> Callable[[str, torch.Tensor, int, int, int], None]:
    """A ``fill`` over a model held in memory (for layer-by-layer calibration of a model that cannot be
    built on the meta device: the embedded default, a model given to the Python API).

    The model's parameters are kept aside (no copy) and replaced by meta parameters of the same shape
    and dtype (buffers, such as RoPE tables, stay); ``fill(name, out, start, stop, rows)`` copies rows
    ``[start, stop)`` of the kept parameter into ``out``. Tied parameters are kept under every name.
    """
    kept = {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)}
    for mod in model.modules():
        for leaf, p in list(mod._parameters.items()):
            if p is not None and not p.is_meta:
                mod._parameters[leaf] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)

    def fill(name: str, out: torch.Tensor, start: int, stop: int, rows: int) -> None:
        src = kept[name]
        out.copy_(src[start:stop] if src.dim() else src)

    return fill
