"""Quality benchmark: held-out perplexity of one model under several recipes, same tokens for all.

    .venv/bin/python bench/quality.py                                   # dense SmolLM2, max / mse / hessian_mse
    .venv/bin/python bench/quality.py --model smollm2_moe --recipes nvfp4_experts_only_mse_fp8_cast_kv,...
    .venv/bin/python bench/quality.py --trainer gpu                     # on a CUDA GPU
    .venv/bin/python bench/quality.py --dump-tokens T.safetensors       # the tokens, for a peer tool
    .venv/bin/python bench/quality.py --judge DIR [DIR ...]             # any checkpoints, one judge
    .venv/bin/python bench/quality.py --judge A B --baseline C          # ... each paired with C token by token

Every recipe runs the real pipeline (``nvfp4cal.calibrate.run`` on the composed config) with the same
model, calibration samples and held-out samples (``data.seed``); the quantized perplexity is what the
export computes (fake quant with the exported scales). With ``--judge-all`` (and ``--judge``) every
checkpoint, ours or a peer's, is scored by ``nvfp4cal-evaluate`` (:func:`nvfp4cal.cli.evaluate.evaluate`:
our W4A4 reader, fp32) against the original model on every evaluation set (the corpus's held-out rows and
the other-kind sets of ``eval=default``, e.g. ``code``): perplexity, KL to the original, and the share of max
calibration's increase removed per set. Prints a markdown table (also written to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def model_args(model: str) -> list[str]:
    """``--model NAME`` or ``NAME@key=value@...`` (``hf@model.path=DIR``) as Hydra overrides."""
    name, *own = model.split("@")
    return [f"model={name}", *own]


def run_recipe(
    model: str,
    recipe: str,
    trainer: str,
    data: list[str],
    extra: list[str],
    keep: str | None = None,
    judge_all: bool = False,
) -> dict:
    """One row: ``recipe`` is a recipe name, optionally with overrides of its own after ``@``
    (``nvfp4_gptq@recipe.algorithm.scales=max``); ``judge_all``: score the export with the judge even
    when the run measured its own perplexity (one judge for every row)."""
    from hydra import compose, initialize_config_module

    from nvfp4cal.calibrate import run

    name, *own = recipe.split("@")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(keep) / recipe.replace("@", "_").replace("=", "-") if keep else Path(tmp) / "ckpt"
        with initialize_config_module(config_module="nvfp4cal.conf", version_base=None):
            overrides = [*model_args(model), f"recipe={name}", f"trainer={trainer}", f"export.dir={out}", *data, *extra]
            overrides += own
            cfg = compose(config_name="calibrate", overrides=overrides)
        rep = run(cfg, Path(tmp) / "run").report
        if judge_all or "quantized" not in rep["perplexity"]:  # a layer-by-layer run measures none
            rep["judged"] = judge_sets(str(out), model, data, device="cuda" if trainer == "gpu" else "cpu")
            rep["perplexity"]["quantized"] = rep["judged"]["corpus"]["perplexity"]["quantized"]
            rep["perplexity"]["original"] = rep["judged"]["corpus"]["perplexity"]["original"]
        return rep


def original_dir(model: str) -> str:
    """The unquantized model's directory for ``--model`` (what nvfp4cal-evaluate compares against)."""
    name, *own = model.split("@")
    paths = [o.split("=", 1)[1] for o in own if o.startswith("model.path=")]
    if paths:
        return paths[0]
    from nvfp4cal.model import packaged

    dirs = {"smollm2": packaged.smollm2_dir, "gemma3_270m": packaged.gemma3_270m_dir}
    if name not in dirs:
        raise SystemExit("--judge-all needs the original model as a directory: use --model hf@model.path=DIR")
    return str(dirs[name](".cache"))


def judge_sets(ckpt: str, model: str, data: list[str], device: str = "cpu", baseline: str | None = None) -> dict:
    """Every evaluation set's figures for ``ckpt`` against the original (nvfp4cal-evaluate, fp32); with
    ``baseline`` (a checkpoint) also its per-token loss difference from that one (``vs_baseline``)."""
    from nvfp4cal.cli.evaluate import evaluate

    with tempfile.TemporaryDirectory() as tmp:
        rep = evaluate(ckpt, original_dir(model), data, report=tmp, dtype="float32", device=device, baseline=baseline)
        return rep["evaluation"]


def tokens(model: str, data: list[str]):
    """(calibration, held-out) token tensors exactly as a run with these overrides sees them."""
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    from nvfp4cal.calibrate import calibration_data

    with initialize_config_module(config_module="nvfp4cal.conf", version_base=None):
        cfg = compose(config_name="calibrate", overrides=[*model_args(model), *data])
    dm = calibration_data(cfg, instantiate(cfg.model, _convert_="all").tokenizer)
    dm.setup("validate")
    return dm.calib, dm.held_out, dm


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--recipes", default="nvfp4_max,nvfp4_mse,nvfp4_hessian_mse")
    ap.add_argument("--trainer", default="cpu")
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", default=None, help="markdown file for the table (default: print only)")
    ap.add_argument("--dump-tokens", help="write the calibration and held-out tokens (safetensors) and stop")
    ap.add_argument("--judge", nargs="*", help="score these checkpoint dirs with our reader instead of calibrating")
    ap.add_argument("--keep", help="keep each recipe's export under this dir (for --judge)")
    ap.add_argument(
        "--baseline", help="with --judge: pair every checkpoint's losses with this checkpoint's, token by token"
    )
    ap.add_argument("--max-row", default="nvfp4_max", help="the row that is max calibration's reference")
    ap.add_argument("--judge-all", action="store_true", help="score every row's export with the judge (fp32)")
    ap.add_argument("overrides", nargs="*", help="more key=value overrides for every run")
    args = ap.parse_args(argv)
    data = [
        f"data.num_samples={args.num_samples}",
        f"data.seq_len={args.seq_len}",
        f"data.eval_samples={args.eval_samples}",
        f"data.batch_size={args.batch_size}",
    ]
    if args.dump_tokens or args.judge:
        calib, held_out, dm = tokens(args.model, data)
        if args.dump_tokens:
            from safetensors.torch import save_file

            save_file({"calib": calib.contiguous(), "held_out": held_out.contiguous()}, args.dump_tokens)
            print(f"{args.dump_tokens}: calib {tuple(calib.shape)}, held-out {tuple(held_out.shape)}")
            return 0
        device = "cuda" if args.trainer == "gpu" else "cpu"
        judged = {c: judge_sets(c, args.model, data, device, args.baseline) for c in args.judge}
        names = list(next(iter(judged.values())))
        vs = bool(args.baseline)
        head = "| checkpoint | " + " | ".join(f"{n}: ppl | {n}: KL mean" + (f" | {n}: vs baseline" if vs else "")
                                             for n in names) + " |"  # fmt: skip
        rows = ["| " + c + " | " + " | ".join(_judged_cells(e[n], vs) for n in names) + " |" for c, e in judged.items()]
        table = "\n".join([head, "|" + "---|" * (1 + (2 + vs) * len(names)), *rows])
        if vs:
            table += f"\n\nvs baseline ({args.baseline}): mean per-token loss difference (log of the perplexity ratio) +- its standard error"
        print(table)
        if args.out:
            Path(args.out).write_text(table + "\n")
        return 0
    rows = []
    for recipe in args.recipes.split(","):
        rep = run_recipe(args.model, recipe, args.trainer, data, args.overrides, args.keep, args.judge_all)
        ppl = rep["perplexity"]
        rows.append(
            {
                "recipe": recipe,
                "original": ppl["original"],
                "max": ppl.get("max_calibrated", ppl["quantized"]),
                "quantized": ppl["quantized"],
                "sweep_s": rep["stages"].get("sweep", {}).get("seconds"),
                "gptq_s": rep["stages"].get("gptq", {}).get("seconds"),
                "calibration_s": rep["stages"]["calibration"]["seconds"],
                "total_s": rep["wall_seconds"],
                "fallback": len(rep.get("sweep", {}).get("fallback", [])),
                "judged": rep.get("judged"),
                # the run's own evaluation sets (the model's fake-quant forward, not the judge): e.g. code
                "sets": {
                    n: {
                        "ppl": e["perplexity"],
                        "kl_mean": e["kl_mean"],
                        "top1": e["top1_agreement"],
                        "removed": e.get("share_of_max_increase_removed"),
                    }
                    for n, e in rep.get("evaluation", {}).items()
                },
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    orig = rows[0]["original"]
    max_rows = [r["quantized"] for r in rows if r["recipe"] == args.max_row]
    for r in rows:  # the max-calibrated reference: the nvfp4_max row where there is one (same judge)
        r["max"] = max_rows[0] if max_rows else r["max"]
    lines = [
        f"model={args.model}, {args.num_samples} x {args.seq_len} calibration tokens, "
        f"{args.eval_samples} x {args.seq_len} held-out tokens, trainer={args.trainer}"
        + (", every row scored by the judge (our W4A4 reader, fp32)" if args.judge_all else ""),
        "",
        "| recipe | perplexity | vs original | share of max's increase removed | sweep s | gptq s | calibration s "
        "| run s |",
        "|---|---|---|---|---|---|---|---|",
        f"| (original) | {orig:.3f} | | | | | | |",
    ]
    for r in rows:
        gap = r["max"] - r["original"]
        removed = (r["max"] - r["quantized"]) / gap if gap > 0 else float("nan")
        lines.append(
            f"| {r['recipe']} | {r['quantized']:.3f} | +{r['quantized'] - r['original']:.3f} | {removed:+.0%} | "
            f"{r['sweep_s'] if r['sweep_s'] is not None else '-'} | {r['gptq_s'] if r['gptq_s'] is not None else '-'} "
            f"| {r['calibration_s']} | {r['total_s']:.0f} |"
        )
    lines += judged_table(rows, args.max_row)
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


def _judged_cells(e: dict, vs: bool) -> str:
    """``ppl | KL mean`` of one set (and ``log ratio +- standard error`` against the baseline)."""
    cells = f"{e['perplexity']['quantized']:.3f} | {e['kl_mean']:.4f}"
    if vs:
        d = e["vs_baseline"]
        cells += f" | {d['mean_nll_difference']:+.4f} +- {d['standard_error']:.4f}"
    return cells


def judged_table(rows: list[dict], max_row: str) -> list[str]:
    """Per evaluation set (nvfp4cal-evaluate on every row's export): perplexity, the share of the max row's
    increase removed on that set, and mean KL to the original."""
    judged = [r for r in rows if r.get("judged")]
    if not judged:
        return []
    names = list(judged[0]["judged"])
    ref = next((r["judged"] for r in judged if r["recipe"] == max_row), None)
    out = ["", "Every evaluation set, every row scored by nvfp4cal-evaluate (our W4A4 reader, fp32):", "",
           "| recipe | " + " | ".join(f"{n}: ppl | {n}: removed | {n}: KL mean" for n in names) + " |",
           "|---|" + "---|---|---|" * len(names),
           "| (original) | " + " | ".join(f"{judged[0]['judged'][n]['perplexity']['original']:.3f} |  | "
                                        for n in names).rstrip() + " |"]  # fmt: skip
    for r in judged:
        cells = []
        for n in names:
            e, p = r["judged"][n], r["judged"][n]["perplexity"]
            removed = ""
            if ref is not None:
                mx, orig = ref[n]["perplexity"]["quantized"], p["original"]
                removed = f"{(mx - p['quantized']) / (mx - orig):+.0%}" if mx > orig else ""
            cells.append(f"{p['quantized']:.3f} | {removed} | {e['kl_mean']:.4f}")
        out.append(f"| {r['recipe']} | " + " | ".join(cells) + " |")
    return out


if __name__ == "__main__":
    sys.exit(main())
