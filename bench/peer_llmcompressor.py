"""llm-compressor's NVFP4 recipes on the same model and calibration tokens as bench/quality.py.

Runs in llm-compressor's own venv (``bench/peer_llmcompressor.sh`` makes it; never the project's):

    python bench/peer_llmcompressor.py MODEL_DIR TOKENS.safetensors OUT_DIR

``TOKENS.safetensors`` holds ``calib`` [n, seq] token ids (``bench/quality.py --dump-tokens``). Writes
one compressed-tensors checkpoint per configuration under ``OUT_DIR`` (every Linear but lm_head NVFP4
W4A4, as our ``nvfp4_*`` recipes): ``rtn`` (QuantizationModifier, its default min-max observer),
``mse`` and ``imatrix_mse`` (the same with those weight observers), ``gptq`` (GPTQModifier, its
sequential pipeline).
``bench/quality.py --judge`` then scores them with our reader on the held-out tokens.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    model_dir, tokens, out = argv[0], argv[1], Path(argv[2])
    only = argv[3].split(",") if len(argv) > 3 else ["rtn", "mse", "imatrix_mse", "gptq"]
    import llmcompressor
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calib = load_file(tokens)["calib"]
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})

    def observed(observer: str):
        """llm-compressor's NVFP4 scheme with another weight observer."""
        from compressed_tensors.quantization import QuantizationScheme
        from compressed_tensors.quantization.quant_scheme import NVFP4

        scheme = dict(NVFP4)
        scheme["weights"] = scheme["weights"].model_copy(update={"observer": observer})
        return {"group_0": QuantizationScheme(targets=["Linear"], **scheme)}

    configs = {
        "rtn": lambda: QuantizationModifier(targets="Linear", scheme="NVFP4", ignore=["lm_head"]),
        "mse": lambda: QuantizationModifier(config_groups=observed("mse"), ignore=["lm_head"]),
        "imatrix_mse": lambda: QuantizationModifier(config_groups=observed("imatrix_mse"), ignore=["lm_head"]),
        "gptq": lambda: GPTQModifier(targets="Linear", scheme="NVFP4", ignore=["lm_head"]),
    }
    times = {}
    for name in only:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        tok = AutoTokenizer.from_pretrained(model_dir)
        t0 = time.perf_counter()
        oneshot(
            model=model,
            dataset=ds,
            recipe=configs[name](),
            num_calibration_samples=len(calib),
            max_seq_length=calib.shape[1],
        )
        times[name] = round(time.perf_counter() - t0, 1)
        model.save_pretrained(out / name, save_compressed=True)
        tok.save_pretrained(out / name)
        print(f"{name}: {times[name]} s", flush=True)
    (out / "peer.json").write_text(json.dumps({"llmcompressor": llmcompressor.__version__, "seconds": times}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
