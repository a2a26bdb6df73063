"""Token ids in and out: a request's input as ids (text, ids or a chat), readable token
texts, and targets given as ids or single-token strings, each checked against the model's
vocabulary (:class:`RequestError` names the field)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.errors import RequestError
from engine.request import check_one_input


@dataclass(frozen=True)
class Tokens:
    """The tokenizer (``None``: ids only) and the model's vocabulary size."""

    tokenizer: Any
    vocab_size: int

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
        """Readable text of each token."""
        if self.tokenizer is None:
            return [str(i) for i in ids]
        return [self.tokenizer.decode([i]) for i in ids]

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
