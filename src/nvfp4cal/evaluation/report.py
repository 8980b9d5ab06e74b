"""The run report: report.json (everything), report.md (short tables) and PNG plots."""

from __future__ import annotations

import importlib.metadata as md
import json
import math
import platform
import re
from pathlib import Path

OBJECTIVES = ("quantized_ppl", "ppl_increase", "total_seconds")


def _layer(name: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def objective(report: dict, name: str) -> float:
    """The scalar a Hydra sweeper ranks (smaller is better)."""
    ppl = report.get("perplexity", {})
    if name == "quantized_ppl":
        return float(ppl.get("quantized", float("nan")))
    if name == "ppl_increase":
        return float(ppl.get("quantized", float("nan")) - ppl.get("original", float("nan")))
    if name == "total_seconds":
        return float(sum(s["seconds"] for s in report["stages"].values()))
    raise ValueError(f"report.objective={name!r} unknown; use one of {OBJECTIVES}")


def worst_modules(report: dict, n: int = 10) -> list[tuple[str, float, float | None]]:
    rows = []
    for name, w in report.get("weights", {}).items():
        final = w.get("mse", w["max"])
        rows.append((name, final["sqnr_db"], w["max"]["sqnr_db"] if "mse" in w else None))
    return sorted(rows, key=lambda r: r[1])[:n]


def worse_than_max(report: dict) -> list[str]:
    """The evaluation sets where the quantized model scores worse than max calibration (one line each;
    a difference below 1e-5 relative, fp32 summation noise of a recipe that changed nothing, is not worse).
    Where the run compared the two token by token (``vs_max``), the line says how many standard errors of
    the per-token loss difference the gap is, and "within noise" below two."""
    out = []
    for name, e in (report.get("evaluation") or {}).items():
        p = e.get("perplexity", {})
        if "max_calibrated" in p and p["quantized"] > p["max_calibrated"] * (1 + 1e-5):
            line = f"{report['recipe']} is worse than max calibration on {name}: perplexity "
            line += f"{p['quantized']:.3f} > {p['max_calibrated']:.3f}"
            vs = e.get("vs_max") or {}
            se = vs.get("standard_error")
            if se is not None and math.isfinite(se) and se > 0:
                z = vs["mean_nll_difference"] / se
                line += f" ({z:.1f} standard errors of the per-token difference{': within noise' if z < 2 else ''})"
            out.append(line)
    return out


def baseline_lines(report: dict) -> list[str]:
    """``nvfp4cal-evaluate ... baseline=``: one line per set, the checkpoint's loss against the baseline's on
    the same tokens (negative: the checkpoint is better), in standard errors of the per-token difference."""
    out = []
    for name, e in (report.get("evaluation") or {}).items():
        vs = e.get("vs_baseline")
        if not vs:
            continue
        d, se = vs["mean_nll_difference"], vs["standard_error"]
        z = d / se if math.isfinite(se) and se > 0 else None
        verdict = "within noise" if z is None or abs(z) < 2 else ("better" if d < 0 else "worse")
        in_se = "" if z is None else f", {z:+.1f} standard errors"
        out.append(f"  vs base {name:<6}: perplexity x{math.exp(d):.4f} (log {d:+.4f} +- {se:.4f}{in_se}: {verdict})")
    return out


def _share(e: dict) -> str:
    """The share of max's increase removed, with its standard error where the run paired the tokens."""
    se = e.get("share_removed_standard_error")
    share = f"{e['share_of_max_increase_removed']:.0%}"
    return share if se is None or not math.isfinite(se) else f"{share} +- {se:.0%}"


def eval_lines(report: dict) -> list[str]:
    """One console line per evaluation set."""
    lines = []
    for name, e in (report.get("evaluation") or {}).items():
        p = e["perplexity"]
        chain = " -> ".join(f"{p[k]:.2f}" for k in ("original", "max_calibrated", "quantized") if k in p)
        removed = (
            f" ({_share(e)} of max's increase removed)" if e.get("share_of_max_increase_removed") is not None else ""
        )
        lines.append(f"  eval {name:<6}: ppl {chain}{removed}; KL mean {e['kl_mean']:.4g} p99 {e['kl_p99']:.4g}, "
                     f"top-1 {e['top1_agreement']:.1%} ({e['tokens']} tokens)")  # fmt: skip
    return lines


def _eval_table(report: dict) -> list[str]:
    lines = ["| set | tokens | ppl original | ppl max | ppl quantized | max's increase removed | KL mean | "
             "KL median | KL p99 | top-1 agreement | RMS Δp |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, e in report["evaluation"].items():
        p, share = e["perplexity"], e.get("share_of_max_increase_removed")
        mx = f"{p['max_calibrated']:.3f}" if "max_calibrated" in p else "-"
        lines.append(f"| {name} | {e['tokens']} | {p['original']:.3f} | {mx} | {p['quantized']:.3f} | "
                     f"{'-' if share is None else _share(e)} | {e['kl_mean']:.4g} | {e['kl_median']:.4g} | "
                     f"{e['kl_p99']:.4g} | {e['top1_agreement']:.1%} | {e['rms_delta_p']:.4g} |")  # fmt: skip
    return lines


def evaluation_markdown(report: dict) -> str:
    """report.md of ``nvfp4cal-evaluate``: the checkpoint against its original, one row per set."""
    lines = [f"# nvfp4cal-evaluate: {report['checkpoint']}", "", f"Original: `{report['original']}`, "
             f"{report['dtype']} on {report['device']}, {report['seconds']:.1f} s.", "", *_eval_table(report)]  # fmt: skip
    if report.get("baseline"):
        lines += ["", f"Against the baseline `{report['baseline']}`, token by token:", "", "```",
                  *(ln.strip() for ln in baseline_lines(report)), "```"]  # fmt: skip
    return "\n".join(lines) + "\n"


def markdown(report: dict) -> str:
    ppl = report.get("perplexity", {})
    lines = [f"# nvfp4cal report: {report['model']} with {report['recipe']}", ""]
    lines += ["| | value |", "|---|---|"]
    for k, label in (
        ("original", "perplexity, original"),
        ("max_calibrated", "perplexity, max calibration"),
        ("quantized", "perplexity, quantized (exported)"),
    ):
        if k in ppl:
            lines.append(f"| {label} | {ppl[k]:.3f} |")
    dead = [(e["module"], e["experts"]) for e in report.get("experts", []) if e["experts"]]
    lines.append(f"| calibration and evaluation rows | {rows_start(report)} |")
    lines.append(f"| quantized weights | {report['quantized']} |")
    lines.append(f"| dead experts | {sum(len(e) for _, e in dead)} in {len(dead)} layers |")
    for e in report.get("exports", [report.get("export", {})]):
        lines.append(f"| checkpoint ({e.get('format', 'modelopt')}) | `{e.get('dir')}` |")
    if report.get("evaluation"):
        lines += ["", "## Evaluation sets (the quantized model against the original)", "", *_eval_table(report)]
        lines += [f"- **{w}**" for w in worse_than_max(report)]
    lines += tune_markdown(report)
    lines += ["", "## Stages", "", "| stage | seconds | peak CPU RSS GiB | peak GPU GiB |", "|---|---|---|---|"]
    for name, s in report["stages"].items():
        gpu = f"{s['gpu_peak_gib']:.2f}" if "gpu_peak_gib" in s else "-"
        lines.append(f"| {name} | {s['seconds']:.1f} | {s['cpu_peak_rss_gib']:.2f} | {gpu} |")
    lines += ["", "## Worst 10 weights by SQNR", "", "| weight | SQNR dB | SQNR dB with max only |", "|---|---|---|"]
    for name, final, mx in worst_modules(report):
        lines.append(f"| {name} | {final:.2f} | {'-' if mx is None else f'{mx:.2f}'} |")
    if dead:
        lines += ["", "## Experts without calibration tokens", ""]
        lines += [f"- {m}: {e}" for m, e in dead]
    return "\n".join(lines) + "\n"


def plots(report: dict, out_dir: Path) -> list[str]:
    """sqnr_per_layer.png and, for MoE models, expert_tokens.png; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    weights = report.get("weights", {})
    if weights:
        fig, ax = plt.subplots(figsize=(8, 4))
        for key, label in (("max", "max calibration"), ("mse", "MSE sweep")):
            per_layer: dict[int, list[float]] = {}
            for name, w in weights.items():
                layer = _layer(name)
                if key in w and layer is not None and math.isfinite(w[key]["sqnr_db"]):
                    per_layer.setdefault(layer, []).append(w[key]["sqnr_db"])
            if per_layer:
                xs = sorted(per_layer)
                ax.plot(xs, [sum(per_layer[x]) / len(per_layer[x]) for x in xs], marker="o", label=label)
        ax.set_xlabel("layer")
        ax.set_ylabel("mean weight SQNR (dB)")
        ax.set_title(f"{report['model']}: NVFP4 weight SQNR per layer")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "sqnr_per_layer.png", dpi=100)
        plt.close(fig)
        written.append("sqnr_per_layer.png")
    experts = report.get("experts", [])
    if experts:
        tokens = [e["tokens"] for e in experts]
        fig, ax = plt.subplots(figsize=(max(4, len(tokens[0]) * 0.5), max(3, len(tokens) * 0.25)))
        im = ax.imshow(tokens, aspect="auto", cmap="viridis")
        for i, row in enumerate(tokens):
            for j, t in enumerate(row):
                if t == 0:
                    ax.text(j, i, "x", ha="center", va="center", color="red", fontsize=8)
        ax.set_yticks(range(len(tokens)), [str(_layer(e["module"] + ".") or i) for i, e in enumerate(experts)])
        ax.set_xticks(range(len(tokens[0])))
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_title("calibration tokens per expert (x: none)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out_dir / "expert_tokens.png", dpi=100)
        plt.close(fig)
        written.append("expert_tokens.png")
    return written


def write_report(run_dir: Path, report: dict) -> list[str]:
    run_dir = Path(run_dir)
    report["plots"] = plots(report, run_dir)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (run_dir / "report.md").write_text(markdown(report))
    return ["report.json", "report.md", *report["plots"]]


def versions() -> dict[str, str]:
    """The packages' versions, and Python's: the embedded corpus (``pydoc_data.topics``) and the ``code`` set
    (standard-library source) are read from the running Python, so their figures compare within one version."""
    out = {"python": platform.python_version()}
    for pkg in ("nvfp4cal", "torch", "triton", "transformers", "lightning", "datasets", "hydra-core"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _exported(exp: dict) -> str:
    """`` (N tensors in the export)``, with the count per format when not all are NVFP4 W4A4."""
    if exp.get("quantized_tensors") is None:
        return ""
    formats = exp.get("formats") or {}
    per = f"; {', '.join(f'{n} {f}' for f, n in formats.items())}" if set(formats) - {"nvfp4"} else ""
    return f" ({exp['quantized_tensors']} tensors in the export{per})"


def tune_line(report: dict) -> list[str]:
    """The console's line on layer-output tuning: how many layers moved, and the validation losses."""
    layers = (report.get("tune") or {}).get("layers") or []
    if not layers:
        return []
    moved = sum(1 for r in layers if r.get("kept_iteration"))
    val = [r["validation_loss"] for r in layers if r.get("validation_loss")]
    ratio = (
        f"; validation loss kept/start {sum(k for _, k in val) / sum(s for s, _ in val):.3f} (summed over layers)"
        if val
        else ""
    )
    kept = sum(len(r.get("kept_start", [])) for r in layers)
    return [f"  tuning     : {moved} of {len(layers)} layers moved from their start{ratio}"
            + (f"; {kept} experts kept their start (too few tokens)" if kept else "")]  # fmt: skip


def tune_markdown(report: dict) -> list[str]:
    """report.md's per-layer table of layer-output tuning: the losses at the start and at the kept iterate."""
    layers = (report.get("tune") or {}).get("layers") or []
    if not layers:
        return []
    lines = ["", "## Layer-output tuning (each layer tuned on each decoder layer's output)", "",
             "Training loss on the first training batches, validation loss on the held-out batches that chose the "
             "kept iterate (never worse than the start there). A training loss that falls while the validation "
             "loss does not is fitting.", "",
             "| layer | kept iteration | training loss start -> kept | validation loss start -> kept | kept start |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in layers:
        tr, va = r.get("train_loss"), r.get("validation_loss")
        fmt = lambda p: f"{p[0]:.4g} -> {p[1]:.4g}" if p else "-"  # noqa: E731
        lines.append(f"| {r['layer']} | {r['kept_iteration']} / {r['iterations']} | {fmt(tr)} | {fmt(va)} | "
                     f"{len(r.get('kept_start', []))} |")  # fmt: skip
    return lines


def rows_start(report: dict) -> str:
    """How the run's rows begin: with the tokenizer's BOS (as the model reads text in use) or not."""
    srcs = (report.get("data") or {}).get("sources", {}).values()
    return "rows start with BOS" if any(s.get("bos") for s in srcs) else "rows without BOS (the tokenizer adds none)"


def print_summary(report: dict, run_dir: Path) -> None:
    exports = report.get("exports") or [{}]
    exp = exports[0]
    ppl = report.get("perplexity", {})
    ppl_line = " -> ".join(f"{k} {ppl[k]:.2f}" for k in ("original", "max_calibrated", "quantized") if k in ppl)
    dead = [(e["module"], e["experts"]) for e in report.get("experts", []) if e["experts"]]
    lines = [
        "",
        f"nvfp4cal: {report['model']} with {report['recipe']}",
        *(
            (f"  checkpoint : {e['dir']} ({e['format']} layout)" for e in exports)
            if report.get("exports")
            else ["  checkpoint : not written (export.dir=null)"]
        ),
        f"  quantized  : {report['quantized']} weights{_exported(exp)}",
        f"  excluded   : {len(exp.get('excluded', []))} modules kept in their dtype",
        f"  dead experts: {sum(len(e) for _, e in dead)} in {len(dead)} layers"
        + "".join(f"\n    {m}: experts {e}" for m, e in dead[:10])
        + (f"\n    ... {len(dead) - 10} more layers" if len(dead) > 10 else ""),
        f"  perplexity : {ppl_line or 'not measured'} (held-out, {report['held_out_samples']} samples, "
        f"{rows_start(report)})",
        *eval_lines(report),
        *tune_line(report),
        *(f"  warning    : {w}" for w in worse_than_max(report)),
        *(
            [
                f"  sharded    : {sh['ranks']} ranks hold "
                + ", ".join(f"{b / 2**30:.3f}" for b in sh["param_bytes_per_rank"])
                + f" of {sh['param_bytes'] / 2**30:.3f} GiB of parameters"
            ]
            if (sh := report.get("sharding"))
            else []
        ),
        *(
            [f"  GPU peaks  : {report['gpu_peak_gib_per_rank']} GiB per rank"]
            if "gpu_peak_gib_per_rank" in report
            else []
        ),
        "  stage times: " + ", ".join(f"{k} {v['seconds']:.1f}s" for k, v in report["stages"].items()),
        f"  report     : {run_dir.resolve() / 'report.md'} (+ report.json, {', '.join(report.get('plots', []))})",
    ]
    print("\n".join(lines), flush=True)
