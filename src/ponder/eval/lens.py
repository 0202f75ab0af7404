"""Logit lens: how early does each token's final prediction appear?

For every layer l, the hidden state after l goes through the final norm and the shared head. We report the share
of tokens whose top-1 there already equals the final layer's top-1, and the loss if the model stopped at l. This
is the first evidence of how heterogeneous tokens are: the ceiling for every early-exit and skipping method.
"""

from __future__ import annotations

import torch

from ..engine.forward import Engine
from ..engine.states import layer_states


@torch.inference_mode()
def logit_lens(engine: Engine, ids: list[int], window: int | None = None, batch: int = 4) -> list[dict]:
    """Per layer (1-based depth): top-1 agreement with the final layer, and mean NLL (nats) if stopped there."""
    window = window or engine.cfg.max_position_embeddings
    L = engine.cfg.num_hidden_layers
    agree = torch.zeros(L)
    nll = torch.zeros(L, dtype=torch.float64)
    n = 0
    t = torch.tensor(ids)
    chunks = [t[i:i + window] for i in range(0, len(ids) - window + 1, window)]
    for b in range(0, len(chunks), batch):
        x = torch.stack(chunks[b:b + batch]).to(engine.device)
        outs = layer_states(engine, x)
        tgt = x[:, 1:]
        final_top = engine.logits(outs[-1][:, :-1]).argmax(-1)
        for layer, h in enumerate(outs):
            lg = engine.logits(h[:, :-1]).float()
            agree[layer] += (lg.argmax(-1) == final_top).sum()
            nll[layer] += -torch.log_softmax(lg, -1).gather(-1, tgt[..., None]).sum().double()
        n += tgt.numel()
    return [{"layer": i + 1, "top1_equals_final": float(agree[i] / n), "nll": float(nll[i] / n)} for i in range(L)]
