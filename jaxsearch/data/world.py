"""A seeded, procedurally generated world of fictional entities: the default QA data.

Every fact (who was born where, which company is based in which city, ...) is drawn at
random from `WorldConfig.seed`, so no model can answer the questions from prior knowledge:
it has to search the corpus. Passages are one or two short templated sentences and names
are a few pronounceable syllables, so that a tiny transformer can learn to search and copy
answers within minutes on a CPU.

Entities and their passages:

  country  "{country} is a country. Its capital is {city}."
  city     "{city} is a city in the country {country}."
  company  "{company} is a {industry} company based in {city}."
  person   "{person} was born in {city}, works for {company}, and their occupation is
           {occupation}."
  distractor  templated sentences that mention entities but state none of the facts above.

Question kinds (the subject is a person, company or city; subjects are split between
train / validation / test, so a test question is never about a train subject):

  1-hop  person_occupation, person_birth_city, person_employer, company_city, city_country
  2-hop  person_birth_country (person -> city -> country),
         person_employer_city (person -> company -> city),
         company_country (company -> city -> country)

Example:
  >>> world = build_world(WorldConfig(seed=0))
  >>> q = world.splits["train"][0]
  >>> q.question, q.answers, q.search_queries
  ('In which country is Sesdavor Works based?', ('Gulto',), ('Sesdavor Works', 'Trubepe'))
  >>> world.documents[world.doc_index(q.supporting_doc_ids[0])].text
  'Sesdavor Works is a toy company based in Trubepe.'

Names are unique across all entities, never a substring of one another (case-insensitive,
so a string-match reward cannot confuse two entities), and never a substring of a word used
in the templates.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from typing import Sequence

import numpy as np

SPLITS = ("train", "validation", "test")

# Real occupation words; `WorldConfig.num_occupations` takes the first N of them.
OCCUPATIONS = (
    "baker", "painter", "farmer", "teacher", "doctor", "lawyer", "pilot", "nurse",
    "tailor", "carpenter", "chemist", "singer", "writer", "sailor", "potter", "architect",
    "dentist", "engineer", "gardener", "librarian", "mechanic", "plumber", "surgeon",
    "jeweler",
)
INDUSTRIES = (
    "shipping", "software", "textile", "mining", "publishing", "farming", "steel", "glass",
    "toy", "furniture", "banking", "airline",
)
COMPANY_SUFFIXES = ("Works", "Labs", "Group", "Systems", "Industries", "Holdings", "Trading")

# Passage templates. Only these state facts; distractors must not contain their phrasing.
COUNTRY_TEMPLATE = "{country} is a country. Its capital is {capital}."
CITY_TEMPLATE = "{city} is a city in the country {country}."
COMPANY_TEMPLATE = "{company} is {article} {industry} company based in {city}."
# The person template names each asked relation with the question's own word ("born",
# "works for", "occupation"), so an agent can find the answer by matching the question.
PERSON_TEMPLATE = ("{person} was born in {city}, works for {company}, and their occupation is "
                   "{occupation}.")

# (title template, text template). Fields: p1, p2 (people), city, country, company.
DISTRACTOR_TEMPLATES = (
    ("A visit", "{p1} once visited {city} with {p2}."),
    ("A festival", "{p1} and {p2} met at a festival in {city}."),
    ("A letter", "{p1} wrote a letter to {p2} about {company}."),
    ("A report", "{p1} read a long report about {company}."),
    ("A dream", "{p1} dreamed of a trip to {country}."),
    ("A concert", "{company} sponsored a concert that {p1} attended."),
    ("A chess game", "{p1} and {p2} played chess in {city}."),
)

# kind -> (question template with a {s} slot for the subject name, subject type, hops).
QUESTION_TEMPLATES = {
    "person_occupation": ("What is the occupation of {s}?", "person", 1),
    "person_birth_city": ("In which city was {s} born?", "person", 1),
    "person_employer": ("Which company does {s} work for?", "person", 1),
    "company_city": ("In which city is {s} based?", "company", 1),
    "city_country": ("In which country is {s}?", "city", 1),
    "person_birth_country": ("In which country was {s} born?", "person", 2),
    "person_employer_city": ("In which city is the employer of {s} based?", "person", 2),
    "company_country": ("In which country is {s} based?", "company", 2),
}
KINDS = tuple(QUESTION_TEMPLATES)
ONE_HOP_KINDS = tuple(k for k, v in QUESTION_TEMPLATES.items() if v[2] == 1)
TWO_HOP_KINDS = tuple(k for k, v in QUESTION_TEMPLATES.items() if v[2] == 2)

# Syllables: onset + vowel + coda; open syllables are favoured by repeating "".
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "tr", "st")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "", "", "", "n", "r", "l", "s")


def _template_words() -> frozenset[str]:
  """Every lowercase word used by a template or a fixed word list."""
  texts = [COUNTRY_TEMPLATE, CITY_TEMPLATE, COMPANY_TEMPLATE, PERSON_TEMPLATE, "an"]
  texts += [t for pair in DISTRACTOR_TEMPLATES for t in pair]
  texts += [v[0] for v in QUESTION_TEMPLATES.values()]
  texts += list(OCCUPATIONS) + list(INDUSTRIES) + list(COMPANY_SUFFIXES)
  words = set()
  for text in texts:
    text = re.sub(r"\{[a-z0-9_]+\}", " ", text)
    words.update(w.lower() for w in re.findall(r"[A-Za-z]+", text))
  return frozenset(words)


TEMPLATE_WORDS = _template_words()


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorldConfig:
  """Size and seed of a generated world.

  Attributes:
    seed: Seed of `numpy.random.default_rng`; the same config always builds the same World.
    num_people: People (each the subject of five question kinds).
    num_cities: Cities, at least `num_countries` (every country gets one).
    num_countries: Countries.
    num_companies: Companies.
    num_occupations: How many of `OCCUPATIONS` are used (at most its length).
    num_distractors: Filler passages that mention entities but answer no question.
    two_hop_fraction: Fraction of 2-hop questions in each split.
    train_size: Questions in the train split.
    validation_size: Questions in the validation split.
    test_size: Questions in the test split.
    split_fractions: Fractions of the subjects (people, companies, cities, each type split
      separately) assigned to train / validation / test.
  """

  seed: int = 0
  num_people: int = 240
  num_cities: int = 40
  num_countries: int = 16
  num_companies: int = 32
  num_occupations: int = 16
  num_distractors: int = 120
  two_hop_fraction: float = 0.5
  train_size: int = 1000
  validation_size: int = 100
  test_size: int = 200
  split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)

  def __post_init__(self):
    def check_int(name, minimum):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
      if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")

    check_int("seed", 0)
    for name in ("num_people", "num_countries", "num_companies", "num_occupations"):
      check_int(name, 1)
    check_int("num_cities", 1)
    check_int("num_distractors", 0)
    for name in ("train_size", "validation_size", "test_size"):
      check_int(name, 0)
    if self.num_cities < self.num_countries:
      raise ValueError(f"num_cities must be >= num_countries={self.num_countries} (every "
                       f"country needs a capital), got {self.num_cities}")
    if self.num_occupations > len(OCCUPATIONS):
      raise ValueError(f"num_occupations must be <= {len(OCCUPATIONS)} (the length of "
                       f"OCCUPATIONS), got {self.num_occupations}")
    if not 0.0 <= self.two_hop_fraction <= 1.0:
      raise ValueError(f"two_hop_fraction must be in [0, 1], got {self.two_hop_fraction}")
    fractions = tuple(self.split_fractions)
    if len(fractions) != 3:
      raise ValueError("split_fractions must have 3 entries (train, validation, test), got "
                       f"{self.split_fractions!r}")
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
      raise ValueError("split_fractions must be >= 0 and sum to 1, got "
                       f"{self.split_fractions!r}")

  @property
  def split_sizes(self) -> dict[str, int]:
    return {"train": self.train_size, "validation": self.validation_size,
            "test": self.test_size}


@dataclasses.dataclass(frozen=True)
class Document:
  """One passage of the corpus.

  Attributes:
    doc_id: Stable id, e.g. "person-0007", "city-0012", "company-0003", "country-0001",
      "distractor-0042".
    title: The entity name (distractors: a generic title such as "A visit", naming
      no entity, so that the passage about an entity outranks passages that merely mention it).
    text: One or two short sentences; entity passages start with the title.
  """

  doc_id: str
  title: str
  text: str

  @property
  def contents(self) -> str:
    """The Search-R1 corpus field: the quoted title, a newline, then the text."""
    return f'"{self.title}"\n{self.text}'


@dataclasses.dataclass(frozen=True)
class Question:
  """One question with its gold answer and the ideal search path.

  Attributes:
    qid: Unique id within the world, e.g. "test-00017".
    question: e.g. "In which country was Mira Tolven born?".
    answers: Gold answers (one for every generated kind).
    supporting_doc_ids: Documents needed, in hop order, e.g. ("person-0007", "city-0012").
    hops: 1 or 2.
    search_queries: What an ideal agent searches per hop: the entity names, e.g.
      ("Mira Tolven", "Brindel").
    bridge_answers: Intermediate answers of every hop but the last, e.g. ("Brindel",);
      () for 1-hop questions.
    kind: Template name, one of `KINDS`.
    source: The dataset the question comes from (a QA file's `data_source`, e.g. "nq"); ""
      for generated questions. Evaluations report metrics per source.
  """

  qid: str
  question: str
  answers: tuple[str, ...]
  supporting_doc_ids: tuple[str, ...]
  hops: int
  search_queries: tuple[str, ...]
  bridge_answers: tuple[str, ...]
  kind: str
  source: str = ""


@dataclasses.dataclass(frozen=True)
class Country:
  name: str
  capital: int   # index into World.cities


@dataclasses.dataclass(frozen=True)
class City:
  name: str
  country: int   # index into World.countries


@dataclasses.dataclass(frozen=True)
class Company:
  name: str
  industry: str
  city: int      # index into World.cities (headquarters)


@dataclasses.dataclass(frozen=True)
class Person:
  name: str
  occupation: str
  birth_city: int  # index into World.cities
  employer: int    # index into World.companies


@dataclasses.dataclass(frozen=True)
class World:
  """A corpus, its entity tables and question splits. Build one with `build_world`.

  Attributes:
    config: The config it was built from.
    documents: Every passage: countries, cities, companies, people, then distractors.
    splits: "train", "validation", "test" -> questions.
    countries, cities, companies, people: The entity tables the facts were drawn into;
      `people[i]` is described by document "person-{i:04d}", and so on.
  """

  config: WorldConfig
  documents: tuple[Document, ...]
  splits: dict[str, tuple[Question, ...]]
  countries: tuple[Country, ...] = dataclasses.field(default=(), kw_only=True)
  cities: tuple[City, ...] = dataclasses.field(default=(), kw_only=True)
  companies: tuple[Company, ...] = dataclasses.field(default=(), kw_only=True)
  people: tuple[Person, ...] = dataclasses.field(default=(), kw_only=True)

  @functools.cached_property
  def _doc_positions(self) -> dict[str, int]:
    return {doc.doc_id: i for i, doc in enumerate(self.documents)}

  def doc_index(self, doc_id: str) -> int:
    """Position of `doc_id` in `documents` (the row of the document in a corpus index)."""
    try:
      return self._doc_positions[doc_id]
    except KeyError:
      raise ValueError(f"unknown doc_id {doc_id!r}; the world has {len(self.documents)} "
                       "documents with ids like 'person-0000'") from None

  def answer_values(self, kind: str) -> tuple[str, ...]:
    """All values a question of `kind` can have as answer, sorted (closed-book baselines).

    For example every city name for "person_birth_city", every used occupation for
    "person_occupation".
    """
    if kind not in QUESTION_TEMPLATES:
      raise ValueError(f"unknown question kind {kind!r}; known: {list(KINDS)}")
    if not self.people:  # A World built without tables: fall back to the questions.
      return tuple(sorted({a for qs in self.splits.values() for q in qs if q.kind == kind
                           for a in q.answers}))
    if kind == "person_occupation":
      values = OCCUPATIONS[:self.config.num_occupations]
    elif kind == "person_employer":
      values = [c.name for c in self.companies]
    elif kind in ("person_birth_city", "company_city", "person_employer_city"):
      values = [c.name for c in self.cities]
    else:  # city_country, person_birth_country, company_country
      values = [c.name for c in self.countries]
    return tuple(sorted(values))

  @property
  def entity_names(self) -> tuple[str, ...]:
    """Names of all countries, cities, companies and people."""
    return tuple(e.name for table in (self.countries, self.cities, self.companies,
                                      self.people) for e in table)

  def texts(self) -> tuple[str, ...]:
    """Every passage text and every question (e.g. to train a tokenizer on)."""
    return tuple([d.text for d in self.documents]
                 + [q.question for s in SPLITS for q in self.splits.get(s, ())])

  def write_jsonl(self, directory: str | os.PathLike) -> None:
    """Writes the world in Search-R1 format.

    Files: `corpus.jsonl` with {"id", "contents"} where contents is
    f'"{title}"\\n{text}', and `{split}.jsonl` with {"id", "question", "golden_answers",
    "supporting_doc_ids", "hops"} plus the extra fields "kind", "search_queries" and
    "bridge_answers".
    """
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "corpus.jsonl"), "w", encoding="utf-8") as f:
      for doc in self.documents:
        f.write(json.dumps({"id": doc.doc_id, "contents": doc.contents}) + "\n")
    for split, questions in self.splits.items():
      with open(os.path.join(directory, f"{split}.jsonl"), "w", encoding="utf-8") as f:
        for q in questions:
          f.write(json.dumps({
              "id": q.qid, "question": q.question, "golden_answers": list(q.answers),
              "supporting_doc_ids": list(q.supporting_doc_ids), "hops": q.hops,
              "kind": q.kind, "search_queries": list(q.search_queries),
              "bridge_answers": list(q.bridge_answers)}) + "\n")


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


class _NameGenerator:
  """Draws capitalised syllable names that are unique and not substrings of each other."""

  def __init__(self, rng: np.random.Generator):
    self._rng = rng
    self._taken: list[str] = []   # lowercase
    long_words = [w for w in TEMPLATE_WORDS if len(w) >= 4]
    self._long_words = tuple(long_words)

  def _candidate(self, num_syllables: int) -> str:
    parts = []
    for _ in range(num_syllables):
      parts.append(_ONSETS[self._rng.integers(len(_ONSETS))]
                   + _VOWELS[self._rng.integers(len(_VOWELS))]
                   + _CODAS[self._rng.integers(len(_CODAS))])
    return "".join(parts).capitalize()

  def _ok(self, name: str) -> bool:
    low = name.lower()
    if any(low in w for w in TEMPLATE_WORDS) or any(w in low for w in self._long_words):
      return False
    return not any(low in t or t in low for t in self._taken)

  def draw(self, count: int, what: str, syllables: Sequence[int] = (2, 2, 2, 3)) -> list[str]:
    names = []
    for _ in range(count):
      for _ in range(10_000):
        name = self._candidate(int(syllables[self._rng.integers(len(syllables))]))
        if self._ok(name):
          break
      else:
        raise ValueError(f"could not draw {count} distinct {what} names (got {len(names)}); "
                         "lower the number of entities in WorldConfig")
      self._taken.append(name.lower())
      names.append(name)
    return names


def _split_subjects(n: int, fractions: Sequence[float],
                    rng: np.random.Generator) -> dict[str, np.ndarray]:
  perm = rng.permutation(n)
  n_train = min(n, round(n * fractions[0]))
  n_val = min(n - n_train, round(n * fractions[1]))
  return {"train": np.sort(perm[:n_train]),
          "validation": np.sort(perm[n_train:n_train + n_val]),
          "test": np.sort(perm[n_train + n_val:])}


def _water_fill(need: int, caps: Sequence[int]) -> list[int]:
  """Splits `need` <= sum(caps) as evenly as possible, giving kind i at most caps[i]."""
  quotas = [0] * len(caps)
  while need > 0:
    active = [i for i, c in enumerate(caps) if quotas[i] < c]
    share = need // len(active)
    if share == 0:
      for i in active[:need]:
        quotas[i] += 1
      break
    for i in active:
      add = min(share, caps[i] - quotas[i])
      quotas[i] += add
      need -= add
  return quotas


def _allocate(need: int, caps: Sequence[int]) -> list[int]:
  """Quota per kind: every candidate once before any twice, kinds as balanced as possible."""
  quotas = [0] * len(caps)
  total = sum(caps)
  while need > 0:
    step = min(need, total)
    quotas = [q + a for q, a in zip(quotas, _water_fill(step, caps))]
    need -= step
  return quotas


def build_world(config: WorldConfig) -> World:
  """Generates the entities, passages and question splits of a world.

  Args:
    config: Sizes and seed.

  Each split's questions are sampled without replacement while it has (kind, subject)
  candidates left, kinds balanced by water filling (a kind with few subjects gives its
  share to the others). A split asking for more questions than it has candidates repeats
  them evenly: with the defaults, train draws 2000 questions from 1044 candidates and
  validation / test draw 200 from 130 each. Facts do not depend on the split sizes.

  Returns:
    A `World`; the same config always gives an identical World.

  Raises:
    ValueError: If a split needs 1-hop or 2-hop questions but has no subject to ask them
      about (the message names the size to lower or the fraction to raise).
  """
  rng = np.random.default_rng(config.seed)
  names_rng, facts_rng, distractor_rng, split_rng = rng.spawn(4)

  # Names.
  gen = _NameGenerator(names_rng)
  country_names = gen.draw(config.num_countries, "country")
  city_names = gen.draw(config.num_cities, "city")
  company_bases = gen.draw(config.num_companies, "company")
  pool = max(2, math.ceil(math.sqrt(2 * config.num_people)))
  first_names = gen.draw(pool, "first", syllables=(2,))
  last_names = gen.draw(pool, "last")
  pairs = names_rng.choice(pool * pool, size=config.num_people, replace=False)
  person_names = [f"{first_names[p // pool]} {last_names[p % pool]}" for p in pairs]
  company_names = [f"{base} {COMPANY_SUFFIXES[names_rng.integers(len(COMPANY_SUFFIXES))]}"
                   for base in company_bases]

  # Facts. Every country gets at least one city; its capital is one of its cities.
  city_country = np.concatenate([
      facts_rng.permutation(config.num_countries),
      facts_rng.integers(config.num_countries, size=config.num_cities - config.num_countries)])
  city_country = city_country[facts_rng.permutation(config.num_cities)]
  cities = tuple(City(name, int(c)) for name, c in zip(city_names, city_country))
  countries = tuple(
      Country(name, int(facts_rng.choice(np.flatnonzero(city_country == i))))
      for i, name in enumerate(country_names))
  companies = tuple(
      Company(name, INDUSTRIES[facts_rng.integers(len(INDUSTRIES))],
              int(facts_rng.integers(config.num_cities)))
      for name in company_names)
  occupations = OCCUPATIONS[:config.num_occupations]
  people = tuple(
      Person(name, occupations[facts_rng.integers(len(occupations))],
             int(facts_rng.integers(config.num_cities)),
             int(facts_rng.integers(config.num_companies)))
      for name in person_names)

  # Passages.
  docs = []
  for i, c in enumerate(countries):
    docs.append(Document(f"country-{i:04d}", c.name, COUNTRY_TEMPLATE.format(
        country=c.name, capital=cities[c.capital].name)))
  for i, c in enumerate(cities):
    docs.append(Document(f"city-{i:04d}", c.name, CITY_TEMPLATE.format(
        city=c.name, country=countries[c.country].name)))
  for i, c in enumerate(companies):
    docs.append(Document(f"company-{i:04d}", c.name, COMPANY_TEMPLATE.format(
        company=c.name, article=_article(c.industry), industry=c.industry,
        city=cities[c.city].name)))
  for i, p in enumerate(people):
    docs.append(Document(f"person-{i:04d}", p.name, PERSON_TEMPLATE.format(
        person=p.name, occupation=p.occupation,
        city=cities[p.birth_city].name, company=companies[p.employer].name)))
  for i in range(config.num_distractors):
    title, text = DISTRACTOR_TEMPLATES[distractor_rng.integers(len(DISTRACTOR_TEMPLATES))]
    p1, p2 = distractor_rng.choice(config.num_people, size=2,
                                   replace=config.num_people < 2)
    fields = dict(p1=people[p1].name, p2=people[p2].name,
                  city=cities[distractor_rng.integers(config.num_cities)].name,
                  country=countries[distractor_rng.integers(config.num_countries)].name,
                  company=companies[distractor_rng.integers(config.num_companies)].name)
    docs.append(Document(f"distractor-{i:04d}", title.format(**fields), text.format(**fields)))

  # Questions.
  def make_question(kind: str, s: int) -> Question:
    template, _, hops = QUESTION_TEMPLATES[kind]
    if kind.startswith("person_"):
      p = people[s]
      subject, subject_doc = p.name, f"person-{s:04d}"
      city, company = p.birth_city, p.employer
      chains = {
          "person_occupation": [(p.occupation, None)],
          "person_birth_city": [(cities[city].name, None)],
          "person_employer": [(companies[company].name, None)],
          "person_birth_country": [(cities[city].name, f"city-{city:04d}"),
                                   (countries[cities[city].country].name, None)],
          "person_employer_city": [(companies[company].name, f"company-{company:04d}"),
                                   (cities[companies[company].city].name, None)],
      }
    elif kind.startswith("company_"):
      c = companies[s]
      subject, subject_doc = c.name, f"company-{s:04d}"
      chains = {
          "company_city": [(cities[c.city].name, None)],
          "company_country": [(cities[c.city].name, f"city-{c.city:04d}"),
                              (countries[cities[c.city].country].name, None)],
      }
    else:
      subject, subject_doc = cities[s].name, f"city-{s:04d}"
      chains = {"city_country": [(countries[cities[s].country].name, None)]}
    chain = chains[kind]
    assert len(chain) == hops
    return Question(
        qid="", question=template.format(s=subject), answers=(chain[-1][0],),
        supporting_doc_ids=(subject_doc,) + tuple(d for _, d in chain[:-1]),
        hops=hops, search_queries=(subject,) + tuple(a for a, _ in chain[:-1]),
        bridge_answers=tuple(a for a, _ in chain[:-1]), kind=kind)

  subjects = {
      "person": _split_subjects(config.num_people, config.split_fractions, split_rng),
      "company": _split_subjects(config.num_companies, config.split_fractions, split_rng),
      "city": _split_subjects(config.num_cities, config.split_fractions, split_rng),
  }
  splits = {}
  for split_num, (split, size) in enumerate(config.split_sizes.items()):
    num_two = round(size * config.two_hop_fraction)
    questions = []
    for kinds, need, label in ((ONE_HOP_KINDS, size - num_two, "1-hop"),
                               (TWO_HOP_KINDS, num_two, "2-hop")):
      if need == 0:
        continue
      cands = [subjects[QUESTION_TEMPLATES[k][1]][split] for k in kinds]
      caps = [len(c) for c in cands]
      if sum(caps) == 0:
        raise ValueError(
            f"split {split!r} needs {need} {label} questions but has no subject to ask them "
            f"about; lower {split}_size, change two_hop_fraction, raise "
            f"split_fractions[{split_num}] or the number of entities")
      for kind, cand, quota in zip(kinds, cands, _allocate(need, caps)):
        if quota == 0:
          continue
        reps = math.ceil(quota / len(cand))
        order = np.concatenate([split_rng.permutation(cand) for _ in range(reps)])[:quota]
        questions.extend(make_question(kind, int(s)) for s in order)
    order = split_rng.permutation(len(questions))
    splits[split] = tuple(dataclasses.replace(questions[j], qid=f"{split}-{i:05d}")
                          for i, j in enumerate(order))

  return World(config, tuple(docs), splits, countries=countries, cities=cities,
               companies=companies, people=people)
