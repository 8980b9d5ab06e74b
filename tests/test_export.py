"""Export building blocks: atomic directory, shards, refusal of bad scales, saved names."""

import json

import pytest
import torch
from safetensors import safe_open

from nvfp4cal.export.common import ExportError, Item, atomic_dir, model_tensors, saved_layout, write_shards
from nvfp4cal.export.plan import check_tensors
from nvfp4cal.insert import BadWeightError, insert_quantizers
from nvfp4cal.models import build_tiny
from nvfp4cal.recipe import build_recipe


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target, overwrite=False) as tmp:
            (tmp / "half.safetensors").write_text("x")
            raise RuntimeError("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_only_with_overwrite(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("1")
    with pytest.raises(ExportError, match="already exists"):
        with atomic_dir(target, overwrite=False):
            pass
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_shards_and_index(tmp_path):
    items = [Item(4000, (f"t{i}",), lambda i=i: {f"t{i}": torch.full((1000,), float(i))}) for i in range(5)]
    wm = write_shards(tmp_path, items, max_shard_bytes=9000, check=lambda t: None, progress=False)
    files = sorted(set(wm.values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == wm and index["metadata"]["total_size"] == 20000
    with safe_open(str(tmp_path / wm["t4"]), "pt") as f:
        assert f.get_tensor("t4")[0].item() == 4.0


def test_streamed_safetensors_read_back_exactly(tmp_path):
    """Our streaming writer: every dtype we write, 0-d, empty and strided tensors, read by safetensors."""
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    want = {
        "bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "fp8": torch.randn(4, 2, generator=g).to(torch.float8_e4m3fn),
        "u8": torch.randint(0, 256, (7,), generator=g, dtype=torch.uint8),
        "scalar": torch.tensor(0.25),
        "vec1": torch.tensor([3.0]),
        "empty": torch.zeros(0, 4),
        "strided": torch.arange(12.0).reshape(3, 4).t(),
        "i64": torch.arange(5),
    }
    items = [Item(8, (k,), lambda k=k, v=v: {k: v}) for k, v in want.items()]
    wm = write_shards(tmp_path, items, max_shard_bytes=1 << 20, check=lambda t: None, progress=False)
    assert set(wm.values()) == {"model.safetensors"}
    got = load_file(str(tmp_path / "model.safetensors"))
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(
            got[k].view(torch.uint8) if v.dtype == torch.float8_e4m3fn else got[k],
            v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v,
        ), k
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_check_tensors_names_the_bad_one():
    nan_byte = torch.tensor([0x7F], dtype=torch.uint8).view(torch.float8_e4m3fn)
    with pytest.raises(ExportError, match="a.weight_scale: 1 NaN"):
        check_tensors({"a.weight_scale": nan_byte})
    for bad in (0.0, float("inf"), float("nan"), -1.0):
        with pytest.raises(ExportError, match="b.input_scale"):
            check_tensors({"b.input_scale": torch.tensor(bad)})


def test_nan_weight_is_a_named_error():
    m = build_tiny(
        "LlamaConfig",
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
        },
    ).model
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(BadWeightError, match="model.layers.0.mlp.up_proj.weight holds NaN"):
        insert_quantizers(m, build_recipe("t", rules=["*"]))


def test_saved_layout_uses_save_pretrained_names():
    m = build_tiny(
        "MixtralConfig",
        {
            "hidden_size": 32,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
        },
    ).model
    insert_quantizers(m, build_recipe("t", rules=["*"]))
    layout = saved_layout(m, model_tensors(m))
    w3 = layout["model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    assert (w3.param, w3.expert, w3.start, w3.stop) == ("model.layers.0.mlp.experts.gate_up_proj", 2, 16, 32)
    w2 = layout["model.layers.0.block_sparse_moe.experts.1.w2.weight"]
    assert (w2.param, w2.expert, w2.full) == ("model.layers.0.mlp.experts.down_proj", 1, True)
    assert not any("quantizer" in k or "amax" in k for k in layout)


def test_early_write_gives_the_same_tensors(tmp_path):
    """Unquantized tensors written first (as a GPU run does during calibration), quantized ones after."""
    from conftest import run_calibrate
    from nvfp4cal.export.modelopt import MODELOPT, configure
    from nvfp4cal.export.plan import CheckpointWriter
    from nvfp4cal.reload import read_tensors

    small = ["data.num_samples=2", "data.seq_len=16", "data.eval_samples=1", "report.perplexity=false"]
    r = run_calibrate(tmp_path, ["model=tiny_qwen3_moe", "recipe=nvfp4_mlp_only_mse_fp8_cast_kv", *small])
    w = CheckpointWriter(r.model, tmp_path / "early", MODELOPT, configure, max_shard_size_gb=1e-4, early=True)
    w.start_early()
    summary = w.finish()
    assert len(summary["files"]) > 2 and (tmp_path / "early" / "model.safetensors.index.json").is_file()
    want, got = read_tensors(tmp_path / "ckpt"), read_tensors(tmp_path / "early")
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k].reshape(-1).view(torch.uint8), got[k].reshape(-1).view(torch.uint8)), k
    aborted = CheckpointWriter(r.model, tmp_path / "aborted", MODELOPT, configure, early=True)
    aborted.start_early()
    aborted.abort()
    assert not (tmp_path / "aborted").exists() and not list(tmp_path.glob(".aborted.tmp-*"))


def test_failed_second_layout_leaves_no_temporary_dir(tmp_path, monkeypatch):
    """export.format=both: when the second checkpoint fails, the first stays and no temp dir is left."""
    from conftest import run_calibrate
    from nvfp4cal import callback

    def broken(tmp, kv_cache, excluded):
        raise ExportError("injected failure")

    layout, _ = callback.EXPORTERS["compressed_tensors"]
    monkeypatch.setitem(callback.EXPORTERS, "compressed_tensors", (layout, broken))
    small = ["data.num_samples=2", "data.seq_len=16", "data.eval_samples=1", "report.perplexity=false"]
    with pytest.raises(ExportError, match="injected failure"):
        run_calibrate(tmp_path, ["model=tiny_llama", "recipe=nvfp4_max", "export.format=both", *small])
    assert (tmp_path / "ckpt" / "modelopt" / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["modelopt"]
