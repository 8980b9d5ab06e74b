"""Tabulate a multirun: ``python -m nvfp4cal.cli.tabulate multirun/DATE/TIME`` (or any folder of runs).

Reads every ``report.json`` below the folder, prints one Markdown row per run (sorted by the
objective) and writes the same table to ``summary.md`` in that folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(root: Path) -> list[dict]:
    out = []
    for f in sorted(root.rglob("report.json")):
        r = json.loads(f.read_text())
        ppl = r.get("perplexity", {})
        dead = sum(len(e["experts"]) for e in r.get("experts", []))
        out.append(
            {
                "run": str(f.parent.relative_to(root)) or ".",
                "recipe": r["recipe"],
                "samples": r["calibration_samples"],
                "seq_len": r["seq_len"],
                "ppl original": ppl.get("original"),
                "ppl max": ppl.get("max_calibrated"),
                "ppl quantized": ppl.get("quantized"),
                "dead experts": dead,
                "seconds": round(sum(s["seconds"] for s in r["stages"].values()), 1),
                "objective": r.get("objective", {}).get("value"),
            }
        )
    return sorted(out, key=lambda x: (x["objective"] is None, x["objective"] or 0.0))


def markdown(table: list[dict]) -> str:
    if not table:
        return "no report.json found\n"
    cols = list(table[0])
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(row[c]) for c in cols) + " |" for row in table]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: nvfp4cal-tabulate MULTIRUN_DIR", file=sys.stderr)
        return 2
    root = Path(argv[0])
    text = markdown(rows(root))
    (root / "summary.md").write_text(text)
    print(text, end="")
    return 0


def cli() -> None:
    """Console-script entry point: exit with :func:`main`'s status."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
