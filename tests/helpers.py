"""What the tests share: the real config composed as the CLI builds it, tiny-model runs, round trips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from nvfp4cal.checkpoint.reload import rebuild_model
from nvfp4cal.model.experts import QuantExpertsMixin, logical
from nvfp4cal.model.quantizers import QuantLinear, set_mode

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "src" / "nvfp4cal" / "conf"
RECIPES = sorted(p.stem for p in (CONF / "recipe").glob("*.yaml"))
# GPTQ and tuning recipes run only layer by layer on quantized inputs; the others run in every mode
LAYERWISE_RECIPES = [r for r in RECIPES if any(f"method: {m}" in (CONF / "recipe" / f"{r}.yaml").read_text()
                                               for m in ("gptq", "tune"))]  # fmt: skip
WHOLE_MODEL_RECIPES = [r for r in RECIPES if r not in LAYERWISE_RECIPES]


TINY_MODELS = sorted(p.stem for p in (CONF / "model").glob("tiny_*.yaml"))
DENSE_FAMILIES = ["tiny_gemma3", "tiny_llama"]
MOE_FAMILIES = [m for m in TINY_MODELS if m not in DENSE_FAMILIES]  # every tiny model but the dense ones is an MoE
SMALL = ["data.num_samples=6", "data.seq_len=32", "data.batch_size=2", "data.eval_samples=2"]


def compose(overrides: list[str]):
    """The real config (nvfp4cal/conf/calibrate.yaml, as the package ships it) with overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="nvfp4cal.conf", version_base="1.3"):
        return hydra_compose(config_name="calibrate", overrides=overrides)


def run_calibrate(tmp_path: Path, overrides: list[str]):
    """Run the pipeline in-process on the composed config; returns its RunResult."""
    from nvfp4cal.calibrate import run

    out = tmp_path / "ckpt"
    cfg = compose([f"export.dir={out}", "trainer.enable_progress_bar=false", *overrides])
    return run(cfg, tmp_path / "run", explicit=overrides)


def user_message(tmp_path: Path, args: list[str]) -> str:
    """The one line the command prints for the mistake in ``args`` (failing the test if it would be a traceback)."""
    import pytest

    from nvfp4cal.calibrate import run
    from nvfp4cal.console import user_error

    with pytest.raises(Exception) as info:  # noqa: PT011 (any error; user_error decides)
        run(compose([f"export.dir={tmp_path}/ckpt", "trainer.enable_progress_bar=false", *args]), tmp_path / "run")
    msg = user_error(info.value)
    assert msg is not None, f"a traceback, not a one-line error: {info.value!r}"
    assert "\n" not in msg
    return msg


def same_tensors(a: Path, b: Path) -> bool:
    """Two checkpoints hold the same tensor names and every tensor byte for byte (FP8 compared as bytes)."""
    from nvfp4cal.checkpoint.reload import read_tensors

    ta, tb = read_tensors(a), read_tensors(b)
    return ta.keys() == tb.keys() and all(
        ta[k].reshape(-1).view(torch.uint8).equal(tb[k].reshape(-1).view(torch.uint8)) for k in ta
    )


def tiny_model(name: str):
    """A tiny model from its yaml under conf/model/ (random weights, seeded), without quantizers."""
    from hydra.utils import instantiate

    return instantiate(compose([f"model={name}"]).model, _convert_="all").model


def tiny_config(name: str) -> dict:
    """A tiny model's transformers config values, as its yaml under conf/model/ gives them."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml"))["config"]


def fake_quant_weights(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and m.weight_quantizer is not None:
            out[f"{name}.weight"] = m.weight_quantizer.fake_quant(m.weight)
        if isinstance(m, QuantExpertsMixin):
            for wq, p in ((m.gate_up_weight, m.first_proj), (m.down_weight, "down_proj")):
                if wq is not None:  # in the stored layout ([E, in, out] for transposed experts)
                    out[f"{name}.{p}"] = logical(wq.fake_quant(m.logical_weight(p)), m.transposed)
    return out


def check_round_trip(res, ckpt):
    fq = fake_quant_weights(res.model)
    assert fq, "nothing was quantized"
    rebuilt = rebuild_model(ckpt, dtype=next(res.model.parameters()).dtype)
    params = dict(rebuilt.named_parameters())
    for name, w in fq.items():
        assert torch.equal(params[name], w), f"{name} differs after export and reload"
    set_mode(res.model, "quant")
    batch = next(iter(res.data.eval_dataloader()))["input_ids"]
    with torch.no_grad():
        want = res.model(input_ids=batch, use_cache=False).logits
        got = rebuilt(input_ids=batch, use_cache=False).logits
    assert torch.isfinite(want).all()
    assert torch.equal(got, want)


def check_round_trip_divided(res, ckpt):
    """The compressed-tensors reload: it divides by its global scales, so NVFP4 weights agree with the
    fake-quant weights to the last fp32 bit (FP8 weights exactly, the same in both layouts)."""
    params = dict(rebuild_model(ckpt, dtype=torch.float32).named_parameters())
    for name, w in fake_quant_weights(res.model).items():
        torch.testing.assert_close(params[name], w.float(), rtol=1e-6, atol=0, msg=name)


def subprocess_env(tmp_path, **extra):
    """The environment of a CLI subprocess: offline, one thread per rank, its own cache."""
    return dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        NVFP4CAL_CACHE=str(tmp_path / "cache"),
        **extra,
    )


def torchrun(tmp_path, args, trainer="ddp", n=2, **env):
    """``torchrun`` of the CLI with ``n`` CPU ranks (gloo) in ``tmp_path``."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(n),
        "-m",
        "nvfp4cal.calibrate",
        f"trainer={trainer}",
        "trainer.accelerator=cpu",
        f"trainer.devices={n}",
        *args,
    ]
    return subprocess.run(
        cmd, cwd=tmp_path, env=subprocess_env(tmp_path, **env), capture_output=True, text=True, timeout=300
    )


def one_process(tmp_path, args, name):
    """The pipeline in this process on one CPU thread (as each torchrun rank runs), exporting to
    ``tmp_path/name``: the reference a distributed run must reproduce byte for byte."""
    from nvfp4cal.calibrate import run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = compose([*args, f"export.dir={tmp_path}/{name}", "trainer.enable_progress_bar=false"])
        return run(cfg, tmp_path / f"run_{name}")
    finally:
        torch.set_num_threads(threads)


def calibrated(model_name: str, recipe_name: str):
    """A tiny model with the recipe's quantizers after max calibration on random tokens (no Lightning)."""
    from hydra.utils import instantiate

    from nvfp4cal.algorithms import Unit
    from nvfp4cal.calibration import begin_unit, end_unit
    from nvfp4cal.model.bootstrap import bootstrap_dead_experts
    from nvfp4cal.model.insert import insert_quantizers
    from nvfp4cal.numerics.comm import RunContext

    cfg = compose([f"model={model_name}", f"recipe={recipe_name}"])
    model = instantiate(cfg.model).model
    recipe = instantiate(cfg.recipe, _convert_="all")
    insert_quantizers(model, recipe)
    unit = Unit("", model, model)
    begin_unit(unit, recipe.algorithm, RunContext.single())  # the algorithm's statistics (Hessians) on
    with torch.no_grad():
        model(input_ids=torch.randint(0, 200, (4, 48), generator=torch.Generator().manual_seed(0)))
    end_unit(unit, RunContext.single())
    bootstrap_dead_experts(model)
    return model
