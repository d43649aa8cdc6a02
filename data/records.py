"""A generated corpus of stock-ledger records, most of whose tokens follow from a few earlier ones.

Why it exists: a few-million-parameter model trained for minutes on natural text is rarely sure of a
masked token, so block diffusion and self-speculation cannot show fewer forward passes than AR there
(the quickstart measures tokens per forward near 1). In these records a handful of random draws fix
whole runs of tokens, which is what drafting a block in one pass needs; the demo built on it
(``experiment=records_demo``) shows the mechanism paying on a CPU. It says nothing about natural text.

A document is a stock count that walks the catalogue's bins in order (the field order never changes);
the first held-out document (seed 0), shortened::

    ledger 8320 | store Willow | week 6 | 11 lines
    01 | cream | dairy | l | 1.78 | bin C2 | qty 1
    02 | yogurt | dairy | l | 2.01 | bin C3 | qty 8
    ...
    06 | bread | bakery | pcs | 4.03 | bin D1 | qty 8
    ...
    end of ledger 8320

Drawn (seeded): the ledger number, store, week and line count of the header, the first item, each
line's quantity, and rare skips (an item is left out with probability ``SKIP``). Determined: line
numbers count from 01 up to the announced count; each item follows the previous one in catalogue
order, which wraps from the last bin to the first; category, unit, price and bin are functions of the
item (``CATALOGUE``); the footer repeats the header's ledger number. ``check_records`` verifies every
rule line by line, for the tests and for judging generated text.

Why items mostly follow in order rather than being drawn afresh per line: with a fresh item per line,
a block that starts a line must decide the item and its catalogue fields at once, which a diffusion
pass (all slots predicted independently given the context) cannot do consistently; with the item
known in advance every field of a line is confident at once, and the randomness that is left
(quantities, skips) has nothing depending on it inside the line. Greedy self-speculation is lossless
either way; only how many drafts are kept depends on this.

Documents come from ``random.Random`` seeded by (seed, split, index), so each one is reproducible on
its own; the validation split is a separate stream of whole documents, and no training document
equals a validation one.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from data.preprocess import preprocess
from data.sources import Texts
from data.tokenizer import load_tokenizer_info, train_tokenizer

# The records folder when none is given; configs/data/records.yaml reads the same variable and default.
RECORDS_DIR_ENV = "TANDEM_RECORDS"
DEFAULT_RECORDS_DIR = ".cache/tandem/records"
# Bump when the text generated for the same seed changes: a prepared folder then counts as stale.
FORMAT_VERSION = 1
DEFAULT_SEED = 0
TRAIN_DOCUMENTS = 6000
VALID_DOCUMENTS = 200
# The BPE size the recipe's model is built for (configs/experiment/records_demo.yaml).
VOCAB_SIZE = 1024
# Documents per preprocessing shard: a few shards per worker.
SHARD_DOCS = 1000

MIN_LINES, MAX_LINES = 8, 24
MAX_QUANTITY = 9
# Probability that the count skips an item (repeatedly: several in a row are possible).
SKIP = 0.05
STORES = (
    "Harbor",
    "Maple",
    "Summit",
    "Riverside",
    "Oakwood",
    "Lakeview",
    "Granite",
    "Meadow",
    "Beacon",
    "Willow",
    "Cedar",
    "Falcon",
)
# Category -> (unit, items). Bins are the category's aisle letter and the item's place in it.
_CATEGORIES = {
    "fruit": ("kg", ("apple", "pear", "plum", "cherry", "lemon", "mango")),
    "vegetable": ("kg", ("carrot", "onion", "potato", "leek", "celery", "turnip")),
    "dairy": ("l", ("milk", "cream", "yogurt", "kefir", "buttermilk", "whey")),
    "bakery": ("pcs", ("bread", "bagel", "muffin", "scone", "pretzel", "croissant")),
    "hardware": ("pcs", ("bolt", "nut", "washer", "screw", "hinge", "bracket")),
    "stationery": ("pcs", ("pencil", "eraser", "stapler", "folder", "marker", "ruler")),
    "cleaning": ("pcs", ("soap", "sponge", "bleach", "brush", "mop", "bucket")),
    "beverage": ("btl", ("juice", "cola", "tea", "coffee", "water", "soda")),
}


@dataclass(frozen=True)
class Item:
    name: str
    category: str
    unit: str
    price: str  # e.g. "1.85"
    bin: str  # e.g. "A2"


def _catalogue() -> dict[str, Item]:
    items = {}
    for aisle, (category, (unit, names)) in enumerate(_CATEGORIES.items()):
        for place, name in enumerate(names):
            # A fixed, irregular price per item: learnable only by remembering it, like a real price list.
            cents = 25 + (53 * len(items) ** 2 + 17 * len(items)) % 475
            items[name] = Item(
                name, category, unit, f"{cents // 100}.{cents % 100:02d}", f"{chr(65 + aisle)}{place + 1}"
            )
    return items


CATALOGUE = _catalogue()
_NAMES = tuple(CATALOGUE)


def document_rng(seed: int, split: str, index: int) -> random.Random:
    """The generator of document ``index`` of ``split``: string seeds hash the same in every process."""
    return random.Random(f"tandem-records/{FORMAT_VERSION}/{seed}/{split}/{index}")


def generate_document(rng: random.Random) -> str:
    """One ledger (header, lines, footer), each line ending in a newline."""
    ledger = rng.randint(1000, 9999)
    count = rng.randint(MIN_LINES, MAX_LINES)
    lines = [f"ledger {ledger} | store {rng.choice(STORES)} | week {rng.randint(1, 52)} | {count} lines"]
    first = place = rng.randrange(len(_NAMES))
    for number in range(1, count + 1):
        item = CATALOGUE[_NAMES[place % len(_NAMES)]]
        place += 1
        # Never so many skips that the walk comes round to the first item again.
        while rng.random() < SKIP and place - first < len(_NAMES) - (count - number):
            place += 1
        lines.append(
            f"{number:02d} | {item.name} | {item.category} | {item.unit} | {item.price} | bin {item.bin} "
            f"| qty {rng.randint(1, MAX_QUANTITY)}"
        )
    lines.append(f"end of ledger {ledger}")
    return "\n".join(lines) + "\n"


def held_out_documents(count: int = VALID_DOCUMENTS, seed: int = DEFAULT_SEED) -> list[str]:
    """The first ``count`` held-out documents (the same ones whatever the training set's size)."""
    return [generate_document(document_rng(seed, "valid", i)) for i in range(count)]


def records_corpus(
    seed: int = DEFAULT_SEED, train_documents: int = TRAIN_DOCUMENTS, valid_documents: int = VALID_DOCUMENTS
) -> dict[str, list[str]]:
    """``{"train": [...], "valid": [...]}`` documents; a training draw equal to a held-out document is
    skipped (and the next index drawn), so the parts never share a document."""
    if train_documents < 1 or valid_documents < 1:
        raise ValueError(
            f"train_documents={train_documents} and valid_documents={valid_documents} must both be >= 1"
        )
    valid = held_out_documents(valid_documents, seed)
    held_out = set(valid)
    train: list[str] = []
    index = 0
    while len(train) < train_documents:
        document = generate_document(document_rng(seed, "train", index))
        if document not in held_out:
            train.append(document)
        index += 1
    return {"train": train, "valid": valid}


def opening(document: str, lines: int = 3) -> str:
    """The first ``lines`` lines of ``document`` (newlines kept): a prompt that starts a document."""
    kept = document.split("\n")[:lines]
    if len(kept) < lines:
        raise ValueError(f"the document has fewer than {lines} lines; ask for a shorter opening")
    return "\n".join(kept) + "\n"


_HEADER = re.compile(r"ledger (\d{4}) \| store (\w+) \| week (\d{1,2}) \| (\d{1,2}) lines")
_LINE = re.compile(r"(\d{2}) \| (\w+) \| (\w+) \| (\w+) \| (\d+\.\d{2}) \| bin (\w+) \| qty (\d+)")
_FOOTER = re.compile(r"end of ledger (\d{4})")


def check_records(text: str) -> list[str | None]:
    """One entry per complete (newline-ended) line of ``text``, a document or its beginning: None when
    the line keeps every rule of the format given the lines before it, else what is wrong with it.

    The header fixes the ledger number and the line count; record ``k`` must be numbered ``k``, carry
    its item's catalogue fields, and name an item later in catalogue order than the last valid record
    (counting round from the first record's item, and leaving a later place for every record still
    announced: no item twice); after the last announced record comes the footer, then nothing.
    """
    results: list[str | None] = []
    ledger, count, record, ended = None, None, 0, False
    first, reached = 0, -1  # the first record's catalogue place; the last valid record's, from there
    for position, line in enumerate(text.split("\n")[:-1]):
        if position == 0:
            results.append(_check_header(line))
            if (header := _HEADER.fullmatch(line)) is not None:
                ledger, count = header[1], int(header[4])
        elif ended:
            results.append("a line after the footer; the document should have ended")
        elif count is not None and record == count:
            footer = _FOOTER.fullmatch(line)
            if footer is None:
                results.append(f"expected the footer 'end of ledger {ledger}' after {count} lines")
            else:
                results.append(
                    None if footer[1] == ledger else f"footer ledger {footer[1]} != header {ledger}"
                )
            ended = True
        else:
            record += 1
            problem = _check_line(line, record)
            if problem is None:
                name = line.split(" | ")[1]
                if record == 1:
                    first = _NAMES.index(name)
                place = (_NAMES.index(name) - first) % len(_NAMES)
                # The records still announced need places of their own before the walk comes round.
                last_place = len(_NAMES) - 1 - ((count or record) - record)
                if not reached < place <= last_place:
                    previous = _NAMES[(first + reached) % len(_NAMES)]
                    problem = f"{name} does not come after {previous} in catalogue order"
                else:
                    reached = place
            results.append(problem)
    return results


def _check_header(line: str) -> str | None:
    header = _HEADER.fullmatch(line)
    if header is None:
        return "not a header 'ledger NNNN | store NAME | week W | N lines'"
    if header[2] not in STORES:
        return f"unknown store {header[2]!r}"
    if not 1 <= int(header[3]) <= 52:
        return f"week {header[3]} is outside 1-52"
    if not MIN_LINES <= int(header[4]) <= MAX_LINES:
        return f"{header[4]} lines is outside {MIN_LINES}-{MAX_LINES}"
    return None


def _check_line(line: str, record: int) -> str | None:
    fields = _LINE.fullmatch(line)
    if fields is None:
        return "not a record 'NN | item | category | unit | price | bin B | qty Q'"
    number, name, category, unit, price, bin_, quantity = fields.groups()
    if int(number) != record:
        return f"line number {number}, expected {record:02d}"
    item = CATALOGUE.get(name)
    if item is None:
        return f"unknown item {name!r}"
    for field, value, expected in (
        ("category", category, item.category),
        ("unit", unit, item.unit),
        ("price", price, item.price),
        ("bin", bin_, item.bin),
    ):
        if value != expected:
            return f"{name}: {field} {value!r}, the catalogue says {expected!r}"
    if not 1 <= int(quantity) <= MAX_QUANTITY:
        return f"qty {quantity} is outside 1-{MAX_QUANTITY}"
    return None


@dataclass(frozen=True)
class RecordsData:
    """Paths written by ``prepare_records`` (prefixes are without .bin/.idx/.json)."""

    root: Path
    tokenizer: Path
    train: Path
    valid: Path


def default_records_dir() -> Path:
    return Path(os.environ.get(RECORDS_DIR_ENV, DEFAULT_RECORDS_DIR))


def prepare_records(
    out_dir: str | Path | None = None,
    seed: int = DEFAULT_SEED,
    train_documents: int = TRAIN_DOCUMENTS,
    valid_documents: int = VALID_DOCUMENTS,
    vocab_size: int = VOCAB_SIZE,
    workers: int | None = None,
    progress: bool = True,
) -> RecordsData:
    """Generate the corpus, train its tokenizer and write both parts as indexed datasets in ``out_dir``;
    reuse what is finished for the same seed, sizes and vocabulary."""
    root = Path(out_dir) if out_dir is not None else default_records_dir()
    workers = workers or min(2, os.cpu_count() or 1)
    parts = records_corpus(seed, train_documents, valid_documents)
    recipe = {
        "generator": "data.records",
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "train_documents": train_documents,
        "valid_documents": valid_documents,
        "vocab_size": vocab_size,
    }
    tokenizer_dir, recipe_file = root / "tokenizer", root / "corpus.json"
    reuse = tokenizer_dir.is_dir() and recipe_file.is_file() and json.loads(recipe_file.read_text()) == recipe
    if reuse:
        info = load_tokenizer_info(tokenizer_dir)
    else:
        # Trained on the training part only: held-out documents stay unseen by every learned component.
        info = train_tokenizer(parts["train"], tokenizer_dir, vocab_size)
        if info.vocab_size != vocab_size:
            raise ValueError(
                f"the records corpus yields only {info.vocab_size} BPE tokens; ask for vocab_size <= that "
                f"(and set model.vocab_size to match)"
            )
        root.mkdir(parents=True, exist_ok=True)
        recipe_file.write_text(json.dumps(recipe, indent=2) + "\n")
    origin = {k: v for k, v in recipe.items() if k != "vocab_size"}
    prefixes = {}
    for part, texts in parts.items():
        prefix = root / f"records_{part}"
        # The records folder is ours: a corpus of another seed or size replaces what was there.
        preprocess(
            Texts(f"records_{part}", texts, origin),
            prefix,
            info,
            workers=workers,
            shard_docs=SHARD_DOCS,
            overwrite=True,
            progress=progress,
        )
        prefixes[part] = prefix
    return RecordsData(root=root, tokenizer=tokenizer_dir, train=prefixes["train"], valid=prefixes["valid"])
