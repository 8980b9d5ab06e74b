"""Write (or compare) the checkpoints of every tiny family x every recipe x both layouts, plus
layer-by-layer runs, on the CPU: the byte-identity check of a refactoring.

Usage:
  python bench/same_checkpoints.py write OUT [--part K/N] [--like BASE]   # one tree (K = 0..N-1; before, after;
                                                            # --like: only the cases BASE holds)
  python bench/same_checkpoints.py compare OUT_A OUT_B      # every file of every checkpoint, byte for byte

Each case writes OUT/<case>/modelopt and OUT/<case>/compressed_tensors (export.format=both), or
OUT/<case>/error.txt with the one-line error when the recipe cannot run on that family.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
SMALL = ["data.num_samples=6", "data.seq_len=32", "data.batch_size=2", "data.eval_samples=2"]
LAYERWISE = ["calibration=layerwise", "+model.init=per_param"]


def cases() -> list[tuple[str, list[str]]]:
    conf = ROOT / "src" / "nvfp4cal" / "conf"
    recipes = sorted(p.stem for p in (conf / "recipe").glob("*.yaml") if not p.stem.startswith("_"))
    families = sorted(p.stem for p in (conf / "model").glob("tiny_*.yaml"))
    out = []
    for fam in families:
        # GPT-OSS saves its experts fused: the modelopt layout only
        fmt = ["export.format=modelopt"] if fam == "tiny_gpt_oss" else []
        for rec in recipes:
            own = "gptq" in rec or "tune" in rec  # layer by layer on quantized inputs only
            extra = [*LAYERWISE, "calibration.propagate=quantized", "recipe.algorithm.min_tokens=1"] if own else []
            out.append((f"{fam}__{rec}", [f"model={fam}", f"recipe={rec}", *extra, *fmt]))
        # layer by layer, unquantized propagation (= the whole-model run) and quantized propagation
        out.append((f"{fam}__layerwise_mse", [f"model={fam}", "recipe=nvfp4_mse", *LAYERWISE, *fmt]))
        out.append((f"{fam}__layerwise_q_hessian", [f"model={fam}", "recipe=nvfp4_hessian_mse", *LAYERWISE,
                                                     "calibration.propagate=quantized", *fmt]))  # fmt: skip
    return out


def write(root: Path, part: str, like: Path | None = None) -> None:
    import torch

    from helpers import compose
    from nvfp4cal.calibrate import run
    from nvfp4cal.console import user_error

    torch.set_num_threads(1)
    k, n = (int(x) for x in part.split("/"))
    todo = [c for c in cases() if like is None or (like / c[0]).exists()][k::n]
    for i, (name, overrides) in enumerate(todo):
        out = root / name
        if out.exists():
            continue
        t0 = time.perf_counter()
        cfg = compose([f"export.dir={out}", "export.format=both", "trainer.enable_progress_bar=false",
                       "report.perplexity=false", *SMALL, *overrides])  # fmt: skip
        try:
            run(
                cfg,
                root / "_runs" / name,
                **({"explicit": overrides} if "explicit" in run.__code__.co_varnames else {}),
            )
            status = "ok"
        except Exception as err:  # noqa: BLE001
            msg = user_error(err)
            if msg is None:
                raise
            out.mkdir(parents=True)
            (out / "error.txt").write_text(msg + "\n")
            status = f"error: {msg}"
        print(f"[{i + 1}/{len(todo)}] {name}: {status} ({time.perf_counter() - t0:.1f} s)", flush=True)


def compare(a: Path, b: Path) -> int:
    names = sorted(p.name for p in a.iterdir() if not p.name.startswith("_"))
    bad = 0
    files = 0
    for name in names:
        da, db = a / name, b / name
        if not db.exists():
            print(f"{name}: missing in {b}")
            bad += 1
            continue
        fa = sorted(p.relative_to(da) for p in da.rglob("*") if p.is_file())
        fb = sorted(p.relative_to(db) for p in db.rglob("*") if p.is_file())
        if fa != fb:
            print(f"{name}: different files {sorted(set(fa) ^ set(fb))}")
            bad += 1
            continue
        diff = [str(f) for f in fa if not filecmp.cmp(da / f, db / f, shallow=False)]
        files += len(fa)
        if diff:
            print(f"{name}: differ: {diff}")
            bad += 1
    print(f"{len(names)} cases, {files} files compared, {bad} cases differ")
    return 1 if bad else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["write", "compare"])
    p.add_argument("dirs", nargs="+")
    p.add_argument("--part", default="0/1")
    p.add_argument("--like", type=Path, default=None, help="write only the cases this earlier tree holds")
    args = p.parse_args()
    if args.what == "write":
        write(Path(args.dirs[0]), args.part, args.like)
    else:
        sys.exit(compare(Path(args.dirs[0]), Path(args.dirs[1])))
