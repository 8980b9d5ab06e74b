"""Score any NVFP4 checkpoint against its original model on the evaluation sets:

    nvfp4cal-evaluate CHECKPOINT original=MODEL_DIR [baseline=CHECKPOINT] [report=DIR] [dtype=float32]
                      [device=cpu|cuda] [eval=default|corpus] [+eval.sets.NAME={...}] [data=text ...] ...

The checkpoint is ours or another tool's, in the modelopt or the compressed-tensors layout; it is read by
our W4A4 reader (:func:`nvfp4cal.checkpoint.reload.rebuild_model`: what an engine computes, emulated).
The sets are those a calibration run with the same ``data``/``eval`` overrides reports (the corpus's
held-out rows, ``code``, your own); the figures are those of :mod:`nvfp4cal.evaluation.compare`. Writes
``report.json`` and ``report.md`` to ``report`` (default ``outputs/evaluate/<checkpoint name>``) and one
line per set to the console. ``baseline=``: a second checkpoint of the same model (another recipe, another
tool) read the same way; each set then also says, token by token, how the checkpoint's loss differs from the
baseline's (``vs_baseline``: the mean difference, the log of the perplexity ratio, and its standard error),
so that two close recipes can be told apart from the set's sampling noise. A mistake is one line on stderr
and exit code 2, before any model loads where it can be checked.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from ..calibrate import evaluation_inputs
from ..checkpoint.reload import rebuild_model
from ..console import quiet_libraries, user_error
from ..evaluation.compare import compare_models, paired
from ..evaluation.metrics import token_nll
from ..evaluation.report import baseline_lines, eval_lines, evaluation_markdown
from ..evaluation.sets import CORPUS, batches
from ..model.loaders import load_hf
from ..numerics.errors import UserError

OWN_KEYS = ("original", "baseline", "report", "dtype", "device")


def _config(path: Path) -> dict:
    f = path / "config.json"
    if not f.is_file():
        raise UserError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    return json.loads(f.read_text())


def _check_pair(what: str, path: Path, orig: Path) -> None:
    """``path`` (a checkpoint) is a Hugging Face directory of ``orig``'s architecture and vocabulary."""
    qc, oc = _config(path), _config(orig)
    if qc.get("vocab_size") != oc.get("vocab_size") or qc.get("architectures") != oc.get("architectures"):
        raise UserError(
            f"{what}{path} ({qc.get('architectures')}, vocabulary {qc.get('vocab_size')}) does not match "
            f"original={orig} ({oc.get('architectures')}, vocabulary {oc.get('vocab_size')})"
        )


def evaluate(checkpoint: str, original: str, overrides: list[str] = (), report: str | None = None,
             dtype: str = "float32", device: str = "cpu", baseline: str | None = None) -> dict:  # fmt: skip
    """Score ``checkpoint`` against ``original`` (both directories), and token by token against ``baseline``
    (a second checkpoint) where given; returns the report (also written)."""
    ckpt, orig = Path(checkpoint), Path(original)
    pairs = [("checkpoint ", ckpt)] + ([("baseline=", Path(baseline))] if baseline is not None else [])
    for what, path in pairs:
        if not path.is_dir():
            raise UserError(f"{what}{path} is not a directory")
    if not orig.is_dir():
        raise UserError(f"original={orig} is not a directory")
    for what, path in pairs:
        _check_pair(what, path, orig)
    if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
        raise UserError(f"dtype={dtype} is not a torch dtype; use float32, bfloat16 or float16")
    data, evals, _ = evaluation_inputs(list(overrides))  # the texts are read before the models load
    t0 = time.perf_counter()
    loaded = load_hf(str(orig), dtype=dtype)
    data.tokenizer = loaded.tokenizer
    data.setup("validate")
    sets = {CORPUS: lambda: data.eval_dataloader()}
    for name, rows in evals.tokenized(loaded.tokenizer).items():
        sets[name] = lambda rows=rows: batches(rows, data.batch_size)
    base_nll = {}
    if baseline is not None:  # its losses first, then the model is dropped: one checkpoint in memory at a time
        base = rebuild_model(Path(baseline), dtype=getattr(torch, dtype)).to(device)
        base_nll = {name: token_nll(base, b(), "quant") for name, b in sets.items()}
        del base
    quantized = rebuild_model(ckpt, dtype=getattr(torch, dtype))
    original_model = loaded.model.to(device)
    quantized.to(device)
    found = {}
    for name, b in sets.items():
        comp = compare_models(original_model, quantized, b())
        found[name] = comp.result()
        if name in base_nll:
            found[name]["vs_baseline"] = paired(comp.token_nll(), base_nll[name])
    out = {
        "checkpoint": str(ckpt.resolve()), "original": str(orig.resolve()), "dtype": dtype, "device": device,
        "recipe": f"checkpoint {ckpt.name}", "evaluation": found, "baseline": str(Path(baseline).resolve()) if baseline else None,
        "perplexity": found[CORPUS]["perplexity"], "seconds": round(time.perf_counter() - t0, 3),
        "overrides": list(overrides),
    }  # fmt: skip
    where = Path(report) if report else Path("outputs") / "evaluate" / ckpt.resolve().name
    where.mkdir(parents=True, exist_ok=True)
    (where / "report.json").write_text(json.dumps(out, indent=2))
    (where / "report.md").write_text(evaluation_markdown(out))
    print("\n".join([f"nvfp4cal-evaluate: {ckpt} against {orig}", *eval_lines(out), *baseline_lines(out),
                     f"  report     : {where.resolve() / 'report.md'}"]), flush=True)  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        print("usage: nvfp4cal-evaluate CHECKPOINT original=MODEL_DIR [baseline=CHECKPOINT] [report=DIR] [dtype=...] "
              "[device=...] [eval=...] [data=...] [key=value ...]", file=sys.stderr)  # fmt: skip
        return 2
    own = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv[1:] if a.split("=", 1)[0] in OWN_KEYS}
    rest = [a for a in argv[1:] if a.split("=", 1)[0] not in OWN_KEYS]
    quiet_libraries()
    try:
        if "original" not in own:
            raise UserError("original=MODEL_DIR is required: the unquantized model the checkpoint was made from")
        evaluate(argv[0], own["original"], rest, own.get("report"), own.get("dtype", "float32"),
                 own.get("device", "cpu"), own.get("baseline"))  # fmt: skip
    except Exception as err:  # noqa: BLE001
        msg = user_error(err)
        if msg is None:
            raise
        print(f"nvfp4cal-evaluate: error: {msg}", file=sys.stderr, flush=True)
        return 2
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
