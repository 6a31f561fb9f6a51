"""Tests for jaxsearch.data.world: facts, questions, splits, names and serialization."""
from __future__ import annotations

import collections
import itertools
import json
import os
import re
import tempfile

from absl.testing import absltest
from absl.testing import parameterized

from jaxsearch.data import world as world_lib

SMALL = dict(num_people=60, num_cities=12, num_countries=5, num_companies=10,
             num_distractors=30, train_size=150, validation_size=30, test_size=30)

# Parsers of the passages, written independently of the generator's templates.
PERSON_RE = re.compile(r"^(?P<name>[A-Z][a-z]+ [A-Z][a-z]+) was born in (?P<city>[A-Z][a-z]+), "
                       r"works for (?P<company>[A-Z][a-z]+ [A-Z][a-z]+), and their occupation is "
                       r"(?P<occ>[a-z]+)\.$")
CITY_RE = re.compile(r"^(?P<name>[A-Z][a-z]+) is a city in the country "
                     r"(?P<country>[A-Z][a-z]+)\.$")
COMPANY_RE = re.compile(r"^(?P<name>[A-Z][a-z]+ [A-Z][a-z]+) is an? (?P<industry>[a-z]+) "
                        r"company based in (?P<city>[A-Z][a-z]+)\.$")
COUNTRY_RE = re.compile(r"^(?P<name>[A-Z][a-z]+) is a country\. Its capital is "
                        r"(?P<capital>[A-Z][a-z]+)\.$")
QUESTION_RES = {
    "person_occupation": r"What is the occupation of (.+)\?",
    "person_birth_city": r"In which city was (.+) born\?",
    "person_employer": r"Which company does (.+) work for\?",
    "company_city": r"In which city is (?!the employer of )(.+) based\?",
    "city_country": r"In which country is (\S+)\?",
    "person_birth_country": r"In which country was (.+) born\?",
    "person_employer_city": r"In which city is the employer of (.+) based\?",
    "company_country": r"In which country is (.+ .+) based\?",
}


def parse_facts(world):
  """Facts read back from the passage texts: name -> (doc_id, fields)."""
  facts = {"person": {}, "city": {}, "company": {}, "country": {}}
  for doc in world.documents:
    kind = doc.doc_id.split("-")[0]
    if kind == "distractor":
      continue
    regex = {"person": PERSON_RE, "city": CITY_RE, "company": COMPANY_RE,
             "country": COUNTRY_RE}[kind]
    m = regex.match(doc.text)
    assert m is not None, doc
    assert m["name"] == doc.title, doc
    facts[kind][m["name"]] = (doc.doc_id, m.groupdict())
  return facts


def expected_chain(facts, kind, subject):
  """[(doc_id, answer)] per hop, by following the parsed facts."""
  people, cities, companies = facts["person"], facts["city"], facts["company"]
  if kind.startswith("person_"):
    doc, p = people[subject]
    if kind == "person_occupation":
      return [(doc, p["occ"])]
    if kind == "person_birth_city":
      return [(doc, p["city"])]
    if kind == "person_employer":
      return [(doc, p["company"])]
    if kind == "person_birth_country":
      return [(doc, p["city"]), (cities[p["city"]][0], cities[p["city"]][1]["country"])]
    if kind == "person_employer_city":
      c = companies[p["company"]]
      return [(doc, p["company"]), (c[0], c[1]["city"])]
  if kind == "company_city":
    doc, c = companies[subject]
    return [(doc, c["city"])]
  if kind == "company_country":
    doc, c = companies[subject]
    return [(doc, c["city"]), (cities[c["city"]][0], cities[c["city"]][1]["country"])]
  if kind == "city_country":
    doc, c = cities[subject]
    return [(doc, c["country"])]
  raise AssertionError(kind)


class WorldTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # Sizes pinned here (not the defaults) because several tests count candidates by hand.
    cls.default = world_lib.build_world(world_lib.WorldConfig(
        train_size=2000, validation_size=200, test_size=200, split_fractions=(0.8, 0.1, 0.1)))
    cls.small = world_lib.build_world(world_lib.WorldConfig(seed=3, **SMALL))

  def test_deterministic(self):
    again = world_lib.build_world(self.default.config)
    self.assertEqual(again, self.default)
    self.assertEqual(again.splits["test"], self.default.splits["test"])

  def test_seed_changes_facts(self):
    other = world_lib.build_world(world_lib.WorldConfig(seed=1))
    self.assertNotEqual(other.documents, self.default.documents)
    same_text = sum(a.text == b.text for a, b in zip(self.default.documents, other.documents))
    self.assertLess(same_text, len(other.documents) // 10)
    self.assertNotEqual(set(self.default.entity_names), set(other.entity_names))
    self.assertNotEqual([p.occupation for p in self.default.people],
                        [p.occupation for p in other.people])
    self.assertNotEqual([c.country for c in self.default.cities],
                        [c.country for c in other.cities])

  def test_split_sizes_do_not_change_facts(self):
    other = world_lib.build_world(world_lib.WorldConfig(train_size=10, test_size=50))
    self.assertEqual(other.documents, self.default.documents)

  def test_tables_match_passages(self):
    w = self.default
    facts = parse_facts(w)
    self.assertLen(facts["person"], w.config.num_people)
    self.assertLen(facts["city"], w.config.num_cities)
    self.assertLen(facts["company"], w.config.num_companies)
    self.assertLen(facts["country"], w.config.num_countries)
    for i, p in enumerate(w.people):
      doc_id, f = facts["person"][p.name]
      self.assertEqual(doc_id, f"person-{i:04d}")
      self.assertEqual((f["occ"], f["city"], f["company"]),
                       (p.occupation, w.cities[p.birth_city].name,
                        w.companies[p.employer].name))
    for c in w.cities:
      self.assertEqual(facts["city"][c.name][1]["country"], w.countries[c.country].name)
    for c in w.companies:
      self.assertEqual(facts["company"][c.name][1]["city"], w.cities[c.city].name)
    for c in w.countries:  # The capital is one of the country's own cities.
      capital = facts["country"][c.name][1]["capital"]
      self.assertEqual(facts["city"][capital][1]["country"], c.name)
    self.assertLessEqual({p.occupation for p in w.people},
                         set(world_lib.OCCUPATIONS[:w.config.num_occupations]))

  @parameterized.named_parameters(("default", "default"), ("small", "small"))
  def test_answers_follow_facts(self, which):
    w = getattr(self, which)
    facts = parse_facts(w)
    for split, questions in w.splits.items():
      for q in questions:
        m = re.fullmatch(QUESTION_RES[q.kind], q.question)
        self.assertIsNotNone(m, q)
        subject = m.group(1)
        chain = expected_chain(facts, q.kind, subject)
        self.assertEqual(q.answers, (chain[-1][1],), q)
        self.assertEqual(q.supporting_doc_ids, tuple(d for d, _ in chain), q)
        self.assertEqual(q.bridge_answers, tuple(a for _, a in chain[:-1]), q)
        self.assertEqual(q.search_queries, (subject,) + q.bridge_answers, q)
        self.assertEqual(q.hops, len(chain), q)
        self.assertTrue(q.qid.startswith(split), q)
    all_ids = [q.qid for qs in w.splits.values() for q in qs]
    self.assertLen(set(all_ids), len(all_ids))

  def test_supporting_docs_contain_queries_and_hop_answers(self):
    w = self.default
    for q in itertools.chain(*w.splits.values()):
      hop_answers = q.bridge_answers + q.answers
      for doc_id, query, answer in zip(q.supporting_doc_ids, q.search_queries, hop_answers,
                                       strict=True):
        doc = w.documents[w.doc_index(doc_id)]
        self.assertEqual(doc.title, query)
        self.assertIn(query, doc.text)
        self.assertIn(answer, doc.text)

  @parameterized.named_parameters(("default", "default"), ("small", "small"))
  def test_subjects_disjoint_across_splits(self, which):
    w = getattr(self, which)
    subjects = {s: {q.supporting_doc_ids[0] for q in qs} for s, qs in w.splits.items()}
    for a, b in itertools.combinations(world_lib.SPLITS, 2):
      self.assertEmpty(subjects[a] & subjects[b], f"{a} / {b}")
    # And every subject type is present in every split of the default world.
    for s in world_lib.SPLITS:
      self.assertEqual({d.split("-")[0] for d in subjects[s]}, {"person", "company", "city"})

  @parameterized.named_parameters(
      ("half", 0.5, (150, 30, 30)), ("none", 0.0, (40, 7, 9)), ("all", 1.0, (40, 7, 9)),
      ("third", 0.3, (101, 13, 11)))
  def test_hop_fraction_and_sizes(self, fraction, sizes):
    cfg = world_lib.WorldConfig(**{**SMALL, "train_size": sizes[0],
                                   "validation_size": sizes[1], "test_size": sizes[2]},
                                two_hop_fraction=fraction)
    w = world_lib.build_world(cfg)
    for split, size in zip(world_lib.SPLITS, sizes):
      qs = w.splits[split]
      self.assertLen(qs, size)
      self.assertEqual(sum(q.hops == 2 for q in qs), round(size * fraction), split)
      for q in qs:
        self.assertEqual(q.kind in world_lib.TWO_HOP_KINDS, q.hops == 2)

  def test_no_repeats_when_enough_candidates_and_balanced_kinds(self):
    # Default fractions give validation 24 people, 3 companies and 4 cities: 79 one-hop and
    # 51 two-hop candidates. 30 + 30 questions fit without repeats; kinds share evenly up
    # to their capacity (water filling).
    w = world_lib.build_world(world_lib.WorldConfig(validation_size=60))
    val = w.splits["validation"]
    keys = [(q.kind, q.search_queries[0]) for q in val]
    self.assertLen(set(keys), len(keys))
    counts = collections.Counter(q.kind for q in val)
    self.assertEqual(sorted(counts[k] for k in ("person_occupation", "person_birth_city",
                                                "person_employer")), [7, 8, 8])
    self.assertEqual((counts["company_city"], counts["city_country"]), (3, 4))
    self.assertEqual(sorted((counts["person_birth_country"], counts["person_employer_city"])),
                     [13, 14])
    self.assertEqual(counts["company_country"], 3)

  def test_repeats_only_after_every_candidate(self):
    # Train has 634 one-hop and 410 two-hop candidates but needs 1000 of each.
    train = self.default.splits["train"]
    per_candidate = collections.Counter((q.kind, q.search_queries[0]) for q in train)
    self.assertLen(per_candidate, 634 + 410)
    for kind in world_lib.KINDS:  # Within a kind, subjects are repeated evenly.
      n = [c for (k, _), c in per_candidate.items() if k == kind]
      self.assertLessEqual(max(n) - min(n), 1, kind)

  def test_small_kind_capacity_is_filled_by_others(self):
    cfg = world_lib.WorldConfig(validation_size=0, test_size=80, split_fractions=(0.8, 0.1, 0.1))
    counts = collections.Counter(q.kind for q in world_lib.build_world(cfg).splits["test"])
    # Test holds 24 people and 3 companies: company_country is capped at 3, the two person
    # kinds share the other 37 of the 40 two-hop questions.
    self.assertEqual(counts["company_country"], 3)
    self.assertEqual(counts["person_birth_country"] + counts["person_employer_city"], 37)
    self.assertLessEqual(abs(counts["person_birth_country"] - counts["person_employer_city"]),
                         1)

  def test_split_without_subjects_raises(self):
    cfg = world_lib.WorldConfig(**SMALL, split_fractions=(1.0, 0.0, 0.0))
    with self.assertRaisesRegex(ValueError, "validation_size"):
      world_lib.build_world(cfg)
    ok = world_lib.build_world(world_lib.WorldConfig(
        **{**SMALL, "validation_size": 0, "test_size": 0}, split_fractions=(1.0, 0.0, 0.0)))
    self.assertEmpty(ok.splits["validation"])

  @parameterized.named_parameters(
      ("seed", dict(seed=-1), "seed"),
      ("people", dict(num_people=0), "num_people"),
      ("people_type", dict(num_people=2.5), "num_people"),
      ("cities", dict(num_cities=3, num_countries=4), "num_cities"),
      ("companies", dict(num_companies=0), "num_companies"),
      ("occupations", dict(num_occupations=100), "num_occupations"),
      ("distractors", dict(num_distractors=-1), "num_distractors"),
      ("fraction", dict(two_hop_fraction=1.5), "two_hop_fraction"),
      ("train", dict(train_size=-3), "train_size"),
      ("test", dict(test_size=-1), "test_size"),
      ("split_len", dict(split_fractions=(0.5, 0.5)), "split_fractions"),
      ("split_sum", dict(split_fractions=(0.5, 0.5, 0.5)), "split_fractions"),
      ("split_neg", dict(split_fractions=(1.2, -0.1, -0.1)), "split_fractions"))
  def test_config_validation(self, kwargs, field):
    with self.assertRaisesRegex(ValueError, field):
      world_lib.WorldConfig(**kwargs)

  @parameterized.named_parameters(("default", "default"), ("small", "small"))
  def test_names_unique_and_not_substrings(self, which):
    w = getattr(self, which)
    names = [n.lower() for n in w.entity_names]
    self.assertLen(set(names), len(names))
    parts = {part.lower() for n in w.entity_names for part in n.split()} - {
        suffix.lower() for suffix in world_lib.COMPANY_SUFFIXES}
    for a, b in itertools.permutations(parts, 2):
      self.assertNotIn(a, b)
    for a, b in itertools.permutations(names, 2):
      self.assertNotIn(a, b)
    words = set(re.findall(r"[a-z]+", " ".join(
        [world_lib.PERSON_TEMPLATE, world_lib.CITY_TEMPLATE, world_lib.COMPANY_TEMPLATE,
         world_lib.COUNTRY_TEMPLATE] + [t for p in world_lib.DISTRACTOR_TEMPLATES for t in p]
        + [v[0] for v in world_lib.QUESTION_TEMPLATES.values()]
        + list(world_lib.OCCUPATIONS) + list(world_lib.INDUSTRIES)).lower()))
    self.assertContainsSubset({"born", "works", "based", "capital", "baker"}, words)
    for part in parts:
      for word in words:
        self.assertNotIn(part, word)

  def test_answers_occur_once_as_words(self):
    # A string-match reward cannot be fooled: an answer occurs in its own supporting
    # document exactly once.
    w = self.default
    for q in itertools.chain(*w.splits.values()):
      doc = w.documents[w.doc_index(q.supporting_doc_ids[-1])]
      self.assertEqual(doc.text.count(q.answers[0]), 1, (q, doc))

  def test_distractors_state_no_facts(self):
    w = self.default
    distractors = [d for d in w.documents if d.doc_id.startswith("distractor-")]
    self.assertLen(distractors, w.config.num_distractors)
    names = set(w.entity_names)
    for d in distractors:
      for phrase in (" born", " works for", " based in", " is a city", " is a country",
                     "capital", " who ", " work for", "employer", "occupation"):
        self.assertNotIn(phrase, d.text)
      for occupation in world_lib.OCCUPATIONS:
        self.assertNotIn(occupation, d.text)
      self.assertTrue(any(n in d.text for n in names), d)
    self.assertLen({d.doc_id for d in w.documents}, len(w.documents))

  def test_passages_are_short(self):
    words = [len(d.text.split()) for d in self.default.documents]
    self.assertLessEqual(max(words), 20)

  def test_doc_index_and_answer_values(self):
    w = self.default
    for i, doc in enumerate(w.documents):
      self.assertEqual(w.doc_index(doc.doc_id), i)
    with self.assertRaisesRegex(ValueError, "person-9999"):
      w.doc_index("person-9999")
    self.assertEqual(w.answer_values("city_country"),
                     tuple(sorted(c.name for c in w.countries)))
    self.assertEqual(w.answer_values("person_employer_city"),
                     tuple(sorted(c.name for c in w.cities)))
    self.assertLen(w.answer_values("person_occupation"), w.config.num_occupations)
    for q in itertools.chain(*w.splits.values()):
      self.assertIn(q.answers[0], w.answer_values(q.kind))
    with self.assertRaisesRegex(ValueError, "no_such_kind"):
      w.answer_values("no_such_kind")

  def test_write_jsonl_round_trip(self):
    w = self.small
    with tempfile.TemporaryDirectory() as tmp:
      w.write_jsonl(tmp)
      self.assertEqual(sorted(os.listdir(tmp)),
                       ["corpus.jsonl", "test.jsonl", "train.jsonl", "validation.jsonl"])
      with open(os.path.join(tmp, "corpus.jsonl")) as f:
        rows = [json.loads(line) for line in f]
      self.assertEqual([r["id"] for r in rows], [d.doc_id for d in w.documents])
      for r, d in zip(rows, w.documents):
        title, text = r["contents"].split("\n", 1)
        self.assertEqual((title, text), (f'"{d.title}"', d.text))
      for split in world_lib.SPLITS:
        with open(os.path.join(tmp, f"{split}.jsonl")) as f:
          rows = [json.loads(line) for line in f]
        self.assertLen(rows, len(w.splits[split]))
        for r, q in zip(rows, w.splits[split]):
          self.assertEqual(r["id"], q.qid)
          self.assertEqual(r["question"], q.question)
          self.assertEqual(r["golden_answers"], list(q.answers))
          self.assertEqual(r["supporting_doc_ids"], list(q.supporting_doc_ids))
          self.assertEqual(r["hops"], q.hops)
          self.assertEqual(r["kind"], q.kind)
          self.assertEqual(r["search_queries"], list(q.search_queries))


if __name__ == "__main__":
  absltest.main()
