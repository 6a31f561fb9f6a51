"""Tests for jaxsearch.data.wordnet: the data-file parser, entities, located-in chains,
questions, and the shipped asset."""
from __future__ import annotations

import gzip
import json
import os
import re
import tempfile

from absl.testing import absltest
from absl.testing import parameterized

from jaxsearch.data import wordnet as wn
from jaxsearch.retrieval import corpus as corpus_lib

WORDNET_DIR = "/usr/share/wordnet"
HAVE_WORDNET = os.path.isfile(os.path.join(WORDNET_DIR, "data.noun"))

HEADER = ["  1 This is the licence.  ", "  2 Second line of it.  "]
# 16 names: w_cnt "10" is hexadecimal (a decimal reader would take 10 words, then choke).
ZED_NAMES = ["Zedland"] + [f"Zed{chr(ord('a') + i)}" for i in range(15)]


def _line(offset: str, lex: str, words: list[str], pointers: list[str], gloss: str,
          w_cnt: str | None = None) -> str:
  w_cnt = w_cnt or f"{len(words):02x}"
  word_part = " ".join(f"{w} 0" for w in words)
  return (f"{offset} {lex} n {w_cnt} {word_part} {len(pointers):03d} "
          f"{' '.join(pointers)} | {gloss}  ".replace("  |", " |"))


# A hand-made noun file. Classes: entity (root) > region > city, country; battle under entity.
# Entities (with an @i pointer) and their #p part holonyms:
#   Zedland -> Moria;  Alpha City -> Zedland;  Beta Town -> Zedland (+ the class `city`, not
#   an entity);  Gamma Town -> Zedland;  Quiet River -> Alpha City;  Battle of Ix -> Great War;
#   Moria, Great War -> nothing.
SYNSETS = [
    _line("00001740", "03", ["entity"], ["~ 00002000 n 0000"], "that which exists"),
    _line("00002000", "15", ["region"], ["@ 00001740 n 0000"], "a large location"),
    _line("00003000", "15", ["city", "metropolis"], ["@ 00002000 n 0000"], "a large town"),
    _line("00004000", "15", ["country", "state"], ["@ 00002000 n 0000"], "a nation"),
    _line("00005000", "04", ["battle"], ["@ 00001740 n 0000"], "a fight"),
    _line("00010000", "15", ZED_NAMES, ["@i 00004000 n 0000", "#p 00030000 n 0000"],
          'a country in Moria; "Zedland is flat"'),
    _line("00020000", "15", ["Alpha_City"], ["@i 00003000 n 0000", "#p 00010000 n 0000"],
          "the capital of Zedland"),
    _line("00030000", "15", ["Moria"], ["@i 00002000 n 0000", "%p 00010000 n 0000"],
          "a continent"),
    _line("00040000", "15", ["Beta_Town", "Quiet"],
          ["@i 00003000 n 0000", "#p 00010000 n 0000", "#p 00003000 n 0000"],
          "a town in Zedland"),
    _line("00050000", "17", ["Quiet", "Quiet_River"], ["@i 00002000 n 0000",
                                                       "#p 00020000 n 0000"],
          "a river flowing through Alpha City"),
    _line("00060000", "04", ["Battle_of_Ix"], ["@i 00005000 n 0000", "#p 00070000 n 0000"],
          "a battle of the Great War"),
    _line("00070000", "04", ["Great_War"], ["@i 00005000 n 0000"], "a long war"),
    _line("00080000", "15", ["Gamma_Town"], ["@i 00003000 n 0000", "#p 00010000 n 0000"],
          "Gamma Town, a town in Zedland"),
]


def _write(directory: str, lines: list[str], name: str = "data.noun") -> str:
  path = os.path.join(directory, name)
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return path


class ParserTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp()
    self.path = _write(self.dir, HEADER + SYNSETS)

  def test_fields(self):
    synsets = wn.parse_data_file(self.path)
    self.assertLen(synsets, len(SYNSETS))
    zed = synsets["00010000"]
    self.assertEqual(zed.words, tuple(ZED_NAMES))
    self.assertLen(zed.words, 16)
    self.assertEqual(zed.lex_filenum, 15)
    self.assertEqual(zed.ss_type, "n")
    self.assertEqual(zed.pointers, (wn.Pointer("@i", "00004000", "n", 0, 0),
                                    wn.Pointer("#p", "00030000", "n", 0, 0)))
    self.assertEqual(zed.gloss, 'a country in Moria; "Zedland is flat"')
    self.assertEqual(zed.line, len(HEADER) + 6)

  def test_lexical_pointer_and_verb_frames(self):
    path = _write(self.dir, [
        "00002000 29 v 02 breathe 0 respire 1 001 + 00831191 n 0201 02 + 02 00 + 08 01 "
        "| draw air into, and expel out of, the lungs"], name="data.verb")
    synset = wn.parse_data_file(path)["00002000"]
    self.assertEqual(synset.lex_ids, (0, 1))
    self.assertEqual(synset.pointers, (wn.Pointer("+", "00831191", "n", 2, 1),))
    self.assertEqual(synset.gloss, "draw air into, and expel out of, the lungs")

  @parameterized.named_parameters(
      ("bad_hex_w_cnt", "00009000 15 n 0g Foo 0 000 | x", "w_cnt"),
      ("too_few_words", "00009000 15 n 03 Foo 0 Bar 0 000 | x", "w_cnt"),
      ("short_p_cnt", "00009000 15 n 01 Foo 0 1 @ 00001740 n 0000 | x", "p_cnt"),
      ("missing_pointer", "00009000 15 n 01 Foo 0 002 @ 00001740 n 0000 | x", "pointers"),
      ("unknown_symbol", "00009000 15 n 01 Foo 0 001 #x 00001740 n 0000 | x", "symbol"),
      ("bad_target", "00009000 15 n 01 Foo 0 001 @ 1740 n 0000 | x", "8-digit"),
      ("bad_source_target", "00009000 15 n 01 Foo 0 001 @ 00001740 n 00 | x", "source/target"),
      ("no_gloss", "00009000 15 n 01 Foo 0 000", "gloss"),
      ("bad_offset", "9000 15 n 01 Foo 0 000 | x", "offset"),
      ("bad_lex_filenum", "00009000 99 n 01 Foo 0 000 | x", "lex_filenum"),
      ("verb_in_noun_file", "00009000 15 v 01 Foo 0 000 | x", "ss_type"),
      ("bad_lex_id", "00009000 15 n 01 Foo x 000 | x", "lex_id"),
      ("trailing", "00009000 15 n 01 Foo 0 000 extra | x", "unexpected"),
      ("duplicate", SYNSETS[1], "duplicate synset offset 00002000"),
  )
  def test_malformed_line_names_file_and_line(self, bad_line, words):
    lines = HEADER + SYNSETS[:3] + [bad_line] + SYNSETS[3:]
    path = _write(self.dir, lines)
    with self.assertRaises(ValueError) as cm:
      wn.parse_data_file(path)
    message = str(cm.exception)
    self.assertTrue(message.startswith(f"{path}:{len(HEADER) + 4}: "), message)
    self.assertIn(words, message)

  def test_dangling_pointer_names_line(self):
    path = _write(self.dir, HEADER + SYNSETS + [
        _line("00090000", "15", ["Nowhere"], ["@i 00099999 n 0000"], "a lost place")])
    with self.assertRaisesRegex(ValueError, rf"^{path}:{len(HEADER) + len(SYNSETS) + 1}: .*"
                                r"00099999"):
      wn.derive_entities(self.dir)

  def test_license_header(self):
    self.assertEqual(wn.read_license(self.dir), "This is the licence.\nSecond line of it.\n")


class EntitiesTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp()
    _write(self.dir, HEADER + SYNSETS)
    self.rows = wn.derive_entities(self.dir)
    self.asset = os.path.join(self.dir, "entities.jsonl.gz")
    wn.write_entities_jsonl(self.rows, self.asset)
    self.entities = wn.load_wordnet_entities(self.asset)
    self.by_id = {e.doc_id: e for e in self.entities}

  def test_entities_are_the_instance_synsets(self):
    self.assertEqual([r["id"] for r in self.rows],
                     ["wn-00010000", "wn-00020000", "wn-00030000", "wn-00040000",
                      "wn-00050000", "wn-00060000", "wn-00070000", "wn-00080000"])
    zed = self.rows[0]
    self.assertEqual(zed["names"], ZED_NAMES)
    self.assertEqual(zed["contents"], '"Zedland"\na country in Moria; "Zedland is flat"')
    self.assertEqual(self.rows[4]["names"], ["Quiet", "Quiet River"])
    self.assertEqual(self.rows[1]["instance_of"], ["city"])
    self.assertEqual(self.rows[4]["lex_file"], "noun.object")

  def test_located_in_edges(self):
    located = {r["id"]: r["located_in"] for r in self.rows}
    self.assertEqual(located, {
        "wn-00010000": ["wn-00030000"], "wn-00020000": ["wn-00010000"], "wn-00030000": [],
        "wn-00040000": ["wn-00010000"],   # the #p to the class `city` is not an entity
        "wn-00050000": ["wn-00020000"], "wn-00060000": ["wn-00070000"], "wn-00070000": [],
        "wn-00080000": ["wn-00010000"]})

  def test_two_hop_chains_and_stats(self):
    self.assertEqual(wn.two_hop_chains(self.rows), [
        ("wn-00020000", "wn-00010000", "wn-00030000"),
        ("wn-00040000", "wn-00010000", "wn-00030000"),
        ("wn-00050000", "wn-00020000", "wn-00010000"),
        ("wn-00080000", "wn-00010000", "wn-00030000")])
    self.assertEqual(wn.graph_stats(self.entities), {
        "entities": 8, "located_in_edges": 6, "located_entities": 6, "two_hop_chains": 4,
        "two_hop_subjects": 4})

  def test_hypernym_paths(self):
    paths = {r["id"]: r["hypernym_path"] for r in self.rows}
    self.assertEqual(paths["wn-00020000"], ["00001740", "00002000", "00003000"])
    self.assertEqual(paths["wn-00010000"], ["00001740", "00002000", "00004000"])
    self.assertEqual(paths["wn-00050000"], ["00001740", "00002000"])
    self.assertEqual(paths["wn-00060000"], ["00001740", "00005000"])

  def test_corpus_loads_through_search_r1_loader(self):
    corpus = corpus_lib.load_wordnet_corpus(self.asset)
    self.assertEqual(corpus.ids, tuple(r["id"] for r in self.rows))
    self.assertEqual(corpus.contents, tuple(r["contents"] for r in self.rows))
    self.assertEqual(corpus.titles[1], "Alpha City")

  def test_writer_is_deterministic(self):
    other = os.path.join(self.dir, "again.jsonl.gz")
    wn.write_entities_jsonl(wn.derive_entities(self.dir), other)
    with open(self.asset, "rb") as a, open(other, "rb") as b:
      self.assertEqual(a.read(), b.read())

  def test_bad_rows_name_file_and_line(self):
    rows = [dict(r) for r in self.rows]
    rows[2]["located_in"] = ["wn-12345678"]
    path = os.path.join(self.dir, "bad.jsonl")
    wn.write_entities_jsonl(rows, path)
    with self.assertRaisesRegex(wn.WordNetFormatError, rf"^{path}:3: .*wn-12345678"):
      wn.load_wordnet_entities(path)
    rows = [dict(r) for r in self.rows]
    rows[1]["names"] = "Alpha City"
    wn.write_entities_jsonl(rows, path)
    with self.assertRaisesRegex(wn.WordNetFormatError, rf"^{path}:2: .*names"):
      wn.load_wordnet_entities(path)
    rows = [dict(r) for r in self.rows]
    rows[3]["id"] = rows[0]["id"]
    wn.write_entities_jsonl(rows, path)
    with self.assertRaisesRegex(wn.WordNetFormatError, rf"^{path}:4: duplicate"):
      wn.load_wordnet_entities(path)
    rows = [dict(r) for r in self.rows]
    rows[4]["contents"] = "no title line"
    wn.write_entities_jsonl(rows, path)
    with self.assertRaisesRegex(wn.WordNetFormatError, rf"^{path}:5: contents"):
      wn.load_wordnet_entities(path)
    with open(path, "w", encoding="utf-8") as f:
      f.write(json.dumps(self.rows[0]) + "\n\n{not json\n")
    with self.assertRaisesRegex(wn.WordNetFormatError, rf"^{path}:3: invalid JSON"):
      wn.load_wordnet_entities(path)

  def test_questions_by_hand(self):
    q = wn.wordnet_questions(self.entities, seed=0, fractions=(1.0, 0.0, 0.0))
    self.assertEqual(set(q.entity_split.values()), {"train"})
    names = q.retrieval["name"]["train"]
    # "Quiet" names two entities: Quiet River is asked by its second name; Beta Town by its first.
    self.assertEqual(names.queries["name-00050000"], "Quiet River")
    self.assertEqual(names.queries["name-00040000"], "Beta Town")
    self.assertEqual(names.qrels["name-00050000"], {"wn-00050000": 1})
    self.assertLen(names.queries, 8)
    desc = q.retrieval["description"]["train"]
    self.assertEqual(desc.queries["desc-00010000"], "a country in Moria")
    self.assertEqual(desc.queries["desc-00080000"], "a town in Zedland")
    self.assertEqual(desc.qrels["desc-00080000"], {"wn-00040000": 1, "wn-00080000": 1})
    self.assertEqual(desc.queries["desc-00020000"], "the capital of Zedland")

    qa = {x.qid: x for x in q.qa["train"]}
    self.assertEqual(sorted(qa), ["wn1-00010000", "wn1-00020000", "wn1-00040000",
                                  "wn1-00050000", "wn1-00060000", "wn1-00080000",
                                  "wn2-00020000", "wn2-00040000", "wn2-00050000",
                                  "wn2-00080000"])
    one = qa["wn1-00020000"]
    self.assertEqual(one.question, "What is Alpha City located in?")
    self.assertEqual(one.answers, tuple(ZED_NAMES))
    self.assertEqual((one.hops, one.supporting_doc_ids), (1, ("wn-00020000",)))
    self.assertEqual(qa["wn1-00060000"].question, "What is Battle of Ix part of?")
    self.assertEqual(qa["wn1-00060000"].answers, ("Great War",))
    two = qa["wn2-00050000"]
    self.assertEqual(two.question, "Quiet is in a place that is part of what?")
    self.assertEqual(two.answers, tuple(ZED_NAMES))
    self.assertEqual(two.supporting_doc_ids, ("wn-00050000", "wn-00020000"))
    self.assertEqual(two.search_queries, ("Quiet", "Alpha City"))
    self.assertEqual(two.bridge_answers, ("Alpha City",))
    self.assertEqual(qa["wn2-00020000"].answers, ("Moria",))

  def test_splits_are_seeded_and_by_entity(self):
    a = wn.wordnet_questions(self.entities, seed=3, fractions=(0.5, 0.25, 0.25))
    b = wn.wordnet_questions(self.entities, seed=3, fractions=(0.5, 0.25, 0.25))
    self.assertEqual(a, b)
    counts = {s: list(a.entity_split.values()).count(s) for s in ("train", "validation", "test")}
    self.assertEqual(counts, {"train": 4, "validation": 2, "test": 2})
    for split, questions in a.qa.items():
      for x in questions:
        self.assertEqual(a.entity_split[x.supporting_doc_ids[0]], split)
    for kind in wn.RETRIEVAL_KINDS:
      for split, part in a.retrieval[kind].items():
        for qid in part.queries:
          self.assertEqual(a.entity_split["wn-" + qid.split("-")[1]], split)
    with self.assertRaisesRegex(ValueError, "fractions"):
      wn.wordnet_questions(self.entities, fractions=(0.5, 0.5, 0.5))


class RemoveNamesTest(absltest.TestCase):

  def test_remove_names(self):
    self.assertEqual(wn.remove_names("Mark Twain (1835-1910), humorist; Twain wrote",
                                     ["Twain", "Mark Twain"]), "(1835-1910), humorist; wrote")
    # Whole words only.
    self.assertEqual(wn.remove_names("Parisian life in Paris", ["Paris"]), "Parisian life in")


class ShippedAssetTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.entities = wn.load_wordnet_entities()
    cls.by_id = {e.doc_id: e for e in cls.entities}
    cls.questions = wn.wordnet_questions(cls.entities, seed=0)

  def test_loads_with_unique_ids(self):
    corpus = corpus_lib.load_wordnet_corpus()
    self.assertLen(set(corpus.ids), len(corpus))
    self.assertEqual(corpus.ids, tuple(e.doc_id for e in self.entities))
    self.assertEqual(corpus.contents, tuple(e.contents for e in self.entities))
    # DESIGN.md: 7,730 named-entity glosses. The graph counts were computed by a separate
    # throwaway script over data.noun (see the module docstring for DESIGN.md's 3,379).
    self.assertLen(corpus, 7730)
    self.assertEqual(wn.graph_stats(self.entities), {
        "entities": 7730, "located_in_edges": 3609, "located_entities": 3056,
        "two_hop_chains": 4736, "two_hop_subjects": 2739})
    self.assertTrue(os.path.isfile(wn.LICENSE_ASSET))

  def test_rows_are_valid_search_r1_json(self):
    with gzip.open(wn.ENTITIES_ASSET, "rt", encoding="utf-8") as f:
      first = json.loads(f.readline())
    self.assertRegex(first["id"], r"^wn-\d{8}$")
    self.assertEqual(first["contents"].split("\n")[0], f'"{first["names"][0]}"')
    self.assertEqual(first["hypernym_path"][0], wn.ROOT_OFFSET)

  def test_matches_derivation_from_wordnet(self):
    if not HAVE_WORDNET:
      self.skipTest(f"{WORDNET_DIR}/data.noun absent (apt-get install wordnet-base)")
    rows = wn.derive_entities(WORDNET_DIR)
    path = os.path.join(tempfile.mkdtemp(), "wordnet_entities.jsonl.gz")
    wn.write_entities_jsonl(rows, path)
    with open(path, "rb") as a, open(wn.ENTITIES_ASSET, "rb") as b:
      self.assertEqual(a.read(), b.read())
    self.assertEqual(wn.graph_stats(rows), wn.graph_stats(self.entities))
    with open(wn.LICENSE_ASSET, encoding="utf-8") as f:
      self.assertEqual(f.read(), wn.read_license(WORDNET_DIR))

  def test_all_synsets_parse(self):
    if not HAVE_WORDNET:
      self.skipTest(f"{WORDNET_DIR} absent")
    total = sum(len(wn.parse_data_file(os.path.join(WORDNET_DIR, f"data.{pos}")))
                for pos in ("noun", "verb", "adj", "adv"))
    self.assertEqual(total, 117659)   # DESIGN.md: 117,659 glosses

  def test_questions_consistent_with_located_in(self):
    q = self.questions
    seen = set()
    for questions in q.qa.values():
      for x in questions:
        self.assertNotIn(x.qid, seen)
        seen.add(x.qid)
        subject = self.by_id[x.supporting_doc_ids[0]]
        self.assertEqual(x.search_queries[0], subject.title)
        if x.hops == 1:
          targets = subject.located_in
        else:
          bridge = self.by_id[x.supporting_doc_ids[1]]
          self.assertIn(bridge.doc_id, subject.located_in)
          self.assertNotEmpty(bridge.located_in)
          self.assertEqual(x.bridge_answers, (bridge.title,))
          targets = [z for y in subject.located_in for z in self.by_id[y].located_in]
        expected = {n for t in targets for n in self.by_id[t].names}
        self.assertEqual(set(x.answers), expected, x)
    two_hop_subjects = {x.supporting_doc_ids[0] for s in q.qa.values() for x in s if x.hops == 2}
    self.assertEqual(two_hop_subjects, {c[0] for c in wn.two_hop_chains(self.entities)})

  def test_retrieval_queries_point_at_their_entity(self):
    q = self.questions
    names = wn.merge_queries(q.retrieval["name"].values())
    owners: dict[str, set[str]] = {}
    for e in self.entities:
      for n in e.names:
        owners.setdefault(n.lower(), set()).add(e.doc_id)
    for qid, text in names.queries.items():
      (doc_id,) = names.qrels[qid]
      self.assertIn(text, self.by_id[doc_id].names)
      self.assertEqual(owners[text.lower()], {doc_id})
    desc = wn.merge_queries(q.retrieval["description"].values())
    self.assertGreater(len(desc.queries), 7000)
    for qid, text in desc.queries.items():
      doc_id = "wn-" + qid.split("-")[1]
      self.assertIn(doc_id, desc.qrels[qid])
      for name in self.by_id[doc_id].names:
        self.assertNotRegex(text.lower(), rf"(?<!\w){re.escape(name.lower())}(?!\w)")


if __name__ == "__main__":
  absltest.main()


def _entity(doc_id, names, text, *, lex="noun.location", located_in=(), instance_of=()):
  return wn.WordNetEntity(doc_id=doc_id, title=names[0], text=text, names=tuple(names),
                          located_in=tuple(located_in), instance_of=tuple(instance_of),
                          hypernym_path=(), lex_file=lex)


# Xtown -> Yland -> Zcont (located-in); two people sharing the name "Ames"; a third person
# whose only name is shared; a book.
AGENT_ENTITIES = (
    _entity("wn-1", ["Ames", "Ann Ames"], "English poet (1612-1672)", lex="noun.person",
            instance_of=["poet"]),
    _entity("wn-2", ["Ames", "Bo Ames"], "Greek painter (384-322 BC)", lex="noun.person",
            instance_of=["painter"]),
    _entity("wn-3", ["Ames"], "a sculptor (1900-1950)", lex="noun.person",
            instance_of=["sculptor"]),
    _entity("wn-4", ["Xtown"], "a town in Yland", located_in=["wn-5"], instance_of=["town"]),
    _entity("wn-5", ["Yland", "Ylandia"], "a country in Zcont", located_in=["wn-6"],
            instance_of=["country"]),
    _entity("wn-6", ["Zcont"], "a continent", instance_of=["continent"]),
    _entity("wn-7", ["Book of Q"], "a book of the testament (1100-1200)",
            lex="noun.communication", instance_of=["book"]),
)


class AgentQuestionsTest(absltest.TestCase):

  def test_every_kind_by_hand(self):
    q = wn.agent_questions(AGENT_ENTITIES, fractions=(1.0, 0.0, 0.0))
    self.assertEqual(q["validation"], ())
    self.assertEqual(q["test"], ())
    got = {x.qid: (x.question, x.answers, x.supporting_doc_ids, x.hops, x.search_queries,
                   x.bridge_answers, x.kind) for x in q["train"]}
    self.assertEqual(got, {
        "wn1-4": ("What is Xtown located in?", ("Yland", "Ylandia"), ("wn-4",), 1,
                  ("Xtown",), (), "wordnet_located_in"),
        "wn1-5": ("What is Yland located in?", ("Zcont",), ("wn-5",), 1, ("Yland",), (),
                  "wordnet_located_in"),
        "wn2-4": ("Xtown is in a place that is part of what?", ("Zcont",), ("wn-4", "wn-5"), 2,
                  ("Xtown", "Yland"), ("Yland",), "wordnet_located_in_2hop"),
        # Named by their first unique name; wn-3 has none and is skipped.
        "wnc-1": ("What was Ann Ames's occupation?", ("poet",), ("wn-1",), 1, ("Ann Ames",),
                  (), "wordnet_category"),
        "wnc-2": ("What was Bo Ames's occupation?", ("painter",), ("wn-2",), 1, ("Bo Ames",),
                  (), "wordnet_category"),
        "wnc-4": ("What kind of place is Xtown?", ("town",), ("wn-4",), 1, ("Xtown",), (),
                  "wordnet_category"),
        "wnc-5": ("What kind of place is Yland?", ("country",), ("wn-5",), 1, ("Yland",), (),
                  "wordnet_category"),
        "wnc-6": ("What kind of place is Zcont?", ("continent",), ("wn-6",), 1, ("Zcont",), (),
                  "wordnet_category"),
        "wnc-7": ("What kind of thing is Book of Q?", ("book",), ("wn-7",), 1, ("Book of Q",),
                  (), "wordnet_category"),
        # Only people get birth years; a BC span is left out.
        "wny-1": ("In what year was Ann Ames born?", ("1612",), ("wn-1",), 1, ("Ann Ames",), (),
                  "wordnet_birth_year"),
    })

  def test_kinds_filter_and_bad_kind(self):
    q = wn.agent_questions(AGENT_ENTITIES, kinds=("wordnet_birth_year",),
                           fractions=(1.0, 0.0, 0.0))
    self.assertEqual([x.qid for x in q["train"]], ["wny-1"])
    with self.assertRaisesRegex(ValueError, "wordnet_birthday"):
      wn.agent_questions(AGENT_ENTITIES, kinds=("wordnet_birthday",))

  def test_birth_year_and_unique_names(self):
    self.assertEqual([wn.birth_year(e) for e in AGENT_ENTITIES],
                     ["1612", None, "1900", None, None, None, None])
    self.assertEqual(wn.unique_names(AGENT_ENTITIES), {
        "wn-1": "Ann Ames", "wn-2": "Bo Ames", "wn-4": "Xtown", "wn-5": "Yland",
        "wn-6": "Zcont", "wn-7": "Book of Q"})

  def test_shipped_split_never_trains_on_a_held_out_answer(self):
    q = wn.agent_questions(seed=0)
    answers = {s: {a.lower() for x in qs for a in x.answers} for s, qs in q.items()}
    self.assertEmpty(answers["train"] & answers["test"])
    self.assertEmpty(answers["train"] & answers["validation"])
    self.assertEmpty(answers["validation"] & answers["test"])
    for split, qs in q.items():
      self.assertEqual({x.kind for x in qs}, set(wn.AGENT_KINDS), split)
      self.assertGreater(len(qs), 1000, split)
    by_id = {e.doc_id: e for e in wn.load_wordnet_entities()}
    for x in (x for qs in q.values() for x in qs if x.kind == wn.BIRTH_YEAR_KIND):
      self.assertIn(f"({x.answers[0]}-", by_id[x.supporting_doc_ids[0]].text)
    # The split is a function of the seed; the kinds are mixed in every prefix.
    self.assertEqual(q, wn.agent_questions(seed=0))
    self.assertLen({x.kind for x in q["test"][:40]}, 4)
