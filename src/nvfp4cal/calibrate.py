"""Hydra entry point: ``python -m nvfp4cal.calibrate [group=option] [key=value ...]``.

The only module that reads the DictConfig: it turns config groups into typed objects, inserts
quantizers, runs max calibration through ``Trainer.validate`` with the :class:`PostCalibration`
callback (bootstrap -> sweep -> export), then writes the run's report and prints a summary.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import logging
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import hydra
import torch
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.errors import (
    ConfigCompositionException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
)
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from .console import (
    environment,
    launch_id,
    nearest,
    quiet_libraries,
    remove_empty_run_dir,
    seed_everything,
    stop_on_signals,
    user_error,
)
from .evaluation.metrics import stage
from .evaluation.report import OBJECTIVES, objective, print_summary, versions, write_report
from .evaluation.sets import CORPUS
from .evaluation.sets import batches as eval_batches
from .model.insert import insert_quantizers
from .model.loaders import fill_from_memory, upcast_for_cpu
from .model.sweep import warm_up
from .numerics.errors import RunStopped, UserError
from .results import Results
from .steps import post_calibration
from .texts import check_counts

log = logging.getLogger("nvfp4cal")


@dataclass
class RunResult:
    report: dict
    model: object  # the calibrated model, quantizers attached (mode "off")
    tokenizer: object
    data: object
    dtypes: dict | None = None  # the original dtypes of a model computed in fp32 (the export writes these)


def glue():
    """The Lightning glue (callback, module, progress bar), imported when a run starts: importing Lightning
    takes ~3 s, and a mistake in the command line or the data is reported before that."""
    from .lightning import callback, module, progress

    return callback, module, progress


def _target_error(key: str, err: BaseException) -> UserError:
    """A ``_target_`` that does not import (e.g. a module path from before the folders): one line."""
    m = re.search(r"'([\w.]+)'", str(err))
    what = m.group(1) if m else str(err).splitlines()[0]
    return UserError(f"{key}._target_: cannot import {what} - the modules moved into folders in this version "
                     "(docs/architecture.md: nvfp4cal.model.loaders, nvfp4cal.lightning.data, ...)")  # fmt: skip


def target_method(target: str, key: str):
    """The callable a ``_target_`` names (its signature tells what it accepts)."""
    try:
        return get_method(target)
    except (ImportError, InstantiationException) as err:
        if not str(err).startswith(("Error loading", "Error locating")):
            raise
        raise _target_error(key, err) from err


def build(node: DictConfig, key: str, **runtime):
    """``instantiate`` one config group; ``runtime`` passes values known only during the run (the
    tokenizer). Failures caused by the user's values become one line naming the group."""
    try:
        return instantiate(node, _convert_="all", **runtime)
    except ImportError as err:  # Hydra could not import the _target_ itself (not an import inside it)
        if not str(err).startswith(("Error loading", "Error locating")):
            raise
        raise _target_error(key, err) from err
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, (UserError, OmegaConfBaseException, RunStopped)):
            raise cause from err
        if "Error locating target" in str(err):
            raise _target_error(key, err) from err
        if isinstance(cause, TypeError) and "argument" in str(cause):  # an unknown or missing key
            raise UserError(f"{key}: {str(cause).splitlines()[0]} - check the {key}.* keys") from err
        raise


def calibration_data(cfg: DictConfig, tokenizer, source=None):
    """The run's DataModule from the ``data`` group (also what benchmarks use to see the same tokens);
    ``source``: texts given at run time (the Python API) instead of ``data.source``."""
    return build(cfg.data, "data", tokenizer=tokenizer, **({"source": source} if source is not None else {}))


@dataclass
class Built:
    """Everything a run is made of, built from the config and checked before any work."""

    export: object
    trainer: object
    recipe: object
    calibration: object
    loaded: object
    plan: object
    data: object
    schedule: object
    dtypes: dict | None
    eval_sets: dict  # evaluation set -> a callable giving its batches (empty: report.perplexity=false)


def _calibration(cfg: DictConfig, recipe, explicit: set[str]):
    """The ``calibration`` group, switched to what the recipe's algorithm needs unless the user chose
    otherwise (then: one line naming the contradiction)."""
    needs, calibration = recipe.algorithm.needs, build(cfg.calibration, "calibration")
    what = f"recipe {recipe.name} (method {recipe.algorithm.method}) needs {needs.describe()}"
    if needs.layerwise and not calibration.layerwise:
        if "calibration" in explicit:
            raise UserError(
                f"{what}: remove calibration={OmegaConf.select(cfg, 'hydra:runtime.choices.calibration', default='whole')}"
            )
        node = OmegaConf.load(files("nvfp4cal.conf") / "calibration" / "layerwise.yaml")
        with open_dict(cfg):
            cfg.calibration = node
        calibration = build(cfg.calibration, "calibration")
        log.info("%s: chosen", what)
    if needs.propagate and calibration.propagate != needs.propagate:
        if "calibration.propagate" in explicit:
            raise UserError(f"{what}: remove calibration.propagate={calibration.propagate}")
        with open_dict(cfg):
            cfg.calibration.propagate = needs.propagate
        calibration = build(cfg.calibration, "calibration")
    return calibration


def build_run(cfg: DictConfig, loaded, recipe, source, explicit: set[str], stages: dict, env: dict) -> Built:
    """Build every object of the run from ``cfg`` and check every precondition, cheapest first."""
    export = build(cfg.export, "export")
    export.check_targets()  # before any work
    if cfg.report.objective not in OBJECTIVES:
        raise UserError(f"report.objective={cfg.report.objective!r} unknown; use one of {list(OBJECTIVES)}")
    # the data's counts and texts (a missing file fails) before Lightning, the trainer or the model load
    check_counts(cfg.data.num_samples, cfg.data.seq_len, cfg.data.batch_size)
    if source is None and cfg.data.get("source") is not None:
        source = build(cfg.data.source, "data.source")
    evals = build(cfg.eval, "eval")  # the evaluation sets' texts too
    data = calibration_data(cfg, None, source)
    trainer = build_trainer(cfg)
    device, holds = trainer.strategy.root_device, glue()[1].holding(trainer.strategy)
    given_recipe = recipe
    with stage(stages, "load"):
        recipe = recipe if recipe is not None else build(cfg.recipe, "recipe")
        if "NVFP4CAL_KERNEL" in env:  # recorded in the report's environment
            log.info("NVFP4CAL_KERNEL=%s overrides recipe.algorithm.kernel", env["NVFP4CAL_KERNEL"])
            recipe = dataclasses.replace(recipe, algorithm=recipe.algorithm.with_kernel(env["NVFP4CAL_KERNEL"]))
        calibration = _calibration(cfg, recipe, explicit)
        if calibration.layerwise and holds == "rows":
            raise UserError("calibration=layerwise holds one layer at a time: use trainer=cpu, gpu or ddp, not fsdp")
        if trainer.is_global_zero:
            where = "CPU" if device.type == "cpu" else f"GPU ({device})"
            auto = " (trainer.accelerator=auto)" if cfg.trainer.accelerator == "auto" else ""
            log.info("calibrating on the %s%s", where, auto)
        if recipe.algorithm.kernel is not None:
            warm_up(recipe.algorithm.kernel, getattr(torch, str(cfg.model.get("dtype")), torch.bfloat16), device)
        on_meta = (
            loaded is None and "sharded" in inspect.signature(target_method(cfg.model._target_, "model")).parameters
        )
        extra = {"sharded": True} if on_meta and (holds == "rows" or calibration.layerwise) else {}
        if holds == "rows" and not on_meta:
            log.info("%s loads the whole model on every rank before sharding it", cfg.model._target_)
        if loaded is None:
            loaded = build(cfg.model, "model", **extra)
    with stage(stages, "insert", next(loaded.model.parameters()).device):
        shipped = given_recipe is None and not any(k.startswith("recipe.") for k in explicit)
        plan = insert_quantizers(loaded.model, recipe, shipped=shipped)
    counts = ", ".join(f"{n} {f}" for f, n in sorted(Counter(plan.formats.values()).items()))
    log.info("recipe %s quantizes %d weights (%s):\n%s", recipe.name, len(plan.quantized), counts, plan.summary())
    if plan.kv_cache:
        log.info("FP8 KV cache on %d k/v projections", len(plan.kv_cache))
    if not plan.quantized:
        raise UserError(f"recipe {recipe.name} matches no quantizable module of {loaded.name}; check its rules")
    with stage(stages, "plan"):
        export.check_model(loaded.model)  # a layout that cannot hold this model fails now, not after calibration
    data.tokenizer = loaded.tokenizer  # known once the model is loaded
    with stage(stages, "data"):
        data.setup("validate")  # tokenize, pack and split (Trainer.validate would do it, untimed)
    eval_sets = {}
    if cfg.report.perplexity:
        eval_sets[CORPUS] = data.eval_dataloader
        for name, rows in evals.tokenized(loaded.tokenizer).items():
            eval_sets[name] = lambda rows=rows: eval_batches(rows, data.batch_size)
    if calibration.layerwise:
        dtypes = {n: t.dtype for n, t in loaded.model.state_dict().items() if t.is_floating_point()}
        held = loaded.fill is None  # a model in memory: read layer by layer from there
        fill = fill_from_memory(loaded.model) if held else loaded.fill
        fingerprint = {g: OmegaConf.to_container(cfg[g], resolve=True) for g in ("model", "recipe", "data")}
        fingerprint["calibration.propagate"] = calibration.propagate
        schedule = calibration.schedule(recipe.algorithm, fill=fill, fingerprint=fingerprint, held=held)
    else:
        dtypes = upcast_for_cpu(loaded.model) if device.type == "cpu" else None
        schedule = calibration.schedule(recipe.algorithm)
    return Built(export, trainer, recipe, calibration, loaded, plan, data, schedule, dtypes, eval_sets)


def build_trainer(cfg: DictConfig):
    bar = (
        [glue()[2].CalibrationProgress()] if cfg.trainer.get("enable_progress_bar", True) else []
    )  # labelled "Calibration"
    try:
        return build(cfg.trainer, "trainer", callbacks=bar)
    except Exception as err:  # Lightning's own checks of accelerator, devices, strategy
        if isinstance(err, (UserError, RunStopped)):
            raise
        cause = err.__cause__ or err
        raise UserError(
            f"trainer: {type(cause).__name__}: {str(cause).splitlines()[0]} - check trainer=... and the trainer.* "
            "overrides (gpu, ddp and fsdp run on CUDA GPUs unless trainer.accelerator=cpu)"
        ) from err


def run(cfg: DictConfig, run_dir: str | Path, loaded=None, recipe=None, source=None, explicit=()) -> RunResult:
    """Calibrate and export as ``cfg`` says; the report is also written to ``run_dir``.

    The Python API (:mod:`nvfp4cal.api`) passes what it holds already: ``loaded`` (a
    :class:`~nvfp4cal.model.loaders.LoadedModel`) instead of the ``model`` group, ``recipe`` (a Recipe)
    instead of the ``recipe`` group, ``source`` (a Dataset of texts) instead of ``data.source``.
    ``explicit``: the overrides the user typed (a recipe's needs never override a choice made there)."""
    t_start = time.perf_counter()
    given = {"model": loaded is not None, "recipe": recipe is not None, "data.source": source is not None}
    check_missing(cfg, given)
    run_dir, env, stages = Path(run_dir), environment(), {}
    seed_everything(cfg.seed)
    b = build_run(cfg, loaded, recipe, source, explicit_keys(explicit), stages, env)
    if b.trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "quantized_modules.json").write_text(json.dumps(vars(b.plan), indent=2))
    results = Results()
    callback, module, _ = glue()
    post = callback.PostCalibration(lambda ctx: post_calibration(ctx, b.recipe.algorithm, b.export, b.loaded.tokenizer,
                                                        b.eval_sets, b.dtypes, b.loaded.source_format,
                                                        b.schedule.evaluate),
                           results)  # fmt: skip
    b.trainer.callbacks.append(post)
    try:
        b.trainer.validate(module.CalibrationModule(b.loaded.model, b.schedule, post, results, b.loaded.fill),
                           datamodule=b.data, verbose=False)  # fmt: skip
    except BaseException:
        b.schedule.abort()
        raise
    b.schedule.done()  # the checkpoint is written: a layer-by-layer run's progress goes
    report = {
        "model": b.loaded.name, "recipe": b.recipe.name, "algorithm": b.recipe.algorithm.describe(),
        "calibration_samples": len(b.data.calib), "held_out_samples": len(b.data.held_out), "seq_len": b.data.seq_len,
        "data": b.data.stats, "quantized": len(b.plan.quantized), "excluded_shape": b.plan.skipped_shape,
        "kv_cache": b.plan.kv_cache, **results.as_dict(), "stages": {**stages, **results.stages},
        **b.schedule.report(), "environment": env, "versions": versions(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        **({"given": [g for g, on in given.items() if on]} if any(given.values()) else {}),
    }  # fmt: skip
    report["wall_seconds"] = round(time.perf_counter() - t_start, 3)  # all of run() until the report
    report["objective"] = {"name": cfg.report.objective, "value": objective(report, cfg.report.objective)}
    if b.trainer.is_global_zero:
        write_report(run_dir, report)
        print_summary(report, run_dir)
        log.info("report written; %.1f s since the start of the run", time.perf_counter() - t_start)
    return RunResult(report, b.loaded.model, b.loaded.tokenizer, b.data, b.dtypes)


def check_missing(cfg: DictConfig, given: dict[str, bool]) -> None:
    missing = sorted(
        k
        for k in OmegaConf.missing_keys(cfg)
        if not k.startswith("hydra") and not any(on and (k == g or k.startswith(g + ".")) for g, on in given.items())
    )
    if missing:
        raise UserError(f"missing value for {', '.join(missing)}: pass {missing[0]}=... on the command line")


def explicit_keys(overrides) -> set[str]:
    """The keys (and groups) the user set: ``calibration=whole`` -> ``calibration``."""
    out = set()
    for o in overrides or ():
        key = str(o).split("=", 1)[0].lstrip("+~")
        if "@" in key:
            key = key.split("@", 1)[0]
        out.add(key)
    return out


def stop_message(err: RunStopped, cfg: DictConfig) -> str:
    """One line: where the run stopped, that the target is untouched, how to continue."""
    target = OmegaConf.select(cfg, "export.dir", throw_on_resolution_failure=False)
    layerwise = str(OmegaConf.select(cfg, "calibration._target_")).endswith("Layerwise")
    again = (
        "run the same command with calibration.resume=true to continue from the last finished layer"
        if layerwise
        else "run the same command again (calibration=layerwise runs can resume)"
    )
    return f"{err}; nothing was written to {target}; {again}"


if not OmegaConf.has_resolver("nvfp4cal_launch_id"):
    OmegaConf.register_new_resolver("nvfp4cal_launch_id", launch_id, use_cache=True)


def evaluation_inputs(overrides: list[str]):
    """(DataModule, EvalSets, seed) from the packaged config with ``overrides`` (the ``data`` and ``eval``
    groups only): what ``nvfp4cal-evaluate`` scores a checkpoint on, the same rows a run with the same
    overrides calibrates and evaluates on. The texts are read here, before any model loads."""
    cfg = compose_checked(overrides)
    return calibration_data(cfg, None), build(cfg.eval, "eval"), int(cfg.seed)


def check_overrides(argv: list[str]) -> str | None:
    """Before Hydra starts (no run directory yet): compose the config with the user's overrides; an
    unknown option or key is one line naming what was typed and the nearest valid names (None: fine, or
    a command Hydra handles itself: ``--help``, ``-m``, ``hydra.searchpath``)."""
    if any(a.startswith("-") or a.lstrip("+~").startswith("hydra.searchpath") for a in argv):
        return None  # Hydra's own flags; options kept outside the package
    try:
        compose_checked([a for a in argv if not a.lstrip("+~").startswith("hydra")])  # hydra.run.dir=...: Hydra's
    except UserError as err:
        return str(err)
    return None


def compose_checked(argv: list[str]) -> DictConfig:
    """The packaged config composed with ``argv``; an unknown option or key raises a one-line
    :class:`UserError` naming what was typed and the nearest valid names."""
    try:
        with initialize_config_module(config_module="nvfp4cal.conf", version_base="1.3"):
            return compose(config_name="calibrate", overrides=argv)
    except MissingConfigException as err:  # group=option with no such option
        group, _, option = str(err.missing_cfg_file or "").partition("/")
        if err.options:
            raise UserError(f"{group}={option}: no such option; {nearest(option, sorted(err.options))}") from err
        raise UserError(str(err).splitlines()[0]) from err
    except OverrideParseException as err:
        raise UserError(f"cannot parse the override: {str(err).splitlines()[0]}") from err
    except ConfigCompositionException as err:
        m = re.search(r"Could not override '([^']+)'", str(err))
        if m is None:
            cause = err.__cause__ or err
            raise UserError(str(cause).splitlines()[0]) from err
        key = m.group(1)
        typed = next((a for a in argv if a.split("=", 1)[0].lstrip("+") == key), key)
        parent, _, leaf = key.rpartition(".")
        choices = [a for a in argv if "=" in a and "." not in a.split("=", 1)[0]]  # group=option only
        with initialize_config_module(config_module="nvfp4cal.conf", version_base="1.3"):
            node = OmegaConf.select(compose(config_name="calibrate", overrides=choices), parent) if parent else None
        if not isinstance(node, DictConfig):
            raise UserError(f"{typed}: no such key (a new key needs a leading +)") from err
        keys = [k for k in node.keys() if isinstance(k, str) and not k.startswith("_")]
        near = difflib.get_close_matches(leaf, keys, n=3, cutoff=0.5)
        hint = (
            f"nearest: {', '.join(f'{parent}.{k}' for k in near)}" if near else f"keys of {parent}: {', '.join(keys)}"
        )
        raise UserError(f"{typed}: no such key; {hint} (a new key needs a leading +)") from err


@hydra.main(version_base="1.3", config_path="pkg://nvfp4cal.conf", config_name="calibrate")
def _hydra_main(cfg: DictConfig) -> float | None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[nvfp4cal] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    quiet_libraries()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        with stop_on_signals():
            result = run(cfg, run_dir, explicit=HydraConfig.get().overrides.task)
            return result.report["objective"]["value"]
    except RunStopped as err:
        print(f"nvfp4cal: {stop_message(err, cfg)}", file=sys.stderr, flush=True)
        sys.exit(128 + err.signum)
    except Exception as err:  # noqa: BLE001
        msg = user_error(err)
        if msg is None:
            raise
        print(f"nvfp4cal: error: {msg}{remove_empty_run_dir(run_dir)}", file=sys.stderr, flush=True)
        sys.exit(2)


def main() -> float | None:
    """``nvfp4cal-calibrate`` / ``python -m nvfp4cal.calibrate``: overrides checked, then Hydra runs."""
    msg = check_overrides(sys.argv[1:])
    if msg is not None:
        print(f"nvfp4cal: error: {msg}", file=sys.stderr, flush=True)
        sys.exit(2)
    return _hydra_main()


if __name__ == "__main__":
    main()
