"""Answer extraction and equivalence -> the 0/1 reward. Safe against anything a model writes, time-bounded, parallel.

reward(response, gold, template) is the training reward AND the evaluation score: the extraction the template asks
for (templates.Template.answer) only, 1.0 or 0.0, no format reward. grade(response, gold) is a lenient judgement for
analysis (see lenient_answer). Both end in is_equiv(pred, gold): (1) both sides normalised (\\dfrac, \\left, spacing,
\\$, \\%, degrees, units, \\text{}, thousands separators, \\geq, repeating decimals...) and compared as strings - most
responses stop here; (2) else our own recursive-descent LaTeX parser turns each side into trees of tuples in a
container (tuple/interval, set, list, union, matrix, equation), compared by value: exact Fractions while rational
(Residue when huge), else 50-digit mpmath, and free symbols evaluated at three fixed rational points (an identity
test: no symbolic algebra, no simplifier blow-ups, decimals stay strict). Deliberate choices:
  - Unreduced fractions count as correct (\\frac{2}{4} == \\frac{1}{2}), as Math-Verify does; the paper's fast
    grader does not. We grade the value, not its presentation.
  - A decimal matches only an exactly equal value: 0.5 == \\frac12, 0.\\overline{3} == \\frac13, 1.414 != \\sqrt2.
  - Sets (\\{...\\}) and bare lists ("1, 2") are unordered; tuples, intervals (bracket types matter) and matrices
    are ordered. "5 or 7" is a list, so a hedged answer only matches a gold that is itself that set.
  - \\pm expands to the set of both signs; 101_2 is the number 5 (and the digits 101 match it too); x = 3 and AB = 3
    are 3; "a = 2, b = -1" is the tuple (2, -1); x > 5 is the interval (5, \\infty).
Safety: model text is never executed: nothing here hands text to Python or to sympy's string parsers, the parser
knows only arithmetic, and huge sizes are refused before they are computed (see the MAX_ constants). A response over
MAX_RESPONSE_CHARS (1 MB) is cut to its last 1 MB: a direct call returns within about a second. GraderPool kills a
worker whose response runs past the time limit (default 1 s); that response scores 0. An int or float gold or
response (read from a jsonl) is converted to str; any other type is a TypeError, never a silent 0.
"""
import contextlib
import functools
import math
import multiprocessing as mp
import numbers
import re
import time
from collections import deque
from fractions import Fraction
from itertools import accumulate
from multiprocessing.connection import wait

import mpmath

from templates import get_template

DPS = 50                    # mpmath working precision, decimal digits
TOL = mpmath.mpf(10) ** (15 - DPS)  # non-rational values are equal within this relative difference
BIG = mpmath.mpf(10) ** 30  # non-rational values beyond this must match exactly: 50 digits cannot see x + 1 vs x
TINY = mpmath.mpf(10) ** (-2 * DPS)  # a nonzero value below this is no rounding residue of 50-digit arithmetic
MAX_RESPONSE_CHARS = 1_000_000  # longer responses are cut to their last 1 MB (the answer comes last)
TAIL_CHARS = 4000           # the unboxed fallbacks read the response's end only
MAX_ANSWER_CHARS = 4000    # longer answers are only compared as strings (also: int() reads <= 4,300 digits)
MAX_TOKENS, MAX_FACTORIAL, MAX_PM = 400, 1000, 3  # MAX_PM: at most 2**3 sign choices from \pm
MAX_EXACT_BITS = 20_000     # exact Fractions up to this size; beyond, residues (see Residue)
MAX_EXPONENT = 10**6        # |exponent| beyond this is refused unless base and exponent are exact (power towers)
MAX_FUNC_ARG = mpmath.mpf(10) ** 1000  # sin/exp/... beyond this are refused: mpmath's cost grows with the size
PRIME = 2**127 - 1          # a Mersenne prime: the modulus of Residue
# Free symbols take these values (a column per symbol, a row per test point); one row is negative: |x| != x.
POINTS = tuple(tuple(Fraction((-1) ** k * (101 + 37 * j + 53 * k), 71 + 11 * j + 29 * k) for j in range(8))
               for k in range(3))

# ---- extraction ------------------------------------------------------------------------------------------------
BRACE = re.compile(r"[{}]")
FINAL = re.compile(r"final answer(?: is)?|the answer is|(?<!\w)answer\s*:|####", re.I)
MATH_SPAN = re.compile(r"\$+([^$]+)\$+|\\\((.+?)\\\)|\\\[(.+?)\\\]")
SENTENCE_END = re.compile(r"[.!](?:\s|$)|\n")
# A sentence's values (math spans; numbers standing alone: in no word, path, identifier or LaTeX argument, nor
# hyphened to one, as in H2O, v2, x_0, user-0, /tmp/0/, n/2, x^2, {3}) and what states them.
CLOSING = re.compile(MATH_SPAN.pattern + r"|(?<![\w.{^_\\/-])(-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?)(?![\w}/])"
                     r"|(\b(?:is|are|was|equals?|be)\b|=)")
END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>", "<|eot_id|>", "</s>")  # a model may write on
# A finished response ends with a full stop, a formula, or a number and <= 2 words (= 18 dollars), not mid-sentence.
CONCLUDED = re.compile(r"(?:[.!)\]}$*]|\d(?:\s+(?!(?:and|or|then|but|so|which|to|by|the|is|we|of|plus|minus|times)\b)"
                       r"[a-zA-Z]+){0,2})\s*$")
WORDY = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{4,}")  # a stated answer in words: "17 because ...", "Tuesday"


def _last_boxed(text: str):
    """Content of the last \\boxed{...} / \\fbox{...} / `\\boxed 5`; None if there is none or it never closes."""
    i, j = text.rfind("\\boxed"), text.rfind("\\fbox")
    start = i + 6 if i > j else j + 5
    if max(i, j) < 0:
        return None
    if text.startswith(" ", start) and not text.startswith(" {", start):  # `\boxed 5`: up to a space or $
        m = re.match(r" +([^\s$]+)", text[start:start + 200])
        return m.group(1) if m else None
    start, depth = text.find("{", start, start + 3), 0
    for m in BRACE.finditer(text, start) if start >= 0 else ():
        depth += 1 if m.group() == "{" else -1
        if depth == 0:
            return text[start + 1:m.start()]
    return None  # unbalanced (truncated) or malformed


def _unwrap(answer: str) -> str:
    """A \\boxed{} inside an answer tag is unwrapped; an unparseable one gives '' (format found, answer unusable)."""
    return (_last_boxed(answer) or "").strip() if "\\boxed" in answer or "\\fbox" in answer else answer.strip()


def _answer_tag(text: str):
    """The last <answer>...</answer>, unwrapped; None if there is none. rfind, not a regex: linear on any input."""
    end = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, max(end, 0))
    return _unwrap(text[start + 8:end]) if start >= 0 else None


def extract_answer(response: str, template) -> "str | None":
    """The answer in the format the template (name or Template) asks for; None when there is none in that format."""
    kind = (get_template(template) if isinstance(template, str) else template).answer
    if kind == "boxed":
        return _last_boxed(response)
    if kind == "r1":  # Oat's strict check: the literal '</think> <answer>' (one space) and a closing '</answer>'
        strict = "</think> <answer>" in response and "</answer>" in response
        return _unwrap(response.split("<answer>")[-1].replace("</answer>", "")) if strict else None
    if kind == "answer_tag":
        return _answer_tag(response)
    raise ValueError(f"unknown answer extraction {kind!r}")


def _stated(sentence: str, marked: bool = False):
    """The value a sentence states: the first math span or number after its last 'is'/'equals'/'=' (or after its
    start when marked: it follows "The answer is"), else its last one; None if it has none."""
    found = [(m.group(5) is not None, next(g for g in m.groups() if g is not None)) for m in CLOSING.finditer(sentence)]
    marks = [k + 1 for k, (mark, _) in enumerate(found) if mark] or [0] * marked
    after = [v for mark, v in found[marks[-1]:] if not mark] if marks else []
    values = [v for mark, v in found if not mark]
    return after[0] if after else values[-1] if values else None


def lenient_answer(response: str) -> "str | None":
    """The answer grade() judges: last box, else last <answer> tag, else a final statement, else the value stated by
    one of the last three sentences of a response that concludes. Unboxed, only the end of what the model said to
    the user counts: up to the first end-of-turn marker, never inside an unclosed <think>, the last TAIL_CHARS."""
    found = _last_boxed(response)
    found = _answer_tag(response) if found is None else found
    if found is not None:
        return found
    text = response[:min((k for k in map(response.find, END_MARKERS) if k >= 0), default=len(response))]
    think = text.rfind("<think>")
    text = (text[:think] if think > text.rfind("</think>") else text)[-TAIL_CHARS:].rstrip()
    finals = list(FINAL.finditer(text))
    if finals:
        rest = text[finals[-1].end():finals[-1].end() + 500].lstrip("*: \t\n")  # **Final Answer:** 42
        m = MATH_SPAN.match(rest)  # $$...$$ may span lines; else "-\frac{1}{2}", "Tuesday", "5 or 7": all of it
        stated = ((m[1] or m[2] or m[3]) if m else SENTENCE_END.split(rest, maxsplit=1)[0]).strip()
        if WORDY.search(stated) and not re.search(r"\bor\b", stated):  # "the value of $x$ is 17", "17 because.."
            stated = _stated(stated, marked=True) or stated
        if stated:
            return stated
    sentences = [x for x in SENTENCE_END.split(text) if x.strip()] if CONCLUDED.search(text) else []
    return next(filter(None, map(_stated, sentences[:-4:-1])), None)


# ---- normalisation ---------------------------------------------------------------------------------------------
REPLACE = (("\\left", ""), ("\\right", ""), ("\\displaystyle", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
           ("\\cfrac", "\\frac"), ("^{\\circ}", ""), ("^\\circ", ""), ("\\circ", ""), ("\\degree", ""), ("°", ""),
           ("\\%", ""), ("%", ""), ("\\$", ""), ("$", ""), ("{,}", ""), ("\\lbrace", "\\{"), ("\\rbrace", "\\}"),
           ("\\lvert", "|"), ("\\rvert", "|"), ("\\vert", "|"), ("−", "-"), ("π", "\\pi"), ("∞", "\\infty"),
           ("√", "\\sqrt"), ("\\infinity", "\\infty"), ("\\emptyset", "\\{\\}"), ("\\varnothing", "\\{\\}"),
           ("\\mathbb{R}", "(-\\infty,\\infty)"), ("\\mathbb R", "(-\\infty,\\infty)"), ("ℝ", "(-\\infty,\\infty)"),
           ("all real numbers", "(-\\infty,\\infty)"), ("\\geqslant", "\\ge"), ("\\leqslant", "\\le"),
           ("\\geq", "\\ge"), ("\\leq", "\\le"), ("\\neq", "\\ne"), ("\\gt", ">"), ("\\lt", "<"), (">=", " \\ge "),
           ("<=", " \\le "), ("!=", " \\ne "), ("≥", " \\ge "), ("≤", " \\le "), ("≠", " \\ne "))
SPACING = re.compile(r"\\\\|\\[,;:! ]|~|\\(?:[Bb]ig[lr]?|q?quad)(?![a-zA-Z])")
SPACE_AS = {"\\\\": ";", "\\!": ""}  # \\ separates matrix rows; \! is a negative space (100,\!000)
MATRIX_BEGIN = re.compile(r"[(\[]?\s*\\begin\{(?:[pbvBV]?matrix|array)\}(?:\{[lcr| ]*\})?")  # \left[ \begin{array}..
MATRIX_END = re.compile(r"\\end\{(?:[pbvBV]?matrix|array)\}\s*[)\]]?")
TEXT_CMD = r"\\(?:text|textrm|textup|textnormal|mbox|mathrm|operatorname)\s*"
TEXT_SEP = re.compile(TEXT_CMD + r"\{\s*(?:or|and)\s*\}|\s(?:or|and)\s")
WHOLE_TEXT = re.compile(r"\s*" + TEXT_CMD + r"\{([^{}]*)\}\s*\.?")
TEXT_UNIT = re.compile(TEXT_CMD + r"\{([^{}]*)\}(?:\^\{?\d\}?)?")  # a unit, or a name: \text{Area} = 24
FORMAT_CMD = re.compile(r"\\(?:textbf|mathbf|boldsymbol|mathit|textit|emph|bf|mathbb)\s*\{([^{}]*)\}")
UNIT_WORD = re.compile(
    r"(?<=\S)\s+(?:(?:sq(?:uare)?\.?|cubic)\s+)?(?:units?|cm|centimeters?|meters?|km|kilometers?|mm|inch(?:es)?|"
    r"feet|foot|ft|yards?|miles?|dollars?|cents?|degrees?|hours?|minutes?|seconds?|days?|weeks?|months?|years?|"
    r"mph|pounds?|ounces?|gallons?|lit(?:er|re)s?|grams?|kg|people|students|ways|points)\b(?:\^\{?\d\}?|²|³)?\s*$")
SCI = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)[eE]([+-]?\d+)(?![\w.])")
PLAIN_FUNC = re.compile(r"(?<![\\a-zA-Z])(sin|cos|tan|cot|sec|csc|log|ln|exp|sqrt|pi)(?![a-zA-Z])")
# A whole answer that is one number in groups of three: 1,000 | 1\,000 | 1,\! 000 | 1\ 000 (not "1, 000": a list).
GROUPED = re.compile(r"-?\d{1,3}(?:(?:,\s*(?:\\[!,;: ]\s*)+|(?:\\[!,;: ]|~|\s)+|,)\d{3})+(?:\.\d+)?")
REPEATING = re.compile(r"(\d{0,20})\.(\d{0,20})(?:\\(?:overline|bar)\{(\d{1,20})\}|\((\d{1,20})\))")  # 0.(3)
CHOICE = re.compile(r"\(([A-Za-z])\)")
BASE_SUB = re.compile(r"(?<=\d)_\{?\d+\}?")


def _repeating(m) -> str:
    whole, fixed, period = m.group(1), m.group(2), m.group(3) or m.group(4)
    num = int(whole + fixed + period) - int(whole + fixed or "0")
    return f"{{\\frac{{{num}}}{{{(10 ** len(period) - 1) * 10 ** len(fixed)}}}}}"


@functools.lru_cache(maxsize=4096)  # answers of up to 4,000 characters: at most ~30 MB
def _clean(s: str) -> str:
    """Presentation -> canonical text. Single spaces stay: the parser needs them between commands (\\pi r)."""
    for a, b in REPLACE:
        s = s.replace(a, b)
    s = re.sub(r"[^\d.-]", "", s) if GROUPED.fullmatch(s.strip()) else s  # while 1,\! 000 differs from 1, 000
    s = REPEATING.sub(_repeating, SPACING.sub(lambda m: SPACE_AS.get(m.group(), " "), s))
    s = FORMAT_CMD.sub(r"\1", TEXT_SEP.sub(",", MATRIX_END.sub("}", MATRIX_BEGIN.sub(r"\\mat{", s))))
    whole = WHOLE_TEXT.fullmatch(s)
    s = whole.group(1) if whole else TEXT_UNIT.sub(lambda m: m[1] if s[m.end():].lstrip()[:1] == "=" else "", s)
    s = PLAIN_FUNC.sub(r"\\\1", SCI.sub(r"\1\\times10^{\2}", UNIT_WORD.sub("", s)))
    s = " ".join(s.split()).rstrip(" .")  # a sentence's full stop, not .15's point
    s = re.sub(r"[^\d.-]", "", s) if GROUPED.fullmatch(s) else s
    return CHOICE.fullmatch(s)[1] if CHOICE.fullmatch(s) else s


# ---- parsing: cleaned text -> value (a container of trees of tuples) -------------------------------------------
TOKEN = re.compile(r"\\[a-zA-Z]+|\\[{}|]|\d+\.?\d*|\.\d+|[a-zA-Z]+|\S")
FUNCS = {"\\" + name: getattr(mpmath, name.replace("arc", "a")) for name in  # \log is natural, like mpmath.log
         "sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh ln log exp".split()}
GREEK = {"\\alpha", "\\beta", "\\gamma", "\\delta", "\\theta", "\\lambda", "\\mu", "\\phi", "\\varphi", "\\omega",
         "\\sigma", "\\tau", "\\rho", "\\epsilon", "\\varepsilon", "\\psi", "\\xi", "\\eta", "\\kappa", "\\nu"}
CONSTANTS = {"\\pi", "\\infty", "i"}
CLOSE = {"(": ")", "[": "]", "{": "}", "|": "|", "\\|": "\\|"}
STARTS_ATOM = {"(", "\\frac", "\\sqrt"} | set(FUNCS) | GREEK | CONSTANTS


class _Parser:
    """Recursive descent over a token list -> ('n', Fraction) | ('s', name) | ('c', name) | (op, *children).
    Raises ValueError on anything it does not know. It only ever builds tuples."""

    def __init__(self, text: str):
        self.toks, self.i = TOKEN.findall(text) + [None], 0  # None marks the end
        if len(self.toks) > MAX_TOKENS:
            raise ValueError("too long")

    def eat(self, *want):  # consume and return the next token if it is one of `want` (any token if none given)
        t = self.toks[self.i]
        taken = t is not None and (not want or t in want)
        self.i += taken
        return t if taken else None

    def inside(self, close):
        node = self.expr()
        if self.eat(close) is None:
            raise ValueError(f"expected {close!r} at token {self.i}")
        return node

    def split_next(self):  # a LaTeX argument is one character: \\frac12 is \\frac{1}{2}, x^23 is x^{2}3
        t = self.toks[self.i]
        if t is not None and len(t) > 1 and t[0].isalnum():
            self.toks[self.i:self.i + 1] = [t[0], t[1:]]

    def expr(self):
        node = self.term()
        while op := self.eat("+", "-"):
            node = ("+", node, self.term() if op == "+" else ("neg", self.term()))
        return node

    def term(self):
        node = self.unary()
        while True:
            if self.eat("*", "\\cdot", "\\times"):
                node = ("*", node, self.unary())
            elif self.eat("/", "\\div"):
                node = ("/", node, self.unary())
            elif (t := self.toks[self.i]) and (t[0].isalnum() or t[0] == "." or t in STARTS_ATOM):
                node = ("*", node, self.power())  # implicit multiplication: 2x, 3\sqrt{2}, (x+1)(x-1)
            else:
                return node

    def unary(self):
        if op := self.eat("-", "+"):
            return ("neg", self.unary()) if op == "-" else self.unary()
        return self.power()

    def power(self):
        node = self.atom()
        while self.eat("!"):
            node = ("!", node)
        return ("^", node, self.arg()) if self.eat("^") else node

    def arg(self):  # a macro argument: a braced group or a single token
        if self.eat("{"):
            return self.inside("}")
        if self.eat("-"):
            return ("neg", self.arg())
        self.split_next()
        return self.atom()

    def raw_group(self) -> str:  # subscript text (a braced group or one character) as a string
        if not self.eat("{"):
            self.split_next()
            return self.eat() or ""
        start = self.i
        while self.toks[self.i] not in ("}", None):
            self.i += 1
        return "".join(self.toks[start:self.i]) + ("" if self.eat("}") else "}")  # never a silent cut

    def atom(self):
        t = self.eat() or "<end>"
        if t[0].isdigit() or t[0] == ".":
            return self.number(t)
        if t in CLOSE:
            node = self.inside(CLOSE[t])
            return node if t in "([{" else ("abs", node)
        if t[0].isalpha() and len(t) <= 3 or t in GREEK:  # 4+ letters are a word ("Sunday"), not a product
            if len(t) > 1 and t[0] != "\\":  # abc = a * b * c
                self.toks.insert(self.i, t[1:])
                t = t[0]
            if t == "i" and self.toks[self.i] != "_":
                return ("c", "i")
            return ("s", t + "_" + self.raw_group()) if self.eat("_") else ("s", t)
        if t == "\\frac":
            return ("/", self.arg(), self.arg())
        if t == "\\sqrt":
            index = self.inside("]") if self.eat("[") else ("n", Fraction(2))
            return ("root", self.arg(), index)
        if t in CONSTANTS:
            return ("c", t)
        if t in FUNCS:
            return self.function(t)
        raise ValueError(f"unsupported {t!r}")

    def number(self, t):
        if t.isdigit() and self.eat("_"):  # base subscript: 101_2 = 5
            return ("n", Fraction(int(t, int(self.raw_group()))))
        if t.isdigit() and self.eat("\\frac"):  # a mixed number 2\frac{1}{2}, only with integer parts
            save, a, b = self.i - 1, self.arg(), self.arg()
            if a[0] == b[0] == "n" and a[1].denominator == b[1].denominator == 1 and b[1] != 0:
                return ("n", int(t) + a[1] / b[1])
            self.i = save
        return ("n", _exact(Fraction(t)))

    def function(self, name):
        base = self.arg() if name == "\\log" and self.eat("_") else None  # \log_2 8
        power = self.arg() if self.eat("^") else None  # \sin^2 x
        arg = self.inside(")") if self.eat("(") else self.power()
        node = ("f", name, arg) if base is None else ("/", ("f", "\\ln", arg), ("f", "\\ln", base))
        return node if power is None else ("^", node, power)


SEP = {name: re.compile(r"(\\\{|[(\[{])|(\\\}|[)\]}])|(" + sep + ")") for name, sep in {  # (open)|(close)|(separator)
    "cup": r"\\cup(?![a-zA-Z])|∪", "comma": "[,;]", "cell": "&", "row": ";", "in": r"\\in(?![a-zA-Z])", "eq": "=",
    "rel": r"<|>|\\[lgn]e(?![a-zA-Z])"}.items()}
NAME = re.compile(r"(?:m? ?\\angle ?|\\overline\{)?[a-zA-Z]+(?: [a-zA-Z]+)*(?:_\{?\w+\}?)?\}?(?:\([\w, ]*\))?|"
                  r"\\[a-zA-Z]+|\((?:[a-zA-Z] ?, ?)+[a-zA-Z]\)")  # x, AB, \angle ABC, a_{10}, f(3), (x, y), Area


def _split_top(s: str, sep: str, keep: bool = False) -> list:
    """Split at separators outside any brackets; with keep, the separators stay as the odd items."""
    parts, depth, start = [], 0, 0
    for m in SEP[sep].finditer(s):
        depth += 1 if m.group(1) else -1 if m.group(2) else 0
        if m.group(3) and depth == 0:
            parts += [s[start:m.start()].strip()] + [m.group(3)] * keep
            start = m.end()
    return parts + [s[start:].strip()]


def _wrapped(s: str) -> bool:
    """True when the bracket that opens s closes at its last character: (1,2) yes, (1)+(2) no."""
    depths = list(accumulate(bool(m.group(1)) - bool(m.group(2)) for m in SEP["comma"].finditer(s[:-1])))
    return bool(depths) and min(depths) > 0 and depths[-1] == 1


def _parse(s: str):
    """Cleaned text -> ('expr', tree) | ('eq', lhs, rhs, lhs name or None) | ('tup', open, close, items) |
    ('set' | 'list' | 'union', items) | ('mat', rows). Raises ValueError when it cannot parse."""
    if s.startswith("\\mat{") and _wrapped(s[4:]):
        rows = [tuple(map(_parse, _split_top(r, "cell"))) for r in _split_top(s[5:-1], "row") if r]
        if len({len(r) for r in rows}) != 1:
            raise ValueError("ragged matrix")
        return ("mat", tuple(rows))
    for sep, kind in (("cup", "union"), ("comma", "list")):
        parts = _split_top(s, sep)
        if len(parts) > 1:  # a trailing comma leaves an empty part: ignored; "0, \pm 3" is three items
            items = tuple(_parse(p) for p in parts if p or sep == "cup")
            items = tuple(x for v in items for x in (v[1] if v[0] == kind == "list" else (v,)))
            return items[0] if len(items) == 1 else (kind, items)
    if s.startswith("\\{") and s.endswith("\\}") and _wrapped(s):
        items = tuple(map(_parse, filter(None, _split_top(s[2:-2], "comma"))))
        return items[0] if len(items) == 1 else ("set", items)  # {3} is 3
    if s[:1] in ("(", "[") and s[-1] in ")]" and _wrapped(s) and len(_split_top(s[1:-1], "comma")) > 1:
        return ("tup", s[0], s[-1], tuple(map(_parse, _split_top(s[1:-1], "comma"))))
    parts = _split_top(s, "in")
    if len(parts) == 2:  # x \in [1, 2]
        return _parse(parts[1])
    parts = _split_top(s, "rel", keep=True)
    if len(parts) > 1:  # 2 \le x < 7
        return _solution_set([_parse(p) for p in parts[::2]], parts[1::2])
    parts = _split_top(s, "eq")
    if len(parts) > 1:  # x = 2 + 1 = 3: the first side and the last; a name needs not parse (\angle ABC = 30)
        name = parts[0].replace(" ", "") if NAME.fullmatch(parts[0]) else None
        return ("eq", ("expr", ("s", name)) if name else _parse(parts[0]), _parse(parts[-1]), name)
    if "\\pm" in s or "\\mp" in s:  # 1 \pm 2 is the set {3, -1}
        if s.count("\\pm") + s.count("\\mp") > MAX_PM:
            raise ValueError("too many \\pm")
        signs = [_parse(s.replace(pm, sign, 1)) for pm in ("\\pm", "\\mp") if pm in s for sign in ("+", "-")][:2]
        return ("list", tuple(x for v in signs for x in (v[1] if v[0] == "list" else (v,))))
    parser = _Parser(s)
    tree = parser.expr()
    if parser.toks[parser.i] is not None or not s:
        raise ValueError(f"unexpected {parser.toks[parser.i]!r}")
    return ("expr", tree)


def _solution_set(sides, ops):
    """An inequality (or a chain) linear in its one variable -> its solution set as an interval (a union for \\ne):
    5 < x -> (5, \\infty), -x \\ge -4 -> (-\\infty, 4], 2 \\le x < 7 -> [2, 7). Anything else: ValueError."""
    if any(x[0] != "expr" for x in sides) or len(names := set().union(*(_symbols(x[1]) for x in sides))) != 1:
        raise ValueError("not an inequality in one variable")
    lo, hi = [("neg", ("c", "\\infty")), "("], [("c", "\\infty"), ")"]  # each end: its value, its bracket
    with mpmath.workdps(DPS):
        for (_, left), op, (_, right) in zip(sides, ops, sides[1:]):
            f = [_ev(("+", left, ("neg", right)), {min(names): Fraction(t)}) for t in (0, 1, 2)]  # left - right
            f = f if all(isinstance(x, Fraction) for x in f) else [_mp(x) for x in f]
            if not all(map(mpmath.isfinite, f)):
                continue  # -\infty < x: no bound
            slope = f[1] - f[0]
            if _close(slope, 0) or not _close(f[2] - f[1], slope):
                raise ValueError("not linear")
            root = ("n", -f[0] / slope)
            if op == "\\ne" and len(ops) == 1:
                return ("union", (("tup", "(", ")", (("expr", lo[0]), ("expr", root))),
                                  ("tup", "(", ")", (("expr", root), ("expr", hi[0])))))
            if (op in (">", "\\ge")) == (slope > 0):  # the variable is above the root
                lo = [root, "[" if op in ("\\le", "\\ge") else "("]
            else:
                hi = [root, "]" if op in ("\\le", "\\ge") else ")"]
    return ("tup", lo[1], hi[1], (("expr", lo[0]), ("expr", hi[0])))


_value = functools.lru_cache(maxsize=4096)(_parse)  # golds repeat (G samples each); failures are cheap, not kept


# ---- evaluation: tree -> Fraction (exact), Residue (exact, huge) or mpmath number ------------------------------
class Residue:
    """A rational too large to hold (2^{2^{24}}, 10^{-999999}) as its value modulo PRIME: exact and cheap, never a float
    (10^{-999999} != 0); two values collide with probability 2^-127 unless the text is built on PRIME. The operators
    are those _ev uses (a Fraction on the left hands over to the reflected ones); no inverse mod PRIME: ValueError."""
    __slots__ = ("r",)

    def __init__(self, r: int):
        self.r = r % PRIME

    @staticmethod
    def of(x) -> "Residue":
        if not isinstance(x, (int, Fraction, Residue)):
            raise ValueError("a huge exact value meets an irrational one")
        return x if isinstance(x, Residue) else Residue(Fraction(x).numerator * pow(Fraction(x).denominator, -1, PRIME))

    __add__ = __radd__ = lambda self, o: Residue(self.r + Residue.of(o).r)
    __mul__ = __rmul__ = lambda self, o: Residue(self.r * Residue.of(o).r)
    __truediv__ = lambda self, o: Residue(self.r * pow(Residue.of(o).r, -1, PRIME))
    __rtruediv__ = lambda self, o: Residue.of(o) / self
    __neg__ = lambda self: Residue(-self.r)
    __pow__ = lambda self, n: Residue(pow(self.r, n % (PRIME - 1), PRIME) if self.r else pow(0, n, PRIME))  # Fermat


EXACT = (Fraction, Residue)


def _mp(x):
    if isinstance(x, Residue):
        raise ValueError("a huge exact value has no 50-digit value")
    return mpmath.mpf(x.numerator) / x.denominator if isinstance(x, Fraction) else x


def _exact(x):  # a Fraction past MAX_EXACT_BITS continues as a Residue: big-number gcds would be the slow part
    big = isinstance(x, Fraction) and max(x.numerator.bit_length(), x.denominator.bit_length()) > MAX_EXACT_BITS
    return Residue.of(x) if big else x


def _power(a, b):
    if isinstance(a, Fraction) and a == 1 and isinstance(b, EXACT):  # 1^{2024^{2024}}: no exponent is too large
        return a
    if isinstance(a, EXACT) and isinstance(b, Fraction) and b.denominator == 1:  # 2^{2^{24}}, 10^{-999999}: exact
        small = isinstance(a, Fraction) and \
            max(a.numerator.bit_length(), a.denominator.bit_length()) * abs(b) <= MAX_EXACT_BITS
        return a ** int(b) if small else Residue.of(a) ** int(b)
    if abs(_mp(b)) > MAX_EXPONENT:
        raise ValueError("exponent too large")
    return mpmath.power(_mp(a), _mp(b))  # a negative base, a fractional exponent: the principal value


def _ev(node, env):
    op = node[0]
    if op == "n":
        return node[1]
    if op == "s":
        return env[node[1]]
    if op == "c":
        return mpmath.mpc(0, 1) if node[1] == "i" else +mpmath.pi if node[1] == "\\pi" else mpmath.inf
    if op in ("+", "*", "/", "^"):
        a, b = _ev(node[1], env), _ev(node[2], env)
        if op == "^":
            return _exact(_power(a, b))
        a, b = (a, b) if isinstance(a, EXACT) and isinstance(b, EXACT) else (_mp(a), _mp(b))
        return _exact(a + b if op == "+" else a * b if op == "*" else a / b)
    x = _ev(node[2] if op == "f" else node[1], env)
    if op == "neg":
        return -x
    if op == "root":
        n = _ev(node[2], env)
        if not (isinstance(n, Fraction) and n.denominator == 1 and 0 < n <= 100):
            raise ValueError("bad root index")
        x = _mp(x)
        if isinstance(x, mpmath.mpf) and x < 0 and n % 2 == 1:  # the real odd root of a negative number
            return -mpmath.root(-x, int(n))
        return mpmath.root(x, int(n))
    if op == "!":
        if not (isinstance(x, Fraction) and x.denominator == 1 and 0 <= x <= MAX_FACTORIAL):
            raise ValueError("factorial out of range")
        return Fraction(math.factorial(int(x)))
    if op == "abs":
        return abs(x)  # a Residue has no sign: a TypeError, i.e. not shown equal
    if abs(_mp(x)) > MAX_FUNC_ARG:
        raise ValueError("function argument too large")
    return FUNCS[node[1]](_mp(x))


def _close(a, b) -> bool:
    """Equal: exactly for two rationals, else to 35 significant digits (called inside workdps(DPS))."""
    if isinstance(a, Residue) or isinstance(b, Residue):
        return Residue.of(a).r == Residue.of(b).r
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b
    a, b = _mp(a), _mp(b)
    if not (mpmath.isfinite(a) and mpmath.isfinite(b)) or max(abs(a), abs(b)) > BIG or \
            0 < max(abs(a), abs(b)) < TINY:  # \pi^{-10^6} is not 0: rounding residues are ~10^-50, far above it
        return a == b
    return abs(a - b) <= TOL * max(1, abs(a), abs(b))


def _symbols(node) -> set:
    if node[0] == "s":
        return {node[1]}
    return set().union(*(_symbols(child) for child in node[1:] if isinstance(child, tuple)))


def _same_expr(a, b, scaled: bool = False) -> bool:
    """a == b at every test point; with scaled, a == c * b for one constant c != 0 (equations)."""
    names = sorted(_symbols(a) | _symbols(b))
    if len(names) > len(POINTS[0]):
        return False
    ratio = None
    try:  # any failure of our own arithmetic (domain, overflow, refused sizes) means: not shown equal
        with mpmath.workdps(DPS):
            for point in POINTS if names else POINTS[:1]:
                env = dict(zip(names, point))
                va, vb = _ev(a, env), _ev(b, env)
                if scaled and not _close(vb, 0):  # equations: the ratio must be one constant, not 0
                    r = va / vb if isinstance(va, EXACT) and isinstance(vb, EXACT) else _mp(va) / _mp(vb)
                    if _close(r, 0) or (ratio is not None and not _close(r, ratio)):
                        return False
                    ratio = r
                elif not _close(va, vb):
                    return False
    except Exception:
        return False
    return True


def _labelled(v):
    """'x = 1, y = 2, x = 3, y = 4' -> ((1, 2), (3, 4)): equations naming the same values in turn; else None."""
    names = [x[3] for x in v[1] if x[0] == "eq" and x[3]] if v[0] == "list" else []
    k = len(set(names))
    if k < 2 or len(names) < len(v[1]) or names != names[:k] * (len(names) // k):
        return None
    return tuple(tuple(x[2] for x in v[1][i:i + k]) for i in range(0, len(names), k))


def _same_unordered(a, b) -> bool:
    left = list(b)
    for x in a:
        hit = next((k for k, y in enumerate(left) if _same(x, y)), None)
        if hit is None:
            return False
        left.pop(hit)
    return not left


def _same(p, g) -> bool:
    """Value equality; collections element-wise, equations by their right side or up to a factor."""
    kp, kg = p[0], g[0]
    for a, b in ((p, g), (g, p)):  # labelled values against a tuple, several labelled solutions against tuples
        groups = _labelled(a)
        if groups and b[0] == "tup":
            return len(groups) == 1 and _same(b[:3] + (groups[0],), b)
        if groups and len(groups) > 1 and b[0] in ("list", "set"):
            return _same_unordered([("tup", "(", ")", x) for x in groups], b[1])
    if kp == kg == "expr":
        return _same_expr(p[1], g[1])
    if kp == kg == "eq":
        if p[3] and g[3]:
            return _same(p[2], g[2])
        if p[1][0] == p[2][0] == g[1][0] == g[2][0] == "expr":  # 2x - y = 3 vs y = 2x - 3
            return _same_expr(("+", p[1][1], ("neg", p[2][1])), ("+", g[1][1], ("neg", g[2][1])), scaled=True)
        return _same(p[1], g[1]) and _same(p[2], g[2])
    if "eq" in (kp, kg):  # x = 3 vs 3
        eq, other = (p, g) if kp == "eq" else (g, p)
        return bool(eq[3]) and _same(eq[2], other)
    if kp == kg == "tup":
        return p[1:3] == g[1:3] and len(p[3]) == len(g[3]) and all(map(_same, p[3], g[3]))
    if kp == kg == "mat":
        return [len(r) for r in p[1]] == [len(r) for r in g[1]] and all(map(_same, sum(p[1], ()), sum(g[1], ())))
    return (kp == kg or {kp, kg} in ({"list", "set"}, {"list", "union"})) and _same_unordered(p[1], g[1])


def is_equiv(pred: str, gold) -> bool:
    """True when the predicted answer text equals the gold answer text (or any element of a list) in value."""
    if not isinstance(gold, str):
        return any(is_equiv(pred, g) for g in gold)
    if pred is None or not pred.strip():
        return False
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:  # kept out of the caches and the parser
        return pred.strip() == gold.strip()
    cp, cg = _clean(pred.strip()), _clean(gold.strip())
    kp, kg = cp.replace(" ", ""), cg.replace(" ", "")
    if kp and kp == kg or (len(kp) > 1 and kp.isalpha() and kp.lower() == kg.lower()):
        return True
    if BASE_SUB.search(kg) and BASE_SUB.sub("", kg) == kp:  # 101 for 101_2: the digits that were asked for
        return True
    try:
        vp, vg = _value(cp), _value(cg)
    except (ValueError, ArithmeticError, TypeError, IndexError, RecursionError):  # TypeError: a complex bound
        return False
    if ("%" in pred) != ("%" in gold) and vp[0] == vg[0] == "expr":  # 50\% vs 0.5 (and vs 50, below)
        pct, other = (vp, vg) if "%" in pred else (vg, vp)
        if _same_expr(("/", pct[1], ("n", Fraction(100))), other[1]):
            return True
    return _same(vp, vg)


def _checked(response, gold):
    """(response, gold) as str, several golds as a tuple; an int/float (from a jsonl) becomes str, else TypeError."""
    golds = tuple(gold) if isinstance(gold, (list, tuple)) else (gold,)
    if not golds:
        raise ValueError("grader: an empty list of gold answers")
    for x in (response,) + golds:
        if not (isinstance(x, str) or isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)):
            raise TypeError(f"grader: answers must be str or finite int/float, not {type(x).__name__} {x!r:.60}")
    return str(response), tuple(map(str, golds)) if isinstance(gold, (list, tuple)) else str(gold)


def reward(response: str, gold, template) -> float:
    """1.0 if the answer extracted the template's way equals the gold (or any element of a list gold), else 0.0."""
    return grade_item("rewards", template, response, gold)[0]


def grade(response: str, gold) -> bool:
    """Lenient judgement for analysis: any usual final-answer form (see lenient_answer)."""
    return grade_item("grades", None, response, gold)


# ---- batch grading in worker processes ------------------------------------------------------------------------
def grade_item(task: str, template, response: str, gold):
    """One response, as a worker computes it: (reward, format_found) for "rewards", a bool for "grades"."""
    response, gold = _checked(response, gold)
    response = response[-MAX_RESPONSE_CHARS:]  # every step below is about linear in it
    answer = lenient_answer(response) if task == "grades" else extract_answer(response, template)
    correct = bool(answer) and is_equiv(answer, gold)
    return correct if task == "grades" else (float(correct), answer is not None)


def _worker(conn, progress, fn):
    """Grade chunks; progress = [index, start time] of the response being graded lets the parent kill a hung one."""
    with contextlib.suppress(EOFError, KeyboardInterrupt):  # parent gone, or Ctrl-C (the parent's to say)
        while True:  # until killed
            task, template, items = conn.recv()
            out, errors = [], 0
            for k, (response, gold) in enumerate(items):
                progress[1], progress[0] = time.monotonic(), k  # time first: the parent reads k first
                try:
                    out.append(fn(task, template, response, gold))
                except Exception:  # a grader bug scores 0 and is counted; it never takes the batch down
                    out.append(False if task == "grades" else (0.0, False))
                    errors += 1
            conn.send((out, errors))


class GraderPool(contextlib.AbstractContextManager):
    """Grades many responses in worker processes, order preserved, with a hard per-response time limit: a worker
    whose response runs past `timeout` s is killed, it scores 0, a fresh worker takes its place and the rest
    of its chunk is queued again; 3 workers in a row dying at start-up raise. "forkserver", never fork:
    create it before vLLM (forking with OpenMP threads hangs). workers=0: in-process, no time limit."""

    def __init__(self, workers: int = 2, timeout: float = 1.0, chunk: int = 64, fn=grade_item):
        self.timeout, self.chunk, self.fn = timeout, chunk, fn
        self.timeouts = self.errors = 0  # cumulative: responses killed (hung or died in), grader exceptions
        self._ctx = mp.get_context("forkserver")
        self._ctx.set_forkserver_preload(["grader"])  # workers fork from a server that has imported us once
        self._slots = [self._start() for _ in range(workers)]

    def _start(self):
        parent, child = self._ctx.Pipe()
        progress = self._ctx.RawArray("d", [-1, math.inf])  # no clock runs until the worker starts a response
        proc = self._ctx.Process(target=_worker, args=(child, progress, self.fn), daemon=True)
        proc.start()
        child.close()
        return proc, parent, progress

    def rewards(self, responses, golds, template) -> list:
        """[(reward, format_found)] per response: the template's strict reward and whether its format was found."""
        return self._run("rewards", template, responses, golds)

    def grades(self, responses, golds) -> list:
        """[bool] per response: the lenient grade."""
        return self._run("grades", None, responses, golds)

    def _run(self, task, template, responses, golds):
        if len(responses) != len(golds):
            raise ValueError(f"grader: {len(responses)} responses but {len(golds)} golds")
        items = [_checked(r, g) for r, g in zip(responses, golds)]  # a bad input is an error here, not a silent 0
        if not self._slots:
            return [self.fn(task, template, r, g) for r, g in items]
        results = [False if task == "grades" else (0.0, False)] * len(items)  # what a killed response scores
        size = max(1, min(self.chunk, -(-len(items) // (2 * len(self._slots)))))  # one IPC message per chunk
        queue, busy = deque((s, items[s:s + size]) for s in range(0, len(items), size)), {}  # busy: w -> chunk
        dead = 0  # workers in a row that died before beginning a response
        while queue or busy:
            for w, (_, conn, progress) in enumerate(self._slots):
                if w not in busy and queue:
                    progress[1], progress[0] = math.inf, -1
                    busy[w] = queue.popleft()
                    with contextlib.suppress(OSError):  # a worker dead already is seen below, as end of file
                        conn.send((task, template, busy[w][1]))
            deadline = min(self._slots[w][2][1] for w in busy) + self.timeout
            ready = wait([self._slots[w][1] for w in busy], timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            for w in list(busy):
                proc, conn, progress = self._slots[w]
                out = None
                if conn in ready:
                    with contextlib.suppress(EOFError, OSError):  # it died (out of memory?): as if it hung
                        out = conn.recv()
                elif time.monotonic() - progress[1] <= self.timeout:
                    continue
                offset, chunk = busy.pop(w)
                if out is not None:
                    results[offset:offset + len(out[0])] = out[0]
                    self.errors, dead = self.errors + out[1], 0
                    continue
                k = int(progress[0])  # the response it hangs on, -1 if none; those before it died with it
                dead = 0 if k >= 0 else dead + 1
                proc.kill()
                proc.join()
                if dead == 3:  # never a silent 0 for every response
                    raise RuntimeError(f"grader workers died at start-up 3 times in a row (exit {proc.exitcode}):"
                                       " likely __main__ re-imported: run from a file, not stdin or a notebook")
                conn.close()
                self._slots[w], self.timeouts = self._start(), self.timeouts + (k >= 0)
                done = chunk[:max(k, 0)]  # graded, but its results died with the worker
                queue.extendleft(c for c in ((offset + k + 1, chunk[k + 1:]), (offset, done)) if c[1])
        return results

    def close(self):
        for proc, conn, _ in self._slots:  # nothing to flush: a worker holds only its pipe
            proc.kill()
            proc.join()
            conn.close()
        self._slots = []

    def __exit__(self, *exc):
        self.close()
