"""Tokenizer, special tokens and chat template from a GGUF file's metadata.

A GGUF carries no tokenizer.json: the vocabulary, merges, token types and special ids live in metadata under
llama.cpp's key names (``tokenizer.ggml.*``). We rebuild a ``tokenizers.Tokenizer`` from those keys alone (no
network, no transformers at run time) and make it split text the way llama.cpp does, because llama.cpp is what
wrote the file and what its users compare against:

- ``gpt2`` (byte-level BPE): the pre-tokenizer regexes are picked from ``tokenizer.ggml.pre`` as in llama.cpp's
  ``llm_tokenizer_bpe`` (llama-vocab.cpp), applied in order, each isolating its matches, then GPT-2 byte encoding.
- ``llama`` (SentencePiece-style): BPE whose merge order comes from the token scores (llama.cpp's SPM tokenizer
  merges the adjacent pair whose result scores highest), ``<0xNN>`` byte fallback, and a "\u2581" put in front of
  every piece of raw text (after each special token too, as llama.cpp does).

The caller reads the file: ``fields = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Tok

from ..errors import PonderError
from .tokenizer import Tokenizer

# llama.cpp's token types (gguf.TokenType)
_UNDEFINED, _NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = range(7)

SUPPORTED_MODELS = ("gpt2", "llama")

# --- pre-tokenizer regexes, from llama.cpp's llm_tokenizer_bpe (llama-vocab.cpp) ------------------------------
# Where llama.cpp had to rewrite a tokenizer.json regex for std::regex, it either kept the meaning ((?i:'s) ->
# '[sS]) and we use its spelling, or only approximated it (tekken, gpt-4o: ((?=[\p{L}])([^a-z])) for \p{Lu}...)
# and we use the original regex that llama.cpp records in a comment, which is what the model was trained with.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_CONTR = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_GPT4O_CONTR}"
          rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_GPT4O_CONTR}"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# LLAMA_VOCAB_PRE_TYPE_DEFAULT: what llama.cpp uses for "default" and for a file with no tokenizer.ggml.pre
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")

# name -> (regexes applied in order, ignore_merges, llama.cpp's add_bos default); names from llama_vocab::impl::load
_PRE_TYPES: dict[str, tuple[tuple[str, ...], bool, bool]] = {}
for _names, _spec in (
    (("default",), (_DEFAULT, False, False)),
    (("gpt-2", "gpt2", "phi-2", "mpt", "olmo", "exaone4"), ((_GPT2,), False, False)),
    (("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b"),
     ((r"\p{N}", _GPT2), False, False)),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
     ((_LLAMA3,), True, True)),
    (("dbrx", "smaug-bpe", "glm4", "chatglm-bpe"), ((_LLAMA3,), False, False)),
    (("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open"),
     ((_QWEN2,), False, False)),
    (("qwen35",), ((_QWEN35,), False, False)),
    (("tekken",), ((_TEKKEN,), True, True)),
    (("gpt-4o", "llama4", "kanana2", "minimax-m2"), ((_GPT4O,), False, False)),
):
    for _n in _names:
        _PRE_TYPES[_n] = _spec
SUPPORTED_PRE_TYPES = tuple(sorted(_PRE_TYPES))

# text of tokens that end a turn, besides EOS (llama.cpp's special_eog_ids list, the common ones)
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def _get(fields: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = fields.get(key, default)
    return default if value is None else value


def _model_type(fields: Mapping[str, Any]) -> str:
    model = fields.get("tokenizer.ggml.model")
    if model is None:
        raise PonderError("GGUF has no tokenizer.ggml.model; it carries no tokenizer, so pass one from a checkpoint")
    if model not in SUPPORTED_MODELS:
        raise PonderError(f"GGUF tokenizer model {model!r} is not supported; supported: {', '.join(SUPPORTED_MODELS)}")
    return str(model)


def _tokens_and_types(fields: Mapping[str, Any]) -> tuple[list[str], list[int]]:
    """Token texts and types, checked the way llama.cpp checks them (empty -> [EMPTY_i], no duplicates)."""
    raw = fields.get("tokenizer.ggml.tokens")
    if raw is None or len(raw) == 0:
        raise PonderError("GGUF has no tokenizer.ggml.tokens; the file is incomplete, re-export it")
    tokens = [str(t) if t != "" else f"[EMPTY_{i}]" for i, t in enumerate(raw)]
    types_raw = fields.get("tokenizer.ggml.token_type")
    if types_raw is None:
        types = [_NORMAL] * len(tokens)
    else:
        types = [int(t) for t in types_raw]
        if len(types) < len(tokens):
            raise PonderError(f"GGUF tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens; "
                              "the file is corrupt, re-export it")
    seen: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in seen:
            raise PonderError(f"GGUF vocabulary has {t!r} twice (ids {seen[t]} and {i}); the file is corrupt")
        seen[t] = i
    return tokens, types[: len(tokens)]


def _add_special(tok: Any, tokens: list[str], types: list[int]) -> None:
    """CONTROL (and UNKNOWN) tokens become special added tokens, USER_DEFINED plain added tokens: llama.cpp
    matches both whole in the text, so without this "<|im_start|>" would be cut into "<", "|", "im", ..."""
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty in (_CONTROL, _UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)


def _build_bpe(fields: Mapping[str, Any], tokens: list[str], types: list[int]) -> tuple[Any, str]:
    pre = fields.get("tokenizer.ggml.pre")
    pre = "default" if pre in (None, "") else str(pre)
    if pre not in _PRE_TYPES:
        raise PonderError(f"GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
                          f"supported: {', '.join(SUPPORTED_PRE_TYPES)}")
    regexes, ignore_merges, _ = _PRE_TYPES[pre]

    raw_merges = fields.get("tokenizer.ggml.merges")
    if raw_merges is None:
        raise PonderError("GGUF gpt2 tokenizer has no tokenizer.ggml.merges; the file is incomplete, re-export it")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for m in raw_merges:
        m = str(m)
        cut = m.find(" ", 1)  # like llama.cpp: the first space after the first character separates the pair
        if cut < 0:
            continue
        a, b = m[:cut], m[cut + 1:]
        # tokenizers refuses a merge whose parts or result are not tokens; llama.cpp could never emit those anyway
        if a in vocab and b in vocab and a + b in vocab:
            merges.append((a, b))

    tok = _Tok(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False,
                          byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    _add_special(tok, tokens, types)
    return tok, pre


def _spm_merges(tokens: list[str], scores: Sequence[float], types: list[int]) -> list[tuple[str, str]]:
    """Merges in the order llama.cpp's SPM tokenizer applies them: any two adjacent pieces whose concatenation is
    a token may merge, best-scored result first. Control, byte and unknown tokens are never the result of a merge
    (SentencePiece never produces them from text), so they take no part."""
    skip = {_CONTROL, _BYTE, _UNKNOWN}
    usable = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty not in skip}
    ranked = []
    for t, i in usable.items():
        for k in range(1, len(t)):
            if t[:k] in usable and t[k:] in usable:
                # best score first; ties by token id, then by where the cut is, so the order is deterministic
                ranked.append((-float(scores[i]), i, k, t[:k], t[k:]))
    ranked.sort()
    return [(a, b) for _, _, _, a, b in ranked]


def _build_spm(fields: Mapping[str, Any], tokens: list[str], types: list[int]) -> Any:
    scores = fields.get("tokenizer.ggml.scores")
    if scores is None or len(scores) < len(tokens):
        raise PonderError("GGUF llama tokenizer needs tokenizer.ggml.scores for every token; re-export the file")
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = fields.get("tokenizer.ggml.unknown_token_id", 0)
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    tok = _Tok(models.BPE(vocab=vocab, merges=_spm_merges(tokens, scores, types), unk_token=unk, fuse_unk=True,
                          byte_fallback=True))
    prefix = bool(_get(fields, "tokenizer.ggml.add_space_prefix", True))
    # A normalizer, not Metaspace: it runs on every stretch of text between added tokens and always prepends, so
    # " hi" -> "\u2581\u2581hi" and "<s>hi" -> "<s>", "\u2581hi", as llama.cpp does (Metaspace skips the first
    # case and, with prepend_scheme="first", the second).
    steps = [normalizers.Replace(" ", "\u2581")]
    if prefix:
        steps.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = None
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        dec.append(decoders.Strip(" ", 1, 0))  # llama.cpp drops the prefix space of the first piece only
    tok.decoder = decoders.Sequence(dec)
    _add_special(tok, tokens, types)
    return tok


def tokenizer_from_gguf(fields: Mapping[str, Any]) -> Tokenizer:
    """A ponder Tokenizer built only from GGUF metadata, splitting text the way llama.cpp does for this file.

    Raises PonderError for tokenizer models or pre-tokenizers it does not know, instead of guessing a split that
    would silently give the model token ids it never saw. ``pre_type_used`` on the result names the pre-tokenizer
    (``"default"`` when the file has none; ``None`` for the SentencePiece-style ``llama`` model)."""
    model = _model_type(fields)
    tokens, types = _tokens_and_types(fields)
    if model == "gpt2":
        backend, pre = _build_bpe(fields, tokens, types)
    else:
        backend, pre = _build_spm(fields, tokens, types), None
    out = Tokenizer.__new__(Tokenizer)
    out._tok = backend
    out.path = None
    out.pre_type_used = pre
    return out


def special_tokens_from_gguf(fields: Mapping[str, Any]) -> dict[str, Any]:
    """BOS/EOS/PAD/UNK ids, whether to add BOS, and the ids that end a turn, with llama.cpp's defaults.

    Returns ``bos_token_id``, ``eos_token_id``, ``pad_token_id``, ``unk_token_id`` (int or None), ``bos_token`` /
    ``eos_token`` (their text, "" if none, for chat templates), ``add_bos_token`` (bool) and ``stop_token_ids``:
    EOS, then ``tokenizer.ggml.eot_token_id`` / ``eom_token_id``, then the CONTROL tokens among "<|im_end|>",
    "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>" -- generation should stop on any of them, since chat
    models end a turn with one of those rather than with EOS."""
    model = _model_type(fields)
    tokens, types = _tokens_and_types(fields)
    n = len(tokens)
    # llama.cpp's defaults when a key is absent: SentencePiece vocabularies put <unk>, <s>, </s> at 0, 1, 2
    defaults = {"bos": 1, "eos": 2, "unk": 0} if model == "llama" else {}

    def token_id(key: str, name: str) -> int | None:
        value = fields.get(f"tokenizer.ggml.{key}")
        if value is None:
            value = defaults.get(name)
        try:
            value = int(value) if value is not None else None
        except (TypeError, ValueError):
            return None
        return value if value is not None and 0 <= value < n else None

    bos, eos = token_id("bos_token_id", "bos"), token_id("eos_token_id", "eos")
    ids = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": token_id("padding_token_id", "pad"),
           "unk_token_id": token_id("unknown_token_id", "unk")}

    if model == "llama":
        add_bos_default = True
    else:
        pre = fields.get("tokenizer.ggml.pre") or "default"
        add_bos_default = _PRE_TYPES.get(pre, ((), False, False))[2]
    add_bos = bool(_get(fields, "tokenizer.ggml.add_bos_token", add_bos_default))

    stop: list[int] = []
    for i in (eos, token_id("eot_token_id", "eot"), token_id("eom_token_id", "eom")):
        if i is not None and i not in stop:
            stop.append(i)
    index = {t: i for i, t in enumerate(tokens)}
    for text in _END_OF_TURN:
        i = index.get(text)
        if i is not None and types[i] == _CONTROL and i not in stop:
            stop.append(i)
    return {**ids, "bos_token": tokens[bos] if bos is not None else "",
            "eos_token": tokens[eos] if eos is not None else "", "add_bos_token": add_bos,
            "stop_token_ids": stop}


# --- chat templates --------------------------------------------------------------------------------------------


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


@lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    """Compile like transformers' apply_chat_template: sandboxed (templates come from files we did not write),
    trim_blocks/lstrip_blocks, loop controls, {% generation %}, raise_exception, tojson without HTML escaping,
    strftime_now."""
    class _Generation(Extension):
        # transformers' {% generation %} marks assistant text for masks; rendering just keeps the body
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise PonderError(f"chat template has a syntax error at line {e.lineno}: {_one_line(e.message)}; "
                          "fix the template or pass another one") from None


def _check_messages(messages: object) -> list[dict[str, Any]]:
    if not isinstance(messages, (list, tuple)):
        raise PonderError(f"chat messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise PonderError(f"chat message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise PonderError(f"chat message {i} has no 'role' string (e.g. 'user', 'assistant', 'system')")
        content = m.get("content")
        if not (isinstance(content, (str, list)) or (content is None and m.get("tool_calls"))):
            raise PonderError(f"chat message {i} ('{m['role']}') needs a 'content' string, "
                              f"got {type(content).__name__}")
    return [dict(m) for m in messages]


def render_chat(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "") -> str:
    """The prompt text a chat template makes of ``messages``, rendered as transformers' apply_chat_template does
    (same sandbox and helpers), so a GGUF's ``tokenizer.chat_template`` gives the prompt the model was tuned on."""
    if not isinstance(template, str) or not template:
        raise PonderError("chat template must be a non-empty string; the GGUF has no tokenizer.chat_template?")
    compiled = _compile(template)
    msgs = _check_messages(messages)
    try:
        return compiled.render(messages=msgs, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                               eos_token=eos_token)
    except jinja2.exceptions.TemplateError as e:  # raise_exception(), undefined names, sandbox refusals
        raise PonderError(f"chat template failed on these messages: {_one_line(e.message or e)}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise PonderError(f"chat template failed on these messages: {type(e).__name__}: {_one_line(e)}") from None
