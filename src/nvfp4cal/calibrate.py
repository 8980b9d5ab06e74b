"""Hydra entry point: ``python -m nvfp4cal.calibrate [group=option] [key=value ...]``.

The only module that reads the DictConfig: it turns config groups into typed objects, inserts
quantizers, runs max calibration through ``Trainer.validate`` with the :class:`PostCalibration`
callback (bootstrap -> sweep -> export), then writes the run's report and prints a summary.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from .errors import RunStopped, UserError

log = logging.getLogger("nvfp4cal")


@dataclass
class RunResult:
    report: dict
    model: object  # the calibrated model, quantizers attached (mode "off")
    tokenizer: object
    data: object


def build(node: DictConfig, key: str, **runtime):
    """``instantiate`` one config group; ``runtime`` passes values known only during the run (the
    tokenizer). Failures caused by the user's values become one line naming the group."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, _convert_="all", **runtime)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, (UserError, OmegaConfBaseException, RunStopped)):
            raise cause from err
        if isinstance(cause, TypeError) and "argument" in str(cause):  # an unknown or missing key
            raise UserError(f"{key}: {str(cause).splitlines()[0]} - check the {key}.* keys") from err
        raise


def calibration_data(cfg: DictConfig, tokenizer, source=None):
    """The run's DataModule from the ``data`` group (also what benchmarks use to see the same tokens);
    ``source``: texts given at run time (the Python API) instead of ``data.source``."""
    return build(cfg.data, "data", tokenizer=tokenizer, **({"source": source} if source is not None else {}))


def environment() -> dict[str, str]:
    """Every ``NVFP4CAL_*`` environment variable of this run (the report records them)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("NVFP4CAL_")}


def run(cfg: DictConfig, run_dir: str | Path, loaded=None, recipe=None, source=None) -> RunResult:
    """Calibrate and export as ``cfg`` says; the report is also written to ``run_dir``.

    The Python API (:mod:`nvfp4cal.api`) passes what it holds already: ``loaded`` (a
    :class:`~nvfp4cal.models.LoadedModel`) instead of the ``model`` group, ``recipe`` (a Recipe)
    instead of the ``recipe`` group, ``source`` (a Dataset of texts) instead of ``data.source``."""
    import dataclasses

    import lightning as L
    import torch
    from hydra.utils import get_method

    from .callback import PostCalibration
    from .evaluate import stage
    from .insert import insert_quantizers
    from .models import upcast_for_cpu
    from .module import CalibrationModule
    from .report import OBJECTIVES, objective, write_report
    from .steps import Results, post_calibration
    from .sweep import warm_up

    t_start = time.perf_counter()
    given = {"model": loaded is not None, "recipe": recipe is not None, "data.source": source is not None}
    missing = sorted(
        k
        for k in OmegaConf.missing_keys(cfg)
        if not k.startswith("hydra") and not any(on and (k == g or k.startswith(g + ".")) for g, on in given.items())
    )
    if missing:
        raise UserError(f"missing value for {', '.join(missing)}: pass {missing[0]}=... on the command line")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    export = build(cfg.export, "export")
    export.check_targets()  # before any work
    L.seed_everything(cfg.seed, verbose=False)
    objective_name = cfg.report.objective
    if objective_name not in OBJECTIVES:
        raise UserError(f"report.objective={objective_name!r} unknown; use one of {list(OBJECTIVES)}")
    stages = {}

    try:
        trainer = build(cfg.trainer, "trainer")
    except Exception as err:  # Lightning's own checks of accelerator, devices, strategy
        if isinstance(err, (UserError, RunStopped)):
            raise
        cause = err.__cause__ or err
        raise UserError(
            f"trainer: {type(cause).__name__}: {str(cause).splitlines()[0]} - check trainer=... and the trainer.* "
            "overrides (gpu, ddp and fsdp run on CUDA GPUs unless trainer.accelerator=cpu)"
        ) from err
    device = trainer.strategy.root_device
    holding = getattr(trainer.strategy, "holding", "whole")
    calibration = build(cfg.calibration, "calibration")
    if calibration.layerwise and holding == "rows":
        raise UserError("calibration=layerwise holds one layer at a time: use trainer=cpu, gpu or ddp, not fsdp")
    if trainer.is_global_zero:
        where = "CPU" if device.type == "cpu" else f"GPU ({device})"
        asked = cfg.trainer.accelerator
        log.info("calibrating on the %s%s", where, " (trainer.accelerator=auto)" if asked == "auto" else "")
    with stage(stages, "load"):
        recipe = recipe if recipe is not None else build(cfg.recipe, "recipe")
        if "NVFP4CAL_KERNEL" in env:  # recorded in the report's environment
            log.info("NVFP4CAL_KERNEL=%s overrides recipe.algorithm.kernel", env["NVFP4CAL_KERNEL"])
            algorithm = dataclasses.replace(recipe.algorithm, kernel=env["NVFP4CAL_KERNEL"])
            recipe = dataclasses.replace(recipe, algorithm=algorithm)
        if recipe.algorithm.gptq and not (calibration.layerwise and calibration.propagate == "quantized"):
            raise UserError(
                "recipe.algorithm.method=gptq rounds each layer on the inputs its quantized predecessors give it: "
                "add calibration=layerwise calibration.propagate=quantized"
            )
        if recipe.algorithm.sweep:
            warm_up(recipe.algorithm.kernel, getattr(torch, str(cfg.model.get("dtype")), torch.bfloat16), device)
        extra = {}
        on_meta = loaded is None and "sharded" in inspect.signature(get_method(cfg.model._target_)).parameters
        if holding == "rows" or calibration.layerwise:  # built on the meta device, rows read when needed
            if on_meta:
                extra["sharded"] = True
            elif calibration.layerwise:
                what = "a model given as an object" if loaded is not None else cfg.model._target_
                raise UserError(f"calibration=layerwise: {what} cannot be built on the meta device")
            else:
                log.info("%s loads the whole model on every rank before sharding it", cfg.model._target_)
        if loaded is None:
            loaded = build(cfg.model, "model", **extra)
        if calibration.layerwise and loaded.fill is None:
            raise UserError(
                "calibration=layerwise needs a model read row by row: model=hf, or a tiny model with +model.init=per_param"
            )

    with stage(stages, "insert", next(loaded.model.parameters()).device):
        plan = insert_quantizers(loaded.model, recipe)
    counts = ", ".join(f"{n} {f}" for f, n in sorted(Counter(plan.formats.values()).items()))
    log.info("recipe %s quantizes %d weights (%s):\n%s", recipe.name, len(plan.quantized), counts, plan.summary())
    if plan.kv_cache:
        log.info("FP8 KV cache on %d k/v projections", len(plan.kv_cache))
    if trainer.is_global_zero:
        (run_dir / "quantized_modules.json").write_text(json.dumps(vars(plan), indent=2))
    if not plan.quantized:
        raise UserError(f"recipe {recipe.name} matches no quantizable module of {loaded.name}; check its rules")
    with stage(stages, "plan"):
        export.check_model(loaded.model)  # a layout that cannot hold this model fails now, not after calibration

    data = calibration_data(cfg, loaded.tokenizer, source)
    with stage(stages, "data"):
        data.setup("validate")  # tokenize, pack and split (Trainer.validate would do it, untimed)
    eval_batches = data.eval_dataloader if cfg.report.perplexity else None
    schedule = None
    if calibration.layerwise:
        from .layerwise import LayerwiseSchedule

        dtypes = {n: t.dtype for n, t in loaded.model.state_dict().items() if t.is_floating_point()}
        fingerprint = {g: OmegaConf.to_container(cfg[g], resolve=True) for g in ("model", "recipe", "data")}
        fingerprint["calibration.propagate"] = calibration.propagate
        schedule = LayerwiseSchedule(
            calibration, loaded.fill, fingerprint, hessian=recipe.algorithm.hessian, gptq=recipe.algorithm.gptq
        )
        if eval_batches is not None and trainer.is_global_zero:
            log.info("calibration=layerwise: held-out perplexity is not measured (the weight SQNR is)")
        eval_batches = None
    else:
        dtypes = upcast_for_cpu(loaded.model) if device.type == "cpu" else None
        loaded.model.__dict__["_nvfp4cal_dtypes"] = dtypes  # for a later nvfp4cal.export of this model
    results = Results()

    def make_steps(ctx):
        steps = post_calibration(ctx, recipe.algorithm, export, loaded.tokenizer, eval_batches, dtypes)
        if schedule is None:
            return steps
        schedule.per_layer = [s for s in steps if s.per_layer]  # once per decoder layer
        return [s for s in steps if not s.per_layer]

    trainer.callbacks.append(PostCalibration(make_steps, results))
    module = CalibrationModule(loaded.model, results, loaded.fill, schedule)
    try:
        trainer.validate(module, datamodule=data, verbose=False)
    except BaseException:
        if schedule is not None:
            schedule.abort()
        raise
    if schedule is not None:
        schedule.finish()  # the checkpoint is written: the progress kept for a resume goes

    report = {
        "model": loaded.name,
        "recipe": recipe.name,
        "calibration_samples": len(data.calib),
        "held_out_samples": len(data.held_out),
        "seq_len": data.seq_len,
        "data": data.stats,
        "quantized": len(plan.quantized),
        "excluded_shape": plan.skipped_shape,
        "kv_cache": plan.kv_cache,
        **results.as_dict(),
        "stages": {**stages, **results.stages},
        **({"layers": schedule.layers, "layers_materialized_at_once": schedule.materializer.peak} if schedule else {}),
        "environment": env,
        "versions": versions(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        **({"given": [g for g, on in given.items() if on]} if any(given.values()) else {}),
    }
    report["wall_seconds"] = round(time.perf_counter() - t_start, 3)  # all of run() until the report
    report["objective"] = {"name": objective_name, "value": objective(report, objective_name)}
    if trainer.is_global_zero:
        t0 = time.perf_counter()
        write_report(run_dir, report)
        print_summary(report, run_dir)
        log.info(
            "report written in %.1f s; %.1f s since the start of the run",
            time.perf_counter() - t0,
            time.perf_counter() - t_start,
        )
    return RunResult(report, loaded.model, loaded.tokenizer, data)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
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
        f"  perplexity : {ppl_line or 'not measured'} (held-out, {report['held_out_samples']} samples)",
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


def _user_error(err: BaseException) -> str | None:
    """A one-line message for a user's mistake, or None for a bug (which keeps its traceback)."""
    while err is not None:
        if isinstance(err, MissingMandatoryValue):
            return f"missing value: {str(err).splitlines()[0]}; pass it on the command line as key=value"
        if isinstance(err, (UserError, OmegaConfBaseException)):
            return str(err).splitlines()[0]
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def stop_on_signals():
    """While running: SIGTERM (what SLURM and ``timeout`` send) and SIGINT raise :class:`RunStopped` in
    the main thread, so the run unwinds as on any error (writers remove their temporary directories;
    a layerwise run keeps its progress)."""
    from .evaluate import current_stage

    def stop(signum, frame):
        raise RunStopped(signum, current_stage())

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


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


def launch_id() -> str:
    """The same run-directory name on every rank of one launch (``${now:}`` differs between ranks).

    torchrun with a rendezvous id (multi-node) -> that id; single-node torchrun -> the launcher's pid;
    SLURM -> the job id; otherwise the local time.
    """
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id != "none":
        return f"run-{run_id}"
    if "LOCAL_RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
        return f"torchrun-{os.getppid()}"
    if "SLURM_JOB_ID" in os.environ:
        return f"slurm-{os.environ['SLURM_JOB_ID']}-{os.environ.get('SLURM_STEP_ID', '0')}"
    return time.strftime("%H-%M-%S")


if not OmegaConf.has_resolver("nvfp4cal_launch_id"):
    OmegaConf.register_new_resolver("nvfp4cal_launch_id", launch_id, use_cache=True)


@hydra.main(version_base="1.3", config_path="pkg://nvfp4cal.conf", config_name="calibrate")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[nvfp4cal] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    try:
        with stop_on_signals():
            return run(cfg, HydraConfig.get().runtime.output_dir).report["objective"]["value"]
    except RunStopped as err:
        print(f"nvfp4cal: {stop_message(err, cfg)}", file=sys.stderr, flush=True)
        sys.exit(128 + err.signum)
    except Exception as err:  # noqa: BLE001
        msg = _user_error(err)
        if msg is None:
            raise
        print(f"nvfp4cal: error: {msg}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
