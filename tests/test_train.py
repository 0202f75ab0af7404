"""The training recipe: exact resume, distributed agreement, and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ponder.errors import PonderError
from ponder.train.recipe import TrainConfig, train

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, seq_len=16, batch_size=4, steps=4, warmup_steps=1,
            ckpt_every=100, log_every=1, compile=False, autocast_bf16=False, export_dtype="float32", threads=1)


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    np.random.default_rng(0).integers(0, 64, 5000).astype(np.uint16).tofile(d / "train.bin")
    return d


def _cfg(data_dir: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "data_dir": str(data_dir), "out_dir": str(out), **kw})


def test_exact_resume_after_interruption(data_dir, tmp_path):
    train(_cfg(data_dir, tmp_path / "a"), progress=False)
    cfg_b = _cfg(data_dir, tmp_path / "b")
    train(cfg_b, progress=False, stop_after=2)
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 2
    train(cfg_b, progress=False)
    a = load_file(tmp_path / "a" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "b" / "final" / "config.json").is_file()
    assert (tmp_path / "b" / "loss.png").is_file()


def test_exported_folder_loads_in_ponder_and_transformers(data_dir, tmp_path):
    import transformers

    import ponder.api as api

    final = train(_cfg(data_dir, tmp_path / "r"), progress=False)
    eng = api.load(final)  # no tokenizer.json in this tiny data dir: load the weights only
    hf = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    ids = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        assert (eng.forward(ids).logits - hf(ids).logits).abs().max() < 1e-4


def test_resume_with_other_config_is_refused(data_dir, tmp_path):
    train(_cfg(data_dir, tmp_path / "c"), progress=False, stop_after=1)
    with pytest.raises(PonderError, match="another config"):
        train(_cfg(data_dir, tmp_path / "c", hidden_size=64), progress=False)


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(PonderError, match="build the corpus"):
        train(_cfg(tmp_path / "nothing", tmp_path / "o"), progress=False)


def test_ddp_two_cpu_processes_agree(data_dir, tmp_path):
    cfg = tmp_path / "tiny.toml"
    lines = [f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}" for k, v in TINY.items()]
    lines += [f'data_dir = "{data_dir}"', f'out_dir = "{tmp_path / "ddp"}"', "steps = 3"]
    cfg.write_text("\n".join(l for l in lines if not l.startswith("steps = 4")) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29533", "-m", "ponder.train.recipe", "--config", str(cfg), "--no-resume"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    check = json.loads((tmp_path / "ddp" / "ddp_check.json").read_text())
    assert check["world"] == 2 and check["checksums"][0] == check["checksums"][1]


def test_config_too_big_for_memory_is_refused(data_dir, tmp_path):
    with pytest.raises(PonderError, match="GiB but"):
        train(_cfg(data_dir, tmp_path / "big", hidden_size=4096, intermediate_size=16384, num_hidden_layers=64,
                   vocab_size=65000, batch_size=64, seq_len=4096, max_position_embeddings=4096), progress=False)


def test_corrupt_checkpoint_is_a_clear_error(data_dir, tmp_path):
    cfg = _cfg(data_dir, tmp_path / "x")
    train(cfg, progress=False, stop_after=1)
    ck = tmp_path / "x" / "checkpoint" / "optimizer.safetensors"
    ck.write_bytes(ck.read_bytes()[:100])
    with pytest.raises(PonderError, match="unreadable"):
        train(cfg, progress=False)
