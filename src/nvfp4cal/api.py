"""The Python API: ``nvfp4cal.quantize``, ``nvfp4cal.checkpoint``, ``nvfp4cal.cli.verify``.

``quantize`` runs exactly what ``nvfp4cal-calibrate`` runs (the packaged config composed with the
given settings, the same Trainer, LightningModule and callback) on a model object you already hold::

    import nvfp4cal
    result = nvfp4cal.quantize(model, tokenizer, recipe="nvfp4_mse", data=["some text", ...],
                               num_samples=128, seq_len=512, export_dir="out/ckpt")
    result.report["perplexity"]          # what the CLI's report.json holds
    nvfp4cal.set_mode(result.model, "quant")   # the calibrated model, fake-quantized as exported
    nvfp4cal.export(result.model, "out/ct", format="compressed_tensors", tokenizer=tokenizer)
    nvfp4cal.verify("out/ckpt").ok
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .calibrate import RunResult, quiet_libraries, run
from .checkpoint.check import Verdict
from .checkpoint.check import verify as _verify
from .checkpoint.targets import export_model
from .model.loaders import LoadedModel
from .model.quantizers import set_mode
from .numerics.errors import UserError
from .recipe import Recipe, build_recipe

__all__ = ["quantize", "export", "verify", "set_mode"]


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="nvfp4cal.conf", version_base="1.3"):
        return compose(config_name="calibrate", overrides=overrides)


def _recipe(recipe) -> tuple[list[str], Recipe | None]:
    """(config overrides, recipe object) for a recipe given by name, YAML path or object."""
    if isinstance(recipe, Recipe):
        return [], recipe
    if isinstance(recipe, (str, Path)) and Path(recipe).suffix in (".yaml", ".yml"):
        from omegaconf import OmegaConf

        if not Path(recipe).is_file():
            raise UserError(f"recipe {recipe} is not a file")
        spec = OmegaConf.to_container(OmegaConf.load(recipe))
        spec.pop("_target_", None)
        if "defaults" in spec:  # a recipe file written for the config tree: compose it as the CLI does
            return [f"hydra.searchpath=[file://{Path(recipe).resolve().parent}]", f"recipe={Path(recipe).stem}"], None
        return [], build_recipe(**spec)
    if isinstance(recipe, str):
        return [f"recipe={recipe}"], None
    raise UserError(f"recipe must be a name, a YAML path or a Recipe, got {type(recipe).__name__}")


def _source(data):
    """(config overrides, text source) for data given as None (the default corpus), a file path or
    glob, a list of strings, or a ``datasets.Dataset`` with a ``text`` column."""
    if data is None:
        return [], None
    if isinstance(data, (str, Path)):
        return ["data=text", f"data.source.path={data}"], None
    import datasets

    if isinstance(data, (list, tuple)):
        if not all(isinstance(t, str) for t in data):
            raise UserError("data: a list must hold strings (the calibration texts)")
        return [], datasets.Dataset.from_dict({"text": list(data)})
    if isinstance(data, datasets.Dataset):
        if "text" not in data.column_names:
            raise UserError(f"data: the Dataset has no 'text' column (has {data.column_names})")
        return [], data
    raise UserError(f"data must be None, a path, a list of strings or a datasets.Dataset, got {type(data).__name__}")


def quantize(
    model,
    tokenizer=None,
    recipe="nvfp4_mse",
    data=None,
    *,
    num_samples: int = 64,
    seq_len: int = 256,
    batch_size: int = 4,
    export_dir: str | Path | None = None,
    export_format: str = "modelopt",
    trainer: str = "auto",
    run_dir: str | Path | None = None,
    overrides: list[str] = (),
) -> RunResult:
    """Calibrate ``model`` (a transformers causal LM, or a :class:`~nvfp4cal.model.loaders.LoadedModel` as
    the loaders return it: the embedded default is ``nvfp4cal.model.upcycle.load_smollm2_moe()``) as the
    CLI does; returns its :class:`RunResult`.

    ``recipe``: a shipped recipe's name, a YAML file, or a :class:`~nvfp4cal.recipe.Recipe`.
    ``data``: None (the embedded corpus), a file path or glob, a list of texts, or a ``datasets.Dataset``.
    ``export_dir``: where to write the checkpoint (None: write none; :func:`export` writes one later).
    ``overrides``: any further ``key=value`` of the CLI (``report.perplexity=false``, ...).
    The report goes to ``run_dir`` (a temporary directory if None) and to ``result.report``.
    """
    if isinstance(model, LoadedModel):  # what a loader returns (nvfp4cal.model.upcycle.load_smollm2_moe(), ...)
        loaded, tokenizer = model, tokenizer or model.tokenizer
    if tokenizer is None:
        raise UserError("quantize needs the model's tokenizer (to tokenize the calibration data)")
    recipe_overrides, recipe_obj = _recipe(recipe)
    data_overrides, source = _source(data)
    cfg = _compose(
        [
            *recipe_overrides,
            *data_overrides,
            f"trainer={trainer}",
            f"data.num_samples={num_samples}",
            f"data.seq_len={seq_len}",
            f"data.batch_size={batch_size}",
            f"export.dir={export_dir if export_dir is not None else 'null'}",
            f"export.format={export_format}",
            *overrides,
        ]
    )
    if not isinstance(model, LoadedModel):
        name = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
        loaded = LoadedModel(model, tokenizer, Path(str(name)).name or type(model).__name__)
    run_dir = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="nvfp4cal-run-"))
    quiet_libraries()
    return run(cfg, run_dir, loaded=loaded, recipe=recipe_obj, source=source, explicit=list(overrides))


def export(result, dir: str | Path, format: str = "modelopt", tokenizer=None, overwrite: bool = False) -> list[dict]:
    """Write the checkpoint(s) of what :func:`quantize` returned (``result``: its :class:`RunResult`, or
    the calibrated model itself) in ``format`` (modelopt, compressed_tensors or both); verified before
    they are renamed into place. A RunResult also gives the tokenizer and the dtypes the model came in
    (a model calibrated on the CPU computes in float32; its checkpoint keeps the original dtypes)."""
    if isinstance(result, RunResult):
        model, dtypes, tokenizer = result.model, result.dtypes, tokenizer or result.tokenizer
    else:
        model, dtypes = result, None
    return export_model(model, dir, format, tokenizer, overwrite, dtypes=dtypes)


def verify(dir: str | Path) -> Verdict:
    """Check a checkpoint as every export does (``.ok``, ``.problems``, ``.table()``)."""
    return _verify(dir)
