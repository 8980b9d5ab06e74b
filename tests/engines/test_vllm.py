"""vLLM (CPU build, its own venv) loads and runs what we write: `make test-engines`.

For a dense (Llama) and an MoE (Mixtral, the default model's family) checkpoint, FP8 KV on and off,
each in both layouts, vLLM's CPU build is run in a subprocess (``vllm_probe.py``) and its view is
compared with our reader (:mod:`nvfp4cal.checkpoint.reload`):

- config parsing: every module we quantized is an NVFP4 layer in vLLM, every module we excluded is
  unquantized, every attention layer has a KV-cache method, FP8 KV where we wrote it;
- loading: no checkpoint tensor unused, no vLLM parameter unfilled;
- numerics: vLLM's dequantized weights equal ours bit for bit; each quantized linear's and each MoE
  layer's output for a fixed input (vLLM's emulation: activation quantize-dequantize, then matmul)
  agrees with our weights under vLLM's activation formula to ``REL_TOL``, and with our reader's own
  formula to ``DRIFT_TOL`` (the two round the odd activation block scale differently: counted);
- the model generates (greedy, W4A4 through vLLM's emulation).

``NVFP4CAL_ENGINE_CKPTS=DIR[:DIR...]`` adds checkpoints made elsewhere (e.g. by ``make calibrate``).
vLLM's GPU kernels are not exercised here: on the CPU every NVFP4 matmul is vLLM's emulation.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import run_calibrate
from nvfp4cal.checkpoint.reload import dequantized, read_tensors
from nvfp4cal.numerics import nvfp4

pytestmark = pytest.mark.engines

ROOT = Path(__file__).resolve().parents[2]
# vLLM's CPU attention wants head_dim >= 32 and NVFP4 wants bf16: the tiny models, reshaped
VLLM_SHAPE = [
    "model.config.hidden_size=128",
    "model.config.head_dim=64",
    "model.config.num_attention_heads=2",
    "model.config.num_key_value_heads=1",
    "model.dtype=bfloat16",
]
SMALL = ["data.num_samples=8", "data.seq_len=64", "data.batch_size=4", "report.perplexity=false"]
CASES = {  # name -> (model, recipe): FP8 KV off and on, dense and MoE
    "dense": ("tiny_llama", "nvfp4_mse"),
    "dense_kv": ("tiny_llama", "nvfp4_mlp_only_mse_fp8_cast_kv"),
    "moe": ("tiny_mixtral", "nvfp4_mse"),
    "moe_kv": ("tiny_mixtral", "nvfp4_experts_only_mse_fp8_cast_kv"),
    "gemma3": ("tiny_gemma3", "nvfp4_mse"),  # 1 KV head, q/k norms, sliding + global attention, tied embeddings
    "tuned": ("tiny_llama", "nvfp4_tune"),  # layer-output tuning: its weights and scales, layer by layer
}
LAYOUTS = ("modelopt", "compressed_tensors")
# fp32 layer outputs from the same weights and activation scales differ only in the matmul summation order
REL_TOL = 1e-6  # measured: at most 2.5e-7, see bench/RESULTS.md
# against our own activation formula (divide instead of multiply by the reciprocal): a block whose
# FP8 scale rounds the other way moves that token's output; measured up to 1.0e-3 on the default MoE
DRIFT_TOL = 1e-2
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@pytest.fixture(scope="session")
def vllm_python() -> str:
    r = subprocess.run(["bash", str(ROOT / "tests/engines/vllm_venv.sh")], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"could not make the vLLM venv:\n{r.stderr[-3000:]}")
    return str(ROOT / r.stdout.strip().splitlines()[-1] / "bin" / "python")


def _run_probe(python: str, ckpt: Path, out: Path, kv_cache_dtype: str) -> subprocess.CompletedProcess:
    cmd = [python, str(ROOT / "tests/engines/vllm_probe.py"), str(ckpt), str(out), "--kv-cache-dtype", kv_cache_dtype]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _probe(python: str, ckpt: Path, out: Path, kv: bool) -> tuple[dict, Path]:
    """vLLM's view of ``ckpt``; a checkpoint with FP8 KV scales runs with an FP8 cache, or, where this
    CPU's vLLM build refuses one (no AVX-512), with an unquantized cache and the reason recorded."""
    r = _run_probe(python, ckpt, out, "fp8" if kv else "auto")
    not_run = {}
    if r.returncode == 3 and kv:
        reason = json.loads((out / "probe.json").read_text())["build_error"]
        assert any(w in reason.lower() for w in ("fp8", "kv", "avx")), f"vLLM refused {ckpt}: {reason}"
        not_run["fp8_kv_cache"] = reason.strip().splitlines()[-1][:300]
        # "auto" would take FP8 from the checkpoint's kv_cache_scheme again: ask for the model dtype
        r = _run_probe(python, ckpt, out, "bfloat16")
    if r.returncode != 0 or not (out / "probe.json").is_file():
        raise AssertionError(f"vLLM failed on {ckpt} (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-6000:]}")
    probe = json.loads((out / "probe.json").read_text())
    probe["not_run"] = not_run
    return probe, out / "layers.safetensors"  # read one checkpoint at a time: a real model's are GBs


def _checkpoints(tmp: Path) -> list[Path]:
    ckpts = []
    for name, (model, recipe) in CASES.items():
        run_calibrate(tmp / name, [f"model={model}", f"recipe={recipe}", "export.format=both", *VLLM_SHAPE, *SMALL])
        ckpts += [tmp / name / "ckpt" / layout for layout in LAYOUTS]
    extra = os.environ.get("NVFP4CAL_ENGINE_CKPTS")
    return ckpts + [Path(p) for p in extra.split(":")] if extra else ckpts


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> list[Path]:
    return _checkpoints(tmp_path_factory.mktemp("engines"))


@pytest.fixture(scope="session")
def probes(vllm_python, checkpoints, tmp_path_factory) -> dict[str, tuple[Path, dict, Path]]:
    tmp, ckpts = tmp_path_factory.mktemp("probes"), checkpoints

    def one(i_ckpt):
        i, ckpt = i_ckpt
        kv = _has_kv_scales(ckpt)
        return str(ckpt), (ckpt, *_probe(vllm_python, ckpt, tmp / f"probe{i}", kv))

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, enumerate(ckpts)))


def _has_kv_scales(ckpt: Path) -> bool:
    for f in ckpt.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            if any(k.endswith((".k_scale", ".v_scale")) for k in fh.keys()):
                return True
    return False


def _ids(probes):
    return sorted(probes)


def _parts(vllm_module: str) -> list[str]:
    parent, _, leaf = vllm_module.rpartition(".")
    return [f"{parent}.{p}" for p in FUSED[leaf]] if leaf in FUSED else [vllm_module]


def _experts(ours: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Our dequantized experts of ``prefix`` as vLLM stacks them: w13 = [gate; up] and w2, per expert."""
    names = {k.removeprefix(prefix + ".").split(".")[1] for k in ours if k.startswith(prefix + ".")}
    first, second, down = ("w1", "w3", "w2") if "w1" in names else ("gate_proj", "up_proj", "down_proj")
    n = 1 + max(int(k.removeprefix(prefix + ".").split(".")[0]) for k in ours if k.startswith(prefix + "."))
    w13 = torch.stack(
        [torch.cat([ours[f"{prefix}.{e}.{first}.weight"], ours[f"{prefix}.{e}.{second}.weight"]]) for e in range(n)]
    )
    w2 = torch.stack([ours[f"{prefix}.{e}.{down}.weight"] for e in range(n)])
    return w13, w2, [f"{prefix}.0.{first}", f"{prefix}.0.{down}"]


def _reciprocal(global_scale: torch.Tensor, s: torch.Tensor) -> bool:
    """vLLM keeps the activation scale as its reciprocal (what its quantizer multiplies by)."""
    return abs(float(global_scale) * float(s) - 1) < 2**-22


def _engine_qdq(x: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    """vLLM's emulated activation quantize-dequantize, written from its ``ref_nvfp4_quant_dequant``:
    block scale ``fp8(gs * (amax * fl(1/6)))`` with ``gs = 1/input_scale`` as vLLM holds it, values
    rounded to E2M1 at ``scale / gs``. Ours divides, ``fp8(amax / 6 / input_scale)``: the two pick a
    different FP8 block scale for the odd block whose quotient sits on a rounding boundary."""
    m, n = x.shape
    xb = x.float().reshape(m, n // 16, 16)
    scale = (gs * (xb.abs().amax(-1, keepdim=True) * (1 / 6))).clamp(-448, 448).to(torch.float8_e4m3fn).float()

    def inv(t):
        return 1.0 / (t + (t == 0) * 1e8)

    y = (xb * inv(scale * inv(gs))).clamp(-6.0, 6.0)
    q = torch.where(y < 0, -nvfp4.e2m1_round(y.abs()), nvfp4.e2m1_round(y.abs()))
    return (q * (scale / gs)).reshape(m, n).to(x.dtype)


def _flipped_blocks(x: torch.Tensor, s: torch.Tensor, gs: torch.Tensor) -> int:
    """Activation blocks of ``x`` whose FP8 scale differs between our formula and vLLM's."""
    amax = nvfp4.block_amax(x)
    ours = nvfp4.block_scales(amax, s).float()
    theirs = (gs * (amax * (1 / 6))).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    return int((ours != theirs).sum())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_vllm_config_parsing_and_loading(probes):
    for key, (ckpt, probe, _) in probes.items():
        assert probe["unexpected"] == [], f"{key}: checkpoint tensors vLLM did not load: {probe['unexpected'][:10]}"
        assert probe["missing"] == [], f"{key}: vLLM parameters not in the checkpoint: {probe['missing'][:10]}"
        tensors = read_tensors(ckpt)
        assert len(probe["checkpoint_tensors"]) == len(tensors), key
        weights, inputs, kv = dequantized(tensors)
        quantized = set(inputs)  # every NVFP4 module (and fused experts parameter) has an input scale
        seen = set()
        for module, method in probe["methods"].items():
            if module.endswith(".attn"):
                assert method.endswith("KVCacheMethod"), (key, module, method)
            elif module.endswith(".routed_experts"):
                prefix = module.removesuffix(".routed_experts")
                ours = {m for m in quantized if m.startswith(prefix + ".")}
                seen |= ours
                assert ("Nvfp4" in method or "NvFp4" in method) == bool(ours), (key, module, method)
            elif "embed" not in module:
                parts = _parts(module)
                ours = [p in quantized for p in parts]
                assert len(set(ours)) == 1, f"{key}: {module} mixes quantized and unquantized parts"
                seen |= set(parts) & quantized
                assert (not method.startswith("Unquantized")) == ours[0], (key, module, method)
        assert seen == quantized, (
            f"{key}: quantized modules vLLM has no NVFP4 layer for: {sorted(quantized - seen)[:5]}"
        )
        attn = probe["kv"]
        assert attn, key
        for layer, state in attn.items():
            proj = layer.removesuffix(".attn")
            if kv:
                assert state["k_scale"] == float(kv[f"{proj}.k_proj"]), (key, layer)
                assert state["v_scale"] == float(kv[f"{proj}.v_proj"]), (key, layer)
                if "fp8_kv_cache" not in probe["not_run"]:
                    assert state["kv_cache_dtype"].startswith("fp8"), (key, layer, state)
            else:
                assert state["kv_cache_dtype"] == "auto", (key, layer, state)


def _as_multiplier(tensors: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> int:
    """compressed-tensors: vLLM multiplies by ``fl(1 / weight_global_scale)`` where our reader (and
    compressed-tensors) divides by it; for some scale bytes the two differ in the last bit. Replace
    our values by the product form (same nibbles, same scale bytes); returns how many values moved."""
    moved = 0
    for k in [k for k in tensors if k.endswith(".weight_packed")]:
        m = k.removesuffix(".weight_packed")
        step = tensors[f"{m}.weight_scale"].float() * (1 / tensors[f"{m}.weight_global_scale"].float())
        product = nvfp4.dequantize_with_step(nvfp4.unpack(tensors[k]), step)
        moved += int((product != weights[f"{m}.weight"]).sum())
        weights[f"{m}.weight"] = product
    return moved


def test_vllm_weights_and_layer_outputs(probes):
    report = []
    for key, (ckpt, _, layers_file) in probes.items():
        layers, tensors = load_file(str(layers_file)), read_tensors(ckpt)
        weights, inputs, _ = dequantized(tensors)
        moved = _as_multiplier(tensors, weights)
        worst = drift = 0.0
        flips = moved_tokens = tokens = 0
        for name in sorted({k.rsplit(".", 1)[0] for k in layers if k.endswith(".w")}):
            parts = _parts(name)
            ours_w = torch.cat([weights[f"{p}.weight"].float() for p in parts])
            assert torch.equal(layers[f"{name}.w"], ours_w), f"{key}: {name} dequantizes differently in vLLM"
            s = inputs[parts[0]].float().reshape(())
            assert all(torch.equal(inputs[p].float().reshape(()), s) for p in parts), (key, name)
            gs = layers[f"{name}.input_global_scale"]
            assert _reciprocal(gs, s), (key, name)
            x, y = layers[f"{name}.x"], layers[f"{name}.y"]
            worst = max(worst, _rel(y, _engine_qdq(x, gs) @ ours_w.t()))
            drift = max(drift, _rel(y, nvfp4.fake_quantize_dynamic(x, s) @ ours_w.t()))
            flips += _flipped_blocks(x, s, gs)
        for name in sorted({k.rsplit(".", 1)[0] for k in layers if k.endswith(".w13")}):
            w13, w2, (gate, down) = _experts(weights, name.removesuffix(".routed_experts"))
            assert torch.equal(layers[f"{name}.w13"], w13), f"{key}: {name} gate/up dequantize differently"
            assert torch.equal(layers[f"{name}.w2"], w2), f"{key}: {name} down dequantizes differently"
            s13, s2 = inputs[gate].float().reshape(()), inputs[down].float().reshape(())
            g13, g2 = layers[f"{name}.w13_input_global_scale"], layers[f"{name}.w2_input_global_scale"]
            assert _reciprocal(g13, s13) and _reciprocal(g2, s2), (key, name)
            x, ids, tw = layers[f"{name}.x"], layers[f"{name}.topk_ids"], layers[f"{name}.topk_weights"]
            mine = {  # our experts under vLLM's activation formula, and under ours
                "engine": (partial(_engine_qdq, gs=g13), partial(_engine_qdq, gs=g2)),
                "ours": (partial(nvfp4.fake_quantize_dynamic, s2=s13), partial(nvfp4.fake_quantize_dynamic, s2=s2)),
            }
            for which, (q13, q2) in mine.items():
                xq, y = q13(x), torch.zeros_like(x)
                for t in range(x.shape[0]):
                    for k in range(ids.shape[1]):
                        g, u = (xq[t] @ w13[ids[t, k]].t()).chunk(2)
                        h = q2((torch.nn.functional.silu(g) * u)[None])[0]
                        y[t] += tw[t, k] * (h @ w2[ids[t, k]].t())
                per_token = [_rel(layers[f"{name}.y"][t], y[t]) for t in range(x.shape[0])]
                if which == "engine":
                    # the intermediate activations are computed on both sides (vLLM's silu_and_mul vs
                    # torch's silu): a 1e-7 difference can move one element across an E2M1 rounding
                    # boundary, which moves that token's output by ~1e-3; count such tokens
                    moved_tokens += sum(r >= REL_TOL for r in per_token)
                    tokens += len(per_token)
                    worst = max(worst, sorted(per_token)[len(per_token) // 2])  # the median token
                else:
                    drift = max(drift, _rel(layers[f"{name}.y"], y))
            flips += _flipped_blocks(x, s13, g13)
        report.append(
            f"{key}: worst layer relative difference {worst:.2e} (vLLM's activation formula; MoE: median "
            f"token, {moved_tokens}/{tokens} tokens moved by an intermediate rounding flip), {drift:.2e} "
            f"(ours; {flips} input blocks with another FP8 scale); weights in product form: {moved} moved"
        )
        assert worst < REL_TOL, report[-1]
        assert moved_tokens <= max(1, tokens // 20), report[-1]
        assert drift < DRIFT_TOL, report[-1]
    print("\n".join(report))


def test_vllm_generates(probes):
    for key, (ckpt, probe, _) in probes.items():
        vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
        assert len(probe["generated"]) == 2, key
        assert all(len(g) == 8 and all(0 <= t < vocab for t in g) for g in probe["generated"]), (key, probe)
    print({k: (p["vllm"], p["kv_cache_dtype"], p["not_run"]) for k, (_, p, _) in probes.items()}, file=sys.stderr)


def test_vllm_rejects_what_we_wrote_before(vllm_python, checkpoints, tmp_path):
    """The test has teeth: with the modelopt config.json every export had before (exclusions only as
    ``exclude_modules``, which vLLM does not read there) vLLM makes lm_head an NVFP4 layer and fails."""
    old = tmp_path / "old"
    shutil.copytree(checkpoints[0], old)
    cfg = json.loads((old / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "modelopt"
    cfg["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4", "exclude_modules": qc["ignore"]}
    (old / "config.json").write_text(json.dumps(cfg))
    r = _run_probe(vllm_python, old, tmp_path / "probe", "auto")
    assert r.returncode == 3, r.stderr[-3000:]  # vLLM refused to build it
    error = json.loads((tmp_path / "probe" / "probe.json").read_text())["build_error"]
    # lm_head's bf16 [vocab, hidden] weight offered to an NVFP4 uint8 [vocab, hidden/2] parameter
    assert "must match the size" in error or "never loaded" in error, error


def test_fp8_kv_refusal_is_recorded_not_hidden(vllm_python, checkpoints, tmp_path, monkeypatch):
    """On a CPU without AVX-512/AMX vLLM refuses an FP8 KV cache: the test then loads the checkpoint
    with an unquantized cache and records why (the probe acts as such a CPU here)."""
    ckpt = checkpoints[2]  # dense_kv, modelopt
    assert _has_kv_scales(ckpt)
    monkeypatch.setenv("NVFP4CAL_PROBE_AS_AVX2", "1")
    probe, _ = _probe(vllm_python, ckpt, tmp_path / "probe", kv=True)
    assert "AVX-512" in probe["not_run"]["fp8_kv_cache"], probe["not_run"]
    assert probe["kv_cache_dtype"] == "bfloat16"
    assert probe["unexpected"] == [] and probe["missing"] == []
    assert all(state["k_scale"] == 1.0 for state in probe["kv"].values())  # the scales still load


def test_vllm_runs_a_mixed_modelopt_checkpoint_and_reads_weight_only(vllm_python, tmp_path):
    """Formats per rule: a MIXED_PRECISION modelopt checkpoint (experts NVFP4, attention FP8, FP8 KV
    scales) builds in vLLM (``modelopt_mixed``), every tensor consumed, nothing unfilled, and
    generates; a weight-only NVFP4 checkpoint (both layouts) is read as W4A16: vLLM picks its FP4
    Marlin kernel, which its CPU build does not have (so it is parsed here, not run)."""
    mixed = tmp_path / "mixed"
    run_calibrate(
        mixed, ["model=tiny_mixtral", "recipe=nvfp4_experts_fp8_attention_mse_fp8_cast_kv", *VLLM_SHAPE, *SMALL]
    )
    probe, _ = _probe(vllm_python, mixed / "ckpt", tmp_path / "probe_mixed", kv=True)
    methods = probe["methods"]
    assert probe["unexpected"] == [] and probe["missing"] == [], probe
    assert {m for n, m in methods.items() if n.endswith(("qkv_proj", "o_proj"))} == {"ModelOptLinearMethod"}
    assert {m for n, m in methods.items() if n.endswith("experts")} == {"ModelOptNvFp4FusedMoE"}, methods
    assert len(probe["generated"]) == 2
    w4a16 = tmp_path / "w4a16"
    run_calibrate(w4a16, ["model=tiny_llama", "recipe=nvfp4_w4a16_mse", "export.format=both", *VLLM_SHAPE, *SMALL])
    for layout in LAYOUTS:
        r = _run_probe(vllm_python, w4a16 / "ckpt" / layout, tmp_path / f"probe_{layout}", "auto")
        error = json.loads((tmp_path / f"probe_{layout}" / "probe.json").read_text()).get("build_error", "")
        assert r.returncode == 0 or "marlin" in error.lower() or "w4a16" in error.lower(), (layout, error[-2000:])
