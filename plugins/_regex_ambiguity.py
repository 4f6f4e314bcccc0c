r"""Which regular expressions Python's ``re`` can take exponential time on: a check for *exponential degree of
ambiguity* (EDA).

Why it matters here: ``re`` is a backtracking engine with no time limit, and moderation patterns are matched on
the event loop, so one pattern that backtracks catastrophically, fed a crafted text, stalls every stream.

What is checked: the pattern is turned into an automaton without empty moves (one state per character
position, Glushkov style, built from the stdlib's own parse tree). When it fails to match, the engine tries
every path of that automaton over the text, one after the other. If some state ``q`` has two *different* paths
from ``q`` back to ``q`` reading the same string ``w``, then ``w`` repeated ``n`` times can be read in ``2**n``
ways, and a text that almost matches makes the engine try them all: ``(a+)+b``, ``(a|aa)+b``, ``(\w|\d\d)+$``,
``(?:a|ab|b)*c``. The test is the classic one on the product automaton: from a pair ``(q, q)``, reach a pair
``(p, p')`` with ``p != p'`` and get back to ``(q, q)`` (or take two parallel transitions ``p -> q``, as in
``(a*)*``, where the inner and the outer loop both lead from ``a`` to ``a``). Repeats with a separator, like
``(\d+-)+`` or ``(?:\w+\s)+``, read every text one way only and pass.

A pattern on its own (how the moderation plugin runs them) succeeds as soon as the engine reaches its end, so a
loop the pattern may end right after can never be made to fail: ``(a+)+`` alone is linear, ``(a+)+b`` is not.
The loop is only counted when its states cannot end the match without reading or asserting something more
(``embedded=True`` drops that refinement, for a pattern that will be pasted into a larger one).

How the parse tree maps onto the automaton:

* anchors and word boundaries (``^ $ \b``) are zero-width (empty moves); so are lookarounds, whose contents
  are also checked as a pattern of their own, since the engine backtracks inside them;
* a bounded repeat ``{m,n}`` is unrolled: ``m`` copies (at most 20), then ``n - m`` optional ones, nested so
  that ``a{0,2}`` reads ``aa`` one way only. Past 20 copies, or past 3 optional ones, the rest is treated as an
  unbounded loop: a bound that large is no protection, ``(\w+\s?){1,20}x`` takes seconds on 25 characters,
  like ``(\w+\s?)*x`` (it is refused, and so is the harmless but pointless ``(a|a){1,10}b``);
* atomic groups ``(?>...)`` and possessive repeats ``a*+``: the engine never backtracks into them, so their
  contents are checked on their own, and outside they are one opaque transition (a fresh symbol that only
  overlaps itself) that matches a single way;
* a backreference is an opaque symbol of its own too (empty when its group can be), ``(?(1)yes|no)`` is a
  choice between its two branches;
* past 2,000 states, 20,000 transitions or 5,000 nodes of the parse tree visited (huge unrolled repeats), or
  too large a product, the older shape rule decides instead (refuse any repeat of a part of varying length),
  so nothing big passes unchecked.

What is approximated: whether two character sets overlap is decided on a sample of characters (every literal
and range end in the pattern, in both cases, plus a few of each kind: digits, letters, ``_``, spaces, line
breaks, punctuation, non-ASCII ones); two sets overlap when one sample is in both. That is exact for ranges
against ranges and literals, and close enough for the ``\d \s \w`` classes and their negations. Case-insensitive
matching is assumed throughout (it only adds overlaps), and ``(?a)`` (ASCII classes) is ignored likewise.

What is not detected: polynomial ambiguity, time ``n**k`` rather than ``2**n``, which can still be slow on long
texts: ``\d+\d+x``, ``.*a.*b``, or a few copies written out or counted exactly (``(\w+\s?){6}x`` takes 1.4 s
on 40 characters); overlaps between an atomic group and plain text, as in ``((?>a)|a)*b``; overlaps hidden behind
a backreference.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import re._constants as _sre  # the stdlib's own parser and its node types (private: Python 3.11+)
import re._parser as _sre_parse

__all__ = ["backtracks_exponentially"]

MAX_COPIES = 20  # copies a repeat must match, unrolled; past it, the rest loops
MAX_OPTIONAL = 3  # optional copies of a bounded repeat, unrolled; past it, they loop
MAX_STATES = 2_000  # per automaton; past it, the shape rule decides
MAX_TRANSITIONS = 20_000  # per automaton, likewise
MAX_NODES = 5_000  # parse-tree nodes visited per automaton (unrolled copies count each time), likewise
MAX_PAIRS = 100_000  # pairs of states explored in the product; past it, the shape rule decides

_IGNORECASE, _DOTALL = _sre.SRE_FLAG_IGNORECASE, _sre.SRE_FLAG_DOTALL
_REPEATS = (_sre.MAX_REPEAT, _sre.MIN_REPEAT)
_UNBOUNDED = _sre.MAXREPEAT
# A few characters of each kind, for the overlap test of character sets.
_SAMPLES = "0٣aZ_é中 \t\u3000\n!-."
_CATEGORIES: dict[Any, Callable[[str], bool]] = {
    _sre.CATEGORY_DIGIT: str.isdecimal,
    _sre.CATEGORY_NOT_DIGIT: lambda ch: not ch.isdecimal(),
    _sre.CATEGORY_SPACE: str.isspace,
    _sre.CATEGORY_NOT_SPACE: lambda ch: not ch.isspace(),
    _sre.CATEGORY_WORD: lambda ch: ch.isalnum() or ch == "_",
    _sre.CATEGORY_NOT_WORD: lambda ch: not (ch.isalnum() or ch == "_"),
}


class _Found(Exception):
    """Some automaton has an ambiguous loop."""


class _TooBig(Exception):
    """Past the size limits (or something the analysis does not know): the shape rule decides."""


def backtracks_exponentially(pattern: str, *, embedded: bool = False) -> bool:
    """Whether Python's ``re`` can take time exponential in the text's length on ``pattern`` (compiled
    case-insensitive): a text that almost matches makes it try exponentially many ways. With ``embedded``,
    assume the pattern may be followed by more that can fail (``(a+)+`` counts then; alone it is linear).
    False for anything ``re`` cannot compile (reported as invalid elsewhere)."""
    try:
        re.compile(pattern, re.IGNORECASE)
        tree = _sre_parse.parse(pattern, re.IGNORECASE)
    except Exception:  # noqa: BLE001 - not a valid pattern
        return False
    try:
        alphabet = _Alphabet(_samples(tree))
        groups = tree.state.groupwidths
        flags = int(tree.state.flags)
        _check(alphabet, groups, {}, lambda b: b.sequence(tree, flags), ends_match=not embedded)
    except _Found:
        return True
    except (_TooBig, RecursionError):
        return _shape_rule(tree)
    return False


# -- character sets ----------------------------------------------------------------------------------------

def _cases(ch: str) -> set[str]:
    return {c for c in (ch, ch.lower(), ch.upper()) if len(c) == 1}


def _children(op: Any, av: Any) -> Iterable[Any]:
    """The sub-patterns of one parse-tree node."""
    if op in _REPEATS or op is _sre.POSSESSIVE_REPEAT:
        return (av[2],)
    if op is _sre.SUBPATTERN:
        return (av[3],)
    if op is _sre.BRANCH:
        return av[1]
    if op in (_sre.ASSERT, _sre.ASSERT_NOT):
        return (av[1],)
    if op is _sre.ATOMIC_GROUP:
        return (av,)
    if op is _sre.GROUPREF_EXISTS:
        return tuple(p for p in av[1:] if p is not None)
    return ()


def _samples(items: Any) -> list[str]:
    """The characters the overlap test tries: every literal and range end of the pattern, in both cases, and
    a few of each kind."""
    codes: set[int] = set()
    todo = [items]
    while todo:
        for op, av in todo.pop():
            if op in (_sre.LITERAL, _sre.NOT_LITERAL):
                codes.add(av)
            elif op is _sre.IN:
                for item_op, item_av in av:
                    if item_op is _sre.LITERAL:
                        codes.add(item_av)
                    elif item_op is _sre.RANGE:
                        codes.update(item_av)
            todo.extend(_children(op, av))
    found = set(_SAMPLES)
    for code in codes:
        found |= _cases(chr(code))
    return sorted(found)


class _Alphabet:
    """Character sets as bit masks over the sample characters (bit ``i``: sample ``i`` is in the set); opaque
    symbols (atomic groups, backreferences) get a bit of their own past the samples."""

    def __init__(self, samples: list[str]) -> None:
        self.samples = samples
        self.cased = [_cases(ch) for ch in samples]
        self.by_char: dict[str, int] = {}  # a character -> the samples it equals in some case
        for i, chars in enumerate(self.cased):
            for ch in chars:
                self.by_char[ch] = self.by_char.get(ch, 0) | 1 << i
        self.everything = (1 << len(samples)) - 1
        self.masks: dict[Any, int] = {}
        self.opaque: dict[Any, int] = {}

    def symbol(self, key: Any) -> int:
        """The mask of an opaque symbol: overlaps only itself."""
        if key not in self.opaque:
            self.opaque[key] = 1 << (len(self.samples) + len(self.opaque))
        return self.opaque[key]

    def mask(self, op: Any, av: Any, flags: int) -> int:
        """The samples a LITERAL, NOT_LITERAL, ANY or IN node matches."""
        ignorecase = bool(flags & _IGNORECASE)
        key = (op, tuple(av) if op is _sre.IN else av, ignorecase, bool(flags & _DOTALL))
        mask = self.masks.get(key)
        if mask is None:
            mask = self.masks[key] = self._mask(op, av, key[2], key[3])
        return mask

    def _literal(self, code: int, ignorecase: bool) -> int:
        if ignorecase:
            mask = 0
            for ch in _cases(chr(code)):
                mask |= self.by_char.get(ch, 0)
            return mask
        return 1 << self.samples.index(chr(code)) if chr(code) in self.samples else 0

    def _mask(self, op: Any, av: Any, ignorecase: bool, dotall: bool) -> int:
        if op is _sre.LITERAL:
            return self._literal(av, ignorecase)
        if op is _sre.NOT_LITERAL:
            return self.everything & ~self._literal(av, ignorecase)
        if op is _sre.ANY:
            return self.everything if dotall else self.everything & ~self.by_char["\n"]
        # IN: a set of items, maybe negated
        negate = bool(av) and av[0][0] is _sre.NEGATE
        mask = 0
        for item_op, item_av in av[negate:]:
            if item_op is _sre.LITERAL:
                mask |= self._literal(item_av, ignorecase)
                continue
            for i, ch in enumerate(self.samples):
                chars = self.cased[i] if ignorecase else (ch,)
                if self._item(item_op, item_av, chars):
                    mask |= 1 << i
        return self.everything & ~mask if negate else mask

    @staticmethod
    def _item(op: Any, av: Any, chars: Iterable[str]) -> bool:
        if op is _sre.RANGE:
            return any(av[0] <= ord(c) <= av[1] for c in chars)
        if op is _sre.CATEGORY and av in _CATEGORIES:
            return any(_CATEGORIES[av](c) for c in chars)
        return True  # something unknown: assume it matches (more overlaps, never fewer)


# -- the automaton -----------------------------------------------------------------------------------------

class _Fragment:
    """A part of the pattern, Glushkov style: the states it can start and end with (each with the number of
    ways, 1 or 2 meaning "more than one"), how many ways it matches the empty string, whether it can do so with
    no condition (no anchor, lookaround or backreference on the way), and the states after which it can end
    with no condition."""

    __slots__ = ("first", "last", "empty", "free", "last_free")

    def __init__(self, first: dict[int, int], last: dict[int, int], empty: int, free: bool,
                 last_free: set[int]) -> None:
        self.first, self.last, self.empty, self.free, self.last_free = first, last, empty, free, last_free


def _add(into: dict[int, int], ways: dict[int, int], times: int) -> None:
    if times:
        for state, n in ways.items():
            into[state] = min(2, into.get(state, 0) + n * times)


def _empty() -> _Fragment:
    return _Fragment({}, {}, 1, True, set())


def _zero_width() -> _Fragment:
    """An anchor or a lookaround: matches the empty string, on a condition."""
    return _Fragment({}, {}, 1, False, set())


class _Builder:
    """Builds one automaton: state ``i`` is "just read a character of set ``labels[i]``", ``follow[i][j]`` the
    number of transitions from ``i`` to ``j`` (reading ``labels[j]``; 2 means two or more)."""

    def __init__(self, alphabet: _Alphabet, groups: list[Any], memo: dict[Any, _Fragment]) -> None:
        self.alphabet, self.groups, self.memo = alphabet, groups, memo
        self.labels: list[int] = []
        self.follow: list[dict[int, int]] = []
        self.transitions = 0
        self.nodes = 0

    def state(self, mask: int) -> _Fragment:
        if len(self.labels) >= MAX_STATES:
            raise _TooBig
        state = len(self.labels)
        self.labels.append(mask)
        self.follow.append({})
        return _Fragment({state: 1}, {state: 1}, 0, False, {state})

    def opaque(self, key: Any, can_be_empty: bool) -> _Fragment:
        """A part the engine matches a single way (atomic group, possessive repeat, backreference)."""
        frag = self.state(self.alphabet.symbol(key))
        frag.empty = int(can_be_empty)
        return frag

    def link(self, last: dict[int, int], first: dict[int, int]) -> None:
        self.transitions += len(last) * len(first)
        if self.transitions > MAX_TRANSITIONS:
            raise _TooBig
        for p, m in last.items():
            follow = self.follow[p]
            for q, n in first.items():
                follow[q] = min(2, follow.get(q, 0) + m * n)

    def concat(self, a: _Fragment, b: _Fragment) -> _Fragment:
        self.link(a.last, b.first)
        first = dict(a.first)
        _add(first, b.first, a.empty)
        last = dict(b.last)
        _add(last, a.last, b.empty)
        last_free = b.last_free | a.last_free if b.free else b.last_free
        return _Fragment(first, last, min(2, a.empty * b.empty), a.free and b.free, last_free)

    @staticmethod
    def branch(parts: list[_Fragment]) -> _Fragment:
        first: dict[int, int] = {}
        last: dict[int, int] = {}
        for part in parts:
            _add(first, part.first, 1)
            _add(last, part.last, 1)
        return _Fragment(first, last, min(2, sum(p.empty for p in parts)), any(p.free for p in parts),
                         set().union(*(p.last_free for p in parts)))

    def loop(self, a: _Fragment, can_skip: bool) -> _Fragment:
        """``a+`` (or ``a*`` with ``can_skip``): every end of ``a`` may start it again."""
        self.link(a.last, a.first)
        if can_skip:
            return _Fragment(a.first, a.last, 1, True, a.last_free)
        return a

    @staticmethod
    def optional(a: _Fragment) -> _Fragment:
        return _Fragment(a.first, a.last, min(2, a.empty + 1), True, a.last_free)

    def repeat(self, items: Any, low: int, high: int, flags: int) -> _Fragment:
        """``items{low,high}`` as fresh copies: the first ``low`` (up to MAX_COPIES) one after the other, then up
        to MAX_OPTIONAL optional ones, nested so that a count is read one way only (``a{0,2}`` reads ``aa`` one
        way); past either limit, the rest loops."""
        copy: Callable[[], _Fragment] = lambda: self.sequence(items, flags)
        mandatory = min(low, MAX_COPIES)
        if high >= _UNBOUNDED or high - low > MAX_OPTIONAL or low > MAX_COPIES:
            tail = self.loop(copy(), can_skip=mandatory == 0)
            mandatory = max(mandatory - 1, 0)
        else:
            tail = None
            for _ in range(high - low):
                tail = self.optional(copy() if tail is None else self.concat(copy(), tail))
        parts = [copy() for _ in range(mandatory)] + ([tail] if tail is not None else [])
        if not parts:
            return _empty()
        frag = parts[0]
        for part in parts[1:]:
            frag = self.concat(frag, part)
        return frag

    def sequence(self, items: Any, flags: int) -> _Fragment:
        frag = _empty()
        for op, av in items:
            frag = self.concat(frag, self.node(op, av, flags))
        return frag

    def node(self, op: Any, av: Any, flags: int) -> _Fragment:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _TooBig
        if op in (_sre.LITERAL, _sre.NOT_LITERAL, _sre.ANY, _sre.IN):
            return self.state(self.alphabet.mask(op, av, flags))
        if op is _sre.SUBPATTERN:
            _, add, remove, items = av
            return self.sequence(items, (flags | int(add)) & ~int(remove))
        if op is _sre.BRANCH:
            return self.branch([self.sequence(items, flags) for items in av[1]])
        if op in _REPEATS:
            return self.repeat(av[2], av[0], av[1], flags)
        if op is _sre.AT:
            return _zero_width()
        if op in (_sre.ASSERT, _sre.ASSERT_NOT):
            self.inner(av[1], flags, lambda b: b.sequence(av[1], flags))
            return _zero_width()
        if op is _sre.ATOMIC_GROUP:
            inside = self.inner(av, flags, lambda b: b.sequence(av, flags))
            return self.opaque(("atomic", id(av)), inside.empty > 0)
        if op is _sre.POSSESSIVE_REPEAT:
            low, high, items = av
            inside = self.inner(av, flags, lambda b: b.repeat(items, low, high, flags))
            return self.opaque(("possessive", id(av)), inside.empty > 0)
        if op is _sre.GROUPREF:
            width = self.groups[av] if av < len(self.groups) else None
            return self.opaque(("group", av), width is None or width[0] == 0)
        if op is _sre.GROUPREF_EXISTS:
            yes = self.sequence(av[1], flags)
            no = self.sequence(av[2], flags) if av[2] is not None else _empty()
            frag = self.branch([yes, no])  # not a choice the engine backtracks over: the group decides
            frag.empty, frag.free = max(yes.empty, no.empty), yes.free and no.free
            return frag
        raise _TooBig  # not something this analysis knows

    def inner(self, key: Any, flags: int, build: Callable[[_Builder], _Fragment]) -> _Fragment:
        """Check a part the engine matches on its own (atomic, possessive, lookaround) as its own pattern."""
        memo_key = (id(key), flags)
        if memo_key not in self.memo:
            self.memo[memo_key] = _check(self.alphabet, self.groups, self.memo, build, ends_match=True)
        return self.memo[memo_key]


def _check(alphabet: _Alphabet, groups: list[Any], memo: dict[Any, _Fragment],
           build: Callable[[_Builder], _Fragment], ends_match: bool) -> _Fragment:
    """Build an automaton and raise _Found if it has an ambiguous loop. With ``ends_match``, reaching the end of
    the pattern ends the match: states the pattern can end after with no condition are left out."""
    builder = _Builder(alphabet, groups, memo)
    frag = build(builder)
    if _ambiguous_loop(builder.labels, builder.follow, frag.last_free if ends_match else set()):
        raise _Found
    return frag


def _components(succ: list[list[int]]) -> list[int]:
    """Strongly connected components (Tarjan, iterative): the component number of every state."""
    n = len(succ)
    index = [-1] * n
    low = [0] * n
    comp = [-1] * n
    stack: list[int] = []
    counter = 0
    for root in range(n):
        if index[root] != -1:
            continue
        work = [(root, 0)]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        while work:
            v, i = work[-1]
            if i < len(succ[v]):
                work[-1] = (v, i + 1)
                w = succ[v][i]
                if index[w] == -1:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    work.append((w, 0))
                elif comp[w] == -1:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                while True:
                    w = stack.pop()
                    comp[w] = v
                    if w == v:
                        break
    return comp


def _ambiguous_loop(labels: list[int], follow: list[dict[int, int]], ends: set[int]) -> bool:
    """Whether some state has two different paths back to itself reading the same string (only through
    states not in ``ends``)."""
    n = len(labels)
    alive = [labels[p] != 0 and p not in ends for p in range(n)]
    succ = [[q for q in follow[p] if alive[q]] if alive[p] else [] for p in range(n)]
    comp = _components(succ)
    # Only transitions inside a strongly connected component can be on a loop.
    inner = [[q for q in succ[p] if comp[q] == comp[p]] for p in range(n)]
    if any(follow[p][q] > 1 for p in range(n) for q in inner[p]):
        return True  # two parallel transitions on a loop: (a*)*
    by_label: list[dict[int, list[int]]] = []
    for p in range(n):
        groups: dict[int, list[int]] = {}
        for q in inner[p]:
            groups.setdefault(labels[q], []).append(q)
        by_label.append(groups)
    # Where two paths part: one state, two different next states reading a common character.
    starts: set[tuple[int, int]] = set()
    for groups in {tuple(sorted(inner[p])): by_label[p] for p in range(n) if len(inner[p]) > 1}.values():
        for mask_a, states_a in groups.items():
            for mask_b, states_b in groups.items():
                if mask_a & mask_b:
                    starts.update((a, b) for a in states_a for b in states_b if a < b)
    # From there, can both paths meet in one state again (reading the same string)? Then they can go on to
    # where they parted, and around again.
    seen = set(starts)
    todo = list(starts)
    while todo:
        a, b = todo.pop()
        for mask_a, states_a in by_label[a].items():
            for mask_b, states_b in by_label[b].items():
                if not mask_a & mask_b:
                    continue
                for x in states_a:
                    for y in states_b:
                        if x == y:
                            return True
                        pair = (x, y) if x < y else (y, x)
                        if pair not in seen:
                            if len(seen) >= MAX_PAIRS:
                                raise _TooBig
                            seen.add(pair)
                            todo.append(pair)
    return False


# -- the shape rule, for what is too big to analyse ----------------------------------------------------------

def _varies(low: int, high: int) -> bool:
    """Whether a repeat ``{low,high}`` matches a varying count of more than one item (backtracking has choices)."""
    return high > 1 and low != high


def _parts(op: Any, av: Any, into_atomic: bool) -> Any:
    """The sub-patterns of one parse-tree node (atomic groups and possessive repeats only with ``into_atomic``:
    backtracking never re-enters them, though they may hold a nesting of their own)."""
    if op in (_sre.ATOMIC_GROUP, _sre.POSSESSIVE_REPEAT) and not into_atomic:
        return ()
    return _children(op, av)


def _holds_varying_repeat(items: Any) -> bool:
    for op, av in items:
        if op in _REPEATS and _varies(av[0], av[1]):
            return True
        if any(_holds_varying_repeat(part) for part in _parts(op, av, into_atomic=False)):
            return True
    return False


def _has_nested_repeat(items: Any) -> bool:
    for op, av in items:
        if op in _REPEATS and av[1] > 1 and _holds_varying_repeat(av[2]):
            return True
        if any(_has_nested_repeat(part) for part in _parts(op, av, into_atomic=True)):
            return True
    return False


def _shape_rule(tree: Any) -> bool:
    """The older, coarser rule: any repeat of a part that itself repeats a varying number of times."""
    try:
        return _has_nested_repeat(tree)
    except RecursionError:
        return True
