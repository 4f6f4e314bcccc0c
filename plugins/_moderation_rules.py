"""Rules of the ``moderation`` plugin: their schema, rule files, and the compiled matchers.

A rule gives a category and a score (0-1) to keywords (literal phrases: case-insensitive, whole words by
default, any run of 1-4 whitespace characters where the phrase has a space) and regular expressions
(case-insensitive). A :class:`Matcher` compiles the rules of one direction (input or output) into:

* one regular expression for all keywords, built from a trie (shared prefixes factored, so the engine tests
  one character class per text position) inside a lookahead, so overlapping keywords are all found;
* one alternation for the regular expressions without capture groups, inside a lookahead too; which ones
  matched is decided only where it found something (rare), by trying each at that position;
* the patterns with capture groups (their numbering would break inside an alternation), scanned one by one.

``Matcher.max_len`` bounds the length of any match (regular expressions with unbounded repeats count as
``max_match_chars``), which is what a streaming scanner must keep to see a match split across chunks.
"""
from __future__ import annotations

import os
import re
import unicodedata
from typing import Any, Iterable

import attrs

from proxy.config.load import ConfigError, ConfigProblem, load_layers, structure

from ._regex_ambiguity import backtracks_exponentially

try:  # the width of a regular expression, from the stdlib's own parser (private, so guarded)
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python < 3.11
    import sre_parse as _sre_parse  # type: ignore[no-redef]

__all__ = ["Rule", "RuleFile", "Hit", "Matcher", "RuleSet", "normalize", "compile_rules", "load_rule_file",
           "JAILBREAK_RULES", "DIRECTIONS", "mtime", "check_rules"]

DIRECTIONS = ("input", "output")
_MAX_KEYWORD = 200
_FLAGS = re.IGNORECASE


@attrs.frozen
class Rule:
    """One rule: keywords and/or regular expressions that put a text in ``category`` with ``score``."""

    category: str = attrs.field(metadata={"doc": "Category a match puts the text in (required)."})
    score: float = attrs.field(default=1.0, metadata={"doc": "Score a match gives the category (0-1)."})
    name: str | None = attrs.field(default=None, metadata={"doc": "Shown in logs (default: the category)."})
    keywords: tuple[str, ...] = attrs.field(default=(), metadata={
        "doc": "Literal phrases, case-insensitive; a space matches 1-4 whitespace characters."})
    patterns: tuple[str, ...] = attrs.field(default=(), metadata={
        "doc": "Python regular expressions, case-insensitive; prefer bounded repeats."})
    applies_to: tuple[str, ...] = attrs.field(default=DIRECTIONS, metadata={"doc": "`input`, `output` or both."})
    word_boundary: bool = attrs.field(default=True, metadata={"doc": "Keywords match whole words only."})

    @property
    def label(self) -> str:
        return self.name or self.category


@attrs.frozen
class RuleFile:
    """The top level of a rule file."""

    rules: tuple[Rule, ...] = ()


@attrs.frozen
class Hit:
    category: str
    score: float
    rule: str


# -- text normalization ------------------------------------------------------------------------------------

_INVISIBLE = str.maketrans({cp: None for cp in (0x00AD, 0x180E, 0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF)})


def normalize(text: str) -> str:
    """The form every text is scanned in: lowercase, NFKC (fullwidth and styled letters become plain ones),
    without zero-width characters. ASCII text only needs ``lower()``."""
    if text.isascii():
        return text.lower()
    return unicodedata.normalize("NFKC", text).translate(_INVISIBLE).lower()


def _keyword_key(text: str) -> str:
    return " ".join(normalize(text).split())


# -- compiling ---------------------------------------------------------------------------------------------

def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def _trie_regex(words: Iterable[str], trailing_boundary: dict[str, bool]) -> str:
    """An alternation matching exactly ``words``, with shared prefixes factored; longer words tried first."""
    root: dict[str, Any] = {}
    for word in words:
        node = root
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = word

    def build(node: dict[str, Any]) -> str:
        branches = []
        for ch in sorted(k for k in node if k):
            atom = r"\s{1,4}" if ch == " " else re.escape(ch)
            branches.append(atom + build(node[ch]))
        if "" in node:
            word = node[""]
            branches.append(r"(?!\w)" if trailing_boundary[word] else "")
        if len(branches) == 1:
            return branches[0]
        return "(?:" + "|".join(branches) + ")"

    return build(root)


def _regex_width(pattern: str, cap: int) -> int:
    try:
        return min(int(_sre_parse.parse(pattern, _FLAGS).getwidth()[1]), cap)
    except Exception:  # noqa: BLE001 - a parser detail changed: assume the worst
        return cap


class Matcher:
    """Every rule of one direction, compiled, for texts in :func:`normalize` form (lowercase).

    ``scan(text, pos)`` finds the hits of matches starting at or after ``pos`` (characters before ``pos`` are
    context for ``\\b`` and lookbehinds). Each part has a *detector* — a plain alternation, whose first-character
    set lets the regex engine skip most positions — and a *collector* inside a lookahead, which finds every
    overlapping match and says which rule it belongs to; the collector runs only from where the detector found
    something, which for clean text is never. Keywords are matched case-sensitively against the lowercase text;
    so are patterns written in lowercase (the same matches as case-insensitive ones, at a fraction of the
    cost); patterns with uppercase characters are compiled case-insensitive.
    """

    __slots__ = ("parts", "grouped", "max_len", "empty", "rules", "detectors")

    def __init__(self, rules: list[Rule], max_match_chars: int) -> None:
        self.rules = tuple(rules)
        # Whole-word keywords and free ones (matched inside words too) are separate parts: the same phrase may
        # be in both, for different rules.
        tables: dict[bool, dict[str, list[Hit]]] = {True: {}, False: {}}
        max_len = 0
        for rule in rules:
            hit = Hit(rule.category, rule.score, rule.label)
            for keyword in rule.keywords:
                key = _keyword_key(keyword)
                tables[rule.word_boundary].setdefault(key, []).append(hit)
                max_len = max(max_len, len(key) + 3 * key.count(" "))
        parts: list[tuple[re.Pattern[str], re.Pattern[str], Any]] = []
        for whole_words, table in tables.items():
            if table:
                parts.append(self._keyword_part(table, whole_words))
        by_case: dict[bool, list[tuple[str, Hit]]] = {False: [], True: []}
        grouped: list[tuple[re.Pattern[str], Hit]] = []
        for rule in rules:
            hit = Hit(rule.category, rule.score, rule.label)
            for pattern in rule.patterns:
                max_len = max(max_len, _regex_width(pattern, max_match_chars))
                caseless = pattern != pattern.lower()  # uppercase literals, \\D, \\S, \\W, ...: keep re.IGNORECASE
                compiled = re.compile(pattern, _FLAGS if caseless else 0)
                if compiled.groups:  # their numbering would break inside an alternation: scanned one by one
                    grouped.append((compiled, hit))
                else:
                    by_case[caseless].append((pattern, hit))
        for caseless, items in by_case.items():
            if not items:
                continue
            flags = _FLAGS if caseless else 0
            singles = tuple((re.compile(p, flags), hit) for p, hit in items)
            alternation = "|".join(f"(?:{p})" for p, _ in items)
            try:
                parts.append((re.compile(alternation, flags), re.compile(f"(?={alternation})", flags), singles))
            except re.error:  # e.g. global inline flags in the middle: scan these one by one instead
                grouped.extend(singles)
        self.parts = tuple(parts)
        self.grouped = tuple(grouped)
        self.max_len = max_len
        self.empty = not self.parts and not self.grouped
        #: Expressions any hit makes match: when none finds anything from ``pos`` (clean text), there are no hits.
        self.detectors: tuple[re.Pattern[str], ...] = tuple(d for d, _, _ in parts) + tuple(p for p, _ in grouped)

    @staticmethod
    def _keyword_part(table: dict[str, list[Hit]], whole_words: bool
                      ) -> tuple[re.Pattern[str], re.Pattern[str], dict[str, tuple[Hit, ...]]]:
        # At one position the collector reports the longest keyword only: give it the hits of the shorter
        # keywords that are its prefixes and would have matched at the same place too.
        closure: dict[str, tuple[Hit, ...]] = {}
        for key, hits in table.items():
            merged = list(hits)
            for end in range(1, len(key)):
                prefix = key[:end]
                if prefix in table and (not whole_words or not _is_word(prefix[-1]) or not _is_word(key[end])):
                    merged.extend(table[prefix])
            closure[key] = tuple(merged)
        trailing = {k: whole_words and _is_word(k[-1]) for k in table}
        leading = [k for k in table if whole_words and _is_word(k[0])]
        rest = [k for k in table if not (whole_words and _is_word(k[0]))]
        # The detector leaves the leading word boundary out (a lookbehind first would hide the first-character
        # set from the engine): it may stop inside a word ("scrap"), and the collector then finds nothing.
        detector = _trie_regex(list(table), trailing)
        alternatives = []
        if leading:
            alternatives.append(r"(?<!\w)" + _trie_regex(leading, trailing))
        if rest:
            alternatives.append(_trie_regex(rest, trailing))
        collector = "(?=(" + "|".join(alternatives) + "))"
        return re.compile(detector), re.compile(collector), closure

    def scan(self, text: str, pos: int = 0) -> list[Hit] | None:
        """The hits of matches starting at or after ``pos`` in ``text`` (in :func:`normalize` form); None when
        there are none (the common case)."""
        for detector in self.detectors:
            if detector.search(text, pos) is not None:
                return self.collect(text, pos)
        return None

    def collect(self, text: str, pos: int = 0) -> list[Hit] | None:
        """Like :meth:`scan`, without the quick "anything at all?" test first."""
        found: list[Hit] | None = None
        # One search per part: joining the detectors into one expression would hide the keywords' first-character
        # set from the engine and cost more than the extra call.
        for detector, collector, info in self.parts:
            first = detector.search(text, pos)
            if first is None:
                continue
            if type(info) is dict:  # keywords: the collector's group 1 is the keyword, with its whitespace
                for m in collector.finditer(text, first.start()):
                    hits = info.get(" ".join(m.group(1).split()))
                    if hits:
                        found = found if found is not None else []
                        found.extend(hits)
            else:  # patterns: which ones match where the collector stops
                for m in collector.finditer(text, first.start()):
                    at = m.start()
                    for pattern, hit in info:
                        if pattern.match(text, at) is not None:
                            found = found if found is not None else []
                            found.append(hit)
        grouped = self._grouped(text, pos)
        if grouped:
            found = (found or []) + grouped
        return found

    def _grouped(self, text: str, pos: int) -> list[Hit] | None:
        found: list[Hit] | None = None
        for pattern, hit in self.grouped:
            if pattern.search(text, pos) is not None:
                found = found if found is not None else []
                found.append(hit)
        return found


@attrs.frozen
class RuleSet:
    """The compiled rules in use; replaced whole (one attribute assignment) on reload."""

    input: Matcher
    output: Matcher
    files: tuple[str, ...]
    mtimes: tuple[float | None, ...]
    loaded_at: float


# -- validation and loading --------------------------------------------------------------------------------

def _rule_problems(rule: Rule) -> Iterable[tuple[tuple[Any, ...], str]]:
    if not rule.category.strip():
        yield ("category",), "the category is empty"
    if not 0 <= rule.score <= 1:
        yield ("score",), f"must be between 0 and 1, got {rule.score!r}"
    if not rule.keywords and not rule.patterns:
        yield (), "a rule needs at least one keyword or pattern"
    bad = [d for d in rule.applies_to if d not in DIRECTIONS]
    if bad or not rule.applies_to:
        yield ("applies_to",), f"must list input and/or output, got {list(rule.applies_to)!r}"
    for i, keyword in enumerate(rule.keywords):
        if not keyword.strip():
            yield ("keywords", i), "empty keyword"
        elif len(keyword) > _MAX_KEYWORD:
            yield ("keywords", i), f"longer than {_MAX_KEYWORD} characters (use a pattern)"
    for i, pattern in enumerate(rule.patterns):
        try:
            compiled = re.compile(pattern, _FLAGS)
        except re.error as exc:
            yield ("patterns", i), f"invalid regular expression: {exc}"
            continue
        if compiled.match("") is not None:
            yield ("patterns", i), "matches the empty string (it would flag every text)"
        elif backtracks_exponentially(pattern):
            yield ("patterns", i), ("part of the pattern can match the same text in more than one way under a "
                                    "repeat (like (a+)+b, (a|a)*b or (\\w+\\s?)*$): on some texts it takes "
                                    "exponential time and stalls every stream; make the alternatives or the "
                                    "repeated parts exclusive, or make the inner part atomic ((?>a+)+) or "
                                    "possessive (a++)")


def check_rules(rules: Iterable[Rule], where: str = "rules") -> list[str]:
    """Problems of inline rules (from the plugin config), as ``rules[i].key: message`` strings."""
    out = []
    for index, rule in enumerate(rules):
        for path, message in _rule_problems(rule):
            key = f"{where}[{index}]" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)
            out.append(f"{key}: {message}")
    return out


def load_rule_file(path: str) -> tuple[Rule, ...]:
    """Read a YAML rule file (``rules: [...]``); raises ConfigError naming file, line and key."""
    data, origins = load_layers(path, environment="", env=os.environ, sections=())
    parsed = structure(data, RuleFile, origins)
    problems = [origins.problem(("rules", index) + sub, message)
                for index, rule in enumerate(parsed.rules) for sub, message in _rule_problems(rule)]
    if problems:
        raise ConfigError(problems)
    return parsed.rules


def mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime_ns / 1e9
    except OSError:
        return None


def compile_rules(inline: Iterable[Rule], files: Iterable[str], jailbreak: bool, max_match_chars: int,
                  now: float = 0.0) -> RuleSet:
    """Load the rule files and compile everything into a :class:`RuleSet` (raises ConfigError/ValueError)."""
    inline = tuple(inline)
    problems = check_rules(inline)
    if problems:
        raise ValueError("moderation: " + "; ".join(problems))
    files = tuple(files)
    mtimes = tuple(mtime(f) for f in files)
    rules = list(inline)
    errors: list[ConfigProblem] = []
    for file in files:
        try:
            rules.extend(load_rule_file(file))
        except ConfigError as exc:
            errors.extend(exc.problems)
    if errors:
        raise ConfigError(errors)
    if jailbreak:
        rules.extend(JAILBREAK_RULES)
    by_direction = {d: [r for r in rules if d in r.applies_to] for d in DIRECTIONS}
    return RuleSet(input=Matcher(by_direction["input"], max_match_chars),
                   output=Matcher(by_direction["output"], max_match_chars),
                   files=files, mtimes=mtimes, loaded_at=now)


# -- built-in jailbreak patterns (``jailbreak_detection: true``) --------------------------------------------
# Bounded repeats only ({0,3}, {1,3}), so every pattern has a known maximum length. Input only.

_W = r"\s{1,3}"
JAILBREAK_RULES: tuple[Rule, ...] = (
    Rule(category="jailbreak", score=0.9, name="jailbreak.ignore-instructions", applies_to=("input",), patterns=(
        rf"\b(?:ignore|disregard|forget|override){_W}(?:(?:all|any|every|the|your|of|my){_W}){{0,3}}"
        rf"(?:previous|prior|above|earlier|preceding|original|initial|system){_W}"
        rf"(?:instructions?|prompts?|rules|directions|guidelines|programming|directives)\b",
    )),
    Rule(category="jailbreak", score=0.85, name="jailbreak.no-restrictions", applies_to=("input",), patterns=(
        rf"\b(?:pretend|act|behave|imagine|roleplay)(?:{_W}(?:as|if|like|that|you|you're|are|were|have|an?|ai|"
        rf"assistant|model|chatbot|bot)){{0,6}}{_W}(?:with(?:out)?|free{_W}of|no|zero){_W}(?:any{_W})?"
        rf"(?:restrictions|filters|limits|limitations|guidelines|rules|censorship|morals|ethics)\b",
        rf"\byou{_W}are{_W}(?:no{_W}longer|not){_W}(?:bound|restricted|limited){_W}by\b",
    )),
    Rule(category="jailbreak", score=0.85, name="jailbreak.dan", applies_to=("input",), patterns=(
        rf"\bdo{_W}anything{_W}now\b",
        rf"\b(?:you{_W}are|act{_W}as|become|enable){_W}(?:now{_W})?DAN\b",
        rf"\b(?:developer|god|jailbreak|unrestricted|dan){_W}mode{_W}(?:enabled|activated|on|engaged)\b",
    )),
    Rule(category="jailbreak", score=0.8, name="jailbreak.bypass-safety", applies_to=("input",), patterns=(
        rf"\b(?:bypass|disable|turn{_W}off|circumvent|evade){_W}(?:(?:your|the|all|any|its){_W}){{0,2}}"
        rf"(?:safety|content|ethical|moderation){_W}(?:filters?|guidelines|restrictions|protocols|policies|checks)\b",
    )),
    Rule(category="jailbreak", score=0.75, name="jailbreak.prompt-extraction", applies_to=("input",), patterns=(
        rf"\b(?:reveal|print|show|repeat|output|leak|tell{_W}me){_W}(?:(?:me|us|your|the|all|of|verbatim){_W})"
        rf"{{0,3}}(?:system{_W}prompt|initial{_W}instructions|hidden{_W}instructions|original{_W}prompt)\b",
    )),
)
