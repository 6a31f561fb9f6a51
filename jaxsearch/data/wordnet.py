"""WordNet 3.0 as a retrieval corpus with real questions: named entities, their glosses, and
the located-in (part holonym) graph between them.

Source: the WordNet database files (`data.noun`, ...; Debian's `wordnet-base` installs them
in /usr/share/wordnet). Each synset is one line (wndb(5)):

  offset lex_filenum ss_type w_cnt (word lex_id){w_cnt} p_cnt (symbol offset pos st){p_cnt}
      [f_cnt (+ f_num w_num){f_cnt}]   (verbs only)   | gloss

`offset` is 8 decimal digits, `lex_filenum` 2 decimal digits (an index into `LEXNAMES`),
`ss_type` one of n v a s r, `w_cnt` 2 HEX digits, `lex_id` 1 hex digit, `p_cnt` 3 decimal
digits, a pointer's `st` (source/target word numbers) 4 hex digits. Lines that start with a
space are the licence header. A malformed line raises `WordNetFormatError` (a `ValueError`)
whose message starts with `path:line:`.

Derived data (what `derive_entities` computes, on WordNet 3.0):

  entity       a noun synset with an instance hypernym (`@i`): 7,730 of the 82,115 noun
               synsets (people, places, works, events ...). Its document is Search-R1
               `{"id": "wn-<offset>", "contents": "\\"<first name>\\"\\n<gloss>"}`.
  located_in   the part holonyms (`#p`) of an entity that are entities too: 3,609 edges
               out of 3,056 entities ("Abadan" -> "Iran").
  2-hop chain  X -> Y -> Z along located_in: 4,736 chains from 2,739 start entities
               ("Abadan" -> "Iran" -> "Asia"). DESIGN.md's "3,379 two-hop chains" was not
               reproduced by any count tried (one holonym per entity: 2,718 chains; X with a
               single located-in: 3,411; all instance synsets, any part holonym: 4,950);
               the numbers above are pinned by tests/data/wordnet_test.py.
  hypernym_path  root-first offsets of the entity's class chain: its first `@i` target,
               then that synset's first `@` hypernym, up to `entity` (00001740); a
               hierarchical docID for generative retrieval.

The shipped asset `assets/wordnet_entities.jsonl.gz` holds one row per entity (id, contents,
names, located_in, instance_of, hypernym_path, lex_file); `assets/WORDNET_LICENSE` is the
WordNet 3.0 licence, copied verbatim from the header of `data.noun`.
`experiments/derive_wordnet.py` regenerates both, byte for byte.

Questions (`wordnet_questions`), over entities split train / validation / test by seed (a
test entity is never the subject of a train question or query):

  retrieval "name"         the entity's first name that no other entity has -> its document.
  retrieval "description"  its gloss's definition (before the first example) with every
                           one of its names removed -> its document (and any entity with the
                           same description).
  QA 1-hop   "What is X located in?" -> every name of every located_in entity of X.
  QA 2-hop   "X is in a place that is part of what?" -> every name of every Z with
             X -> Y -> Z; the supporting documents (X, Y) follow the first such Y.
             (Part holonyms also link battles to wars, books to testaments and periods to
             eras: for an X outside `PLACE_LEX_FILES` the questions read "What is X part
             of?" and "X is part of something that is part of what?".)

The corpus side (a `jaxsearch.retrieval.corpus.Corpus`) is
`jaxsearch.retrieval.corpus.load_wordnet_corpus`, which reads the same asset with the
Search-R1 loader (`data/` may not import `retrieval/`).

Example:
  >>> entities = load_wordnet_entities()
  >>> len(entities), [e.title for e in entities if e.doc_id == "wn-08911602"]
  (7730, ['Abadan'])
  >>> q = wordnet_questions(entities, seed=0)
  >>> x = next(x for x in q.qa["train"] if x.qid == "wn2-08911602")
  >>> x.question, x.answers
  ('Abadan is in a place that is part of what?', ('Middle East', 'Mideast', 'Near East', \
'Asia', 'Gulf States'))
  >>> x.supporting_doc_ids, x.bridge_answers
  (('wn-08911602', 'wn-08910668'), ('Iran',))
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from jaxsearch.data.world import SPLITS, Question

Qrels = dict[str, dict[str, int]]   # query id -> {doc id: relevance grade}

ASSET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
ENTITIES_ASSET = os.path.join(ASSET_DIR, "wordnet_entities.jsonl.gz")
LICENSE_ASSET = os.path.join(ASSET_DIR, "WORDNET_LICENSE")
DEFAULT_WORDNET_DIR = "/usr/share/wordnet"

# lexnames(5): lex_filenum -> lexicographer file name.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance",
    "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion",
    "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)
# Pointer symbols of all parts of speech (wninput(5)).
POINTER_SYMBOLS = frozenset({
    "!", "@", "@i", "~", "~i", "#m", "#s", "#p", "%m", "%s", "%p", "=", "+", ";c", "-c",
    ";r", "-r", ";u", "-u", "*", ">", "^", "$", "&", "<", "\\",
})
SS_TYPES = ("n", "v", "a", "s", "r")
_FILE_SS_TYPES = {"noun": ("n",), "verb": ("v",), "adj": ("a", "s"), "adv": ("r",)}
ROOT_OFFSET = "00001740"   # entity.n.01
INSTANCE_HYPERNYM, HYPERNYM, PART_HOLONYM = "@i", "@", "#p"
RETRIEVAL_KINDS = ("name", "description")
# Entities whose part holonyms are places (cities, rivers, buildings ...); the others'
# (battles of a war, books of a testament, periods of an era) are asked as "part of".
PLACE_LEX_FILES = frozenset({"noun.location", "noun.object", "noun.artifact"})
QA_KINDS = ("wordnet_located_in", "wordnet_located_in_2hop")
# More question kinds for the search agent (`agent_questions`): the class an entity is an
# instance of, and a person's birth year as written in the gloss.
CATEGORY_KIND, BIRTH_YEAR_KIND = "wordnet_category", "wordnet_birth_year"
AGENT_KINDS = (*QA_KINDS, CATEGORY_KIND, BIRTH_YEAR_KIND)
# A person's life span at the end of a gloss: "(1612-1672)"; circa and BC dates are left out.
_LIFE_SPAN_RE = re.compile(r"\((\d{3,4})-\d{2,4}\)\s*$")

_OFFSET_RE = re.compile(r"^\d{8}$")
_HEX_RE = re.compile(r"^[0-9a-fA-F]+$")


class WordNetFormatError(ValueError):
  """A malformed line of a WordNet data file or of the entity JSONL (`path:line: message`)."""

  def __init__(self, path: str | os.PathLike, line: int, message: str):
    self.path = os.fspath(path)
    self.line = line
    super().__init__(f"{self.path}:{line}: {message}")


# ----------------------------------------------------------------------------------------
# Database files
# ----------------------------------------------------------------------------------------


class Pointer(NamedTuple):
  """One relation of a synset: `symbol` to synset `offset` of part of speech `pos`."""

  symbol: str    # e.g. "@i" (instance hypernym), "#p" (part holonym)
  offset: str    # target synset, 8 digits
  pos: str       # target's ss_type: n v a s r
  source: int    # word number in this synset (0: the whole synset, a semantic pointer)
  target: int    # word number in the target synset (0: the whole synset)


class Synset(NamedTuple):
  """One line of a WordNet data file."""

  offset: str                    # 8 digits (its byte offset in the file)
  lex_filenum: int               # index into LEXNAMES
  ss_type: str                   # n v a s r
  words: tuple[str, ...]         # lemmas as stored ("Mark_Twain"; adjectives may end "(p)")
  lex_ids: tuple[int, ...]       # one per word
  pointers: tuple[Pointer, ...]
  gloss: str                     # definition and examples, stripped
  line: int                      # 1-based line number in its file


def _parse_line(path: str, lineno: int, line: str, allowed: Sequence[str] | None) -> Synset:
  def fail(message: str):
    raise WordNetFormatError(path, lineno, message)

  if "|" not in line:
    fail("missing '| gloss' separator")
  data, gloss = line.split("|", 1)
  fields = data.split()
  if len(fields) < 6:
    fail(f"expected 'offset lex_filenum ss_type w_cnt word lex_id ... p_cnt', got "
         f"{len(fields)} fields: {data.strip()[:80]!r}")
  offset, lex_text, ss_type, w_text = fields[:4]
  if not _OFFSET_RE.match(offset):
    fail(f"synset offset must be 8 decimal digits, got {offset!r}")
  if not (len(lex_text) == 2 and lex_text.isdigit() and int(lex_text) < len(LEXNAMES)):
    fail(f"lex_filenum must be 2 digits in 00..{len(LEXNAMES) - 1}, got {lex_text!r}")
  if ss_type not in SS_TYPES:
    fail(f"ss_type must be one of {SS_TYPES}, got {ss_type!r}")
  if allowed is not None and ss_type not in allowed:
    fail(f"ss_type {ss_type!r} does not belong in this file (expected {allowed})")
  if not (len(w_text) == 2 and _HEX_RE.match(w_text)) or int(w_text, 16) == 0:
    fail(f"w_cnt must be 2 hexadecimal digits >= 01, got {w_text!r}")
  w_cnt = int(w_text, 16)
  pos = 4
  if len(fields) < pos + 2 * w_cnt + 1:
    fail(f"w_cnt {w_text!r} = {w_cnt} words, but the line ends after "
         f"{(len(fields) - pos) // 2} (word, lex_id) pairs")
  words, lex_ids = [], []
  for _ in range(w_cnt):
    word, lex_id = fields[pos], fields[pos + 1]
    if not (len(lex_id) == 1 and _HEX_RE.match(lex_id)):
      fail(f"lex_id of {word!r} must be 1 hexadecimal digit, got {lex_id!r}")
    words.append(word)
    lex_ids.append(int(lex_id, 16))
    pos += 2
  p_text = fields[pos]
  if not (len(p_text) == 3 and p_text.isdigit()):
    fail(f"p_cnt must be 3 decimal digits, got {p_text!r}")
  p_cnt = int(p_text)
  pos += 1
  if len(fields) < pos + 4 * p_cnt:
    fail(f"p_cnt {p_text} pointers, but the line ends after {(len(fields) - pos) // 4}")
  pointers = []
  for _ in range(p_cnt):
    symbol, target, target_pos, st = fields[pos:pos + 4]
    if symbol not in POINTER_SYMBOLS:
      fail(f"unknown pointer symbol {symbol!r}")
    if not _OFFSET_RE.match(target):
      fail(f"pointer {symbol} target must be an 8-digit offset, got {target!r}")
    if target_pos not in SS_TYPES:
      fail(f"pointer {symbol} {target}: pos must be one of {SS_TYPES}, got {target_pos!r}")
    if not (len(st) == 4 and _HEX_RE.match(st)):
      fail(f"pointer {symbol} {target}: source/target must be 4 hexadecimal digits, got "
           f"{st!r}")
    pointers.append(Pointer(symbol, target, target_pos, int(st[:2], 16), int(st[2:], 16)))
    pos += 4
  if ss_type == "v" and pos < len(fields):     # verb frames: f_cnt (+ f_num w_num)*
    f_text = fields[pos]
    if not f_text.isdigit():
      fail(f"f_cnt must be decimal digits, got {f_text!r}")
    f_cnt = int(f_text)
    frames = fields[pos + 1:pos + 1 + 3 * f_cnt]
    if len(frames) != 3 * f_cnt or any(frames[i] != "+" for i in range(0, len(frames), 3)):
      fail(f"f_cnt {f_cnt} frames must follow as '+ f_num w_num', got {frames!r}")
    pos += 1 + 3 * f_cnt
  if pos != len(fields):
    fail(f"unexpected fields after the pointers: {' '.join(fields[pos:])[:80]!r}")
  return Synset(offset=offset, lex_filenum=int(lex_text), ss_type=ss_type, words=tuple(words),
                lex_ids=tuple(lex_ids), pointers=tuple(pointers), gloss=gloss.strip(),
                line=lineno)


def parse_data_file(path: str | os.PathLike, *, pos: str | None = None) -> dict[str, Synset]:
  """Parses a WordNet data file (`data.noun`, `data.verb`, `data.adj`, `data.adv`).

  Args:
    path: The file.
    pos: "noun", "verb", "adj" or "adv" to also check every line's ss_type belongs there
      (default: taken from a `data.<pos>` file name, else unchecked).

  Returns:
    {offset: Synset} in file order.

  Raises:
    WordNetFormatError: a malformed line or a duplicate offset (message `path:line: ...`).

  Example:
    >>> synsets = parse_data_file("/usr/share/wordnet/data.noun")    # doctest: +SKIP
    >>> synsets["08911602"].words, synsets["08911602"].pointers[0].symbol   # doctest: +SKIP
    (('Abadan',), '@i')
  """
  path = os.fspath(path)
  if pos is None:
    suffix = os.path.basename(path).rsplit(".", 1)[-1]
    pos = suffix if suffix in _FILE_SS_TYPES else None
  elif pos not in _FILE_SS_TYPES:
    raise ValueError(f"pos must be one of {sorted(_FILE_SS_TYPES)}, got {pos!r}")
  allowed = _FILE_SS_TYPES[pos] if pos else None
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such WordNet data file: {path}")
  synsets: dict[str, Synset] = {}
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise WordNetFormatError(path, lineno, f"invalid UTF-8 ({e.reason})") from None
      line = line.rstrip("\r\n")
      if not line.strip() or line.startswith(" "):   # blank, or the licence header
        continue
      synset = _parse_line(path, lineno, line, allowed)
      if synset.offset in synsets:
        raise WordNetFormatError(path, lineno, f"duplicate synset offset {synset.offset} "
                                f"(first on line {synsets[synset.offset].line})")
      synsets[synset.offset] = synset
  if not synsets:
    raise ValueError(f"{path}: no synsets")
  return synsets


def read_license(wordnet_dir: str | os.PathLike = DEFAULT_WORDNET_DIR) -> str:
  """The WordNet licence: the header of `data.noun` with its line numbers removed.

  Example:
    >>> read_license().splitlines()[0]   # doctest: +SKIP
    'This software and database is being provided to you, the LICENSEE, by'
  """
  path = os.path.join(os.fspath(wordnet_dir), "data.noun")
  lines = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      if not line.startswith(" "):
        break
      lines.append(re.sub(r"^\s*\d+ ?", "", line.rstrip("\r\n")).rstrip())
  if not lines:
    raise ValueError(f"{path}: no licence header (lines starting with a space)")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------
# Entities
# ----------------------------------------------------------------------------------------


def _name(word: str) -> str:
  return re.sub(r"\((?:a|p|ip)\)$", "", word).replace("_", " ")


def _unique(items: Iterable[str]) -> list[str]:
  return list(dict.fromkeys(items))


def derive_entities(wordnet_dir: str | os.PathLike = DEFAULT_WORDNET_DIR) -> list[dict[str, Any]]:
  """The named entities of `wordnet_dir/data.noun` as asset rows, in offset order.

  Each row: {"id": "wn-<offset>", "contents": '"<first name>"\\n<gloss>', "names": [...],
  "located_in": [entity ids of its part holonyms, pointer order], "instance_of": [first name
  of each instance hypernym], "hypernym_path": [root-first class offsets], "lex_file": str}.

  Raises:
    WordNetFormatError: a malformed line, or an `@i` / `@` / `#p` pointer to a noun synset
      that the file lacks (named by the pointing line), or a hypernym cycle.

  Example:
    >>> rows = derive_entities("/usr/share/wordnet")        # doctest: +SKIP
    >>> len(rows), rows[0]["id"]                            # doctest: +SKIP
    (7730, 'wn-...')
  """
  path = os.path.join(os.fspath(wordnet_dir), "data.noun")
  synsets = parse_data_file(path, pos="noun")
  followed = (INSTANCE_HYPERNYM, HYPERNYM, PART_HOLONYM)
  for s in synsets.values():
    for p in s.pointers:
      if p.symbol in followed and p.pos == "n" and p.offset not in synsets:
        raise WordNetFormatError(path, s.line, f"pointer {p.symbol} {p.offset} n names a "
                                "synset that is not in the file")
  entities = {o for o, s in synsets.items()
              if any(p.symbol == INSTANCE_HYPERNYM for p in s.pointers)}
  paths: dict[str, list[str]] = {}

  def class_path(offset: str) -> list[str]:
    """Root-first offsets ending at `offset`, following first hypernyms."""
    chain, seen = [], set()
    node = offset
    while node is not None and node not in paths:
      if node in seen:
        raise WordNetFormatError(path, synsets[node].line, f"hypernym cycle through {node}")
      seen.add(node)
      chain.append(node)
      node = next((p.offset for p in synsets[node].pointers
                   if p.symbol in (HYPERNYM, INSTANCE_HYPERNYM) and p.pos == "n"), None)
    prefix = paths[node] if node is not None else []
    for i in range(len(chain) - 1, -1, -1):
      paths[chain[i]] = prefix + [chain[i]]
      prefix = paths[chain[i]]
    return paths[offset]

  rows = []
  for offset in sorted(entities, key=int):
    s = synsets[offset]
    names = _unique(_name(w) for w in s.words)
    classes = [p.offset for p in s.pointers if p.symbol == INSTANCE_HYPERNYM]
    rows.append({
        "id": f"wn-{offset}",
        "contents": f'"{names[0]}"\n{s.gloss}',
        "names": names,
        "located_in": _unique(f"wn-{p.offset}" for p in s.pointers
                              if p.symbol == PART_HOLONYM and p.pos == "n"
                              and p.offset in entities),
        "instance_of": _unique(_name(synsets[c].words[0]) for c in classes),
        "hypernym_path": class_path(classes[0]),
        "lex_file": LEXNAMES[s.lex_filenum],
    })
  return rows


def write_entities_jsonl(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
  """Writes asset rows as JSONL, gzip-compressed when `path` ends in .gz, byte-deterministic
  (no timestamp or file name in the gzip header).

  Example:
    >>> write_entities_jsonl(derive_entities(), "wordnet_entities.jsonl.gz")  # doctest: +SKIP
  """
  data = "".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
  path = os.fspath(path)
  with open(path, "wb") as f:
    if path.endswith(".gz"):
      with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    else:
      f.write(data)


def write_assets(wordnet_dir: str | os.PathLike = DEFAULT_WORDNET_DIR,
                 out_dir: str | os.PathLike = ASSET_DIR) -> dict[str, int]:
  """Derives the entities of `wordnet_dir` and writes `wordnet_entities.jsonl.gz` and
  `WORDNET_LICENSE` into `out_dir`; returns the counts of `graph_stats`.

  Example:
    >>> write_assets("/usr/share/wordnet", "/tmp/assets")["entities"]   # doctest: +SKIP
    7730
  """
  rows = derive_entities(wordnet_dir)
  os.makedirs(out_dir, exist_ok=True)
  write_entities_jsonl(rows, os.path.join(out_dir, "wordnet_entities.jsonl.gz"))
  with open(os.path.join(out_dir, "WORDNET_LICENSE"), "w", encoding="utf-8") as f:
    f.write(read_license(wordnet_dir))
  return graph_stats(rows)


@dataclasses.dataclass(frozen=True)
class WordNetEntity:
  """One entity row of the asset.

  Attributes:
    doc_id: "wn-<offset>".
    title: Its first name (the document title).
    text: Its gloss.
    names: All its names, the title first.
    located_in: Ids of the entities it is part of (part holonyms), WordNet's order.
    instance_of: First names of its classes (instance hypernyms), e.g. ("port",).
    hypernym_path: Root-first 8-digit offsets of its first class's hypernym chain.
    lex_file: Lexicographer file, e.g. "noun.location".
  """

  doc_id: str
  title: str
  text: str
  names: tuple[str, ...]
  located_in: tuple[str, ...]
  instance_of: tuple[str, ...]
  hypernym_path: tuple[str, ...]
  lex_file: str

  @property
  def contents(self) -> str:
    return f'"{self.title}"\n{self.text}'


def _jsonl_objects(path: str) -> Iterable[tuple[int, dict[str, Any]]]:
  """(1-based line, object) per non-blank line of a JSONL file, gzip recognised by magic."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such file: {path}")
  with open(path, "rb") as f:
    gzipped = f.read(2) == b"\x1f\x8b"
  with (gzip.open if gzipped else open)(path, "rb") as f:
    try:
      for lineno, raw in enumerate(f, start=1):
        if not raw.strip():
          continue
        try:
          obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
          raise WordNetFormatError(path, lineno, f"invalid UTF-8 ({e.reason})") from None
        except json.JSONDecodeError as e:
          raise WordNetFormatError(path, lineno, f"invalid JSON ({e.msg} at column {e.colno})"
                                   ) from None
        if not isinstance(obj, dict):
          raise WordNetFormatError(path, lineno,
                                   f"expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj
    except (OSError, EOFError) as e:  # truncated or corrupt gzip stream
      raise ValueError(f"{path}: cannot read: {e}") from None


def _str(path, lineno: int, obj: Mapping[str, Any], key: str) -> str:
  value = obj.get(key)
  if not isinstance(value, str) or not value:
    raise WordNetFormatError(path, lineno, f"field {key!r} must be a non-empty string, got "
                             f"{value!r} (fields: {sorted(obj)})"[:200])
  return value


def _str_list(path, lineno: int, obj: Mapping[str, Any], key: str, *,
              nonempty: bool = False) -> tuple[str, ...]:
  value = obj.get(key)
  if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
    raise WordNetFormatError(path, lineno, f"field {key!r} must be a list of non-empty strings, "
                            f"got {value!r}"[:200])
  if nonempty and not value:
    raise WordNetFormatError(path, lineno, f"field {key!r} must not be empty")
  return tuple(value)


def load_wordnet_entities(path: str | os.PathLike | None = None) -> tuple[WordNetEntity, ...]:
  """Reads the entity asset (default: the shipped `assets/wordnet_entities.jsonl.gz`).

  Rows are Search-R1 rows (`id`, `contents` = quoted title, newline, text; the corpus side
  is read by `jaxsearch.retrieval.corpus.load_wordnet_corpus`) plus: names, located_in,
  instance_of and hypernym_path, lists of strings, and lex_file. The title must be the first
  name, ids unique, and every located_in id an entity of the file.

  Raises:
    WordNetFormatError: naming the path and 1-based line of the bad row (bad JSON or UTF-8,
      a missing or mistyped field, a duplicate id, an unknown located_in id).

  Example:
    >>> entities = load_wordnet_entities()
    >>> entities[0].doc_id.startswith("wn-"), entities[0].title == entities[0].names[0]
    (True, True)
  """
  path = ENTITIES_ASSET if path is None else os.fspath(path)
  out: list[WordNetEntity] = []
  first_line: dict[str, int] = {}
  for lineno, obj in _jsonl_objects(path):
    doc_id = _str(path, lineno, obj, "id")
    if doc_id in first_line:
      raise WordNetFormatError(path, lineno, f"duplicate document id {doc_id!r} (first on line "
                              f"{first_line[doc_id]})")
    first_line[doc_id] = lineno
    contents = _str(path, lineno, obj, "contents")
    match = re.fullmatch(r'"([^\n]*)"\n(.*)', contents, flags=re.DOTALL)
    if match is None:
      raise WordNetFormatError(path, lineno, "contents must be '\"<title>\"\\n<gloss>', got "
                               f"{contents[:60]!r}")
    title, text = match.groups()
    names = _str_list(path, lineno, obj, "names", nonempty=True)
    if title != names[0]:
      raise WordNetFormatError(path, lineno, f"the title {title!r} must be the first name, got "
                              f"names {list(names)}")
    lex_file = _str(path, lineno, obj, "lex_file")
    out.append(WordNetEntity(
        doc_id=doc_id, title=title, text=text,
        names=names, located_in=_str_list(path, lineno, obj, "located_in"),
        instance_of=_str_list(path, lineno, obj, "instance_of"),
        hypernym_path=_str_list(path, lineno, obj, "hypernym_path"), lex_file=lex_file))
  if not out:
    raise ValueError(f"{path}: no entities")
  for e in out:
    unknown = next((d for d in e.located_in if d not in first_line), None)
    if unknown is not None:
      raise WordNetFormatError(path, first_line[e.doc_id], f"located_in id {unknown!r} is not "
                              "an entity of this file")
  return tuple(out)


def _as_rows(entities: Sequence[WordNetEntity | Mapping[str, Any]]) -> list[dict[str, Any]]:
  return [{"id": e.doc_id, "names": list(e.names), "located_in": list(e.located_in)}
          if isinstance(e, WordNetEntity) else dict(e) for e in entities]


def two_hop_chains(entities: Sequence[WordNetEntity | Mapping[str, Any]]
                   ) -> list[tuple[str, str, str]]:
  """All (X, Y, Z) ids with Y in located_in(X) and Z in located_in(Y), in entity order.

  Example:
    >>> rows = [{"id": "a", "located_in": ["b"]}, {"id": "b", "located_in": ["c"]},
    ...         {"id": "c", "located_in": []}]
    >>> two_hop_chains(rows)
    [('a', 'b', 'c')]
  """
  located = {r["id"]: r["located_in"] for r in _as_rows(entities)}
  return [(x, y, z) for x, ys in located.items() for y in ys for z in located.get(y, ())]


def graph_stats(entities: Sequence[WordNetEntity | Mapping[str, Any]]) -> dict[str, int]:
  """Counts: entities, located_in edges, entities with one, 2-hop chains, their start
  entities.

  Example:
    >>> graph_stats([{"id": "a", "located_in": ["b"]}, {"id": "b", "located_in": []}])
    {'entities': 2, 'located_in_edges': 1, 'located_entities': 1, 'two_hop_chains': 0, \
'two_hop_subjects': 0}
  """
  rows = _as_rows(entities)
  chains = two_hop_chains(rows)
  return {"entities": len(rows),
          "located_in_edges": sum(len(r["located_in"]) for r in rows),
          "located_entities": sum(1 for r in rows if r["located_in"]),
          "two_hop_chains": len(chains),
          "two_hop_subjects": len({c[0] for c in chains})}


# ----------------------------------------------------------------------------------------
# Questions
# ----------------------------------------------------------------------------------------


class RetrievalQueries(NamedTuple):
  """Queries and their judgements (every relevant document has grade 1)."""

  queries: dict[str, str]   # query id -> text
  qrels: Qrels              # query id -> {doc id: 1}


class WordNetQuestions(NamedTuple):
  """Retrieval queries and QA questions, by entity split."""

  retrieval: dict[str, dict[str, RetrievalQueries]]   # kind -> split -> queries
  qa: dict[str, tuple[Question, ...]]                 # split -> 1-hop then 2-hop questions
  entity_split: dict[str, str]                        # entity id -> its split


def merge_queries(parts: Iterable[RetrievalQueries]) -> RetrievalQueries:
  """One `RetrievalQueries` from several (ids must not clash), e.g. all splits of a kind.

  Example:
    >>> a = RetrievalQueries({"q1": "x"}, {"q1": {"d": 1}})
    >>> merge_queries([a, RetrievalQueries({"q2": "y"}, {"q2": {"e": 1}})]).queries
    {'q1': 'x', 'q2': 'y'}
  """
  queries: dict[str, str] = {}
  qrels: Qrels = {}
  for part in parts:
    clash = next((q for q in part.queries if q in queries), None)
    if clash is not None:
      raise ValueError(f"query id {clash!r} appears in two parts")
    queries.update(part.queries)
    qrels.update(part.qrels)
  return RetrievalQueries(queries, qrels)


def remove_names(text: str, names: Iterable[str]) -> str:
  """`text` with every whole-word, case-insensitive occurrence of `names` removed (longest
  first), whitespace and stranded punctuation tidied.

  Example:
    >>> remove_names("Twain wrote Tom Sawyer; Mark Twain , humorist", ["Mark Twain", "Twain"])
    'wrote Tom Sawyer; humorist'
  """
  for name in sorted(set(names), key=len, reverse=True):
    text = re.sub(rf"(?<!\w){re.escape(name)}(?!\w)", " ", text, flags=re.IGNORECASE)
  text = re.sub(r"\s+([,;:.)])", r"\1", re.sub(r"\s+", " ", text))
  text = re.sub(r"([;,:])(?:\s*[;,:])+", r"\1", text)
  text = re.sub(r"\(\s*\)", "", text)
  return text.strip(" ,;:")


def description(entity: WordNetEntity) -> str:
  """The entity's gloss definition (before its first quoted example) without its names.

  Example:
    >>> e = WordNetEntity(doc_id="wn-1", title="Abadan", text='a port city; "Abadan is hot"',
    ...                   names=("Abadan",), located_in=(), instance_of=("port",),
    ...                   hypernym_path=(), lex_file="noun.location")
    >>> description(e)
    'a port city'
  """
  definition = re.split(r';\s*"', entity.text, maxsplit=1)[0]
  return remove_names(definition, entity.names)


def split_entities(ids: Sequence[str], *, seed: int = 0,
                   fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, str]:
  """Assigns each id to a split: a seeded permutation of the sorted ids, cut by `fractions`
  (train, validation, test).

  Example:
    >>> split = split_entities([f"e{i}" for i in range(10)], seed=0)
    >>> sorted(collections.Counter(split.values()).items())  # doctest: +SKIP
    [('test', 1), ('train', 8), ('validation', 1)]
  """
  if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
    raise ValueError(f"fractions must be 3 non-negative numbers (train, validation, test) "
                     f"summing to 1, got {tuple(fractions)}")
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ValueError(f"seed must be an int, got {seed!r}")
  ordered = sorted(ids)
  perm = np.random.default_rng(seed).permutation(len(ordered))
  n_train = round(len(ordered) * fractions[0])
  n_val = min(len(ordered) - n_train, round(len(ordered) * fractions[1]))
  out = {}
  for rank, i in enumerate(perm):
    out[ordered[i]] = ("train" if rank < n_train else
                       "validation" if rank < n_train + n_val else "test")
  return out


def wordnet_questions(entities: Sequence[WordNetEntity] | None = None, *, seed: int = 0,
                      fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> WordNetQuestions:
  """Retrieval queries and located-in QA questions over WordNet entities (see the module
  docstring for the kinds), split by entity with `split_entities(seed, fractions)`.

  Args:
    entities: From `load_wordnet_entities` (default: the shipped asset).
    seed: Split seed.
    fractions: (train, validation, test) fractions of the entities.

  Returns:
    `WordNetQuestions`. Query ids are "name-<offset>" and "desc-<offset>"; question ids
    "wn1-<offset>" / "wn2-<offset>" (the subject's offset). Questions are
    `jaxsearch.data.world.Question`s: answers hold every name of every correct entity;
    supporting_doc_ids, search_queries and bridge_answers follow the hops.

  Example:
    >>> q = wordnet_questions(seed=0)
    >>> sorted(q.retrieval), sorted(q.qa)
    (['description', 'name'], ['test', 'train', 'validation'])
  """
  if entities is None:
    entities = load_wordnet_entities()
  entities = tuple(entities)
  by_id = {e.doc_id: e for e in entities}
  if len(by_id) != len(entities):
    raise ValueError("entities must have unique doc_ids")
  split_of = split_entities(list(by_id), seed=seed, fractions=fractions)

  names = unique_names(entities)
  descriptions = {e.doc_id: description(e) for e in entities}
  same_description: dict[str, list[str]] = {}
  for doc_id, d in descriptions.items():
    same_description.setdefault(d.lower(), []).append(doc_id)

  retrieval = {k: {s: RetrievalQueries({}, {}) for s in SPLITS} for k in RETRIEVAL_KINDS}
  qa: dict[str, list[Question]] = {s: [] for s in SPLITS}
  two_hop: dict[str, list[Question]] = {s: [] for s in SPLITS}
  for e in entities:
    split = split_of[e.doc_id]
    offset = e.doc_id.removeprefix("wn-")
    name = names.get(e.doc_id)
    if name is not None:
      part = retrieval["name"][split]
      part.queries[f"name-{offset}"] = name
      part.qrels[f"name-{offset}"] = {e.doc_id: 1}
    desc = descriptions[e.doc_id]
    if len(desc.split()) >= 2:
      part = retrieval["description"][split]
      part.queries[f"desc-{offset}"] = desc
      part.qrels[f"desc-{offset}"] = {d: 1 for d in same_description[desc.lower()]}
    place = e.lex_file in PLACE_LEX_FILES
    if e.located_in:
      answers = _unique(n for y in e.located_in for n in by_id[y].names)
      template = "What is {} located in?" if place else "What is {} part of?"
      qa[split].append(Question(
          qid=f"wn1-{offset}", question=template.format(e.title),
          answers=tuple(answers), supporting_doc_ids=(e.doc_id,), hops=1,
          search_queries=(e.title,), bridge_answers=(), kind=QA_KINDS[0]))
    bridges = [y for y in e.located_in if by_id[y].located_in]
    if bridges:
      answers = _unique(n for y in bridges for z in by_id[y].located_in for n in by_id[z].names)
      bridge = by_id[bridges[0]]
      template = ("{} is in a place that is part of what?" if place else
                  "{} is part of something that is part of what?")
      two_hop[split].append(Question(
          qid=f"wn2-{offset}", question=template.format(e.title),
          answers=tuple(answers), supporting_doc_ids=(e.doc_id, bridge.doc_id), hops=2,
          search_queries=(e.title, bridge.title), bridge_answers=(bridge.title,),
          kind=QA_KINDS[1]))
  return WordNetQuestions(retrieval=retrieval,
                          qa={s: tuple(qa[s] + two_hop[s]) for s in SPLITS},
                          entity_split=split_of)


def unique_names(entities: Sequence[WordNetEntity]) -> dict[str, str]:
  """Entity id -> its first name that no other entity has (entities without one are left out).

  Example:
    >>> unique_names(load_wordnet_entities())["wn-10808200"]   # "Adams" is ambiguous
    'John Adams'
  """
  owners: dict[str, set[str]] = {}
  for e in entities:
    for n in e.names:
      owners.setdefault(n.lower(), set()).add(e.doc_id)
  out = {}
  for e in entities:
    name = next((n for n in e.names if owners[n.lower()] == {e.doc_id}), None)
    if name is not None:
      out[e.doc_id] = name
  return out


def birth_year(entity: WordNetEntity) -> str | None:
  """The birth year of a person whose gloss ends with its life span, e.g. "(1612-1672)" ->
  "1612"; None otherwise (no span, circa or BC dates, not a person).

  Example:
    >>> e = WordNetEntity(doc_id="wn-1", title="Bradstreet", text="poet (1612-1672)",
    ...                   names=("Bradstreet",), located_in=(), instance_of=("poet",),
    ...                   hypernym_path=(), lex_file="noun.person")
    >>> birth_year(e)
    '1612'
  """
  if entity.lex_file != "noun.person":
    return None
  match = _LIFE_SPAN_RE.search(entity.text)
  return match.group(1) if match else None


def agent_questions(entities: Sequence[WordNetEntity] | None = None, *,
                    kinds: Sequence[str] = AGENT_KINDS, seed: int = 0,
                    fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, tuple[Question, ...]]:
  """Questions for a search agent over the WordNet entity glosses, split so that no test
  answer is ever a training answer.

  Kinds (`AGENT_KINDS`; pick any):
    wordnet_located_in       "What is X located in?" (1 hop; as `wordnet_questions`).
    wordnet_located_in_2hop  "X is in a place that is part of what?" (2 hops).
    wordnet_category         the classes X is an instance of: "What kind of place is X?"
                             (places), "What was X's occupation?" (people), "What kind of
                             thing is X?" (the rest) -> the first names of its instance
                             hypernyms ("port", "poet"); 1 hop, supported by X's gloss (which
                             names the class in 72% of entities).
    wordnet_birth_year       "In what year was X born?" for a person whose gloss ends with a
                             life span "(1612-1672)" -> "1612"; 1 hop.
  The new kinds name X by its first name no other entity has (`unique_names`; entities
  without one are skipped), so a question has one subject.

  Split by answer: the distinct first answers (lower-cased) are split with
  `split_entities(seed, fractions)` and each question follows its first answer; then a
  train or validation question sharing any answer (lower-cased) with a test question is
  dropped, and a train question sharing one with a validation question. So no held-out answer
  is ever trained on: a policy cannot score on the test split by memorising frequent answers
  ("town", "England"), only by searching and reading. (A subject may appear in two splits
  under different relations, e.g. its category in train and its location in test.) Within
  each split the questions are shuffled with `seed`, so a prefix of a split
  (`DataConfig.max_questions`) mixes the kinds.

  Returns:
    split -> questions (`Question.kind` is the kind; ids "wn1-", "wn2-", "wnc-", "wny-" +
    the subject's offset).

  Example:
    >>> q = agent_questions(kinds=("wordnet_birth_year",))
    >>> x = next(x for s in q.values() for x in s if x.qid == "wny-10808200")
    >>> x.question, x.answers, x.supporting_doc_ids
    ('In what year was John Adams born?', ('1735',), ('wn-10808200',))
  """
  unknown = sorted(set(kinds) - set(AGENT_KINDS))
  if unknown or not kinds:
    raise ValueError(f"kinds must be a non-empty subset of {AGENT_KINDS}, got {tuple(kinds)}")
  if entities is None:
    entities = load_wordnet_entities()
  entities = tuple(entities)
  located = wordnet_questions(entities, seed=seed, fractions=(1.0, 0.0, 0.0))
  questions = [q for q in located.qa["train"] if q.kind in kinds]
  names = unique_names(entities)
  for e in entities:
    name = names.get(e.doc_id)
    if name is None:
      continue
    offset = e.doc_id.removeprefix("wn-")
    if CATEGORY_KIND in kinds and e.instance_of:
      template = ("What was {}'s occupation?" if e.lex_file == "noun.person" else
                  "What kind of place is {}?" if e.lex_file in PLACE_LEX_FILES else
                  "What kind of thing is {}?")
      questions.append(Question(
          qid=f"wnc-{offset}", question=template.format(name), answers=tuple(e.instance_of),
          supporting_doc_ids=(e.doc_id,), hops=1, search_queries=(name,), bridge_answers=(),
          kind=CATEGORY_KIND))
    year = birth_year(e) if BIRTH_YEAR_KIND in kinds else None
    if year is not None:
      questions.append(Question(
          qid=f"wny-{offset}", question=f"In what year was {name} born?", answers=(year,),
          supporting_doc_ids=(e.doc_id,), hops=1, search_queries=(name,), bridge_answers=(),
          kind=BIRTH_YEAR_KIND))
  split_of = split_entities(sorted({q.answers[0].lower() for q in questions}), seed=seed,
                            fractions=fractions)
  by_split: dict[str, list[Question]] = {s: [] for s in SPLITS}
  for q in questions:
    by_split[split_of[q.answers[0].lower()]].append(q)

  def answers_of(qs):
    return {a.lower() for q in qs for a in q.answers}

  held = answers_of(by_split["test"])
  by_split["validation"] = [q for q in by_split["validation"]
                            if not answers_of([q]) & held]
  held |= answers_of(by_split["validation"])
  by_split["train"] = [q for q in by_split["train"] if not answers_of([q]) & held]
  rng = np.random.default_rng(seed)
  return {s: tuple(by_split[s][i] for i in rng.permutation(len(by_split[s]))) for s in SPLITS}
