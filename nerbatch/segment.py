"""Sentence segmentation with character offsets, for models trained on single sentences.

Most NER checkpoints (every CoNLL-2003 model on the hub, our reference recipe) have only ever seen
one sentence between [CLS] and [SEP]; shown a long window of running text they lose accuracy. For
them `annotate` cuts each document into sentences, runs each sentence as its own window(s) and
decodes the whole document at once, so offsets and "one output row per input row" do not change.

The rules are deliberately conservative: a missed boundary only gives the model a little more
context, while a false one can cut an entity in two. A boundary is

- after `.`, `!` or `?` (and any closing quotes or brackets) followed by whitespace and a capital
  letter, digit or opening quote/bracket, unless the word before the dot is an abbreviation or an
  initial (`Mr.`, `Corp.`, `U.S.`, `J.`);
- at a paragraph break: an empty line, or a line break followed by indentation;
- at every line break, unless the text is hard-wrapped (`is_hard_wrapped`): a line of its own is a
  headline, a dateline, a table row or a sentence, but newswire and e-mail text wrapped at a fixed
  width breaks lines mid-sentence ("BP North America\\nInc said ...").
"""

from __future__ import annotations

import re

# Words that end with a dot without ending a sentence, compared lower-cased without the dot.
ABBREVIATIONS = frozenset(
    """
    mr mrs ms dr prof sr jr st mt ft gen col lt sgt capt cmdr adm gov sen rep rev pres hon
    co corp inc ltd plc bros assn dept univ no nos vol vs etc approx est fig
    jan feb mar apr jun jul aug sep sept oct nov dec
    ala ariz ark calif colo conn del fla ga ill ind kan ky la md mass mich minn miss mo mont neb nev
    okla ore pa tenn tex va vt wash wis wyo
    """.split()
)

_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s+[\"'“‘(\[A-Z0-9\u00c0-\u00de])")
_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*|\n[ \t]+(?=\S)")
_LINE = re.compile(r"\n\s*")
_LAST_WORD = re.compile(r"(\S+)$")


def sentence_bounds(text: str) -> list[tuple[int, int]]:
    """Cut `text` into consecutive `[start, end)` ranges that cover every character exactly once.

    Each range is one sentence with the whitespace that follows it; their concatenation is `text`.
    """
    cuts = {0, len(text)}
    wrapped = is_hard_wrapped(text)
    for match in (_PARAGRAPH if wrapped else _LINE).finditer(text):
        after = match.end()
        # a line that starts lower-case continues the one before (checked here, not in the regex:
        # a lookahead after `\s*` backtracks over long whitespace runs)
        if wrapped or after == len(text) or not text[after].islower():
            cuts.add(after)
    for match in _END.finditer(text):
        if match.group().startswith(".") and _is_abbreviation(text, match.start()):
            continue
        end = match.end()
        while end < len(text) and text[end].isspace():
            end += 1
        cuts.add(end)
    points = sorted(c for c in cuts if 0 <= c <= len(text))
    return [(a, b) for a, b in zip(points, points[1:]) if b > a]


def is_hard_wrapped(text: str) -> bool:
    """True when most lines end near one width of at most 100 columns, as fixed-width wrapping does.

    Lines of a sentence-per-line text, headlines or table rows vary in length or are short; the last
    line of each paragraph (before an empty or indented line) is not counted.
    """
    lines = text.split("\n")
    lengths = [
        len(line.rstrip())
        for line, after in zip(lines, lines[1:])
        if line.strip() and after.strip() and not after[0].isspace()
    ]
    if len(lengths) < 3:
        return False
    width = max(lengths)
    if width > 100 or sorted(lengths)[len(lengths) // 2] < 40:
        return False
    return sum(length >= width - 20 for length in lengths) >= 0.6 * len(lengths)


def _is_abbreviation(text: str, dot: int) -> bool:
    """True when the word ending at `text[dot] == '.'` is an abbreviation or an initial."""
    match = _LAST_WORD.search(text, max(0, dot - 40), dot)  # bounded: a 1M-character text has many dots
    if match is None:
        return False
    word = match.group(1).lstrip("\"'“‘([")
    if not word:  # a dot after a space: tokenized text such as "... Monday ." ends a sentence
        return False
    if len(word) == 1 and word.isalpha():  # an initial: "J. Smith"
        return True
    if "." in word and all(len(part) <= 2 for part in word.split(".")):  # "U.S", "U.K", "a.m"
        return True
    return word.lower() in ABBREVIATIONS
