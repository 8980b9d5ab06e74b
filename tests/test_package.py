"""The package: one direction of imports, every shipped config option composes, a user's own config
directory plugs in, and a built wheel runs from anywhere."""

import os
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest
from hydra.utils import instantiate

from helpers import CONF, ROOT, compose, run_calibrate

SRC = ROOT / "src" / "nvfp4cal"


def _modules() -> list[str]:
    out = []
    for p in sorted(SRC.rglob("*.py")):
        rel = p.relative_to(SRC.parent).with_suffix("")
        if rel.parts[1] == "conf":
            continue
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out.append(".".join(parts))
    return out


def test_every_module_sits_in_a_layer():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")["layers"]
    named = {m.strip() for layer in layers for m in layer.replace("|", ":").split(":")}
    missing = [m for m in _modules() if m not in ("nvfp4cal", "nvfp4cal.checkpoint", "nvfp4cal.model", "nvfp4cal.cli") and not any(
        m == n or m.startswith(n + ".") for n in named)]  # fmt: skip
    assert not missing, f"modules in no layer of pyproject.toml's import contract: {missing}"


def test_import_contracts_hold():
    """`make lint`'s import-linter contracts (layers, no Lightning below the glue, no cycle), here too."""
    exe = Path(sys.executable).parent / "lint-imports"
    r = subprocess.run([str(exe)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "0 broken" in r.stdout


OPTIONS = sorted(
    (p.parent.name, p.stem) for p in CONF.glob("*/*.yaml") if p.parent.name not in ("experiment", "exclusions")
)  # fmt: skip
REQUIRED = {
    "hf": ["model.path=/x"],
    "text": ["data.source.path=/x"],
    "hub": ["data.source.name=x"],
    "mix": ["data.sources=[{name: a, weight: 1, source: {_target_: nvfp4cal.texts.pydoc_texts}}]"],
}


@pytest.mark.parametrize("group, option", OPTIONS)
def test_every_option_composes_and_its_targets_resolve(group, option):
    from hydra.utils import get_method

    cfg = compose([f"{group}={option}", *REQUIRED.get(option, [])])
    node = cfg[group]
    target = node.get("_target_")
    assert target, f"conf/{group}/{option}.yaml has no _target_"
    assert callable(get_method(target)), target
    if group in ("recipe", "export") or option.startswith("tiny_"):
        instantiate(node, _convert_="all", **({"dir": "/tmp/x"} if group == "export" else {}))


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes(experiment):
    if experiment == "optuna_sweep":
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose([f"+experiment={experiment}"])
    assert cfg.recipe and cfg.model


def test_a_users_config_directory_adds_options(tmp_path):
    """``hydra.searchpath`` adds a user's own groups' options without forking the package."""
    (tmp_path / "model").mkdir()
    tiny = (CONF / "model" / "tiny_llama.yaml").read_text().replace("name: tiny_llama", "name: my_llama")
    (tmp_path / "model" / "my_llama.yaml").write_text(tiny)
    res = run_calibrate(
        tmp_path, [f"hydra.searchpath=[file://{tmp_path}]", "model=my_llama", "recipe=nvfp4_max",
                   "data.num_samples=2", "data.seq_len=16", "data.eval_samples=1"],
    )  # fmt: skip
    assert res.report["model"] == "my_llama" and (tmp_path / "ckpt" / "model.safetensors").is_file()


@pytest.mark.xdist_group("subprocess")  # one CLI process: its own worker, beside the torchrun group
def test_a_wheel_runs_from_an_unrelated_directory(tmp_path):
    """Build the wheel, install it (no source tree on the path) and calibrate a tiny model elsewhere."""
    proj, wheels = tmp_path / "project", tmp_path / "wheels"  # a copy: the build leaves the checkout alone
    shutil.copytree(ROOT / "src", proj / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, proj / f)
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(proj)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    env_dir = tmp_path / "venv"
    venv.EnvBuilder().create(env_dir)  # no pip of its own (ensurepip: ~3 s): this pip installs into it
    py = env_dir / "bin" / "python"
    # the dependencies come from the project's venv (no network); nvfp4cal itself only from the wheel
    deps = [p for p in map(Path, sys.path) if p.name == "site-packages"]
    site = next((env_dir / "lib").glob("python*/site-packages"))
    (site / "project_deps.pth").write_text("\n".join(str(p) for p in deps) + "\n")
    wheel = next(wheels.glob("nvfp4cal-*.whl"))
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    where = subprocess.run([str(py), "-c", "import nvfp4cal; print(nvfp4cal.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True)  # fmt: skip
    assert str(site) in where.stdout, where.stdout + where.stderr  # the installed copy, not src/
    args = ["model=tiny_llama", "recipe=nvfp4_mse", "data.num_samples=2", "data.seq_len=16", "data.eval_samples=1",
            f"export.dir={elsewhere}/ckpt", "trainer.enable_progress_bar=false"]  # fmt: skip
    r = subprocess.run([str(env_dir / "bin" / "nvfp4cal-calibrate"), *args], cwd=elsewhere, env=env,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([str(env_dir / "bin" / "nvfp4cal-verify"), str(elsewhere / "ckpt")], cwd=elsewhere, env=env,
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
