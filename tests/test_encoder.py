"""Encoder runtime and token-reduction mechanics on tiny random BERT/RoBERTa folders (transformers is the oracle)."""

from __future__ import annotations

import json

import pytest
import torch

from ponder.encoders.engine import EncoderEngine, EncoderStats, TokenState
from ponder.encoders.policies import registry
from ponder.encoders.reduce import bipartite_soft_matching, compaction, merge_wavg
from ponder.errors import PonderError
from ponder.models.bert_loader import load_encoder_folder

WORDS = ("the cat sat on mat dog ran far away quick brown fox jumps over lazy a an and or but in to of is was "
         "python code runs fast slow token merge prune exit layer").split()


def write_wordpiece(folder) -> int:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + list("abcdefghijklmnopqrstuvwxyz.,")
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                  ("[SEP]", 3)])
    tok.enable_truncation(8)  # exported tokenizers often carry these; the loader must switch them off
    tok.enable_padding(length=8)
    tok.save(str(folder / "tokenizer.json"))
    return len(vocab)


def tiny_encoder(tmp_path, family: str = "bert", layers: int = 4, seed: int = 0, st: bool = True):
    import transformers as tf

    torch.manual_seed(seed)
    folder = tmp_path / f"{family}-{layers}"
    folder.mkdir()
    V = write_wordpiece(folder)
    common = dict(vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, max_position_embeddings=64, hidden_act="gelu")
    if family == "bert":
        m = tf.BertModel(tf.BertConfig(**common, type_vocab_size=2, pad_token_id=0), add_pooling_layer=True)
    else:
        m = tf.RobertaModel(tf.RobertaConfig(**common, type_vocab_size=1, pad_token_id=0), add_pooling_layer=False)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias") or "LayerNorm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    m.eval().save_pretrained(folder, safe_serialization=True)
    if st:
        (folder / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": 48, "pooling_mode_mean_tokens": True}))
    return m, folder


SENTS = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog and runs far away",
         "python code", "token merge and prune and exit layer in the code is fast or slow but the dog ran"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    m, folder = tiny_encoder(tmp_path_factory.mktemp("enc"), "bert")
    return m, EncoderEngine(load_encoder_folder(folder))


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_token_states_match_transformers(tmp_path, family):
    m, folder = tiny_encoder(tmp_path, family)
    eng = EncoderEngine(load_encoder_folder(folder))
    seqs, _ = eng.tokenizer.encode_special(SENTS)
    assert seqs[0][0] == 2 and seqs[0][-1] == 3 and len(seqs[1]) > 8  # specials added, export truncation off
    ids, lengths = eng.batch(seqs)
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask).last_hidden_state
    ours = eng.encode(seqs, tokens_out=True)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(ours[b, :n], ref[b, :n], atol=2e-5, rtol=1e-4)
    # pooled: mean over the attention mask, then L2-normalised (modules.json has Normalize)
    pooled = eng.encode(seqs)
    want = torch.nn.functional.normalize((ref * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    torch.testing.assert_close(pooled, want, atol=2e-5, rtol=1e-4)


def test_batch_equals_single_dense(bert):
    _, eng = bert
    seqs, _ = eng.tokenizer.encode_special(SENTS)
    batch = eng.encode(seqs)
    for b, s in enumerate(seqs):
        torch.testing.assert_close(eng.encode([s])[0], batch[b], atol=1e-5, rtol=1e-5)


def test_compaction_and_merge_functions():
    keep = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    order, valid, o2n = compaction(keep)
    assert order.tolist() == [[0, 2, 3], [2, 0, 1]]
    assert valid.tolist() == [[True, True, True], [True, False, False]]
    assert o2n.tolist() == [[0, -1, 1, 2, -1], [-1, -1, 0, -1, -1]]
    # identical rows merge first; sizes are conserved; the merged value is the size-weighted mean
    x = torch.tensor([[[1.0, 0], [1.0, 0.01], [0, 1.0], [0.5, 0.5], [0, 1.0], [-1.0, 0]]])
    mergeable = torch.ones(1, 6, dtype=torch.bool)
    merged, dst = bipartite_soft_matching(x, mergeable, torch.tensor([2]))
    assert merged[0].tolist() == [True, False, True, False, False, False]
    assert dst[0].tolist() == [1, 1, 3, 3, 4, 5] or dst[0, 2] in (3, 5)
    size = torch.tensor([[1.0, 2.0, 1.0, 1.0, 1.0, 1.0]])
    xm, sm = merge_wavg(x, size, merged, dst)
    assert float(sm[0, 1]) == 3.0 and float(sm[0, ~merged[0]].sum()) == float(size.sum())  # kept rows only
    torch.testing.assert_close(xm[0, 1], (x[0, 0] + 2 * x[0, 1]) / 3)
    # protected rows neither merge nor receive
    mergeable[0, 1] = False
    merged, dst = bipartite_soft_matching(x, mergeable, torch.tensor([3]))
    assert not merged[0, 1] and int((dst[0] == 1).sum()) == 1


def _pol(name: str, eng, **kw):
    p = registry.get(name, 0.5, **kw)
    return p


@pytest.mark.parametrize("name,kw", [
    ("token-prune", {"keep_ratio": 0.7}), ("token-prune", {"keep_ratio": 0.6, "score": "norm"}),
    ("token-prune", {"keep_ratio": 0.6, "score": "cls", "pool": "drop"}),
    ("token-merge", {"merge_ratio": 0.3}), ("token-merge", {"merge_ratio": 0.4, "metric": "keys"}),
    ("token-merge", {"mode": "threshold", "threshold": 0.2}),
    ("token-exit", {"threshold": 0.5}), ("token-exit", {"threshold": 0.3, "criterion": "state", "rejoin": 1}),
    ("token-prune", {"keep_ratio": 0.5, "rejoin": 1}), ("layer-skip", {"skip_layers": (1, 3)})])
def test_policy_batch_compatible_and_really_smaller(bert, name, kw):
    _, eng = bert
    pol = _pol(name, eng, **kw)
    assert pol.flags()["batch_compatible"]
    seqs, _ = eng.tokenizer.encode_special(SENTS * 2)
    st = EncoderStats(eng.cfg)
    batch = eng.encode(seqs, pol.reducer(eng), st)
    for b, s in enumerate(seqs[:len(SENTS)]):
        torch.testing.assert_close(eng.encode([s], pol.reducer(eng))[0], batch[b], atol=2e-5, rtol=1e-4)
    assert torch.isfinite(batch).all()
    # the counters are taken from the shapes of the matrices that ran: padding included, they must shrink
    assert st.padded_fraction < 0.95 and st.flops_fraction < 0.95


@pytest.mark.parametrize("name,kw", [("token-prune", {"keep_ratio": 0.6}), ("token-exit", {"threshold": 0.3}),
                                     ("token-merge", {"merge_ratio": 0.3})])
def test_mean_pool_shortcut_equals_pooling_the_token_states(bert, name, kw):
    """The pooled fast path (affine maps applied to per-stage sums) equals mapping and pooling every token."""
    _, eng = bert
    seqs, _ = eng.tokenizer.encode_special(SENTS)
    pol = registry.get(name, 0.5, **kw)
    emb = eng.encode(seqs, pol.reducer(eng))
    tokens = eng.encode(seqs, pol.reducer(eng), tokens_out=True)
    ids, lengths = eng.batch(seqs)
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).float()
    want = torch.nn.functional.normalize((tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    torch.testing.assert_close(emb, want, atol=2e-5, rtol=1e-4)


def test_budget_one_is_dense_exactly(bert):
    _, eng = bert
    seqs, _ = eng.tokenizer.encode_special(SENTS)
    dense = eng.encode(seqs)
    for name in ("token-prune", "token-merge", "token-exit", "layer-skip"):
        pol = registry.get(name, 1.0)
        pol.calibrate(eng, seqs)
        assert pol.reducer(eng) is None
        assert torch.equal(eng.encode(seqs, pol.reducer(eng)), dense)


def test_calibration_meets_budget(bert):
    _, eng = bert
    seqs, _ = eng.tokenizer.encode_special(SENTS * 8)
    for name in ("token-prune", "token-merge", "token-exit", "layer-skip"):
        pol = registry.get(name, 0.85)
        pol.calibrate(eng, seqs)
        st = EncoderStats(eng.cfg)
        for s in range(0, len(seqs), 32):
            eng.encode(seqs[s:s + 32], pol.reducer(eng), st)
        assert st.flops_fraction <= 0.85 + 1e-6, (name, st.flops_fraction)
        assert st.flops_fraction > 0.4, (name, st.flops_fraction)  # not absurdly far below either
    # a budget the knob cannot reach is refused with the reachable minimum, as the decoder policies refuse it
    pol = registry.get("token-exit", 0.2)
    with pytest.raises(PonderError, match=r"token-exit cannot reach budget 0.2 on this model: its minimum reachable"):
        pol.calibrate(eng, seqs)


def test_prune_keeps_specials_and_freezes(bert):
    """Pruned tokens keep their state from the layer they left; [CLS]/[SEP] reach the last layer."""
    _, eng = bert
    seqs, _ = eng.tokenizer.encode_special(SENTS[1:2])
    pol = registry.get("token-prune", 0.5, keep_ratio=0.3, layers=(1,), pool="frozen")
    red = pol.reducer(eng)
    seen = {}
    orig_mid = red.mid

    def spy(i, st: TokenState, keys, probs, stats):
        orig_mid(i, st, keys, probs, stats)
        if i == 1:
            seen["slot"] = st.slot.clone()
            seen["x"] = st.x.clone()
            seen["final"] = st.final.clone()

    red.mid = spy
    tokens = eng.encode(seqs, red, tokens_out=True)
    slot = seen["slot"][0]
    n = len(seqs[0])
    assert slot[0] >= 0 and slot[n - 1] >= 0  # specials survive
    kept = int((slot >= 0).sum())
    assert kept == max(2, -(-n * 3 // 10))
    gone = (slot < 0).nonzero().squeeze(1)
    torch.testing.assert_close(tokens[0, gone], seen["final"][0, gone])  # frozen at the layer they left


def test_merge_virtual_unmerging(bert):
    """Every original position pools its merged representative; merged tokens share one final state."""
    _, eng = bert
    seqs, _ = eng.tokenizer.encode_special(SENTS[3:4])
    pol = registry.get("token-merge", 0.5, merge_ratio=0.4)
    tokens = eng.encode(seqs, pol.reducer(eng), tokens_out=True)[0]
    n = len(seqs[0])
    distinct = torch.unique(tokens[:n], dim=0).shape[0]
    assert distinct < n * 0.5  # many positions share a representative
    emb = eng.encode(seqs, pol.reducer(eng))[0]
    want = torch.nn.functional.normalize(tokens[:n].mean(0), dim=-1)
    torch.testing.assert_close(emb, want, atol=1e-5, rtol=1e-5)


def test_exit_frozen_tokens_are_still_attended(bert):
    """With every ordinary token frozen after layer 0, [CLS]/[SEP] run on alone but still attend to them."""
    from ponder.models.bert import attn_block, embed_tokens, ffn_block

    _, eng = bert
    seqs, _ = eng.tokenizer.encode_special(SENTS[1:2])
    pol = registry.get("token-exit", 0.5, threshold=-2.0, start=0, pool="frozen", criterion="state")
    tokens = eng.encode(seqs, pol.reducer(eng), tokens_out=True)[0]
    W = eng.W
    ids = torch.tensor(seqs)
    x = ffn_block(W, 0, attn_block(W, 0, embed_tokens(W, ids, None), None, None)[0])
    frozen = x[:, 1:-1]
    live = torch.cat([x[:, :1], x[:, -1:]], 1)
    for i in range(1, eng.cfg.num_hidden_layers):
        live = ffn_block(W, i, attn_block(W, i, live, frozen, None)[0])
    torch.testing.assert_close(tokens[1:-1], frozen[0])
    torch.testing.assert_close(tokens[0], live[0, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens[-1], live[0, 1], atol=1e-5, rtol=1e-5)


def test_rejoin_runs_the_last_layers_on_every_token(bert):
    """Tokens frozen after layer 0 skip layer 1 (still keys/values there) and re-enter for layers 2 and 3."""
    from ponder.models.bert import attn_block, embed_tokens, ffn_block

    _, eng = bert
    seqs, _ = eng.tokenizer.encode_special(SENTS[1:2])
    pol = registry.get("token-exit", 0.5, threshold=-2.0, start=0, criterion="state", rejoin=2)
    tokens = eng.encode(seqs, pol.reducer(eng), tokens_out=True)[0]
    W = eng.W
    x = ffn_block(W, 0, attn_block(W, 0, embed_tokens(W, torch.tensor(seqs), None), None, None)[0])
    live = torch.cat([x[:, :1], x[:, -1:]], 1)
    live = ffn_block(W, 1, attn_block(W, 1, live, x[:, 1:-1], None)[0])
    x = torch.cat([live[:, :1], x[:, 1:-1], live[:, 1:]], 1)
    for i in (2, 3):
        x = ffn_block(W, i, attn_block(W, i, x, None, None)[0])
    torch.testing.assert_close(tokens, x[0], atol=2e-5, rtol=1e-4)


def test_layer_skip_equals_shorter_model(tmp_path):
    m, folder = tiny_encoder(tmp_path, "bert", layers=4, st=False)
    eng = EncoderEngine(load_encoder_folder(folder))
    seqs, _ = eng.tokenizer.encode_special(SENTS)
    out = eng.encode(seqs, registry.get("layer-skip", 0.5, skip_layers=(0, 2)).reducer(eng), tokens_out=True)
    m.encoder.layer = torch.nn.ModuleList([m.encoder.layer[1], m.encoder.layer[3]])
    ids, lengths = eng.batch(seqs)
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask).last_hidden_state
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(out[b, :n], ref[b, :n], atol=2e-5, rtol=1e-4)


def test_folder_errors(tmp_path, bert):
    from conftest import hf_model, write_tokenizer

    llama = tmp_path / "llama"
    hf_model("llama", layers=1).save_pretrained(llama, safe_serialization=True)
    write_tokenizer(llama)
    with pytest.raises(PonderError, match="decoder, not a BERT-family encoder"):
        load_encoder_folder(llama)
    m, folder = tiny_encoder(tmp_path, "bert", layers=1, st=False)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(PonderError, match="pickle.*convert"):
        load_encoder_folder(folder)
    with pytest.raises(PonderError, match="does not exist"):
        load_encoder_folder(tmp_path / "nope")
    with pytest.raises(PonderError, match="unknown encoder policy"):
        registry.get("token-squash", 0.5)
    with pytest.raises(PonderError, match="budget"):
        registry.get("token-prune", 1.5)
