"""Clean/corrupt prompt pairs for the bundled demo models (see `nnpatch.models`).

* `ioi(n)`: indirect object identification. The clean prompt names two people, then repeats
  one of them (the subject, S) as the giver; the answer is the other (the indirect object, IO).
  The corrupt prompt repeats IO instead of S, so its correct answer is S (`wrong`).
* `table_max(n)`: a table of labelled rows ("Grp H 10 Grp L 31 ..."); the answer is the largest
  y-value. The corrupt prompt lowers the maximum row's value below the runner-up, so its correct
  answer is the runner-up's value (`wrong`).

Every name, place, object, label and value is one token of the bundled tokenizers, each word
carrying its leading space (" Mary", " 34"), and the tokenizers add no special tokens, so clean
and corrupt prompts have the same length and the positions in `meta` index
`tokenizer(prompt)["input_ids"]` directly.

Held-out data: each prompt belongs to a split fixed by a CRC32 of its content key (IOI: the
template, place, object and the unordered pair of names; tables: the sequence of row labels).
One key in ten is "test", the rest "train". The training script draws only "train" prompts; the
generators here draw "test" prompts unless told otherwise, so a clean prompt, its corrupt twin,
and every prompt that differs from them only in name order or values, never occur in training.

Examples:
    >>> import nnpatch
    >>> pairs = nnpatch.tasks.ioi(2, seed=0)
    >>> len(pairs), pairs.model
    (2, 'ioi')
    >>> pair = pairs[0]
    >>> pair.answer != pair.wrong
    True
"""
from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass, field
from typing import Iterator

from ..errors import NNPatchIndexError, NNPatchValueError

__all__ = ["PromptPair", "PromptPairs", "ioi", "table_max", "vocabulary"]


@dataclass(frozen=True)
class PromptPair:
    """One clean/corrupt pair. `answer` is right for `clean`, `wrong` is right for `corrupt`."""

    clean: str
    corrupt: str
    answer: str
    wrong: str
    meta: dict


@dataclass(frozen=True)
class PromptPairs:
    """`n` clean/corrupt prompt pairs as parallel lists, and the bundled model they are for.

    `answer[i]` and `wrong[i]` are single tokens (with their leading space). `meta[i]` holds
    token positions in the prompts (identical for clean and corrupt) and task details.
    Indexing with an int gives a `PromptPair`; with a slice, a smaller `PromptPairs`.
    """

    clean: list[str]
    corrupt: list[str]
    answer: list[str]
    wrong: list[str]
    meta: list[dict]
    model: str = field(default="")

    def __len__(self) -> int:
        return len(self.clean)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return PromptPairs(self.clean[index], self.corrupt[index], self.answer[index],
                               self.wrong[index], self.meta[index], self.model)
        return PromptPair(self.clean[index], self.corrupt[index], self.answer[index],
                          self.wrong[index], self.meta[index])

    def __iter__(self) -> Iterator[PromptPair]:
        return (self[i] for i in range(len(self)))


# -- splitting text the way the bundled tokenizers do ------------------------------------------
# The bundled tokenizers pre-tokenize like GPT-2 (a word keeps its leading space; a run of
# punctuation is its own piece) and map each piece to one token. For the ASCII text of these tasks
# this regular expression gives the same pieces; the tests check that.
_PIECE = re.compile(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+")


def _pieces(text: str) -> list[str]:
    return _PIECE.findall(text)


def _split_of(key: str) -> str:
    return "test" if zlib.crc32(key.encode()) % 10 == 0 else "train"


def _check_split(split: str) -> None:
    if split not in ("test", "train"):
        raise NNPatchValueError(f"split must be 'test' (held out, the default) or 'train', got {split!r}")


# -- indirect object identification ------------------------------------------------------------
NAMES = [
    "Mary", "John", "Alice", "Bob", "Sarah", "David", "Emma", "James", "Laura", "Michael",
    "Anna", "Thomas", "Julia", "Peter", "Rachel", "Daniel", "Kate", "Paul", "Lisa", "Steven",
    "Helen", "George", "Susan", "Robert", "Linda", "Richard", "Karen", "Edward", "Nancy", "Brian",
    "Emily", "Kevin", "Claire", "Jason", "Megan", "Eric", "Hannah", "Simon", "Lucy", "Oliver",
    "Sophie", "Henry", "Chloe", "Adam", "Olivia", "Samuel", "Ruth", "Victor", "Diana", "Frank",
    "Irene", "Oscar", "Nora", "Philip", "Wendy", "Tony", "Amy", "Carl", "Jessica", "Martin",
]
PLACES = [
    "store", "park", "school", "garden", "station", "market", "library", "beach", "office",
    "restaurant", "hospital", "museum", "cafe", "bakery", "theater", "river", "farm", "zoo",
    "gym", "hotel",
]
OBJECTS = [
    "drink", "book", "ball", "ring", "kite", "basket", "necklace", "snack", "cup", "pencil",
    "bottle", "guitar", "hat", "lamp", "map", "candle", "towel", "plant", "card", "sandwich",
]
# {A} and {B} introduce the two people, {C} is the giver (S in clean prompts).
IOI_TEMPLATES = [
    "When {A} and {B} went to the {place}, {C} gave a {object} to",
    "When {A} and {B} got a {object} at the {place}, {C} decided to give it to",
    "Then, {A} and {B} went to the {place}. {C} gave a {object} to",
    "After {A} and {B} arrived at the {place}, {C} handed a {object} to",
    "While {A} and {B} were working at the {place}, {C} passed a {object} to",
    "Today {A} and {B} spent the day at the {place}. Later, {C} sent a {object} to",
    "Yesterday {A} and {B} visited the {place}, where {C} showed a {object} to",
    "Once {A} and {B} had left the {place}, {C} threw the {object} to",
    "The {place} was busy when {A} and {B} came in. {C} offered a {object} to",
    "At noon, {A} and {B} were cleaning the {place}. {C} lent a {object} to",
    "Friends {A} and {B} met at the {place}, and {C} brought a {object} for",
    "When {A} and {B} had lunch at the {place}, {C} bought a {object} for",
    "As {A} and {B} walked to the {place}, {C} found a {object} and gave it to",
    "Later, {A} and {B} waited at the {place}, so {C} carried a {object} over to",
    "In the morning, {A} and {B} cleaned the {place}, then {C} returned the {object} to",
]


def ioi(n: int, seed: int = 0, *, template: int | None = None, split: str = "test") -> PromptPairs:
    """`n` IOI prompt pairs for the bundled "ioi" model, reproducible from `seed`.

    Half the pairs (at random) name IO first ("ABBA": "When Mary and John ..., John gave ... to"),
    the rest S first ("BABA"). The corrupt prompt swaps the repeated name S2 for IO ("ABA"), which
    keeps every position and flips the answer. `template` picks one of `IOI_TEMPLATES` (so every
    prompt has the same length); by default each pair draws one. `split="train"` draws from the
    training split instead of the held-out one.

    `meta[i]` keys: "io", "s1", "s2", "end" (token positions of IO, the first and second mention
    of S, and the last token), "template" (index) and "order" ("ABBA" or "BABA").

    Examples:
        >>> import nnpatch
        >>> p = nnpatch.tasks.ioi(1, seed=0, template=0)[0]
        >>> p.clean, p.answer
        ('When Philip and Ruth went to the cafe, Philip gave a drink to', ' Ruth')
        >>> p.corrupt, p.wrong
        ('When Philip and Ruth went to the cafe, Ruth gave a drink to', ' Philip')
        >>> p.meta
        {'io': 3, 's1': 1, 's2': 9, 'end': 13, 'template': 0, 'order': 'BABA'}
    """
    _check_split(split)
    if template is not None and not 0 <= template < len(IOI_TEMPLATES):
        raise NNPatchIndexError(f"template must be an index below {len(IOI_TEMPLATES)}, got {template}")
    rng = random.Random(seed)
    pairs = [_ioi_pair(rng, split, template) for _ in range(n)]
    return _collect(pairs, "ioi")


def _ioi_pair(rng: random.Random, split: str, template: int | None) -> PromptPair:
    while True:
        t = rng.randrange(len(IOI_TEMPLATES)) if template is None else template
        io, s = rng.sample(NAMES, 2)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        order = rng.choice(["ABBA", "BABA"])
        key = f"ioi|{t}|{place}|{obj}|{min(io, s)}|{max(io, s)}"
        if _split_of(key) == split:
            break
    a, b = (io, s) if order == "ABBA" else (s, io)
    text = IOI_TEMPLATES[t]
    clean = text.format(A=a, B=b, C=s, place=place, object=obj)
    corrupt = text.format(A=a, B=b, C=io, place=place, object=obj)
    pieces = _pieces(clean)
    io_pos = pieces.index(" " + io)
    s1 = pieces.index(" " + s)
    s2 = pieces.index(" " + s, s1 + 1)
    meta = {"io": io_pos, "s1": s1, "s2": s2, "end": len(pieces) - 1, "template": t, "order": order}
    return PromptPair(clean, corrupt, " " + io, " " + s, meta)


# -- maximum of a table -------------------------------------------------------------------------
TABLE_HEADER = "What is the maximum y-value? Data Table:"
TABLE_LABEL = "Grp"  # each row is "Grp <letter> <value>": the x-value is the label, y the value
TABLE_LETTERS = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
TABLE_VALUES = range(100)  # y-values are the whole words " 0" .. " 99"
TABLE_ROWS = range(3, 11)  # row counts the model was trained on


def table_max(n: int, seed: int = 0, *, rows: int = 8, split: str = "test") -> PromptPairs:
    """`n` max-of-table prompt pairs for the bundled "table-max" model, reproducible from `seed`.

    A prompt reads "What is the maximum y-value? Data Table: Grp H 10 Grp L 31 ... Answer:" with
    `rows` rows of distinct labels and distinct y-values; the answer is the largest y-value.
    The corrupt prompt lowers that row's value below the runner-up's, so `wrong` (the runner-up's
    value) is the corrupt table's maximum. `split="train"` draws from the training split.

    The model is most reliable from five rows up (held-out, 1000 pairs: 8 rows 100% clean /
    99.9% corrupt; 5 rows 99.9% / 97.9%). Small tables whose maximum is low are rare in training,
    so with 3 rows it scores 98.7% clean but only 81.5% on corrupt prompts.

    `meta[i]` keys: "max_row" and "corrupt_max_row" (row indices), "row_token_map"
    ({row: {"x": [label token positions], "y": [value token position]}}), "values" (the clean
    y-values in row order) and "end" (position of the last token).

    Examples:
        >>> import nnpatch
        >>> p = nnpatch.tasks.table_max(1, seed=0, rows=4)[0]
        >>> int(p.answer) == max(p.meta["values"]) > int(p.wrong)
        True
        >>> p.meta["row_token_map"][0]
        {'x': [11, 12], 'y': [13]}
    """
    _check_split(split)
    if rows not in TABLE_ROWS:
        raise NNPatchValueError(f"rows must be between {TABLE_ROWS.start} and {TABLE_ROWS.stop - 1} "
                                f"(the row counts table-max was trained on), got {rows}")
    rng = random.Random(seed)
    pairs = [_table_pair(rng, split, rows) for _ in range(n)]
    return _collect(pairs, "table-max")


def _table_pair(rng: random.Random, split: str, rows: int) -> PromptPair:
    while True:
        labels = rng.sample(TABLE_LETTERS, rows)
        if _split_of("table|" + "".join(labels)) != split:
            continue
        values = rng.sample(TABLE_VALUES, rows)
        top = max(range(rows), key=values.__getitem__)
        runner_up = max((r for r in range(rows) if r != top), key=values.__getitem__)
        lower = [v for v in range(values[runner_up]) if v not in values]
        if lower:
            break
    corrupt_values = list(values)
    corrupt_values[top] = rng.choice(lower)

    def table(vals):
        cells = " ".join(f"{TABLE_LABEL} {label} {v}" for label, v in zip(labels, vals))
        return f"{TABLE_HEADER} {cells} Answer:"

    header = len(_pieces(TABLE_HEADER))
    row_map = {r: {"x": [header + 3 * r, header + 3 * r + 1], "y": [header + 3 * r + 2]}
               for r in range(rows)}
    meta = {"max_row": top, "corrupt_max_row": runner_up, "row_token_map": row_map,
            "values": values, "end": header + 3 * rows + 1}
    return PromptPair(table(values), table(corrupt_values), f" {values[top]}",
                      f" {values[runner_up]}", meta)


def _collect(pairs: list[PromptPair], model: str) -> PromptPairs:
    return PromptPairs([p.clean for p in pairs], [p.corrupt for p in pairs],
                       [p.answer for p in pairs], [p.wrong for p in pairs],
                       [p.meta for p in pairs], model)


def vocabulary(model: str) -> list[str]:
    """Every word piece that prompts and answers of a bundled model's task can contain, sorted.

    The bundled tokenizers are built from this list (one token per piece).

    Examples:
        >>> import nnpatch
        >>> " Mary" in nnpatch.tasks.vocabulary("ioi")
        True
    """
    pieces: set[str] = set()
    if model == "ioi":
        for text in IOI_TEMPLATES:
            for i in range(len(NAMES)):
                pieces.update(_pieces(text.format(
                    A=NAMES[i], B=NAMES[i - 1], C=NAMES[i - 2],
                    place=PLACES[i % len(PLACES)], object=OBJECTS[i % len(OBJECTS)])))
    elif model == "table-max":
        pieces.update(_pieces(TABLE_HEADER + " Answer:"))
        pieces.update(f" {w}" for w in [TABLE_LABEL, *TABLE_LETTERS, *TABLE_VALUES])
    else:
        raise NNPatchValueError(f"no task for model {model!r}; the bundled tasks are 'ioi' and 'table-max'")
    return sorted(pieces)
