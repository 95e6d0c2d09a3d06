"""JSON mode: constrain decoding so the completion parses as a JSON object.

A character-level JSON automaton (a lexical mode plus a stack of open containers) runs over each
token's decoded text. For a given automaton state, the set of vocabulary tokens whose whole text the
automaton accepts is computed once and cached (per tokenizer; states repeat a lot: "inside a string
at depth 2" is one state however long the string). The engine sets the logits of every other token to
-inf before calling the one sampler, so whatever the sampling settings, every prefix of the output is
a prefix of valid JSON; once the top-level object closes only a stop token (EOS / end of turn) is allowed.

Rules that keep small models from wandering: whitespace-only tokens are refused outside strings (JSON
never needs them, and they are what loops forever), raw control characters are refused inside strings
(json.loads rejects them), and special tokens are refused. A token that decodes to part of a UTF-8
character shows up as U+FFFD, which (like any non-ASCII character) is valid only inside strings: that
is exact, because ASCII bytes never occur inside a multi-byte UTF-8 sequence. When max_tokens is about
to run out, the engine appends `closing_text(state)` so even a truncated answer parses.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import numpy as np

_WS = frozenset(" \t\n\r")
_HEX = frozenset("0123456789abcdefABCDEF")
_DIGITS = frozenset("0123456789")
_ESCAPES = frozenset('"\\/bfnrtu')

# Lexical modes.
TOP, VALUE, ARR_FIRST, OBJ_FIRST, OBJ_KEY = "top", "value", "arr0", "obj0", "key"
COLON, AFTER, DONE = ":", "after", "done"
STR, STR_ESC, KEY_STR, KEY_ESC = "str", "str\\", "kstr", "kstr\\"
NUM_MINUS, NUM_ZERO, NUM_INT, NUM_DOT, NUM_FRAC, NUM_E, NUM_ESIGN, NUM_EXP = (
    "n-", "n0", "n1", "n.", "n.1", "ne", "ne+", "ne1")
_NUM_COMPLETE = frozenset((NUM_ZERO, NUM_INT, NUM_FRAC, NUM_EXP))
_LITERALS = {"t": "true", "f": "false", "n": "null"}


@dataclass(frozen=True)
class JsonState:
    """mode: lexical mode; stack: open containers, 'o' object / 'a' array; extra: pending literal
    letters or remaining \\u hex digits."""

    mode: str = TOP
    stack: str = ""
    extra: str = ""


def _value_start(ch: str, stack: str) -> JsonState | None:
    if ch == "{":
        return JsonState(OBJ_FIRST, stack + "o")
    if ch == "[":
        return JsonState(ARR_FIRST, stack + "a")
    if ch == '"':
        return JsonState(STR, stack)
    if ch == "-":
        return JsonState(NUM_MINUS, stack)
    if ch == "0":
        return JsonState(NUM_ZERO, stack)
    if ch in _DIGITS:
        return JsonState(NUM_INT, stack)
    if ch in _LITERALS:
        return JsonState("lit", stack, _LITERALS[ch][1:])
    return None


def _after_value(stack: str) -> JsonState:
    return JsonState(AFTER if stack else DONE, stack)


def step(state: JsonState, ch: str) -> JsonState | None:
    """The state after reading `ch`, or None if `ch` cannot continue valid JSON."""
    mode, stack = state.mode, state.stack
    if mode in (STR, KEY_STR):
        if ch == '"':
            return _after_value(stack) if mode == STR else JsonState(COLON, stack)
        if ch == "\\":
            return JsonState(STR_ESC if mode == STR else KEY_ESC, stack)
        return None if ord(ch) < 0x20 else state
    if mode in (STR_ESC, KEY_ESC):
        back = STR if mode == STR_ESC else KEY_STR
        if ch == "u":
            return JsonState(back + "u", stack, "4")
        return JsonState(back, stack) if ch in _ESCAPES else None
    if mode in ("stru", "kstru"):
        if ch not in _HEX:
            return None
        left = int(state.extra) - 1
        return JsonState(mode[:-1], stack) if left == 0 else JsonState(mode, stack, str(left))
    if mode == "lit":
        if ch != state.extra[0]:
            return None
        return _after_value(stack) if len(state.extra) == 1 else JsonState("lit", stack, state.extra[1:])
    if mode in (NUM_MINUS, NUM_ZERO, NUM_INT, NUM_DOT, NUM_FRAC, NUM_E, NUM_ESIGN, NUM_EXP):
        nxt = _number_step(mode, ch)
        if nxt is not None:
            return JsonState(nxt, stack)
        if mode in _NUM_COMPLETE:  # the number ended: this character belongs to what follows it
            return step(_after_value(stack), ch)
        return None
    if ch in _WS:
        return state if mode != DONE else None
    if mode == TOP:
        return JsonState(OBJ_FIRST, "o") if ch == "{" else None
    if mode == VALUE:
        return _value_start(ch, stack)
    if mode == ARR_FIRST:
        return _after_value(stack[:-1]) if ch == "]" else _value_start(ch, stack)
    if mode in (OBJ_FIRST, OBJ_KEY):
        if ch == '"':
            return JsonState(KEY_STR, stack)
        return _after_value(stack[:-1]) if ch == "}" and mode == OBJ_FIRST else None
    if mode == COLON:
        return JsonState(VALUE, stack) if ch == ":" else None
    if mode == AFTER:
        top = stack[-1]
        if ch == ",":
            return JsonState(OBJ_KEY if top == "o" else VALUE, stack)
        if (ch == "}" and top == "o") or (ch == "]" and top == "a"):
            return _after_value(stack[:-1])
        return None
    return None  # DONE: nothing may follow the top-level object


def _number_step(mode: str, ch: str) -> str | None:
    digit = ch in _DIGITS
    if mode == NUM_MINUS:
        return NUM_ZERO if ch == "0" else NUM_INT if digit else None
    if mode in (NUM_ZERO, NUM_INT):
        if digit:
            return NUM_INT if mode == NUM_INT else None
        return NUM_DOT if ch == "." else NUM_E if ch in "eE" else None
    if mode in (NUM_DOT, NUM_FRAC):
        if digit:
            return NUM_FRAC
        return NUM_E if ch in "eE" and mode == NUM_FRAC else None
    if mode == NUM_E:
        return NUM_ESIGN if ch in "+-" else NUM_EXP if digit else None
    if mode in (NUM_ESIGN, NUM_EXP):
        return NUM_EXP if digit else None
    return None


def _in_string(mode: str) -> bool:
    return mode in (STR, STR_ESC, KEY_STR, KEY_ESC, "stru", "kstru")


def accepts(state: JsonState, text: str) -> JsonState | None:
    """Run the automaton over `text`; None if any character is rejected."""
    if not text:
        return None
    if not _in_string(state.mode) and text.isspace():
        return None  # whitespace-only tokens outside strings: never needed, and the usual endless loop
    for ch in text:
        state = step(state, ch)
        if state is None:
            return None
    return state


def closing_text(state: JsonState) -> str:
    """The shortest text that completes the JSON value from `state` (used when max_tokens runs out)."""
    mode, out = state.mode, ""
    if mode == TOP:
        return "{}"
    if mode in ("stru", "kstru"):
        out += "0" * int(state.extra)
        mode = mode[:-1]
    if mode in (STR_ESC, KEY_ESC):
        out += "n"
        mode = STR if mode == STR_ESC else KEY_STR
    if mode == STR:
        out += '"'
    elif mode == KEY_STR:
        out += '":null'
    elif mode == OBJ_KEY:
        out += '"":null'
    elif mode == COLON:
        out += ":null"
    elif mode == VALUE:
        out += "null"
    elif mode == "lit":
        out += state.extra
    elif mode in (NUM_MINUS, NUM_DOT, NUM_E, NUM_ESIGN):
        out += "0"
    return out + "".join("}" if c == "o" else "]" for c in reversed(state.stack))


_TOKEN_STRINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_GRAMMARS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def token_strings(tokenizer) -> list[str]:
    """Each token's text as it reads when appended to earlier text (special tokens as their literal text).

    Decoded after an anchor token and cut, so SentencePiece's leading-space rules see a mid-text token.
    Computed once per tokenizer.
    """
    with _LOCK:
        cached = _TOKEN_STRINGS.get(tokenizer)
    if cached is not None:
        return cached
    anchor_ids = tokenizer.encode("a", add_bos=False)
    anchor = anchor_ids[-1] if anchor_ids else None
    prefix = tokenizer.decode([anchor]) if anchor is not None else ""
    strings = []
    for i in range(tokenizer.vocab_size):
        if anchor is None:
            text = tokenizer.decode([i])
        else:
            full = tokenizer.decode([anchor, i])
            text = full[len(prefix):] if full.startswith(prefix) else tokenizer.decode([i])
        strings.append(text)
    with _LOCK:
        _TOKEN_STRINGS[tokenizer] = strings
    return strings


def _prefix_ok(state: JsonState, prefix: str) -> bool:
    for ch in prefix:
        state = step(state, ch)
        if state is None:
            return False
    return True


class JsonGrammar:
    """Token-level view of the JSON automaton for one tokenizer (masks cached per state)."""

    def __init__(self, tokenizer, vocab_size: int | None = None) -> None:
        self.tokenizer = tokenizer
        is_special = getattr(tokenizer, "is_special", None)
        # Special tokens never belong inside JSON text ("" is refused by `accepts`).
        self.strings = [("" if is_special is not None and is_special(i) else s)
                        for i, s in enumerate(token_strings(tokenizer))]
        self.vocab_size = vocab_size or len(self.strings)
        self._masks: dict[JsonState, np.ndarray] = {}
        self._max_cached = 4096
        # Most tokens are "plain" inside a string (no quote, backslash or control character): they leave a
        # string state unchanged, so string states only simulate the few others.
        plain = [bool(t) and '"' not in t and "\\" not in t and all(ord(c) >= 0x20 for c in t) for t in self.strings]
        self._plain = np.array(plain, dtype=bool)
        self._not_plain = [i for i, p in enumerate(plain) if not p and self.strings[i]]
        # Outside strings most tokens fail within their first two characters (" the" fails on "t"): test
        # each distinct two-character prefix once, and only then the tokens that start with it.
        self._by_prefix: dict[str, list[int]] = {}
        for i, t in enumerate(self.strings):
            if t:
                self._by_prefix.setdefault(t[:2], []).append(i)

    def _compute(self, state: JsonState) -> np.ndarray:
        if state.mode in (STR, KEY_STR):
            mask = self._plain.copy()
            candidates = self._not_plain
        else:
            mask = np.zeros(len(self.strings), dtype=bool)
            candidates = [i for prefix, ids in self._by_prefix.items() if _prefix_ok(state, prefix) for i in ids]
        ok = [i for i in candidates if accepts(state, self.strings[i]) is not None]
        if ok:
            mask[ok] = True
        return mask

    @classmethod
    def for_tokenizer(cls, tokenizer) -> JsonGrammar:
        with _LOCK:
            grammar = _GRAMMARS.get(tokenizer)
        if grammar is None:
            grammar = cls(tokenizer)
            with _LOCK:
                _GRAMMARS[tokenizer] = grammar
        return grammar

    def start(self) -> JsonState:
        return JsonState()

    def allowed(self, state: JsonState, stop_ids: set[int], vocab_size: int | None = None) -> np.ndarray:
        """Bool mask (V,) of the tokens that may come next (stop tokens only once the object is closed)."""
        V = vocab_size or self.vocab_size
        mask = np.zeros(V, dtype=bool)
        if state.mode == DONE:
            for t in stop_ids:
                if 0 <= t < V:
                    mask[t] = True
            return mask
        cached = self._masks.get(state)
        if cached is None:
            cached = self._compute(state)
            if len(self._masks) >= self._max_cached:
                self._masks.clear()
            self._masks[state] = cached
        n = min(V, cached.shape[0])
        mask[:n] = cached[:n]
        return mask

    def advance(self, state: JsonState, token_id: int) -> JsonState:
        """State after a token; a token the grammar refuses (only possible for forced closing tokens that
        tokenize oddly) is read character by character, skipping what does not fit."""
        text = self.strings[token_id] if 0 <= token_id < len(self.strings) else ""
        nxt = accepts(state, text)
        if nxt is not None:
            return nxt
        for ch in text:
            state = step(state, ch) or state
        return state

    def is_complete(self, state: JsonState) -> bool:
        return state.mode == DONE

    def closing_text(self, state: JsonState) -> str:
        return closing_text(state)
