"""Do two checkpoints hold the same tensors, byte for byte, whatever their shard layout?

Usage: python bench/same_tensors.py DIR_A DIR_B   (exit 0 and "same" when they do)
A GPU run writes unquantized tensors into shards of their own while it calibrates and a sharded
run writes in saved order, so their files differ while every tensor is equal.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open


def tensors(d: Path) -> dict[str, Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        return {k: d / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        return {k: d / "model.safetensors" for k in f.keys()}  # noqa: SIM118


def main() -> int:
    a, b = (Path(p) for p in sys.argv[1:3])
    ta, tb = tensors(a), tensors(b)
    if set(ta) != set(tb):
        print(f"different names: {sorted(set(ta) ^ set(tb))[:5]}")
        return 1
    handles = {}

    def get(f, k):
        if f not in handles:
            handles[f] = safe_open(str(f), "pt")
        t = handles[f].get_tensor(k)
        return t.reshape(-1).view(torch.uint8) if t.numel() else t  # bytes: FP8 and NaN-safe

    bad = [k for k in ta if not get(ta[k], k).equal(get(tb[k], k))]
    configs = [
        f
        for f in ("config.json", "hf_quant_config.json")
        if (a / f).is_file() != (b / f).is_file() or (a / f).is_file() and (a / f).read_bytes() != (b / f).read_bytes()
    ]
    print(f"{len(ta)} tensors, {len(bad)} differ {bad[:5]}; configs differ: {configs}")
    print("same" if not bad and not configs else "DIFFERENT")
    return 0 if not bad and not configs else 1


if __name__ == "__main__":
    sys.exit(main())
