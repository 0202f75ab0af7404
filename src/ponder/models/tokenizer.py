"""Tokenizer wrapper over the `tokenizers` library (tokenizer.json only; no Python-side vocab code)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _Tok

from ..errors import PonderError


class Tokenizer:
    def __init__(self, path: str | Path):
        p = Path(path)
        if not p.is_file():
            raise PonderError(f"{p} not found; a checkpoint folder needs tokenizer.json")
        try:
            self._tok = _Tok.from_file(str(p))
        except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exceptions
            raise PonderError(f"{p} is not a valid tokenizer.json ({e})") from None
        self.path = p

    @classmethod
    def from_object(cls, tok: object) -> Tokenizer:
        """Wrap a transformers fast tokenizer (``from_hf``), sharing its backend."""
        self = cls.__new__(cls)
        backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
        if backend is None:
            raise PonderError("from_hf needs a fast tokenizer (PreTrainedTokenizerFast)")
        self._tok = backend
        self.path = None
        return self

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)
