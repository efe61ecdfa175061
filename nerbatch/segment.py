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
    return _abbreviated(match.group(1).lstrip("\"'“‘(["))


def _abbreviated(word: str) -> bool:
    """True when `word` (without its final dot) is an abbreviation or an initial."""
    if not word:  # a dot after a space: tokenized text such as "... Monday ." ends a sentence
        return False
    if len(word) == 1 and word.isalpha():  # an initial: "J. Smith"
        return True
    if "." in word and all(len(part) <= 2 for part in word.split(".")):  # "U.S", "U.K", "a.m"
        return True
    return word.lower() in ABBREVIATIONS


# ----- a cap on a segment's length, for text without line breaks -----
# Text extracted from HTML or PDFs runs headlines, datelines, bylines and tables into one line, and
# the rules above (rightly) find no boundary in "... AL-AIN , United Arab Emirates 1996-12-06 Japan
# began ...": such stretches are longer than any sentence a sentence-trained model has seen. A
# stretch over the cap is cut at its strongest boundary, the one nearest its middle among equals,
# until every piece fits; a stretch with no boundary of strength >= 1 is left whole (the windows'
# overlap serves it better than a cut between two words that may be one entity).

_SENTENCE_END = frozenset(".!?")
_CLAUSE_END = frozenset(";:")
_DASHES = frozenset({"-", "--", "\u2013", "\u2014"})


def cut_strength(previous: str, following: str) -> int:
    """How strongly a boundary between the words `previous` and `following` (adjacent, separated
    by whitespace) reads as the end of a sentence-like unit: 4 sentence punctuation, 3 a clause
    mark or a number/date before a capitalised word (datelines, table rows), 2 a spaced dash or the
    end of an all-capitals run (headlines), 1 a comma, 0 none."""
    if not previous or not following:
        return 0
    if previous[-1] in _SENTENCE_END:
        word = previous.rstrip(".!?")
        abbreviated = previous[-1] == "." and _abbreviated(word.lstrip("\"'“‘(["))
        return 1 if abbreviated else 4  # "U.S. Army", "Mr. Smith": rather not there
    starts_unit = following[0].isupper() or following[0].isdigit() or following[0] in "\"'“‘(["
    if previous[-1] in _CLAUSE_END:
        return 3
    if starts_unit and any(ch.isdigit() for ch in previous):
        return 3
    if previous in _DASHES or following in _DASHES:
        return 2
    if previous.isupper() and len(previous) > 1 and following[:1].isupper() and not following.isupper():
        return 2
    if previous[-1] == ",":
        return 1
    return 0


def cap_segments(
    text: str, offsets: list[tuple[int, int]], segments: list[tuple[int, int]], cap: int
) -> list[tuple[int, int]]:
    """`segments` (subword ranges covering the text) with each one longer than `cap` subwords cut
    at its strongest word boundaries (`cut_strength`) until every piece fits or no boundary is left."""
    out: list[tuple[int, int]] = []
    pending = list(reversed(segments))
    while pending:
        a, b = pending.pop()
        cut = _best_cut(text, offsets, a, b) if b - a > cap else None
        if cut is None:
            out.append((a, b))
        else:
            pending += [(cut, b), (a, cut)]  # the left piece is handled first
    return out


def _best_cut(text: str, offsets: list[tuple[int, int]], a: int, b: int) -> int | None:
    """The subword index in (a, b) that starts a word after the strongest boundary of the range
    (nearest its middle among equals), or None when it has none of strength >= 1."""
    best, best_key = None, (0, 0.0)
    middle = (a + b) / 2
    word_start = a  # first subword of the current word
    for i in range(a + 1, b):
        if offsets[i][0] == offsets[i - 1][1]:  # glued to the previous subword: same word
            continue
        previous = text[offsets[word_start][0] : offsets[i - 1][1]]
        following_end = i
        while following_end + 1 < b and offsets[following_end + 1][0] == offsets[following_end][1]:
            following_end += 1
        following = text[offsets[i][0] : offsets[following_end][1]]
        key = (cut_strength(previous, following), -abs(i - middle))
        if key[0] >= 1 and key > best_key:
            best, best_key = i, key
        word_start = i
    return best
