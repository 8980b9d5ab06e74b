"""Export building blocks through the writer the product runs: atomic directory, shards, bad scales, saved names."""

import json

import pytest
import torch
from safetensors import safe_open

from helpers import tiny_config
from nvfp4cal.checkpoint.io import Item, Staging, plan_shards, write_groups, write_index
from nvfp4cal.checkpoint.modelopt import MODELOPT
from nvfp4cal.checkpoint.plan import check_tensors, write_checkpoint
from nvfp4cal.model.insert import insert_quantizers
from nvfp4cal.model.loaders import build_tiny
from nvfp4cal.model.view import BadWeightError, model_tensors, saved_layout
from nvfp4cal.numerics.errors import ExportError
from nvfp4cal.recipe import build_recipe


def _tiny_quantized():
    loaded = build_tiny("LlamaConfig", tiny_config("tiny_llama"))
    insert_quantizers(loaded.model, build_recipe("t", rules=["*", {"pattern": "*lm_head*", "enable": False}]))
    return loaded.model


def test_export_replaces_a_directory_only_with_overwrite(tmp_path):
    model, target = _tiny_quantized(), tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("1")
    with pytest.raises(ExportError, match="already exists"):
        write_checkpoint(model, target, MODELOPT)
    assert (target / "old").read_text() == "1"
    write_checkpoint(model, target, MODELOPT, overwrite=True, progress=False)
    assert "old" not in {p.name for p in target.iterdir()} and (target / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left


def test_export_leaves_nothing_when_the_layout_fails(tmp_path, monkeypatch):
    def broken(*_):
        raise ExportError("injected failure")

    monkeypatch.setattr(MODELOPT, "configure", broken)
    with pytest.raises(ExportError, match="injected failure"):
        write_checkpoint(_tiny_quantized(), tmp_path / "out", MODELOPT, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_shards_and_index_as_huggingface_hub_plans_them(tmp_path):
    """The product's writer with a small shard limit: huggingface_hub's grouping and names, a true index."""
    from huggingface_hub import split_state_dict_into_shards_factory

    items = [Item(4000, (f"t{i}",), lambda i=i: {f"t{i}": torch.full((1000,), float(i))}) for i in range(5)]
    items.insert(2, Item(12000, ("big",), lambda: {"big": torch.zeros(3000)}))  # over the limit: a shard of its own
    shards = plan_shards(items, 9000)
    hub = split_state_dict_into_shards_factory(
        {i.names[0]: i for i in items}, get_storage_size=lambda i: i.nbytes, max_shard_size=9000,
        filename_pattern="model{suffix}.safetensors",
    )  # fmt: skip
    assert [[i.names[0] for i in g] for g in shards] == list(hub.filename_to_tensors.values())
    wm, total = write_groups(tmp_path, shards, 0, len(shards), lambda t: None, Staging())
    write_index(tmp_path, wm, total)
    assert wm == hub.tensor_to_filename and total == 32000
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == wm and index["metadata"]["total_size"] == 32000
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
    wm, _ = write_groups(tmp_path, plan_shards(items, 1 << 20), 0, 1, lambda t: None, Staging())
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
    from helpers import run_calibrate
    from nvfp4cal.checkpoint.plan import CheckpointWriter
    from nvfp4cal.checkpoint.reload import read_tensors

    small = ["data.num_samples=2", "data.seq_len=16", "data.eval_samples=1", "report.perplexity=false"]
    r = run_calibrate(tmp_path, ["model=tiny_qwen3_moe", "recipe=nvfp4_mlp_only_mse_fp8_cast_kv", *small])
    w = CheckpointWriter(r.model, tmp_path / "early", MODELOPT, max_shard_size_gb=1e-4, early=True)
    w.start_early()
    summary = w.finish()
    assert len(summary["files"]) > 2 and (tmp_path / "early" / "model.safetensors.index.json").is_file()
    want, got = read_tensors(tmp_path / "ckpt"), read_tensors(tmp_path / "early")
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k].reshape(-1).view(torch.uint8), got[k].reshape(-1).view(torch.uint8)), k
    aborted = CheckpointWriter(r.model, tmp_path / "aborted", MODELOPT, early=True)
    aborted.start_early()
    aborted.abort()
    assert not (tmp_path / "aborted").exists() and not list(tmp_path.glob(".aborted.tmp-*"))


def test_failed_second_layout_leaves_no_temporary_dir(tmp_path, monkeypatch):
    """export.format=both: when the second checkpoint fails, the first stays and no temp dir is left."""
    from helpers import run_calibrate
    from nvfp4cal.checkpoint.compressed_tensors import COMPRESSED_TENSORS

    def broken(*_):
        raise ExportError("injected failure")

    monkeypatch.setattr(COMPRESSED_TENSORS, "configure", broken)
    small = ["data.num_samples=2", "data.seq_len=16", "data.eval_samples=1", "report.perplexity=false"]
    with pytest.raises(ExportError, match="injected failure"):
        run_calibrate(tmp_path, ["model=tiny_llama", "recipe=nvfp4_max", "export.format=both", *small])
    assert (tmp_path / "ckpt" / "modelopt" / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["modelopt"]
