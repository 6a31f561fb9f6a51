"""REALM-style differentiable retrieval on the embedded world: retriever and reader trained end
to end through the marginal likelihood over the top-k documents.

Models (all tiny, from scratch):
  query encoder  E_q: a `BertEncoder` embedding the question          [B, D] (unit norm)
  doc encoder    E_d: a `BertEncoder` embedding `Document.text`        [N, D] (unit norm);
                 initialised as a copy of E_q (`tie_encoder_init`), as REALM initialises both
                 towers from the same (ICT) checkpoint: two independent random towers would
                 start in unrelated spaces and retrieve at random.
  reader         a causal `Transformer` reading
                 `<bos> question <information> passage </information> <answer> y </answer>`;
                 `log p(y|x, z)` is the teacher-forced log-likelihood of the answer tokens and
                 the closing tag.

One training step (REALM's `model_fn`):
  1. retrieve the top-k documents of each question from a STALE index: the document
     embeddings computed with E_d at the last refresh, searched with the live query
     embedding (`jaxsearch.retrieval.stale_index.StaleIndex`: exact MIPS with
     `jaxsearch.retrieval.mips.exact_search`, or ScaNN with `ScannIndex` when `index="scann"`);
  2. re-score those k documents with the LIVE encoders, `s(x, z) = <E_q(x), E_d(z)> / T`, so
     gradients reach E_q (and E_d when `train_doc_encoder`) although the index is stale;
  3. loss = `losses.marginal_nll(s, log p(y|x, z))`: -log sum_z p(z|x) p(y|x, z).
The index is refreshed (all documents re-embedded; ScaNN upserted) before every step that is
a multiple of `refresh_every`. Staleness goes to metrics.jsonl: `index/steps_since_refresh`
and `index/stale_score_gap`, the mean |<q, d_stale> - <q, d_live>| over the retrieved
documents (0 right after a refresh, and always 0 when E_d is not trained).

No supervision of the retriever: its training never looks at `supporting_doc_ids` (they are
only used to *report* how often the gold document was retrieved, `train/support_in_topk`).
The reader alone gets a warm-up on (question, gold passage) pairs (`reader_warmup_steps`), so
that p(y|x, z) already says which passage holds the answer; the frozen baseline gets exactly
the same warm-up (same seed, same steps), so a gain in recall comes from the retriever
learning from the answer likelihood. `freeze_retriever=True` is the baseline: the same run
with E_q and E_d fixed after the (corpus-only) ICT warm-up; the reader trains exactly the same
way on what the fixed retriever returns.

Why several worlds (`train_worlds`), and E_q only (`train_doc_encoder=False`, ORQA-style):
with the 280 train questions of one world the tiny reader memorised question -> answer,
p(y|x, z) stopped depending on z and the retriever drifted until one document held 0.999 of
p(z|x); with the subject hidden from the reader, the retriever learned a "codebook" sending
each training question to its own (wrong) passage which the reader memorised. Training
questions from 9 worlds whose facts differ (each batch retrieving from its own world's
documents) make both impossible, and keeping E_d (and so the index) fixed keeps the
document space meaningful while E_q learns to land on the right passage.

Measured (defaults = gin/experiments/realm.gin, seed 0, 300 steps, K=8, test split of the
held-out world, 80 questions; the two runs differ only in `freeze_retriever`):
  end to end  recall@1 0.838  recall@8 1.000  em 0.300  (em_gold_doc 0.362)
  frozen      recall@1 0.488  recall@8 0.850  em 0.212  (em_gold_doc 0.400)

Evaluation on `eval_split` (1-hop questions only; `world.two_hop_fraction` must be 0; test
subjects never occur in a training question):
  recall@1, recall@k  the supporting document among the top-1 / top-k of the final retriever
                      (the index refreshed with the final E_d);
  em                  SQuAD exact match of the answer the reader greedy-decodes from the top-1
                      document (generation, not a choice among candidates: the reader must copy
                      the answer out of the passage, so EM rises only if retrieval does);
  em_gold_doc         the same reader given the gold document (a diagnostic of the reader
                      alone: em is bounded by roughly recall@1 * em_gold_doc).

Workdir layout:
  tokenizer.model     the BPE tokenizer trained on the world
  realm_config.json   the resolved `RealmConfig`
  checkpoints/realm   orbax checkpoints {params, opt_state, step, index_emb, refreshed_at}
  metrics.jsonl, events.*   `train/*` (loss, marginal_loglik, support_in_topk, ...),
                      `index/*` (steps_since_refresh, stale_score_gap, refreshes)
  summary.json        recall@1, recall@k, em, em_gold_doc, timings
A second run with the same workdir resumes from the latest checkpoint (the stale index is
part of the checkpoint, so a resumed run retrieves exactly what an uninterrupted one would).

Example:
  >>> e2e = run(RealmConfig(), "/tmp/realm")                        # end to end
  >>> frozen = run(RealmConfig(freeze_retriever=True), "/tmp/realm_frozen")
  >>> e2e["recall@k"], e2e["em"], frozen["recall@k"], frozen["em"]
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from jaxsearch import metrics as metrics_lib
from jaxsearch.checkpoint import Checkpointer
from jaxsearch.data.questions import unique_questions
from jaxsearch.data.tokenizer import SentencePieceTokenizer
from jaxsearch.data.world import SPLITS, Question, World, WorldConfig, build_world
from jaxsearch.losses.contrastive import info_nce_loss
from jaxsearch.losses.marginal import marginal_nll
from jaxsearch.models.encoder import BertEncoder, EncoderConfig, init_encoder_params
from jaxsearch.models.transformer import Transformer, TransformerConfig
from jaxsearch.retrieval.scann_index import ScannConfig
from jaxsearch.retrieval.stale_index import StaleIndex
from jaxsearch.rewards.qa import exact_match
from jaxsearch.train.dual_encoder import make_embed_fn
from jaxsearch.train import trainer
from jaxsearch.train.optim import OptimizerConfig, make_optimizer
from jaxsearch.train.state import TrainState
from jaxsearch.types import PyTree

INDEX_KINDS = ("exact", "scann")
CONFIG_FILE = "realm_config.json"
CHECKPOINT_DIR = os.path.join("checkpoints", "realm")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RealmConfig:
  """Everything a REALM run needs.

  Attributes:
    seed: seeds parameters and data order.
    world: the embedded world (1-hop only: `two_hop_fraction` must be 0).
    tokenizer_vocab_size: BPE pieces trained on the world (encoders' and reader's vocabulary;
      the configs' `vocab_size` is replaced by the tokenizer's).
    encoder: the query / document encoder (`max_position` must fit the longest text).
    reader: the reader (`max_len` must fit question + passage + answer).
    top_k: K, documents retrieved (and marginalised over) per question.
    temperature: T in `s(x, z) = <E_q(x), E_d(z)> / T` (embeddings are unit-norm).
    steps: optimizer steps.
    batch_size: questions per step (each read with K documents).
    refresh_every: re-embed the corpus and refresh the index every this many steps.
    index: "exact" (on-device MIPS) or "scann" (host `ScannIndex`, brute force under
      `scann.brute_force_below` documents, upserted at each refresh).
    scann: ScaNN parameters when `index == "scann"`.
    train_doc_encoder: also train E_d (the index then goes stale between refreshes).
    freeze_retriever: the baseline: E_q and E_d never change.
    tie_encoder_init: E_d starts as a copy of E_q (else an independent initialisation).
    train_worlds: extra worlds (`world` with seeds `world.seed + 1000 * w`, w = 1..n) whose
      train questions and documents are added to training. Their facts are drawn
      independently, so a tiny reader cannot memorise question -> answer (measured: with the
      280 questions of one world it does, p(y|x, z) stops depending on z and the retriever
      drifts) and the retriever cannot learn a per-question "codebook": only reading the
      passage, and retrieving the passage about the question's subject, generalises. Each
      training batch comes from one world and retrieves from that world's documents only
      (the index is segmented by world); evaluation is on `world`'s `eval_split`.
    reader_sees_subject: False (default): the reader reads the question with the subject's
      name removed ("What is the occupation of ?") plus the passage. A tiny reader that sees
      the name memorises the train facts (question -> answer) instead of reading the
      passage; p(y|x, z) then hardly depends on z and the retriever collapses onto a few
      passages the reader has got used to (measured). Without the name the answer can only
      come from the passage, so p(y|x, z) is high exactly for passages about the subject:
      REALM's signal. The query encoder always sees the whole question.
    reader_warmup_steps: reader-only steps on (question, GOLD passage) pairs of the training
      questions before REALM training (0: none). It teaches the tiny reader to copy the
      answer out of a passage, so that p(y|x, z) is informative from the first REALM step.
      The retriever is untouched (it never sees a gold document) and the frozen baseline gets
      exactly the same warm-up, so an end-to-end gain is the retriever's learning from the
      answer likelihood alone.
    reader_warmup_batch_size: questions per reader warm-up step.
    ict_steps: unsupervised Inverse Cloze Task warm-up of E_q and E_d before training (0:
      none), as ORQA / REALM start from an ICT-pretrained retriever: the pseudo-query is a
      random span of a document's tokens, its positive the document, the other documents of
      the batch the negatives (InfoNCE). It reads only the corpus, never a question or a
      gold document; the frozen baseline gets the same warm-up (it is the initialisation).
    ict_batch_size: documents per ICT step.
    ict_span: (min, max) tokens of an ICT pseudo-query span.
    ict_title_prob: probability that an ICT pseudo-query is the document's title instead of
      a span (title -> body pairs, another corpus-only pre-training task).
    retriever_optimizer: optimizer of E_q and E_d.
    reader_optimizer: optimizer of the reader.
    eval_split: the split reported in summary.json.
    eval_batch_size: questions per evaluation call.
    log_every: write metrics every this many steps.
    checkpoint_every: save every this many steps (and at the end).
  """

  seed: int = 0
  world: WorldConfig = WorldConfig(num_people=120, num_cities=24, num_countries=8,
                                   num_companies=16, num_distractors=40, two_hop_fraction=0.0,
                                   train_size=1000, validation_size=50, test_size=200)
  tokenizer_vocab_size: int = 512
  encoder: EncoderConfig = EncoderConfig(vocab_size=1, hidden_size=64, num_layers=1,
                                         num_heads=4, intermediate_size=128, max_position=64)
  reader: TransformerConfig = TransformerConfig(vocab_size=1, d_model=64, num_layers=2,
                                                num_heads=2, num_kv_heads=2, mlp_dim=192,
                                                rope_theta=1e6, max_len=128)
  top_k: int = 8
  temperature: float = 0.1
  steps: int = 300
  batch_size: int = 16
  refresh_every: int = 50
  index: str = "exact"
  scann: ScannConfig = ScannConfig()
  train_doc_encoder: bool = False
  freeze_retriever: bool = False
  tie_encoder_init: bool = True
  reader_sees_subject: bool = False
  train_worlds: int = 8
  reader_warmup_steps: int = 300
  reader_warmup_batch_size: int = 32
  ict_steps: int = 200
  ict_batch_size: int = 64
  ict_span: tuple[int, int] = (2, 6)
  ict_title_prob: float = 0.5
  retriever_optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-3, warmup_steps=20)
  reader_optimizer: OptimizerConfig = OptimizerConfig(learning_rate=3e-3, warmup_steps=20)
  eval_split: str = "test"
  eval_batch_size: int = 128
  log_every: int = 25
  checkpoint_every: int = 100

  def __post_init__(self):
    for name in ("tokenizer_vocab_size", "top_k", "batch_size", "refresh_every",
                 "eval_batch_size", "log_every", "checkpoint_every", "ict_batch_size",
                 "reader_warmup_batch_size"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"RealmConfig.{name} must be an int >= 1, got {value!r}")
    for name in ("seed", "steps", "ict_steps", "train_worlds", "reader_warmup_steps"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"RealmConfig.{name} must be an int >= 0, got {value!r}")
    if (isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float))
        or not (math.isfinite(self.temperature) and self.temperature > 0)):
      raise ValueError(f"RealmConfig.temperature must be a finite number > 0, got "
                       f"{self.temperature!r}")
    span = tuple(self.ict_span)
    if (len(span) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in span)
        or not 1 <= span[0] <= span[1]):
      raise ValueError(f"RealmConfig.ict_span must be (min, max) token counts with "
                       f"1 <= min <= max, got {self.ict_span!r}")
    if (isinstance(self.ict_title_prob, bool) or not isinstance(self.ict_title_prob, (int, float))
        or not 0 <= self.ict_title_prob <= 1):
      raise ValueError(f"RealmConfig.ict_title_prob must be in [0, 1], got "
                       f"{self.ict_title_prob!r}")
    if self.index not in INDEX_KINDS:
      raise ValueError(f"RealmConfig.index must be one of {INDEX_KINDS}, got {self.index!r}")
    for name in ("train_doc_encoder", "freeze_retriever", "tie_encoder_init",
                 "reader_sees_subject"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"RealmConfig.{name} must be a bool, got {getattr(self, name)!r}")
    if self.eval_split not in SPLITS:
      raise ValueError(f"RealmConfig.eval_split must be one of {SPLITS}, got "
                       f"{self.eval_split!r}")
    if self.world.two_hop_fraction != 0:
      raise ValueError(f"RealmConfig.world.two_hop_fraction must be 0 (REALM reads one "
                       f"document per question), got {self.world.two_hop_fraction!r}")
    for name, cls in (("world", WorldConfig), ("encoder", EncoderConfig),
                      ("reader", TransformerConfig), ("scann", ScannConfig),
                      ("retriever_optimizer", OptimizerConfig),
                      ("reader_optimizer", OptimizerConfig)):
      if not isinstance(getattr(self, name), cls):
        raise ValueError(f"RealmConfig.{name} must be a {cls.__name__}, got "
                         f"{type(getattr(self, name)).__name__}")
    if not self.encoder.normalize:
      raise ValueError("RealmConfig.encoder.normalize must be True (scores are cosines / "
                       "temperature)")


# ------------------------------------------------------------------------------------ data


class Corpus(NamedTuple):
  """Every document, tokenized twice: for the document encoder and as a reader passage."""

  enc_ids: np.ndarray      # [N, Ld] int32 `Document.text`, right-padded
  enc_mask: np.ndarray     # [N, Ld] int32
  passage: np.ndarray      # [N, Sp] int32 `<information> text </information>`, right-padded
  passage_mask: np.ndarray  # [N, Sp] bool


class Questions(NamedTuple):
  """Questions with their reader segments (host arrays, row i = question i)."""

  enc_ids: np.ndarray      # [Q, Lq] int32 question text (query encoder input)
  enc_mask: np.ndarray     # [Q, Lq] int32
  prefix: np.ndarray       # [Q, Sq] int32 `<bos> question`, right-padded
  prefix_mask: np.ndarray  # [Q, Sq] bool
  answer: np.ndarray       # [Q, Sa] int32 `<answer> y </answer>`, right-padded
  answer_mask: np.ndarray  # [Q, Sa] bool
  gold: np.ndarray         # [Q] int32 row of the supporting document (metrics only)


class RealmBatch(NamedTuple):
  """One step's questions and what the stale index retrieved for them."""

  enc_ids: jax.Array       # [B, Lq] int32
  enc_mask: jax.Array      # [B, Lq] int32
  prefix: jax.Array        # [B, Sq] int32
  prefix_mask: jax.Array   # [B, Sq] bool
  answer: jax.Array        # [B, Sa] int32
  answer_mask: jax.Array   # [B, Sa] bool
  doc_ids: jax.Array       # [B, K] int32 retrieved rows of the corpus
  stale_scores: jax.Array  # [B, K] float32 <q, d_stale> from the index
  doc_vecs: jax.Array      # [B, K, D] float32 d_stale, the index's vectors of `doc_ids`


def _pad(rows: Sequence[Sequence[int]], width: int | None = None, pad: int = 0
         ) -> tuple[np.ndarray, np.ndarray]:
  width = max(len(r) for r in rows) if width is None else width
  ids = np.full((len(rows), width), pad, np.int32)
  mask = np.zeros((len(rows), width), bool)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = r
    mask[i, :len(r)] = True
  return ids, mask


def build_corpus(world: World | Sequence[World], tokenizer: Any) -> Corpus:
  """Tokenizes every document of `world` (rows in `world.documents` order; several worlds:
  their documents one world after the other)."""
  worlds = [world] if isinstance(world, World) else list(world)
  texts = [tokenizer.encode(d.text) for w in worlds for d in w.documents]
  enc_ids, enc_mask = _pad(texts, pad=tokenizer.pad_id)
  tag = tokenizer.tag_id
  passage, passage_mask = _pad([[tag("<information>"), *t, tag("</information>")]
                                for t in texts], pad=tokenizer.pad_id)
  return Corpus(enc_ids, enc_mask.astype(np.int32), passage, passage_mask)


def build_questions(world: World, questions: Sequence[Question], tokenizer: Any, *,
                    reader_sees_subject: bool = True, offset: int = 0) -> Questions:
  """Tokenizes questions and gold answers (`answers[0]`) into fixed-width segments.

  `gold` is the supporting document's row in `world.documents` plus `offset` (the world's
  first row in a corpus of several worlds).

  With `reader_sees_subject=False` the reader's copy of the question has the subject's name
  (`search_queries[0]`) removed (the query encoder always gets the whole question).
  """
  tag = tokenizer.tag_id
  q_ids = [tokenizer.encode(q.question) for q in questions]
  enc_ids, enc_mask = _pad(q_ids, pad=tokenizer.pad_id)
  r_ids = q_ids if reader_sees_subject else [
      tokenizer.encode(" ".join(q.question.replace(q.search_queries[0], " ").split()))
      for q in questions]
  prefix, prefix_mask = _pad([[tokenizer.bos_id, *t] for t in r_ids], pad=tokenizer.pad_id)
  answer, answer_mask = _pad([[tag("<answer>"), *tokenizer.encode(q.answers[0]),
                               tag("</answer>")] for q in questions], pad=tokenizer.pad_id)
  gold = np.array([offset + world.doc_index(q.supporting_doc_ids[0]) for q in questions],
                  np.int32)
  return Questions(enc_ids, enc_mask.astype(np.int32), prefix, prefix_mask, answer,
                   answer_mask, gold)


def _concat_questions(parts: Sequence[Questions], pad: int) -> Questions:
  """Questions of several worlds in one set (segments re-padded to the widest)."""
  width = {"enc": max(q.enc_ids.shape[1] for q in parts),
           "prefix": max(q.prefix.shape[1] for q in parts),
           "answer": max(q.answer.shape[1] for q in parts)}
  parts = [_pad_width(q, width, pad) for q in parts]
  return Questions(*(np.concatenate(xs, axis=0) for xs in zip(*parts)))


def _pad_width(q: Questions, width: dict[str, int], pad: int) -> Questions:
  """Questions re-padded to the widths of another split (so jitted shapes are shared)."""
  def fit(x, w, fill):
    if x.shape[1] > w:
      raise ValueError(f"a question segment of {x.shape[1]} tokens exceeds the training width "
                       f"{w}")
    return np.pad(x, ((0, 0), (0, w - x.shape[1])), constant_values=fill)
  return q._replace(
      enc_ids=fit(q.enc_ids, width["enc"], pad), enc_mask=fit(q.enc_mask, width["enc"], 0),
      prefix=fit(q.prefix, width["prefix"], pad),
      prefix_mask=fit(q.prefix_mask, width["prefix"], False),
      answer=fit(q.answer, width["answer"], pad),
      answer_mask=fit(q.answer_mask, width["answer"], False))


# ---------------------------------------------------------------------------------- models


def reader_inputs(prefix: jax.Array, prefix_mask: jax.Array, passage: jax.Array,
                  passage_mask: jax.Array, answer: jax.Array, answer_mask: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Concatenates right-padded segments into reader rows with contiguous positions.

  Args:
    prefix: [R, Sq] `<bos> question`; passage: [R, Sp]; answer: [R, Sa]; each with a bool
      mask of the same shape (False on padding).

  Returns:
    (tokens [R, T], mask [R, T] bool, positions [R, T] int32) with T = Sq + Sp + Sa; padded
    slots are masked out as keys and real tokens get positions 0, 1, 2, ... (so a row reads
    exactly as its unpadded concatenation).

  Example:
    >>> t, m, p = reader_inputs(*(jnp.ones((1, 2), jnp.int32), jnp.array([[True, False]])) * 3)
    >>> p.tolist()
    [[0, 0, 1, 1, 2, 2]]
  """
  tokens = jnp.concatenate([prefix, passage, answer], axis=1)
  mask = jnp.concatenate([prefix_mask, passage_mask, answer_mask], axis=1).astype(bool)
  positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
  return tokens, mask, positions


def make_reader_loglik_fn(reader: Transformer) -> Callable[..., jax.Array]:
  """`loglik(params, prefix, prefix_mask, passage, passage_mask, answer, answer_mask) -> [R]`:
  teacher-forced log p(answer tokens after `<answer>` | prefix, passage), summed over tokens.

  Example:
    >>> loglik = make_reader_loglik_fn(Transformer(cfg))(params, *segments)   # [R]
  """
  def loglik(params, prefix, prefix_mask, passage, passage_mask, answer, answer_mask):
    tokens, mask, positions = reader_inputs(prefix, prefix_mask, passage, passage_mask,
                                            answer, answer_mask)
    logits = reader.apply({"params": params}, tokens, positions=positions, attention_mask=mask)
    sa = answer.shape[1]
    logits = logits[:, -sa:-1]                                 # predict answer[1:]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    target = answer[:, 1:]
    tok = jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(answer_mask[:, 1:], tok, 0.0), axis=-1)
  return loglik


def make_greedy_answer_fn(reader: Transformer, end_id: int) -> Callable[..., jax.Array]:
  """`answer(params, prefix, prefix_mask, passage, passage_mask, start, width) -> [R, width]`:
  greedy decoding after `<answer>` (`start` [R] is its id) until `end_id` or `width - 1` tokens.

  Returns the decoded ids (position 0 is `<answer>`); tokens after `end_id` are `end_id`.
  """
  def answer(params, prefix, prefix_mask, passage, passage_mask, start, width: int):
    r = prefix.shape[0]
    seg = jnp.zeros((r, width), jnp.int32).at[:, 0].set(start)
    seg_mask = jnp.ones((r, width), bool)
    offset = prefix.shape[1] + passage.shape[1]

    def body(j, carry):
      seg, done = carry
      tokens, mask, positions = reader_inputs(prefix, prefix_mask, passage, passage_mask,
                                              seg, seg_mask)
      logits = reader.apply({"params": params}, tokens, positions=positions,
                            attention_mask=mask)
      last = jax.lax.dynamic_index_in_dim(logits, offset + j - 1, axis=1, keepdims=False)
      nxt = jnp.argmax(last, axis=-1).astype(jnp.int32)
      seg = jax.lax.dynamic_update_index_in_dim(seg, jnp.where(done, end_id, nxt), j, axis=1)
      return seg, done | (nxt == end_id)

    # One compiled body (not unrolled): `done` marks rows that have emitted `end_id`.
    seg, _ = jax.lax.fori_loop(1, width, body, (seg, jnp.zeros([r], bool)))
    return seg
  return answer


def _embed_in_batches(embed_fn, params, ids: np.ndarray, mask: np.ndarray, batch: int
                      ) -> np.ndarray:
  n = ids.shape[0]
  out = []
  for s in range(0, n, batch):
    i, m = ids[s:s + batch], mask[s:s + batch]
    short = batch - i.shape[0]
    if short:                                  # keep one compiled shape
      i = np.pad(i, ((0, short), (0, 0)))
      m = np.pad(m, ((0, short), (0, 0)), constant_values=1)
    out.append(np.asarray(embed_fn(params, i, m))[:batch - short])
  return np.concatenate(out, axis=0)


def _labels(params: PyTree, config: RealmConfig) -> PyTree:
  retriever = "frozen" if config.freeze_retriever else "retriever"
  doc = retriever if config.train_doc_encoder else "frozen"
  names = {"query": retriever, "doc": doc, "reader": "reader"}
  return {k: jax.tree.map(lambda _, n=names[k]: n, v) for k, v in params.items()}


def make_optimizer_for(config: RealmConfig) -> optax.GradientTransformation:
  """Per-part optimizers: retriever (E_q, E_d), reader, and zero updates for frozen parts."""
  return optax.multi_transform(
      {"retriever": make_optimizer(config.retriever_optimizer, config.steps),
       "reader": make_optimizer(config.reader_optimizer, config.steps),
       "frozen": optax.set_to_zero()},
      lambda params: _labels(params, config))


def make_realm_loss_fn(config: RealmConfig, embed_fn, reader_loglik_fn):
  """`loss_fn(params, batch: RealmBatch, corpus) -> (loss, metrics)` (pure).

  `params == {"query", "doc", "reader"}`; `corpus` is a `Corpus` of device arrays. Frozen
  parts are wrapped in `stop_gradient` (their gradient is never computed).
  """
  def loss_fn(params, batch: RealmBatch, corpus: Corpus):
    q_params, d_params = params["query"], params["doc"]
    if config.freeze_retriever:
      q_params = jax.lax.stop_gradient(q_params)
    if config.freeze_retriever or not config.train_doc_encoder:
      d_params = jax.lax.stop_gradient(d_params)
    b, k = batch.doc_ids.shape
    q = embed_fn(q_params, batch.enc_ids, batch.enc_mask)                    # [B, D]
    flat = batch.doc_ids.reshape(-1)
    if config.freeze_retriever or not config.train_doc_encoder:
      d = batch.doc_vecs            # E_d never changes: the index's vectors are the live ones
    else:
      d = embed_fn(d_params, corpus.enc_ids[flat], corpus.enc_mask[flat]).reshape(b, k, -1)
    live = jnp.einsum("bd,bkd->bk", q, d)                                    # [B, K]
    rep = lambda x: jnp.repeat(x, k, axis=0)                                 # [B*K, ...]
    loglik = reader_loglik_fn(params["reader"], rep(batch.prefix), rep(batch.prefix_mask),
                              corpus.passage[flat], corpus.passage_mask[flat],
                              rep(batch.answer), rep(batch.answer_mask)).reshape(b, k)
    loss, aux = marginal_nll(live / config.temperature, loglik)
    prior, posterior = aux["p_z_given_x"], aux["p_z_given_xy"]
    metrics = {
        "marginal_loglik": jnp.mean(aux["marginal_loglik"]),
        "best_doc_loglik": jnp.mean(jnp.max(loglik, axis=-1)),
        "prior_entropy": -jnp.mean(jnp.sum(prior * jnp.log(prior + 1e-12), axis=-1)),
        "prior_top_mass": jnp.mean(jnp.max(prior, axis=-1)),
        "posterior_top_mass": jnp.mean(jnp.max(posterior, axis=-1)),
        "stale_score_gap": jnp.mean(jnp.abs(jax.lax.stop_gradient(live) - batch.stale_scores)),
    }
    return loss, metrics
  return loss_fn


def make_realm_update_fn(config: RealmConfig, embed_fn, reader_loglik_fn):
  """`update(state, batch, corpus) -> (state, metrics)`: one step on the marginal loss."""
  loss_fn = make_realm_loss_fn(config, embed_fn, reader_loglik_fn)

  def update(state: TrainState, batch: RealmBatch, corpus: Corpus):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch,
                                                                       corpus)
    gnorm = {f"grad_norm_{k}": optax.tree.norm(v) for k, v in grads.items()}
    return state.apply_gradients(grads), {"loss": loss, **gnorm, **metrics}
  return update


def reader_warmup(config: RealmConfig, params: PyTree, reader_loglik_fn, questions: Questions,
                  corpus: Corpus) -> tuple[PyTree, dict[str, float]]:
  """`config.reader_warmup_steps` steps of the reader alone on (question, gold passage).

  Uses only training questions (`questions`) and their supporting documents; E_q and E_d
  are untouched. Deterministic in `config.seed`, so the end-to-end and the frozen runs start
  REALM training from the same reader.

  Returns:
    (params with the trained "reader", {"reader_warmup_loss"} of the last step).
  """
  gold = questions.gold
  questions = Questions(*(jnp.asarray(x) for x in questions))
  corpus = Corpus(*(jnp.asarray(x) for x in corpus))
  tx = make_optimizer(config.reader_optimizer, config.reader_warmup_steps)
  opt_state = tx.init(params["reader"])

  @jax.jit
  def step(p, opt_state, rows, passage_rows):
    def loss_fn(p):
      return -jnp.mean(reader_loglik_fn(
          p, questions.prefix[rows], questions.prefix_mask[rows], corpus.passage[passage_rows],
          corpus.passage_mask[passage_rows], questions.answer[rows], questions.answer_mask[rows]))
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  rng = np.random.default_rng([config.seed, 11])
  n = gold.shape[0]
  p, loss = params["reader"], float("nan")
  for _ in range(config.reader_warmup_steps):
    rows = rng.choice(n, size=min(config.reader_warmup_batch_size, n), replace=False)
    p, opt_state, loss = step(p, opt_state, rows, gold[rows])
  if config.reader_warmup_steps:
    loss = float(loss)
    trainer.say(f"[realm reader warm-up {config.reader_warmup_steps}] loss={loss:.4g}")
  return {**params, "reader": p}, {"reader_warmup_loss": loss}


def ict_batch(corpus: Corpus, rows: np.ndarray, span: tuple[int, int],
              rng: np.random.Generator, titles: Sequence[Sequence[int]] = (),
              title_prob: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
  """Inverse-Cloze pseudo-queries: a random span of each document's encoder tokens (or,
  with probability `title_prob`, the document's title).

  Args:
    corpus: the tokenized corpus.
    rows: [B] documents.
    span: (min, max) span length (clipped to the document's length).
    rng: numpy generator.
    titles: token ids of every document's title (needed when `title_prob > 0`).
    title_prob: probability of using the title (truncated to `span[1]` tokens).

  Returns:
    (ids [B, max], mask [B, max] int32), right-padded.
  """
  lengths = corpus.enc_mask[rows].sum(axis=1)
  ids = np.zeros((rows.shape[0], span[1]), np.int32)
  mask = np.zeros((rows.shape[0], span[1]), np.int32)
  for i, (r, n) in enumerate(zip(rows, lengths)):
    if title_prob and rng.random() < title_prob:
      t = list(titles[r])[:span[1]]
      ids[i, :len(t)] = t
      mask[i, :len(t)] = 1
      continue
    length = min(int(rng.integers(span[0], span[1] + 1)), int(n))
    start = int(rng.integers(0, n - length + 1))
    ids[i, :length] = corpus.enc_ids[r, start:start + length]
    mask[i, :length] = 1
  return ids, mask


def ict_warmup(config: RealmConfig, params: PyTree, embed_fn, corpus: Corpus,
               titles: Sequence[Sequence[int]] = ()) -> tuple[PyTree, dict[str, float]]:
  """`config.ict_steps` InfoNCE steps of E_q (pseudo-queries) and E_d (documents).

  Returns:
    (params with trained "query" and "doc", {"ict_loss", "ict_accuracy"} of the last step).
  """
  retriever = {"query": params["query"], "doc": params["doc"]}
  dev = Corpus(*(jnp.asarray(x) for x in corpus))
  tx = make_optimizer(config.retriever_optimizer, config.ict_steps)
  opt_state = tx.init(retriever)

  @jax.jit
  def step(retriever, opt_state, q_ids, q_mask, rows):
    def loss_fn(p):
      q = embed_fn(p["query"], q_ids, q_mask)
      d = embed_fn(p["doc"], dev.enc_ids[rows], dev.enc_mask[rows])
      return info_nce_loss(q, d, temperature=config.temperature, doc_ids=rows)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(retriever)
    updates, opt_state = tx.update(grads, opt_state, retriever)
    return optax.apply_updates(retriever, updates), opt_state, loss, aux["accuracy"]

  rng = np.random.default_rng([config.seed, 7])
  n = corpus.enc_ids.shape[0]
  loss = acc = float("nan")
  for _ in range(config.ict_steps):
    rows = rng.choice(n, size=min(config.ict_batch_size, n), replace=False).astype(np.int32)
    q_ids, q_mask = ict_batch(corpus, rows, tuple(config.ict_span), rng, titles,
                              config.ict_title_prob)
    retriever, opt_state, loss, acc = step(retriever, opt_state, q_ids, q_mask, rows)
  if config.ict_steps:
    loss, acc = float(loss), float(acc)
    trainer.say(f"[realm ict {config.ict_steps}] loss={loss:.4g} accuracy={acc:.3f}")
  return {**params, **retriever}, {"ict_loss": loss, "ict_accuracy": acc}


# ------------------------------------------------------------------------------------ run


class RealmData(NamedTuple):
  """What a run trains and evaluates on (host arrays; built once, in `build_data`)."""

  corpus: Corpus                        # every world's documents, world after world
  segments: tuple[tuple[int, int], ...]  # each world's rows of `corpus`
  titles: list[list[int]]               # each document's title tokens (ICT pseudo-queries)
  train_q: Questions                    # the training questions of every world
  train_world: np.ndarray               # [Q] the world of each training question
  eval_q: Questions                     # `world`'s `eval_split`, padded like `train_q`
  eval_questions: list[Question]        # the same questions (their answers)
  width: dict[str, int]                 # the widest question segments ("enc", "prefix", ...)


class RealmState(NamedTuple):
  """The loop's state: the trained parameters and the stale index they retrieve from."""

  train: TrainState
  index: StaleIndex


def build_worlds(config: RealmConfig) -> list[World]:
  """`config.world` (row 0: evaluation) and the `train_worlds` extra worlds."""
  return [build_world(dataclasses.replace(config.world, seed=config.world.seed + 1000 * w))
          for w in range(config.train_worlds + 1)]


def build_data(config: RealmConfig, worlds: Sequence[World], tokenizer: Any) -> RealmData:
  """Tokenizes the corpus and the questions: the train questions of every world (each
  world's gold rows offset to its segment), `worlds[0]`'s `eval_split` for evaluation, all
  padded to the same widths (one compiled shape)."""
  corpus = build_corpus(worlds, tokenizer)
  sizes = [len(w.documents) for w in worlds]
  starts = np.cumsum([0] + sizes)
  segments = tuple((int(a), int(b)) for a, b in zip(starts[:-1], starts[1:]))
  parts = [build_questions(w, unique_questions(w.splits["train"]), tokenizer,
                           reader_sees_subject=config.reader_sees_subject, offset=a)
           for w, (a, _) in zip(worlds, segments)]
  train_world = np.concatenate([np.full(q.gold.shape[0], i, np.int32)
                                for i, q in enumerate(parts)])
  train_q = _concat_questions(parts, tokenizer.pad_id)
  eval_questions = unique_questions(worlds[0].splits[config.eval_split])
  eval_raw = build_questions(worlds[0], eval_questions, tokenizer,
                             reader_sees_subject=config.reader_sees_subject)
  width = {"enc": max(train_q.enc_ids.shape[1], eval_raw.enc_ids.shape[1]),
           "prefix": max(train_q.prefix.shape[1], eval_raw.prefix.shape[1]),
           "answer": max(train_q.answer.shape[1], eval_raw.answer.shape[1])}
  if config.top_k > min(sizes):
    raise ValueError(f"RealmConfig.top_k={config.top_k} exceeds the {min(sizes)} documents "
                     "of a world")
  titles = [tokenizer.encode(d.title) for w in worlds for d in w.documents]
  return RealmData(corpus, segments, titles, _pad_width(train_q, width, tokenizer.pad_id),
                   train_world, _pad_width(eval_raw, width, tokenizer.pad_id),
                   list(eval_questions), width)


def _tokenizer(config: RealmConfig, worlds: Sequence[World], workdir: str
               ) -> SentencePieceTokenizer:
  """The workdir's tokenizer (trained on every world's texts on the first call)."""
  path = os.path.join(workdir, "tokenizer.model")
  if os.path.exists(path):
    tokenizer = SentencePieceTokenizer.load(path)
  else:
    tokenizer = SentencePieceTokenizer.train([t for w in worlds for t in w.texts()],
                                             vocab_size=config.tokenizer_vocab_size,
                                             seed=config.seed)
  if jax.process_index() == 0:
    tokenizer.save(path)
  return tokenizer


def init_params(config: RealmConfig, enc_config: EncoderConfig, reader: Transformer
                ) -> dict[str, PyTree]:
  """`{"query", "doc", "reader"}`, seeded by `config.seed` (E_d a copy of E_q when
  `tie_encoder_init`)."""
  key = jax.random.key(config.seed)
  q_params = init_encoder_params(enc_config, jax.random.fold_in(key, 0))
  d_params = (jax.tree.map(jnp.array, q_params) if config.tie_encoder_init
              else init_encoder_params(enc_config, jax.random.fold_in(key, 1)))
  reader_params = jax.jit(reader.init)(jax.random.fold_in(key, 2),
                                       jnp.zeros((1, 8), jnp.int32))["params"]
  return {"query": q_params, "doc": d_params, "reader": nn.meta.unbox(reader_params)}


def warm_start(config: RealmConfig, params: PyTree, embed_fn, reader: Transformer,
               data: RealmData) -> tuple[PyTree, dict[str, float]]:
  """The ICT warm-up of the encoders, then the reader's warm-up (a fresh run only; neither
  is checkpointed: a resumed run restores their result)."""
  params, info = ict_warmup(config, params, embed_fn, data.corpus, data.titles)
  params, warm = reader_warmup(config, params, make_reader_loglik_fn(reader), data.train_q,
                               data.corpus)
  return params, {**info, **warm}


def realm_checkpoint(state: RealmState) -> dict:
  """What a checkpoint holds: the train state and the stale index (so a resumed run
  retrieves exactly what an uninterrupted one would)."""
  return {**trainer.train_state_checkpoint(state.train),
          "index_emb": jnp.asarray(state.index.embeddings),
          "refreshed_at": jnp.asarray(state.index.refreshed_at, jnp.int32)}


def _resolved_models(config: RealmConfig, vocab: int, corpus: Corpus, width: dict[str, int]
                     ) -> tuple[EncoderConfig, TransformerConfig]:
  enc = dataclasses.replace(config.encoder, vocab_size=vocab)
  reader = dataclasses.replace(config.reader, vocab_size=vocab)
  longest = max(corpus.enc_ids.shape[1], width["enc"])
  if longest > enc.max_position:
    raise ValueError(f"RealmConfig.encoder.max_position={enc.max_position} is shorter than the "
                     f"longest text ({longest} tokens)")
  total = width["prefix"] + corpus.passage.shape[1] + width["answer"]
  if total > reader.max_len:
    raise ValueError(f"RealmConfig.reader.max_len={reader.max_len} is shorter than question + "
                     f"passage + answer ({total} tokens)")
  return enc, reader


class _BatchSchedule:
  """Step -> (question rows [B], world): every batch holds questions of one world.

  An epoch cuts each world's shuffled questions into batches of B (the last one filled by
  wrapping around) and shuffles the batches of all worlds; deterministic in (seed, epoch).
  """

  def __init__(self, world_of: np.ndarray, batch_size: int, seed: int):
    self.rows = [np.flatnonzero(world_of == w) for w in range(int(world_of.max()) + 1)]
    self.batch_size, self.seed = batch_size, seed
    self.per_epoch = sum(-(-len(r) // batch_size) for r in self.rows)
    self._epoch, self._batches = -1, []

  def __call__(self, step: int) -> tuple[np.ndarray, int]:
    epoch, pos = divmod(step, self.per_epoch)
    if epoch != self._epoch:
      rng = np.random.default_rng([self.seed, 1, epoch])
      batches = []
      for w, rows in enumerate(self.rows):
        order = rng.permutation(rows)
        for s in range(0, len(rows), self.batch_size):
          batches.append((np.take(order, np.arange(s, s + self.batch_size), mode="wrap"), w))
      self._batches = [batches[i] for i in rng.permutation(len(batches))]
      self._epoch = epoch
    return self._batches[pos]


def realm_batch(questions: Questions, rows: np.ndarray, doc_ids: np.ndarray,
                stale_scores: np.ndarray, index_embeddings: np.ndarray) -> RealmBatch:
  """The batch of questions `rows` with what the stale index retrieved for them (`doc_ids`
  [B, K], their stale scores, and their stale vectors taken from `index_embeddings`)."""
  return RealmBatch(questions.enc_ids[rows], questions.enc_mask[rows], questions.prefix[rows],
                    questions.prefix_mask[rows], questions.answer[rows],
                    questions.answer_mask[rows], doc_ids.astype(np.int32),
                    stale_scores.astype(np.float32), index_embeddings[doc_ids])


def support_metrics(doc_ids: np.ndarray, gold: np.ndarray) -> dict[str, float]:
  """How often the gold document is among the retrieved [B, K] (`support_in_topk`) and
  first (`support_top1`): reported only, never trained on."""
  return {"support_in_topk": float(np.mean(np.any(doc_ids == gold[:, None], axis=1))),
          "support_top1": float(np.mean(doc_ids[:, 0] == gold))}


class _WindowMean:
  """Means of each metric over the steps since the last log step (the loop logs the metrics
  of its log steps; REALM's are averaged over the window instead)."""

  def __init__(self):
    self.sums: dict[str, list[float]] = {}

  def add(self, metrics: Mapping[str, float]) -> dict[str, float]:
    for k, v in metrics.items():
      self.sums.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in self.sums.items()}

  def reset(self) -> None:
    self.sums = {}


def make_step_fn(config: RealmConfig, loop: trainer.LoopConfig, data: RealmData, update,
                 embed_fn, embed_docs: Callable[[PyTree], np.ndarray], corpus: Corpus):
  """`step_fn(state: RealmState, step) -> (state, metrics, work)` for `trainer.run_loop`.

  Refreshes the index (re-embeds every document) before a step that is a multiple of
  `refresh_every`, retrieves the step's questions (`_BatchSchedule`) from their world's
  segment of the stale index, runs `update`. The metrics are the means over the log window
  (`loss`, ..., `support_in_topk`, `support_top1`) and the index's (`index/...`: the last
  step's `stale_score_gap` and the window's mean, `steps_since_refresh`, `refreshes` of this
  invocation).
  """
  schedule = _BatchSchedule(data.train_world, config.batch_size, config.seed)
  window = _WindowMean()
  refreshes = 0
  reader_width = data.width["prefix"] + data.corpus.passage.shape[1] + data.width["answer"]

  def step_fn(state: RealmState, step: int):
    nonlocal refreshes
    train, index = state
    if step % config.refresh_every == 0 and index.refreshed_at != step:
      index.refresh(embed_docs(train.params["doc"]), step)
      refreshes += 1
    idx, w = schedule(step)
    q_vec = embed_fn(train.params["query"], data.train_q.enc_ids[idx],
                     data.train_q.enc_mask[idx])
    doc_ids, stale = index.search(q_vec, config.top_k, segment=w)
    batch = realm_batch(data.train_q, idx, doc_ids, stale, index.embeddings)
    train, m = update(train, batch, corpus)
    m = metrics_lib.to_python(m)
    m.update(support_metrics(doc_ids, data.train_q.gold[idx]))
    means = window.add(m)
    out = {k: v for k, v in means.items() if k != "stale_score_gap"}
    out.update({"index/stale_score_gap": m["stale_score_gap"],
                "index/stale_score_gap_mean": means["stale_score_gap"],
                "index/steps_since_refresh": float(step - index.refreshed_at),
                "index/refreshes": float(refreshes)})
    if (step + 1) % loop.log_every == 0 or step + 1 == loop.steps:
      window.reset()
    return RealmState(train, index), out, trainer.StepWork(
        tokens=float(doc_ids.size * reader_width))
  return step_fn


PROGRESS_KEYS = ("loss", "marginal_loglik", "support_in_topk", "support_top1",
                 "index/stale_score_gap", "s_per_step")


def run(config: RealmConfig, workdir: str, *,
        after_first_step: Callable[[], None] | None = None) -> dict[str, Any]:
  """Trains retriever and reader end to end (or the reader alone over a frozen retriever).

  Args:
    config: the run's configuration.
    workdir: where everything goes; an existing workdir is resumed.
    after_first_step: called once after the first optimizer step (the launcher records the
      operative gin config there).

  Returns:
    The summary written to `workdir/summary.json`: `recall@1`, `recall@k` (k = `top_k`),
    `em`, `em_gold_doc`, `num_eval_questions`, `num_docs`, `top_k`, `freeze_retriever`,
    `train_doc_encoder`, `index`, `steps`, `train_seconds`, `wall_seconds`.
  """
  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  worlds = build_worlds(config)
  tokenizer = _tokenizer(config, worlds, workdir)
  trainer.write_config(workdir, CONFIG_FILE, config)
  data = build_data(config, worlds, tokenizer)
  enc_config, reader_config = _resolved_models(config, tokenizer.vocab_size, data.corpus,
                                               data.width)
  embed_fn = make_embed_fn(BertEncoder(enc_config))
  reader = Transformer(reader_config)
  params = init_params(config, enc_config, reader)
  num_params = sum(int(x.size) for x in jax.tree.leaves(params))
  n_docs = data.corpus.enc_ids.shape[0]
  state = RealmState(
      TrainState.create(apply_fn=reader.apply, params=params, tx=make_optimizer_for(config)),
      StaleIndex("exact", config.scann, np.zeros((n_docs, enc_config.hidden_size)), 0))
  embed_jit = jax.jit(embed_fn)
  embed_docs = lambda p: _embed_in_batches(embed_jit, p, data.corpus.enc_ids,  # noqa: E731
                                           data.corpus.enc_mask, 256)

  ckpt = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR))
  state, start, _ = trainer.restore_latest(
      ckpt, state, realm_checkpoint,
      lambda s, tree: RealmState(
          s.train.replace(params=tree["params"], opt_state=tree["opt_state"],
                          step=tree["step"]),
          StaleIndex(config.index, config.scann, np.asarray(tree["index_emb"]),
                     int(tree["refreshed_at"]), data.segments)))
  warm = {}
  if not start:    # a fresh run: warm-ups, then the index of the warmed-up E_d
    params, warm = warm_start(config, state.train.params, embed_fn, reader, data)
    state = RealmState(state.train.replace(params=params),
                       StaleIndex(config.index, config.scann, embed_docs(params["doc"]), 0,
                                  data.segments))

  corpus = Corpus(*(jnp.asarray(x) for x in data.corpus))
  update = jax.jit(make_realm_update_fn(config, embed_fn, make_reader_loglik_fn(reader)),
                   donate_argnums=0)
  writer = metrics_lib.create_writer(workdir)
  loop = trainer.LoopConfig(name="train", steps=config.steps, log_every=config.log_every,
                            checkpoint_every=config.checkpoint_every,
                            progress_keys=PROGRESS_KEYS)
  t_train = time.time()
  state = trainer.run_loop(
      loop, state, make_step_fn(config, loop, data, update, embed_jit, embed_docs, corpus),
      start=start, writer=writer,
      save_fn=lambda step, s: ckpt.save(step, realm_checkpoint(s), {"phase": "realm"}),
      after_first_step=after_first_step)
  ckpt.close()
  train_seconds = time.time() - t_train

  t_eval = time.time()
  params, index = state.train.params, state.index
  if not config.freeze_retriever and config.train_doc_encoder:
    index.refresh(embed_docs(params["doc"]), config.steps)   # evaluate on a fresh index
  summary = evaluate(config, params, data.eval_q, corpus, index, embed_jit, reader,
                     tokenizer, data.eval_questions)
  summary.update(
      num_docs=data.segments[0][1], num_train_docs=n_docs, train_worlds=config.train_worlds,
      top_k=config.top_k, freeze_retriever=config.freeze_retriever,
      train_doc_encoder=config.train_doc_encoder, index=config.index, steps=config.steps,
      num_train_questions=int(data.train_q.gold.shape[0]), eval_split=config.eval_split,
      **warm, num_params=num_params, train_seconds=train_seconds,
      eval_seconds=time.time() - t_eval, wall_seconds=time.time() - t_start)
  writer.write_scalars(config.steps, {f"eval/{k_}": v for k_, v in summary.items()
                                      if isinstance(v, (int, float)) and not isinstance(v, bool)})
  trainer.write_summary(workdir, summary, writer)
  trainer.say("[realm summary] " + " ".join(f"{k_}={v:.3f}" for k_, v in sorted(summary.items())
                                            if isinstance(v, float)))
  return summary


def evaluate(config: RealmConfig, params: PyTree, questions: Questions, corpus: Corpus,
             index: StaleIndex, embed_fn, reader: Transformer, tokenizer: Any,
             raw_questions: Sequence[Question]) -> dict[str, float]:
  """recall@1, recall@k, em (top-1 document) and em_gold_doc on `questions` (see module)."""
  k = config.top_k
  end_id = tokenizer.tag_id("</answer>")
  answer_fn = jax.jit(make_greedy_answer_fn(reader, end_id), static_argnames="width")
  width = questions.answer.shape[1] + 2          # room for a longer (wrong) answer
  hits1, hitsk, preds, preds_gold = [], [], [], []
  bs = config.eval_batch_size
  for s in range(0, questions.gold.shape[0], bs):
    sl = slice(s, s + bs)
    q_vec = embed_fn(params["query"], questions.enc_ids[sl], questions.enc_mask[sl])
    ids, _ = index.search(q_vec, k)
    gold = questions.gold[sl]
    hits1.append(ids[:, 0] == gold)
    hitsk.append(np.any(ids == gold[:, None], axis=1))
    start = np.full([gold.shape[0]], tokenizer.tag_id("<answer>"), np.int32)
    for doc_rows, out in ((ids[:, 0], preds), (gold, preds_gold)):
      seg = answer_fn(params["reader"], questions.prefix[sl], questions.prefix_mask[sl],
                      corpus.passage[doc_rows], corpus.passage_mask[doc_rows], start,
                      width=width)
      out.extend(_decode_answers(np.asarray(seg), end_id, tokenizer))
  golds = [q.answers for q in raw_questions]
  return {
      "recall@1": float(np.mean(np.concatenate(hits1))),
      "recall@k": float(np.mean(np.concatenate(hitsk))),
      f"recall@{k}": float(np.mean(np.concatenate(hitsk))),
      "em": float(np.mean([exact_match(p, g) for p, g in zip(preds, golds)])),
      "em_gold_doc": float(np.mean([exact_match(p, g) for p, g in zip(preds_gold, golds)])),
      "num_eval_questions": len(raw_questions),
  }


def _decode_answers(seg: np.ndarray, end_id: int, tokenizer: Any) -> list[str | None]:
  out = []
  for row in seg[:, 1:]:
    row = list(row)
    if end_id not in row:
      out.append(None)                              # no closing tag: not an answer
      continue
    out.append(tokenizer.decode(row[:row.index(end_id)]).strip())
  return out


def load_config(workdir: str) -> RealmConfig:
  """The `RealmConfig` a REALM workdir was trained with."""
  from jaxsearch.train.config_files import read_config  # noqa: PLC0415
  return read_config(workdir, CONFIG_FILE, RealmConfig, "a REALM workdir")
