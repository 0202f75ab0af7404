"""Write the reference model's card: how it was made and what it scores on held-out data.

    python -m ponder.train.card --model models/ref --run runs/ref --corpus runs/data-ref

Every number in the card is measured here, on the committed evaluation files, next to gzip -9 on the same bytes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from ..api import load
from ..engine.generate import SamplingConfig, generate
from ..eval.lens import logit_lens
from ..eval.metrics import evaluate_text, read_text, text_ids
from ..eval.quality import load_probes, probe_accuracy

# Prompts end mid-line: byte-level BPE merges a newline with the indentation after it, so a prompt ending in a bare
# newline is a token split the model never saw in training.
SAMPLE_PROMPTS = [
    "def fibonacci(n):",
    "import os\n\ndef list_files(path):",
    "class Stack:\n    def __init__(self):",
    "    for i, line in enumerate(lines):",
]


def gzip_bpb(text: str) -> float:
    b = text.encode("utf-8")
    return len(gzip.compress(b, compresslevel=9)) * 8 / len(b)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def build_card(model: Path, run: Path, corpus: Path, data: Path, out: Path) -> dict:
    eng = load(model)
    card: dict = {"model": str(model), "config": json.loads((model / "config.json").read_text())}
    man = json.loads((corpus / "manifest.json").read_text())
    card["corpus"] = {"sha256": man["sha256"], "bytes": man["bytes"], "documents": man["documents"],
                      "sources": {k: {kk: vv for kk, vv in v.items() if kk != "files"}
                                  for k, v in man["sources"].items()},
                      "train_tokens": man["tokens"]["train_tokens"], "tokenizer_sha256": man.get("tokenizer_sha256")}
    st = json.loads((run / "checkpoint" / "state.json").read_text())
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]
    card["training"] = {"steps": st["step"], "tokens_seen": st["tokens_seen"], "wall_time_s": round(st["elapsed_s"]),
                        "machine": f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
                        "final_train_loss": log[-1]["loss"],
                        "final_val_loss": next((r["val_loss"] for r in reversed(log) if "val_loss" in r), None),
                        "recipe": st["config"]}
    if (run / "loss.png").is_file():
        shutil.copyfile(run / "loss.png", out / "loss.png")
    heldout = {}
    for name in ("code", "prose"):
        text = read_text(data / f"{name}.txt")
        t0 = time.perf_counter()
        r = evaluate_text(eng, text)
        heldout[name] = {"bits_per_byte": round(r["bits_per_byte"], 4), "gzip9_bits_per_byte": round(gzip_bpb(text), 4),
                         "ratio_to_gzip": round(r["bits_per_byte"] / gzip_bpb(text), 4),
                         "perplexity": round(r["perplexity"], 3), "tokens": r["tokens_scored"], "bytes": r["bytes"],
                         "eval_s": round(time.perf_counter() - t0, 1)}
    card["heldout"] = heldout
    pr = probe_accuracy(eng, None, load_probes(data / "probes.jsonl"))
    card["probes"] = {"exact_match": pr["probe_exact_match"], "n": pr["probes"],
                      "correct": sum(pr["probe_correct"]), "by_kind": pr["probe_by_kind"],
                      "truncated_prompts": pr["probes_truncated"]}
    code_ids = text_ids(eng, read_text(data / "code.txt"))[: 256 * 48]
    card["logit_lens"] = logit_lens(eng, code_ids)
    samples = []
    for p in SAMPLE_PROMPTS:
        toks = generate(eng, [eng.tokenizer.encode(p)], SamplingConfig(max_new_tokens=60)).tokens[0]
        samples.append({"prompt": p, "completion": eng.tokenizer.decode(toks)})
    card["samples"] = samples
    (out / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    (out / "README.md").write_text(render(card))
    return card


def render(c: dict) -> str:
    cfg, tr, ho = c["config"], c["training"], c["heldout"]
    n_params = (cfg["vocab_size"] * cfg["hidden_size"] + cfg["num_hidden_layers"] * (
        cfg["hidden_size"] * cfg["head_dim"] * (2 * cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"])
        + 3 * cfg["hidden_size"] * cfg["intermediate_size"] + 2 * cfg["hidden_size"]) + cfg["hidden_size"])
    lines = [
        "# ponder reference model (`--model ref`)", "",
        "A small Llama-architecture causal LM trained from scratch by ponder's own recipe "
        "(`ponder train --config configs/ref.toml`) on text every machine of this kind has: the Python standard "
        "library, Python's documentation sources and a Wikipedia sample. It exists so ponder's demo, benchmarks and "
        "end-to-end tests run offline; it is a test subject for adaptive depth, not a useful assistant.", "",
        "## Configuration", "",
        f"- {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, FFN {cfg['intermediate_size']} (SwiGLU), "
        f"{cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} KV heads (GQA), "
        f"head dim {cfg['head_dim']}, "
        f"context {cfg['max_position_embeddings']}, vocabulary {cfg['vocab_size']} (byte-level BPE), tied embeddings; "
        f"{n_params / 1e6:.1f}M parameters, stored in {cfg.get('torch_dtype', 'float32')}.",
        "- Loads in ponder (`ponder.load('ref')`) and in transformers "
        "(`AutoModelForCausalLM.from_pretrained('models/ref')`).",
        "", "## Training", "",
        f"- Corpus: {c['corpus']['bytes']:,} bytes, {c['corpus']['documents']} documents, "
        f"{c['corpus']['train_tokens']:,} training tokens; sha256 `{c['corpus']['sha256']}`.",
        "- Sources: " + "; ".join(f"{k} ({v.get('bytes', 0):,} bytes)"
                                  for k, v in c["corpus"]["sources"].items()) + ".",
        f"- {tr['steps']} steps, {tr['tokens_seen']:,} tokens seen, {tr['wall_time_s'] / 60:.0f} minutes on "
        f"{tr['machine']} (float32, torch.compile; this CPU has no bf16 units).",
        f"- AdamW (lr {tr['recipe']['lr']}, cosine to {tr['recipe']['min_lr']}, "
        f"warm-up {tr['recipe']['warmup_steps']}, "
        f"weight decay {tr['recipe']['weight_decay']}), batch {tr['recipe']['batch_size']} x {tr['recipe']['seq_len']} "
        f"tokens, seed {tr['recipe']['seed']}. Final train loss {tr['final_train_loss']:.3f}, validation loss "
        f"{tr['final_val_loss']} nats/token.", "", "![loss curve](loss.png)", "",
        "## Held-out numbers", "",
        "Measured with `ponder eval --model ref --data data/eval/<file>` (windows of the full context, stride half a "
        "window, BOS prepended); gzip -9 on the same bytes for scale.", "",
        "| data | bits/byte | gzip -9 bits/byte | ratio | perplexity | tokens |", "|---|---|---|---|---|---|",
    ]
    for k, v in ho.items():
        lines.append(f"| {k} | {v['bits_per_byte']:.3f} | {v['gzip9_bits_per_byte']:.3f} | {v['ratio_to_gzip']:.3f} | "
                     f"{v['perplexity']:.2f} | {v['tokens']:,} |")
    p = c.get("probes")
    if p:
        kinds = ", ".join(f"{k} {v:.3f}" for k, v in p["by_kind"].items())
        lines += ["", f"Knowledge probes (`data/eval/probes.jsonl`, greedy exact match): **{p['exact_match']:.3f}** "
                      f"({p['correct']}/{p['n']}; by kind: {kinds}; {p['truncated_prompts']} prompts cut to the "
                      "context)."]
    lines += ["", "## Logit lens", "",
              "Per layer: the share of held-out code tokens whose top-1 prediction through the final norm and head "
              "already equals the final layer's top-1, and the loss if the model stopped there "
              f"({len(c['logit_lens'])} layers; first 12k tokens of `data/eval/code.txt`).", "",
              "| layer | top-1 = final | loss (nats) |", "|---|---|---|"]
    for r in c["logit_lens"]:
        lines.append(f"| {r['layer']} | {r['top1_equals_final']:.3f} | {r['nll']:.3f} |")
    lines += ["", "## Greedy samples", "", "As they come out (greedy, 60 new tokens):", ""]
    for s in c["samples"]:
        lines += ["```python", s["prompt"] + s["completion"], "```", ""]
    lines += ["## Licences", "", "Weights: Apache-2.0, like ponder. Training text: Python standard library and "
              "documentation (PSF licence), Wikipedia (CC BY-SA); see `data/LICENSES.md`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ponder.train.card")
    ap.add_argument("--model", default="models/ref")
    ap.add_argument("--run", default="runs/ref")
    ap.add_argument("--corpus", default="runs/data-ref")
    ap.add_argument("--data", default="data/eval")
    a = ap.parse_args(argv)
    card = build_card(Path(a.model), Path(a.run), Path(a.corpus), Path(a.data), Path(a.model))
    print(json.dumps({k: card[k] for k in ("heldout", "probes")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
