"""Token ids in and out: a request's input as ids (text, ids or a chat), readable token
texts, and targets given as ids or single-token strings, each checked against the model's
vocabulary (:class:`RequestError` names the field)."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.errors import RequestError

#: A token spelled as one byte (SentencePiece byte fallback, and how partial UTF-8 shows).
BYTE_PIECE = re.compile(r"(?:<0x[0-9A-Fa-f]{2}>)+")


def show_bytes(raw: bytes) -> str:
    """``raw`` as text, each byte that is not part of a whole UTF-8 character shown as
    ``<0xE4>`` (what a byte-level token of half a character is)."""
    out, i = [], 0
    while i < len(raw):
        for j in range(min(len(raw), i + 4), i, -1):
            try:
                out.append(raw[i:j].decode("utf-8"))
            except UnicodeDecodeError:
                continue
            i = j
            break
        else:
            out.append(f"<0x{raw[i]:02X}>")
            i += 1
    return "".join(out)


def _byte_level_bytes(piece: str) -> bytes | None:
    """The bytes of a byte-level BPE token (GPT-2's byte-to-character map), or None when
    ``piece`` is not spelled in that map."""
    table = _unicode_to_bytes()
    if not all(char in table for char in piece):
        return None
    return bytes(table[char] for char in piece)


@functools.cache
def _unicode_to_bytes() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


#: The request fields that give the input, exactly one of which a request sets.
INPUT_FIELDS = ("prompt", "input_ids", "messages")


def check_one_input(
    prompt: str | None, input_ids: list[int] | None, messages: Sequence[Any] | None = None
) -> None:
    """Exactly one of ``prompt``, ``input_ids`` and ``messages``, and not an empty one."""
    given = [
        name
        for name, v in zip(INPUT_FIELDS, (prompt, input_ids, messages), strict=True)
        if v is not None
    ]
    if len(given) != 1:
        raise RequestError("prompt", "give exactly one of 'prompt', 'input_ids' and 'messages'")
    if input_ids is not None and not input_ids:
        raise RequestError("input_ids", "must not be empty")
    if prompt is not None and not prompt:
        raise RequestError("prompt", "must not be empty")


@dataclass(frozen=True)
class Tokens:
    """The tokenizer (``None``: ids only) and the model's vocabulary size."""

    tokenizer: Any
    vocab_size: int
    bos_token_id: int | None = None  # the model's, for engines without a tokenizer

    def special_ids(self) -> set[int]:
        """Ids of the tokenizer's special tokens (BOS, EOS, a chat template's markers...,
        not the unknown token); without a tokenizer, the model's BOS."""
        if self.tokenizer is None:
            return set() if self.bos_token_id is None else {self.bos_token_id}
        # the unknown token stands for text the vocabulary lacks: not a special one here
        return set(self.tokenizer.all_special_ids) - {self.tokenizer.unk_token_id}

    def starts_with_special(self, ids: Sequence[int]) -> bool:
        """Whether the first token is a special one (a BOS or a chat template's marker,
        which the tokenizer adds): what the first-token rule is for, and its default."""
        return bool(ids) and ids[0] in self.special_ids()

    def tokenize(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` as the model sees it (special tokens included)."""
        if self.tokenizer is None:
            raise RequestError("prompt", "this engine has no tokenizer; send input_ids")
        return list(self.tokenizer(prompt)["input_ids"])

    def chat_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a chat in the tokenizer's own chat template, with the generation
        prompt appended (so the next token is the assistant's first)."""
        template = getattr(self.tokenizer, "chat_template", None)
        if self.tokenizer is None or not template:
            raise RequestError(
                "messages", "this model's tokenizer has no chat template; send prompt or input_ids"
            )
        try:
            encoded = self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, tokenize=True, return_dict=True
            )
        except Exception as exc:  # the template's own checks (roles must alternate, ...)
            raise RequestError("messages", f"the chat template refused them: {exc}") from None
        return list(encoded["input_ids"])

    def input_ids(
        self,
        prompt: str | None = None,
        input_ids: Sequence[int] | None = None,
        messages: Sequence[dict[str, str]] | None = None,
    ) -> tuple[list[int], str]:
        """The token ids of a request's input (exactly one of the three) and the name of
        the field that gave them, checked against the vocabulary.

        Raises:
            RequestError: no or several inputs, no tokens, ids outside the vocabulary, no
                chat template for ``messages``.
        """
        check_one_input(prompt, None if input_ids is None else list(input_ids), messages)
        if input_ids is not None:
            ids, field = list(input_ids), "input_ids"
        elif messages is not None:
            ids, field = self.chat_ids(messages), "messages"
        else:
            ids, field = self.tokenize(prompt or ""), "prompt"
        self.check_ids(ids, field)
        if field == "prompt" and set(ids) <= self.special_ids():
            raise RequestError(
                field, "tokenizes to special tokens only (no text to attribute); give some text"
            )
        return ids, field

    def check_ids(self, ids: Sequence[int], field: str) -> None:
        """Refuse no tokens, or ids outside the vocabulary."""
        if not ids:
            raise RequestError(field, "tokenizes to no tokens")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise RequestError(
                field, f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})"
            )

    def texts(self, ids: Sequence[int]) -> list[str]:
        """Readable text of each token; a token that is part of a UTF-8 character (byte
        pieces of an emoji or CJK character) shows its bytes, ``<0xE4><0xBD>``, where
        decoding it alone would give U+FFFD."""
        if self.tokenizer is None:
            return [str(i) for i in ids]
        return [self._text(i) for i in ids]

    def span_text(self, ids: Sequence[int]) -> str:
        """The decoded text of consecutive tokens, as the tokenizer joins them."""
        if self.tokenizer is None:
            return " ".join(str(i) for i in ids)
        return str(self.tokenizer.decode(list(ids)))

    def _text(self, token_id: int) -> str:
        text = str(self.tokenizer.decode([token_id]))
        if "\ufffd" not in text:
            return text
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str) or "\ufffd" in piece:
            return text  # the token really is U+FFFD (or unknown to the tokenizer)
        if BYTE_PIECE.fullmatch(piece):
            return piece  # a byte-fallback token of a SentencePiece vocabulary
        raw = _byte_level_bytes(piece)
        return text if raw is None else show_bytes(raw)

    def targets(self, targets: Sequence[int | str]) -> list[int]:
        """Target ids from ids or single-token strings (``RequestError`` on ``targets``)."""
        resolved: list[int] = []
        for target in targets:
            if isinstance(target, int):
                if not 0 <= target < self.vocab_size:
                    raise RequestError(
                        "targets",
                        f"token id {target} is outside the vocabulary [0, {self.vocab_size})",
                    )
                resolved.append(target)
                continue
            found = self.single_token(target)
            if found is None:
                raise RequestError(
                    "targets", f"{target!r} is not a single token of this tokenizer; send its id"
                )
            resolved.append(found)
        return resolved

    def single_token(self, text: str) -> int | None:
        """The id of ``text`` if the tokenizer has it as one token (its vocabulary entry,
        or what it tokenizes to alone), else ``None``."""
        if self.tokenizer is None:
            return None
        unknown = self.tokenizer.unk_token_id
        if unknown is not None and text == self.tokenizer.unk_token:
            return unknown
        vocab_id = self.tokenizer.convert_tokens_to_ids(text)
        if isinstance(vocab_id, int) and vocab_id != unknown:
            return vocab_id
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        # a string the tokenizer only knows as its unknown token is no token of it
        return ids[0] if len(ids) == 1 and ids[0] != unknown else None
