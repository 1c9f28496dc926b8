"""Tokenizer wrapper, incremental detokenisation and stop conditions.

Streaming text is produced incrementally (decode a small window of recent ids,
emit the new suffix), so a step's work does not grow with the generated length.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from specrt.runtime.chat_template import ChatTemplate
from specrt.runtime.errors import EngineDirError, GenerationError
from specrt.runtime.request import check_text
from tokenizers import Tokenizer

MAX_MESSAGES = 4096


class TextCodec:
    def __init__(self, tokenizer_json: Path, chat_template: str | None, bos_token_id: int | None,
                 eos_token_ids: frozenset[int]):
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # noqa: BLE001 -- tokenizers raises a plain Exception
            raise EngineDirError(f"cannot read {tokenizer_json.name}: {e}. Re-export the engine directory.") from None
        self.chat_template = chat_template
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self._template: ChatTemplate | None = None  # compiled on first use

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        check_text("the text", text)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render messages with the model's own chat template (the HF Jinja format), in the sandbox of
        ``runtime.chat_template``: the template comes from the engine directory and is untrusted."""
        if not self.chat_template:
            raise GenerationError("this engine's tokenizer has no chat template; pass a plain prompt instead")
        check_messages(messages)
        if self._template is None:
            self._template = ChatTemplate(self.chat_template)
        tok = self.tokenizer
        bos = tok.id_to_token(self.bos_token_id) if self.bos_token_id is not None else ""
        eos = tok.id_to_token(min(self.eos_token_ids)) if self.eos_token_ids else ""
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=bos or "", eos_token=eos or "")


def check_messages(messages) -> None:
    """A chat is a non-empty list of {"role": str, "content": str} (extra string keys allowed)."""
    if not isinstance(messages, list) or not messages:
        raise GenerationError(f"messages must be a non-empty list of {{'role', 'content'}} objects, "
                              f"got {type(messages).__name__}")
    if len(messages) > MAX_MESSAGES:
        raise GenerationError(f"a chat may have at most {MAX_MESSAGES} messages, got {len(messages)}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise GenerationError(f"message {i} must be an object with string 'role' and 'content', got {m!r:.200}")
        for key, value in m.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise GenerationError(f"message {i}: field {key!r:.50} must be a string")


class Detokenizer:
    """Turns a stream of token ids into a stream of text deltas (vLLM-style prefix/read offsets)."""

    def __init__(self, codec: TextCodec, prompt_ids: Sequence[int], context_tokens: int = 5):
        self.codec = codec
        self.ids = list(prompt_ids[-context_tokens:])  # a little prompt context so the first word spaces right
        self.prefix = 0
        self.read = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.codec.decode(self.ids[self.prefix:self.read])
        after = self.codec.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""  # an incomplete UTF-8 sequence, or a special token: wait for more


class StopChecker:
    """Applies EOS / stop strings / max_new_tokens to emitted tokens one at a time.

    The text that matched a stop string is not part of the result (its token is).  While
    streaming, the last ``len(longest stop) - 1`` characters are held back until they can
    no longer start a stop string, so nothing already shown ever has to be taken back.
    """

    def __init__(self, detok: Detokenizer, eos_ids: frozenset[int], stop: Sequence[str], max_new_tokens: int):
        if isinstance(stop, str) or any(not isinstance(s, str) or not s for s in stop):
            raise GenerationError(f"stop must be a list of non-empty strings, got {stop!r}")
        self.detok = detok
        self.eos_ids = eos_ids
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.max_new_tokens = max_new_tokens
        self.token_ids: list[int] = []
        # Text already handed out is kept as pieces (never re-copied); `pending` holds what is not
        # shown yet, which always includes the last `hold` characters: all a stop search needs.
        self._shown: list[str] = []
        self._pending = ""
        self.reason: str | None = None

    @property
    def text(self) -> str:
        """All text so far (joins the pieces: call it once at the end, not per token)."""
        return "".join(self._shown) + self._pending

    def push(self, token_id: int) -> None:
        """Record one emitted token; sets ``reason`` when generation must stop here."""
        assert self.reason is None
        self.token_ids.append(token_id)
        delta = self.detok.push(token_id)
        if delta and self.stop:
            tail = self._pending[len(self._pending) - self.hold:] if self.hold else ""
            window = tail + delta
            hits = [i for i in (window.find(s) for s in self.stop) if i >= 0]
            if hits:
                self._pending = (self._pending + delta)[: len(self._pending) - len(tail) + min(hits)]
                self.reason = "stop_string"
                return
        self._pending += delta  # bounded: at most `hold` characters plus one step's text
        if token_id in self.eos_ids:
            self.reason = "eos"
        elif len(self.token_ids) >= self.max_new_tokens:
            self.reason = "max_new_tokens"

    def take(self, final: bool = False) -> str:
        """Text that is safe to show now (everything, once ``final``)."""
        end = len(self._pending) if (final or self.reason) else max(0, len(self._pending) - self.hold)
        out, self._pending = self._pending[:end], self._pending[end:]
        if out:
            self._shown.append(out)
        return out
