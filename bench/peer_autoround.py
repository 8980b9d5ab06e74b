"""auto-round (Intel's SignRound) NVFP4 on the same model and calibration tokens as bench/quality.py: the
peer row of the quality table (#25, #31).

Runs beside the peer tools, never from the project's environment (on the GPU machine, ``peer-wheels.sh``'s
header: ``PYTHONPATH=/tmp/peers:/tmp/site``)::

    python bench/peer_autoround.py MODEL_DIR TOKENS.safetensors OUT_DIR [ITERS] [BATCH]

``TOKENS.safetensors`` holds ``calib`` [n, seq] token ids (``bench/quality.py --dump-tokens``): auto-round
receives exactly those rows, in batches of ``BATCH`` (default 8), ``nsamples = n``, ``seqlen = seq``,
``iters = ITERS`` (default 50), scheme NVFP4 (every Linear but lm_head W4A4). The checkpoint
(``format="llm_compressor"``) lands in a subfolder of ``OUT_DIR``; ``bench/quality.py --judge`` scores it
with our reader. Prints one JSON line: iterations, rows, seconds, the checkpoint folder.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3:
        raise SystemExit(__doc__)
    model_dir, tokens, out = argv[0], argv[1], Path(argv[2])
    iters = int(argv[3]) if len(argv) > 3 else 50
    batch = int(argv[4]) if len(argv) > 4 else 8
    import torch
    from auto_round import AutoRound
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calib = load_file(tokens)["calib"]
    rows, seq = calib.shape
    batches = [calib[i : i + batch] for i in range(0, rows, batch)]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(model_dir)
    t0 = time.perf_counter()
    ar = AutoRound(model, tok, scheme="NVFP4", dataset=batches, nsamples=rows, seqlen=seq, iters=iters,
                   batch_size=batch)  # fmt: skip
    ar.quantize_and_save(str(out), format="llm_compressor")
    seconds = time.perf_counter() - t0
    ckpt = sorted(p.parent for p in out.rglob("config.json"))
    print(json.dumps({"iters": iters, "rows": rows, "seq_len": seq, "batch": batch, "seconds": round(seconds, 1),
                      "checkpoint": str(ckpt[0]) if ckpt else None}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
