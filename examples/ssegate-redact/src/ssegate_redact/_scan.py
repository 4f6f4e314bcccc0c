"""The matching behind ssegate_redact: one regular expression, and the hold-back of a stream's tail."""
from __future__ import annotations

import re
from typing import Any

from proxy import Chunk

EMAIL = r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"
CARD = r"(?<!\d)\d(?:[ -]?\d){12,18}(?!\d)"
#: The end of a text that may still grow into a match: a word (an e-mail to be), or digits and separators.
TAIL = re.compile(r"(?:[\w.+-]*(?:@[\w.-]*)?|\d(?:[ -]?\d)*[ -]?)$")
MAX_HOLD = 256  # never hold more than this many characters


def luhn(digits: str) -> bool:
    total = sum(int(d) if i % 2 == 0 else (2 * int(d) - 9 if int(d) > 4 else 2 * int(d))
                for i, d in enumerate(reversed(digits)))
    return total % 10 == 0


class Redactor:
    def __init__(self, mask: str, *, emails: bool, cards: bool) -> None:
        self.mask = mask
        self.pattern = re.compile("|".join([EMAIL] * emails + [CARD] * cards) or r"(?!)")

    def _replace(self, m: re.Match[str]) -> str:
        return self.mask if "@" in m[0] or luhn(re.sub(r"\D", "", m[0])) else m[0]

    def redact(self, text: str) -> str:
        return self.pattern.sub(self._replace, text)

    def split(self, text: str) -> tuple[str, str]:
        """(the redacted text that is safe to send now, the tail to hold back until more text comes)."""
        cut = TAIL.search(text).start()  # type: ignore[union-attr]  # (it matches at the end at worst)
        for m in self.pattern.finditer(text):  # a match running into the tail ("1234 5678." + "...") is held whole
            if m.end() > cut:
                cut = min(cut, m.start())
                break
        cut = max(cut, len(text) - MAX_HOLD)
        return self.redact(text[:cut]), text[cut:]

    def texts(self, value: Any) -> Any:
        """A string, or a list of strings (other items, such as token ids, pass as they are), redacted."""
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, list):
            return [self.redact(v) if isinstance(v, str) else v for v in value]
        return value

    def message(self, message: Any) -> Any:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            return {**message, "content": self.redact(content)}
        if isinstance(content, list):  # content parts: redact the text ones
            return {**message, "content": [{**p, "text": self.redact(p["text"])} if isinstance(p, dict) and
                                           isinstance(p.get("text"), str) else p for p in content]}
        return message


class StreamState:
    """Per exchange: the text held back per choice, and the last chunk (a template to carry it at the end)."""

    def __init__(self) -> None:
        self.held: dict[int, str] = {}
        self.template: dict[str, Any] = {}

    def feed(self, chunk: Chunk, redactor: Redactor) -> list[Chunk] | None:
        completions = self.template.get("object") == "text_completion"
        if chunk.is_done:  # the stream ends: release what is held, then [DONE]
            last = [{"index": i, **({"text": redactor.redact(t)} if completions else
                                    {"delta": {"content": redactor.redact(t)}}), "finish_reason": None}
                    for i, t in self.held.items()]
            self.held.clear()
            return [Chunk.from_json({**self.template, "choices": last}), chunk] if last else None
        obj = chunk.json
        choices = obj.get("choices") if isinstance(obj, dict) else None
        if not choices:
            return None
        self.template, changed = obj, False
        completions = obj.get("object") == "text_completion"
        for choice in choices:
            index = choice.get("index", 0)
            # Chat chunks carry choices[].delta.content, completions chunks choices[].text.
            part = choice.get("text") if completions else (choice.get("delta") or {}).get("content")
            text = self.held.pop(index, "") + (part or "")
            if text:  # a finished choice releases everything; otherwise hold back a tail that may still match
                out, rest = (redactor.redact(text), "") if choice.get("finish_reason") else redactor.split(text)
                if rest:
                    self.held[index] = rest
                if completions:
                    choice["text"] = out
                else:
                    choice["delta"] = {**(choice.get("delta") or {}), "content": out}
                changed = True
        if not changed:
            return None
        chunk.set_json(obj)
        empty = all((c.get("text") == "" if completions else c.get("delta") == {"content": ""})
                    and not c.get("finish_reason") for c in choices)
        return [] if empty else [chunk]
