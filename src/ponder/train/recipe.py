"""ponder's training recipe for small Llama-architecture models.

Why a recipe of our own: ponder must ship a default model trained on text every machine has, and it must be
reproducible on 2 CPU cores or a GPU. The recipe is deliberately plain (AdamW, warm-up + cosine, bf16 autocast,
gradient accumulation), with two properties that matter more than speed:

* exact resume: the batch for step ``s`` is a pure function of (seed, step, rank), the learning rate a pure function
  of ``s``, and model + optimizer state are restored from safetensors, so an interrupted run continues bit for bit;
* nothing is pickled: checkpoints are safetensors plus JSON.

Distributed runs use ``torchrun`` (DDP; gloo on CPU, NCCL on GPU). Rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..errors import PonderError
from ..models.config import ModelConfig
from ..models.llama import LlamaModel


@dataclass
class TrainConfig:
    # model
    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    # data
    data_dir: str = "corpus"
    seq_len: int = 512
    # optimisation
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 100
    steps: int = 1000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    # machinery
    out_dir: str = "runs/ref"
    ckpt_every: int = 200
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 8
    autocast_bf16: bool = True
    compile: bool = False
    threads: int = 0  # 0: leave torch's default
    export_dtype: str = "bfloat16"

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        p = Path(path)
        if not p.is_file():
            raise PonderError(f"training config {p} not found")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise PonderError(f"training config {p} is not valid TOML: {e}") from None
        raw.update(overrides or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise PonderError(f"unknown training config keys {unknown}; known keys: {sorted(known)}")
        return cls(**raw)

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.hidden_size // self.num_attention_heads,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=1e-5,
            rope_theta=self.rope_theta,
            tie_word_embeddings=self.tie_word_embeddings,
            model_type="llama",
            bos_token_id=0,
            eos_token_id=[0],
        )

    def model_fields(self) -> dict[str, Any]:
        """The fields a checkpoint must agree on to be resumed (the model's shape and the data it was cut from)."""
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "seq_len")
        return {k: getattr(self, k) for k in keys}


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


class TokenData:
    """Random windows of a flat uint16 token file; the batch is a pure function of (seed, step, rank, micro)."""

    def __init__(self, path: Path, seq_len: int):
        if not path.is_file():
            raise PonderError(f"{path} not found; build the corpus first with `ponder data build --out {path.parent}`")
        self.tokens = np.memmap(path, dtype=np.uint16, mode="r")
        if len(self.tokens) <= seq_len + 1:
            raise PonderError(f"{path} holds only {len(self.tokens)} tokens, fewer than one window of {seq_len + 1}")
        self.seq_len = seq_len

    def batch(self, seed: int, step: int, rank: int, micro: int, batch_size: int) -> torch.Tensor:
        rng = np.random.default_rng([seed, step, rank, micro])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=batch_size)
        rows = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        return torch.from_numpy(rows)


# ---- checkpoints: safetensors + JSON, never pickle -------------------------------------------------------------------

def _opt_tensors(opt: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    out = {}
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"{names[pid]}::{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def save_checkpoint(path: Path, model: LlamaModel, opt: torch.optim.Optimizer, cfg: TrainConfig, step: int,
                    extra: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    names = {i: n for i, (n, _) in enumerate(model.named_parameters())}
    save_file({k: v.contiguous() for k, v in _opt_tensors(opt, names).items()}, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step, "config": dataclasses.asdict(cfg), **extra}, indent=1))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)  # a crash mid-save leaves the previous checkpoint intact


def load_checkpoint(path: Path, model: LlamaModel, opt: torch.optim.Optimizer, cfg: TrainConfig) -> dict[str, Any]:
    try:
        state = json.loads((path / "state.json").read_text())
        weights = load_file(path / "model.safetensors")
        opt_t = load_file(path / "optimizer.safetensors")
    except Exception as e:  # noqa: BLE001 - any unreadable file means the same thing to the user
        raise PonderError(f"checkpoint {path} is unreadable ({e}); delete it to start over") from None
    saved = TrainConfig(**state["config"]).model_fields()
    if saved != cfg.model_fields():
        diff = {k: (saved[k], v) for k, v in cfg.model_fields().items() if saved[k] != v}
        raise PonderError(f"checkpoint {path} was written for another config (saved vs now: {diff}); "
                          "use another --out or the matching config")
    model.load_state_dict(weights)
    names = [n for n, _ in model.named_parameters()]
    sd = opt.state_dict()
    sd["state"] = {}
    for i, n in enumerate(names):
        st = {k.split("::", 1)[1]: v for k, v in opt_t.items() if k.split("::", 1)[0] == n}
        if st:
            sd["state"][i] = st
    opt.load_state_dict(sd)
    return state


def export_hf(model: LlamaModel, cfg: TrainConfig, out: Path, tokenizer: Path | None) -> None:
    """Write a Hugging Face folder (config.json, model.safetensors, tokenizer.json, generation_config.json)."""
    out.mkdir(parents=True, exist_ok=True)
    dt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[cfg.export_dtype]
    sd = {k: v.detach().to(dt).contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    hf = model.config.to_hf_dict()
    hf["torch_dtype"] = cfg.export_dtype
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "do_sample": False}, indent=2) + "\n")
    if tokenizer is not None and tokenizer.is_file():
        shutil.copyfile(tokenizer, out / "tokenizer.json")


# ---- the loop -----------------------------------------------------------------------------------------------------

def _dist() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def check_memory(cfg: TrainConfig, n_params: int) -> None:
    """Refuse a config that cannot fit before spending minutes on it."""
    need = n_params * 16  # weights, grads, two Adam moments (fp32)
    act = cfg.batch_size * cfg.seq_len * cfg.hidden_size * cfg.num_hidden_layers * 4 * 24
    act += cfg.batch_size * cfg.seq_len * cfg.vocab_size * 4 * 3
    try:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        return
    if need + act > avail:
        raise PonderError(f"config needs about {(need + act) / 2**30:.1f} GiB but {avail / 2**30:.1f} GiB is free; "
                          "lower batch_size, seq_len or the model size")


def train(cfg: TrainConfig, resume: bool = True, progress: bool = True, stop_after: int | None = None) -> Path:
    """Train (or resume) and export; returns the exported HF folder.

    ``stop_after`` ends this run after that many steps (writing a checkpoint), as an interruption would."""
    rank, world = _dist()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    out = Path(cfg.out_dir)
    data_dir = Path(cfg.data_dir)
    data = TokenData(data_dir / "train.bin", cfg.seq_len)
    val = TokenData(data_dir / "val.bin", cfg.seq_len) if (data_dir / "val.bin").is_file() else None

    torch.manual_seed(cfg.seed)
    mc = cfg.model_config()
    check_memory(cfg, mc.vocab_size * mc.hidden_size * (1 if mc.tie_word_embeddings else 2)
                 + mc.num_hidden_layers * (mc.attn_proj_params + mc.ffn_params))  # before allocating anything
    model = LlamaModel(mc).init_weights(cfg.seed).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, foreach=False,
    )
    start, elapsed_before, tokens_before = 0, 0.0, 0
    ckpt = out / "checkpoint"
    if resume and ckpt.exists():
        st = load_checkpoint(ckpt, model, opt, cfg)
        start, elapsed_before, tokens_before = st["step"], st.get("elapsed_s", 0.0), st.get("tokens_seen", 0)
        if rank == 0:
            print(f"resumed from {ckpt} at step {start}", file=sys.stderr)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    step_model: torch.nn.Module = model
    if world > 1:
        step_model = torch.nn.parallel.DistributedDataParallel(model)
    fwd = torch.compile(step_model) if cfg.compile else step_model

    log_path = out / "log.jsonl"
    if rank == 0 and start == 0 and log_path.exists():
        log_path.unlink()
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world
    bar = None
    if rank == 0 and progress:
        bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True, file=sys.stderr)
    t0 = time.perf_counter()
    tokens = tokens_before
    use_bf16 = cfg.autocast_bf16 and device.type in ("cpu", "cuda")
    for step in range(start, cfg.steps):
        lr = lr_at(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            xy = data.batch(cfg.seed, step, rank, micro, cfg.batch_size).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = fwd(xy[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), xy[:, 1:].flatten()) / cfg.grad_accum
            loss.backward()
            loss_sum += loss.item()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        tokens += tokens_per_step
        done = step + 1
        elapsed = elapsed_before + time.perf_counter() - t0
        if rank == 0:
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum:.3f}",
                                tok_s=f"{(tokens - tokens_before) / (time.perf_counter() - t0):.0f}")
            if done % cfg.log_every == 0 or done == cfg.steps:
                rec = {"step": done, "loss": round(loss_sum, 5), "lr": lr, "grad_norm": round(float(gn), 4),
                       "tokens": tokens, "elapsed_s": round(elapsed, 1)}
                if val is not None and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                    rec["val_loss"] = round(evaluate(model, val, cfg, device), 5)
                with log_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
        interrupted = stop_after is not None and done - start >= stop_after
        if done % cfg.ckpt_every == 0 or done == cfg.steps or interrupted:
            if rank == 0:
                save_checkpoint(ckpt, model, opt, cfg, done, {"elapsed_s": elapsed, "tokens_seen": tokens})
                plot_loss(log_path, out / "loss.png")
            if world > 1:
                torch.distributed.barrier()
        if interrupted:
            if bar is not None:
                bar.close()
            return ckpt
    if bar is not None:
        bar.close()
    if world > 1:  # the replicas must agree bit for bit; record each rank's checksum so a test can see it
        sums = torch.stack([p.detach().double().sum() for p in model.parameters()]).cpu()
        gathered = [torch.zeros_like(sums) for _ in range(world)]
        torch.distributed.all_gather(gathered, sums)
        if rank == 0:
            (out / "ddp_check.json").write_text(json.dumps({"world": world,
                                                            "checksums": [g.tolist() for g in gathered]}))
    final = out / "final"
    if rank == 0:
        export_hf(model, cfg, final, data_dir / "tokenizer.json")
    if world > 1:
        torch.distributed.barrier()
    return final


@torch.no_grad()
def evaluate(model: LlamaModel, val: TokenData, cfg: TrainConfig, device: torch.device) -> float:
    model.eval()
    losses = []
    for i in range(cfg.eval_batches):
        xy = val.batch(cfg.seed + 1, 0, 0, i, cfg.batch_size).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16):
            logits = model(xy[:, :-1])
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), xy[:, 1:].flatten()).item())
    model.train()
    return float(np.mean(losses))


def plot_loss(log_path: Path, png: Path) -> None:
    """Loss curve as a PNG; skipped quietly when matplotlib is not installed (it is an optional extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if not log_path.is_file():
        return
    recs = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if not recs:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["tokens"] / 1e6 for r in recs], [r["loss"] for r in recs], lw=1, label="train")
    v = [r for r in recs if "val_loss" in r]
    if v:
        ax.plot([r["tokens"] / 1e6 for r in v], [r["val_loss"] for r in v], "o-", ms=3, label="validation")
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ponder train", description="Train a small Llama model with ponder's recipe.")
    ap.add_argument("--config", required=True, help="TOML file with TrainConfig fields")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    ap.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    args = ap.parse_args(argv)
    overrides = {}
    for kv in args.set:
        k, _, v = kv.partition("=")
        try:
            overrides[k] = tomllib.loads(f"v = {v}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[k] = v  # a bare string such as a path
    cfg = TrainConfig.from_file(args.config, overrides)
    final = train(cfg, resume=not args.no_resume)
    print(final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
