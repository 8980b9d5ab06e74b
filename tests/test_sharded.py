"""Sharded calibration (trainer=fsdp, FSDP2 on CPU with gloo): same checkpoint as one process,
each rank holding and reading only its rows."""

import json

import pytest
import torch
from accelerate import init_empty_weights

from helpers import one_process, torchrun
from nvfp4cal.model.loaders import CheckpointRows, RandomRows, build_tiny
from nvfp4cal.numerics.comm import rows

# the torchrun tests share one pytest-xdist worker: two at once would run 4-6 ranks on 2 cores
pytestmark = pytest.mark.xdist_group("torchrun")

ARGS = [
    "recipe=nvfp4_mse",  # every Linear and the experts: row-sharded Linears and expert-sharded experts
    "data.num_samples=6",
    "data.seq_len=16",
    "data.batch_size=1",
    "data.eval_samples=1",
    "trainer.enable_progress_bar=false",
]
TINY_MOE = dict(
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
)


def _same_files(a, b):
    for f in ("model.safetensors", "hf_quant_config.json", "config.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_fsdp_on_three_ranks_writes_the_one_process_checkpoint(tmp_path):
    # 3 ranks: 8 experts split 3/3/2, 64-row Linears 22/22/20 - uneven shards everywhere
    args = ["model=tiny_qwen3_moe", *ARGS]
    one_process(tmp_path, args, "one")
    r = torchrun(tmp_path, [*args, f"export.dir={tmp_path}/fsdp"], "fsdp", 3)
    assert r.returncode == 0, r.stderr[-3000:]
    _same_files(tmp_path / "one", tmp_path / "fsdp")
    (run,) = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    report = json.loads((run / "report.json").read_text())
    assert report["sharding"]["ranks"] == 3
    assert report["sweep"]["ranks"] == 3


def test_fsdp_reads_only_its_rows_of_an_hf_checkpoint(tmp_path):
    src = build_tiny("Qwen3MoeConfig", {**TINY_MOE, "tie_word_embeddings": True}, dtype="bfloat16")
    src.model.save_pretrained(tmp_path / "hf")
    src.tokenizer.save_pretrained(tmp_path / "hf")
    args = ["model=hf", f"model.path={tmp_path}/hf", *ARGS, "export.format=both"]
    one_process(tmp_path, args, "one")
    r = torchrun(tmp_path, [*args, f"export.dir={tmp_path}/fsdp"], "fsdp", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    _same_files(tmp_path / "one" / "modelopt", tmp_path / "fsdp" / "modelopt")
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "one" / "compressed_tensors" / f).read_bytes() == (
            tmp_path / "fsdp" / "compressed_tensors" / f
        ).read_bytes(), f
    (run,) = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    sharding = json.loads((run / "report.json").read_text())["sharding"]
    # fp32 on CPU: each rank holds about half of the parameters, never all of them
    total = sharding["param_bytes"]
    assert all(0.4 * total < b < 0.6 * total for b in sharding["param_bytes_per_rank"]), sharding


def test_fsdp_names_a_nan_weight_in_one_line(tmp_path):
    src = build_tiny("Qwen3MoeConfig", TINY_MOE, dtype="bfloat16")
    with torch.no_grad():
        src.model.model.layers[1].mlp.experts.down_proj[7, 3, 5] = float("nan")  # rank 1's expert
    src.model.save_pretrained(tmp_path / "hf")
    src.tokenizer.save_pretrained(tmp_path / "hf")
    r = torchrun(tmp_path, ["model=hf", f"model.path={tmp_path}/hf", *ARGS, f"export.dir={tmp_path}/x"], "fsdp", 2)
    assert r.returncode != 0
    assert "nvfp4cal: error: weight model.layers.1.mlp.experts.down_proj holds NaN or Inf values" in r.stderr + r.stdout
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("n", [1, 5, 8, 64, 257])
def test_rows_are_torch_chunk_rows(n):
    for world in (1, 2, 3, 7):
        parts = torch.arange(n).chunk(world)
        for rank in range(world):
            start, stop = rows(n, rank, world)
            got = torch.arange(n)[start:stop]
            want = parts[rank] if rank < len(parts) else torch.arange(0)
            assert torch.equal(got, want), (n, world, rank)


def test_random_rows_do_not_depend_on_the_split():
    fill = RandomRows(seed=3, std=0.02)
    for name, shape in (("a.weight", (10, 16)), ("b.experts.gate_up_proj", (5, 8, 16)), ("c.norm.weight", (16,))):
        whole = torch.empty(shape)
        fill(name, whole, 0, shape[0], shape[0])
        for world in (2, 3):
            for rank in range(world):
                start, stop = rows(shape[0], rank, world)
                part = torch.empty((stop - start, *shape[1:]))
                fill(name, part, start, stop, shape[0])
                assert torch.equal(part, whole[start:stop]), (name, world, rank)


def test_checkpoint_rows_match_the_loaded_model(tmp_path):
    from transformers import AutoModelForCausalLM

    src = build_tiny("Qwen3MoeConfig", TINY_MOE, dtype="bfloat16")
    src.model.save_pretrained(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(ref.config, dtype=torch.bfloat16)
    fill = CheckpointRows(tmp_path, skeleton)
    for name, p in ref.named_parameters():  # experts are fused [E, ...] here, saved one expert at a time
        n = p.shape[0]
        for rank in range(3):
            start, stop = rows(n, rank, 3)
            out = torch.empty((stop - start, *p.shape[1:]), dtype=p.dtype)
            fill(name, out, start, stop, n)
            assert torch.equal(out, p.detach()[start:stop]), (name, rank)
