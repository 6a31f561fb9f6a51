r"""New documents in a trained DSI model: incremental training with replay vs a DOME-style
low-rank edit (issue 7, item 4). Library: `jaxsearch.generative.edit`.

Protocol (world corpus, 448 passages, atomic docIDs):
  queries   every question the world can ask about a document (its `QUESTION_TEMPLATES`
            instances: 5 per person, 2 per company, 1 per city; countries and distractors
            have none). For a document with >= 2 questions one of them (seeded) is held out;
            the others are its training queries (for new documents: its pseudo-queries).
  new docs  `--new_fraction` of the corpus (45 of 448), drawn (seeded) among the documents
            with a held-out question; the rest are old. Old documents get atomic codes
            0..N_old-1, new ones the appended codes N_old..N-1.
  base      a decoder-only DSI transformer (`jaxsearch.generative.dsi`) trained on the old
            documents only: indexing rows (`text SEP docID END`, text cut to 20 tokens) and
            the old training queries, mixed 1:1. The tokenizer is trained on old texts and
            old training queries only. Then the vocabulary gets the new documents' codes
            (`edit.extend_docid_vocab`, random rows at the trained codes' scale).
  update    both methods see the same new-document data, in one of two settings
            (`--new_data`): "pseudo" = the new documents' indexing rows and pseudo-query
            rows (their questions but the held-out one: an oracle query generator, DSI-QG
            style), "indexing" = their indexing rows only; and old rows (all old training
            rows for replay; a `--edit_old_rows` sample for the edit's preserved key
            statistics and layer effects, `--edit_refine_old_rows` for its KL term):
            (a) incremental: `edit.incremental_train`, every parameter, `--replay_steps`
                batches of `--batch_size` rows with `--replay_ratio` old rows per new row;
                in the first setting also without replay (ratio 0: the forgetting it
                prevents);
            (b) edit: `edit.edit_for_new_documents` (critical layers by mean ablation of
                each layer's MLP / attention output at the docID decoding positions; keys,
                hybrid-label edit vectors, closed-form ridge least-squares updates of the
                chosen layers' down-projections truncated to rank r), reported as is
                ("closed form") and after `edit.refine_edit` (a few Adam steps on the rank-r
                factors: hard + soft labels for new rows, KL to the model's own
                distributions for old rows). With `--ablations 1`, the first setting also
                runs the closed form on the last layers instead of the measured ones, and
                with the old keys preserved at the decoding positions only.
  metrics   trie-constrained beam search (beam 10) over all N docIDs; Recall@1 / Recall@10
            on four query sets: old-document training queries (`old_train`, a seeded
            sample), old-document held-out queries (`old_heldout`), new-document
            pseudo-queries (`new_train`; trained on in the "pseudo" setting only) and
            new-document held-out questions (`new_heldout`); wall-clock and process CPU
            seconds of each update (compilation included; the edit's include measuring
            the layer effects; the refined edit's include the closed form).

Output: one JSON row per method on stdout (and `--json`), and `--out` (markdown) with the
table, the per-layer effects and the command.

Several seeds: run with `--seed 1`, `--seed 2` (own `--json`), then
`python -m experiments.gr_new_docs --summarize OUT.md RUN.json ...` writes mean ± std per row.

Example:
  python -m experiments.gr_new_docs --out docs/generative/new_docs.md \
      --json runs/gr_new_docs.json
  python -m experiments.gr_new_docs --base_steps 20 --replay_steps 3 --edit_vector_steps 3 \
      --edit_refine_steps 2 --out /tmp/nd.md                                     # smoke test
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsearch.data.tokenizer import SentencePieceTokenizer
from jaxsearch.generative import docids as docids_lib
from jaxsearch.generative import dsi
from jaxsearch.generative import edit as edit_lib
from jaxsearch.generative.trie import build_trie, trie_depth
from jaxsearch.models.transformer import Transformer, TransformerConfig
from jaxsearch.programs.generative_retrieval import DSIConfig, load_dsi_data
from jaxsearch.train.optim import OptimizerConfig, make_optimizer
from jaxsearch.train.state import TrainState

QUERY_SETS = ("old_train", "old_heldout", "new_train", "new_heldout")
KS = (1, 10)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--new_fraction", type=float, default=0.1)
  p.add_argument("--max_input_tokens", type=int, default=20)
  p.add_argument("--d_model", type=int, default=128)
  p.add_argument("--num_layers", type=int, default=4)
  p.add_argument("--mlp_dim", type=int, default=512)
  p.add_argument("--base_steps", type=int, default=400)
  p.add_argument("--base_lr", type=float, default=2e-3)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--replay_steps", type=int, default=40)
  p.add_argument("--replay_ratio", type=float, default=1.0)
  p.add_argument("--replay_lr", type=float, default=1e-3)
  p.add_argument("--new_data", type=str, default="pseudo,indexing",
                 help="comma-separated settings: what the updates learn the new documents "
                 "from: their indexing rows and pseudo-queries (pseudo), or their indexing "
                 "rows only (indexing)")
  p.add_argument("--methods", type=str, default="replay,no_replay,edit",
                 help="comma-separated subset of: replay (incremental training with "
                 "--replay_ratio), no_replay (incremental training, ratio 0), edit")
  p.add_argument("--ablations", type=int, default=1,
                 help="1: in the first setting, also run the closed-form edit on the last "
                 "layers and with old keys preserved at decoding positions only")
  p.add_argument("--edit_layers", type=str, default="",
                 help="comma-separated layers to edit; empty = chosen by measured effect")
  p.add_argument("--edit_num_layers", type=int, default=2)
  p.add_argument("--edit_rank", type=int, default=64)
  p.add_argument("--edit_soft_weight", type=float, default=0.1)
  p.add_argument("--edit_vector_steps", type=int, default=25)
  p.add_argument("--edit_vector_lr", type=float, default=0.2)
  p.add_argument("--edit_vector_l2", type=float, default=0.01)
  p.add_argument("--edit_covariance_weight", type=float, default=4.0)
  p.add_argument("--edit_refine_steps", type=int, default=10)
  p.add_argument("--edit_refine_lr", type=float, default=1e-3)
  p.add_argument("--edit_kl_weight", type=float, default=1.0)
  p.add_argument("--edit_old_rows", type=int, default=256,
                 help="old rows for the layer effects and the preserved key statistics")
  p.add_argument("--edit_refine_old_rows", type=int, default=128,
                 help="old rows whose distributions the refinement keeps (KL)")
  p.add_argument("--old_train_eval", type=int, default=200,
                 help="old training queries evaluated (a seeded sample)")
  p.add_argument("--beam", type=int, default=10)
  p.add_argument("--base_cache", type=str, default="",
                 help="npz file: load the base model's parameters if it exists, else save")
  p.add_argument("--json", type=str, default="")
  p.add_argument("--out", type=str, default="")
  return p.parse_args(argv)


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Split:
  """Documents in docID order (old first), their texts and queries."""

  texts: list[str]                  # [N] indexing texts, old documents first
  doc_ids: list[str]                # [N]
  num_old: int
  train_queries: list[tuple[str, int]]    # (query, doc row)
  heldout_queries: list[tuple[str, int]]


def make_split(seed: int, new_fraction: float) -> Split:
  """Old/new documents and the per-document query split (module docstring)."""
  data = load_dsi_data(DSIConfig())
  n = len(data.corpus)
  rng = np.random.default_rng([seed, 1])
  heldout_of: dict[int, int] = {}
  for row, questions in enumerate(data.templates):
    if len(questions) >= 2:
      heldout_of[row] = int(rng.integers(len(questions)))
  num_new = int(round(new_fraction * n))
  if not 1 <= num_new <= len(heldout_of):
    raise ValueError(f"--new_fraction={new_fraction} gives {num_new} new documents; expected "
                     f"1..{len(heldout_of)} (documents with a held-out question)")
  new_rows = np.sort(rng.choice(sorted(heldout_of), num_new, replace=False))
  is_new = np.zeros(n, bool)
  is_new[new_rows] = True
  order = np.concatenate([np.flatnonzero(~is_new), new_rows])       # docID code -> corpus row
  code_of = np.empty(n, np.int64)
  code_of[order] = np.arange(n)
  train, heldout = [], []
  for row, questions in enumerate(data.templates):
    for j, q in enumerate(questions):
      (heldout if heldout_of.get(row) == j else train).append((q, int(code_of[row])))
  return Split(texts=[data.doc_inputs[r] for r in order],
               doc_ids=[data.corpus.ids[r] for r in order], num_old=n - num_new,
               train_queries=train, heldout_queries=heldout)


# ----------------------------------------------------------------------------------------
# Base model
# ----------------------------------------------------------------------------------------


def train_base(model: Transformer, layout: dsi.DSILayout, indexing: dsi.DSIBatch,
               retrieval: dsi.DSIBatch, args) -> tuple[Any, dict[str, float]]:
  t0 = time.time()
  opt = OptimizerConfig(learning_rate=args.base_lr, warmup_steps=30, decay_steps=-1)
  state = TrainState.create(apply_fn=model.apply,
                            params=dsi.init_params(model.config, jax.random.key(args.seed)),
                            tx=make_optimizer(opt, args.base_steps))
  update = jax.jit(dsi.make_dsi_update_fn(model, layout), donate_argnums=0)
  m = {}
  for step in range(args.base_steps):
    batch = dsi.mixture_batch(indexing, retrieval, step=step, batch_size=args.batch_size,
                              indexing_ratio=1.0, seed=args.seed)
    state, m = update(state, jax.tree.map(jnp.asarray, batch))
    if (step + 1) % 100 == 0 or step + 1 == args.base_steps:
      print(f"[base {step + 1}/{args.base_steps}] loss={float(m['loss']):.3f} "
            f"seq_acc={float(m['sequence_accuracy']):.3f} ({time.time() - t0:.0f}s)",
            file=sys.stderr, flush=True)
  params = jax.block_until_ready(state.params)
  return params, {"base_seconds": time.time() - t0, "base_loss": float(m["loss"])}


def _save_params(path: str, params) -> None:
  flat = {"/".join(str(getattr(k, "key", k)) for k in kp): np.asarray(v)
          for kp, v in jax.tree_util.tree_leaves_with_path(params)}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, **flat)


def _load_params(path: str, like):
  with np.load(path) as f:
    leaves = {k: f[k] for k in f.files}
  return jax.tree_util.tree_map_with_path(
      lambda kp, v: jnp.asarray(leaves["/".join(str(getattr(k, "key", k)) for k in kp)]), like)


# ----------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------


class Evaluator:
  """Recall@k of constrained beam search over all N docIDs, per query set."""

  def __init__(self, model, layout, num_docs: int, prompts: dict[str, tuple], beam: int):
    ids = docids_lib.atomic_docids(num_docs)
    self.trie = jax.tree.map(jnp.asarray, build_trie(ids))
    self.fn = jax.jit(dsi.make_retrieve_fn(model, layout, beam_size=beam,
                                           num_steps=trie_depth(ids)))
    self.prompts = prompts

  def __call__(self, params) -> dict[str, float]:
    out = {}
    for name, (p, m, gold) in self.prompts.items():
      docs, _ = dsi.batched_retrieve(self.fn, params, self.trie, p, m, 64)
      for k in KS:
        out[f"{name}_recall@{k}"] = float(np.mean(np.any(docs[:, :k] == gold[:, None], 1)))
    return out


# ----------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------


def run(args) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  t_start = time.time()
  split = make_split(args.seed, args.new_fraction)
  n, n_old = len(split.texts), split.num_old
  n_new = n - n_old
  old_train = [(q, d) for q, d in split.train_queries if d < n_old]
  tokenizer = SentencePieceTokenizer.train(
      split.texts[:n_old] + [q for q, _ in old_train], vocab_size=1024, seed=args.seed)
  enc = lambda t: tokenizer.encode(t)[:args.max_input_tokens]  # noqa: E731
  v_text = tokenizer.vocab_size
  layout_old = dsi.DSILayout(code_offset=v_text, num_codes=n_old, sep_id=tokenizer.bos_id,
                             pad_id=tokenizer.pad_id)
  width = args.max_input_tokens + 1 + 2

  def examples(pairs, layout):
    targets = docids_lib.docid_tokens(docids_lib.atomic_docids(layout.num_codes),
                                      layout.code_offset)
    return dsi.build_examples([enc(t) for t, _ in pairs], [d for _, d in pairs], targets,
                              layout, max_input_tokens=args.max_input_tokens, width=width)

  texts = [(t, d) for d, t in enumerate(split.texts)]
  cfg = TransformerConfig(vocab_size=layout_old.vocab_size, d_model=args.d_model,
                          num_layers=args.num_layers, num_heads=4, num_kv_heads=2,
                          mlp_dim=args.mlp_dim, max_len=width + 1)
  model_old = Transformer(cfg)
  base_info: dict[str, Any] = {}
  if args.base_cache and os.path.exists(args.base_cache):
    like = dsi.init_params(cfg, jax.random.key(0))
    params_old = _load_params(args.base_cache, like)
    base_info["base_cached"] = True
  else:
    params_old, base_info = train_base(model_old, layout_old, examples(texts[:n_old], layout_old),
                                       examples(old_train, layout_old), args)
    if args.base_cache:
      _save_params(args.base_cache, params_old)

  # Add the new documents' codes.
  params, layout = edit_lib.extend_docid_vocab(params_old, layout_old, n_new,
                                               jax.random.key(args.seed + 1))
  model = Transformer(dataclasses.replace(cfg, vocab_size=layout.vocab_size))
  old_ex = dsi.concat_examples([examples(texts[:n_old], layout), examples(old_train, layout)])

  # Query sets.
  rng = np.random.default_rng([args.seed, 2])
  sets = {
      "old_train": [old_train[i] for i in np.sort(rng.choice(
          len(old_train), min(args.old_train_eval, len(old_train)), replace=False))],
      "old_heldout": [(q, d) for q, d in split.heldout_queries if d < n_old],
      "new_train": [(q, d) for q, d in split.train_queries if d >= n_old],
      "new_heldout": [(q, d) for q, d in split.heldout_queries if d >= n_old],
  }
  prompts = {}
  for name, pairs in sets.items():
    p, m = dsi.prompt_batch([enc(q) for q, _ in pairs], layout,
                            max_input_tokens=args.max_input_tokens)
    prompts[name] = (p, m, np.array([d for _, d in pairs]))
  evaluate = Evaluator(model, layout, n, prompts, args.beam)

  common = {"num_docs": n, "num_old": n_old, "num_new": n_new,
            **{f"num_{k}": len(v) for k, v in sets.items()}}
  rows = []

  def add_row(new_data, method, params_, seconds, cpu_seconds, **extra):
    row = {"new_data": new_data, "method": method, **evaluate(params_), "seconds": seconds,
           "cpu_seconds": cpu_seconds, **extra}
    rows.append(row)
    print(json.dumps(row), flush=True)

  add_row("-", "base (old docs only)", params, 0.0, 0.0, **common)
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = set(methods) - {"replay", "no_replay", "edit"}
  if unknown:
    raise ValueError(f"--methods must name replay, no_replay or edit, got {sorted(unknown)}")
  settings = [x.strip() for x in args.new_data.split(",") if x.strip()]
  if not settings or set(settings) - {"pseudo", "indexing"}:
    raise ValueError(f"--new_data must list pseudo and/or indexing, got {args.new_data!r}")
  layers = tuple(int(x) for x in args.edit_layers.split(",") if x.strip())
  edit_cfg = edit_lib.EditConfig(
      layers=layers, num_layers=args.edit_num_layers, rank=args.edit_rank,
      soft_weight=args.edit_soft_weight, vector_steps=args.edit_vector_steps,
      vector_lr=args.edit_vector_lr, vector_l2=args.edit_vector_l2,
      covariance_weight=args.edit_covariance_weight, refine_steps=args.edit_refine_steps,
      refine_lr=args.edit_refine_lr, kl_weight=args.edit_kl_weight,
      effect_rows=args.edit_old_rows)
  pick = np.random.default_rng([args.seed, 3]).permutation(len(old_ex.tokens))
  old_sample = dsi.take(old_ex, np.sort(pick[:args.edit_old_rows]))
  refine_old = dsi.take(old_ex, np.sort(pick[:args.edit_refine_old_rows]))

  for i_setting, setting in enumerate(settings):
    first = i_setting == 0
    new_pairs = texts[n_old:]
    if setting == "pseudo":
      new_pairs = new_pairs + [(q, d) for q, d in split.train_queries if d >= n_old]
    new_ex = examples(new_pairs, layout)

    # (a) incremental training, with and without replay.
    ratios = [r for m, r in (("replay", args.replay_ratio), ("no_replay", 0.0))
              if m in methods and (first or m == "replay")]      # no replay: first setting
    for ratio in ratios:
      replay_cfg = edit_lib.ReplayConfig(
          steps=args.replay_steps, batch_size=args.batch_size, replay_ratio=ratio,
          learning_rate=args.replay_lr, warmup_steps=5, seed=args.seed)
      c0 = time.process_time()
      p_inc, info = edit_lib.incremental_train(model, layout, params, new_ex, old_ex,
                                               replay_cfg)
      add_row(setting, f"incremental, replay ratio {ratio:g}, {args.replay_steps} steps",
              p_inc, info["seconds"], time.process_time() - c0, new_examples=len(new_pairs),
              new_rows=info["new_rows"], old_rows=info["old_rows"], final_loss=info["loss"])
    if "edit" not in methods:
      continue

    # (b) the edit: closed form (layers, keys, edit vectors, least squares), then refinement.
    c0 = time.process_time()
    edit, einfo = edit_lib.edit_for_new_documents(
        model, layout, params, new_ex, old_sample, dataclasses.replace(edit_cfg, refine_steps=0))
    cpu = time.process_time() - c0
    name = f"edit (layers {','.join(map(str, edit.layers))}, rank {edit.u.shape[-1]})"
    add_row(setting, name + ", closed form", edit_lib.apply_edit(params, edit), einfo["seconds"],
            cpu, new_examples=len(new_pairs), **{k: v for k, v in einfo.items() if k != "seconds"})
    if edit_cfg.refine_steps:
      t0, c0 = time.time(), time.process_time()
      edit, rinfo = edit_lib.refine_edit(model, layout, params, edit, new_ex, refine_old,
                                         edit_cfg)
      jax.block_until_ready(edit.u)
      refine_seconds, refine_cpu = time.time() - t0, time.process_time() - c0
      add_row(setting, name + f" + {edit_cfg.refine_steps} refinement steps",
              edit_lib.apply_edit(params, edit), einfo["seconds"] + refine_seconds,
              cpu + refine_cpu, refine_seconds=refine_seconds, **rinfo)
    if first and args.ablations:
      # The choice of layers and of the preserved keys, closed form (first setting only).
      last = tuple(range(cfg.num_layers - len(einfo["layers"]), cfg.num_layers))
      for label, change in (
          (f"ablation: the last layers {','.join(map(str, last))} instead",
           dict(layers=last)),
          ("ablation: preserve old keys at decoding positions only",
           dict(layers=tuple(einfo["layers"]), preserve_positions="decoding"))):
        c0 = time.process_time()
        a_edit, a_info = edit_lib.edit_for_new_documents(
            model, layout, params, new_ex, old_sample,
            dataclasses.replace(edit_cfg, refine_steps=0, **change))
        add_row(setting, label + " (closed form)", edit_lib.apply_edit(params, a_edit),
                a_info["seconds"], time.process_time() - c0,
                residual_fit=a_info["residual_fit"])
  meta = {"args": vars(args), "total_seconds": time.time() - t_start,
          "model": dataclasses.asdict(model.config), "text_vocab": v_text, **base_info,
          **common}
  return rows, meta


def write_markdown(path: str, rows: list[dict[str, Any]], meta: dict[str, Any],
                   command: str) -> None:
  """The results table, the layer effects and the edit's diagnostics, as markdown."""
  cols = [f"{s}_recall@{k}" for s in QUERY_SETS for k in KS]
  head = ("| new-doc data | method | " + " | ".join(c.replace("_recall@", " R@") for c in cols)
          + " | seconds | CPU s |")
  lines = [head, "|" + "---|" * (len(cols) + 4)]
  for r in rows:
    lines.append(f"| {r['new_data']} | {r['method']} | "
                 + " | ".join(f"{r[c]:.3f}" for c in cols)
                 + f" | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} |")
  edits = [r for r in rows if r["method"].endswith("closed form")]
  notes = []
  if edits and "effects_mlp" in edits[0]:
    e = edits[0]
    notes.append(
        f"Per-layer effect: mean drop of log p(docID | input) over {meta['args']['edit_old_rows']}"
        " old examples when one component's output at the docID decoding positions is "
        "replaced by its mean over those positions (mean ablation; base log p = "
        f"{e['effects_base_logprob']:.3f}):\n\n| layer | MLP | attention |\n|---|---|---|\n"
        + "\n".join(f"| {l} | {a:.3f} | {b:.3f} |" for l, (a, b) in enumerate(
            zip(e["effects_mlp"], e["effects_attn"]))))
  for e in edits:
    timing = ", ".join(f"{k[len('seconds_'):]} {e[k]:.1f} s" for k in
                       ("seconds_layers", "seconds_vectors", "seconds_updates") if k in e)
    notes.append(
        f"Edit ({e['new_data']}): layers {e['layers']}; edit vectors move the target token's "
        f"top-1 rate at the new decoding positions from {e['vector_top1_before']:.3f} to "
        f"{e['vector_top1_after']:.3f} with |delta|/|h| = {e['vector_delta_norm_ratio']:.2f}; "
        f"the rank-r updates reproduce {[round(x, 3) for x in e['residual_fit']]} of |R|^2 per "
        f"layer; time: {timing}.")
  note_text = "\n\n".join(notes)
  text = f"""# New documents in a DSI model: incremental training vs a low-rank edit

Generated by `{command}` (`experiments/gr_new_docs.py`; library
`jaxsearch/generative/edit.py`). Total wall time {meta['total_seconds']:.0f} s on this machine
(2 CPU cores shared with other jobs: wall-clock seconds are noisy; CPU seconds are the
process's, all threads).

Setting: the world corpus, {meta['num_docs']} documents, {meta['num_old']} old +
{meta['num_new']} new (atomic docIDs, new codes appended). Base model: decoder-only transformer
d={meta['model']['d_model']}, {meta['model']['num_layers']} layers, MLP {meta['model']['mlp_dim']},
trained {meta['args']['base_steps']} steps (batch {meta['args']['batch_size']}) on the old
documents only (indexing rows and training queries). New-doc data: what the updates learn the
new documents from: "pseudo" = their indexing rows and pseudo-queries (their questions but the
held-out one), "indexing" = their indexing rows only. Query sets: old_train
({meta['num_old_train']} sampled old training queries), old_heldout
({meta['num_old_heldout']} held-out questions about old documents), new_train
({meta['num_new_train']} pseudo-queries of the new documents; trained on in the "pseudo"
setting only), new_heldout ({meta['num_new_heldout']} held-out questions about the new
documents). Recall@k of trie-constrained beam search (beam {meta['args']['beam']}) over all
{meta['num_docs']} docIDs. Seconds: wall clock of the update, compilation included (the edit's
includes measuring the layer effects).

{chr(10).join(lines)}

{note_text}

Method details: the module docstrings of `jaxsearch/generative/edit.py` (the math) and
`experiments/gr_new_docs.py` (the protocol).
"""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


SEED_COLUMNS = ("old_heldout_recall@1", "new_train_recall@1", "new_heldout_recall@1",
                "new_heldout_recall@10", "seconds")


def seeds_markdown(runs: Sequence[tuple[str, dict[str, Any]]]) -> str:
  """One table over several runs' `--json` files (e.g. one per `--seed`): per (new-doc data,
  method), the mean ± sample standard deviation of `SEED_COLUMNS` over the runs that have it.

  Args:
    runs: (path, loaded JSON {"rows": [...], "meta": {...}}) per run.
  """
  groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
  for _, result in runs:
    for row in result["rows"]:
      groups.setdefault((row["new_data"], row["method"]), []).append(row)
  seeds = [str(r["meta"]["args"].get("seed", "?")) for _, r in runs]
  lines = [f"Over {len(runs)} runs (seeds {', '.join(seeds)}; each a new split of old / new "
           "documents, held-out questions and initialisation): mean ± standard deviation.", "",
           "| new-doc data | method | runs | " + " | ".join(SEED_COLUMNS) + " |",
           "|---|---|---|" + "---|" * len(SEED_COLUMNS)]
  for (data, method), rows in groups.items():
    cells = []
    for col in SEED_COLUMNS:
      values = np.array([r[col] for r in rows], np.float64)
      digits = 1 if col == "seconds" else 3
      cell = f"{values.mean():.{digits}f}"
      if len(values) > 1:
        cell += f" ± {values.std(ddof=1):.{digits}f}"
      cells.append(cell)
    lines.append(f"| {data} | {method} | {len(rows)} | " + " | ".join(cells) + " |")
  lines += ["", "Files: " + ", ".join(f"`{path}`" for path, _ in runs)]
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] == "--summarize":
    # python -m experiments.gr_new_docs --summarize OUT.md RUN.json [RUN.json ...]
    if len(argv) < 3:
      raise SystemExit("usage: python -m experiments.gr_new_docs --summarize OUT.md "
                       "RUN.json [RUN.json ...] (the --json files of runs with other --seed)")
    runs = []
    for path in argv[2:]:
      with open(path) as f:
        runs.append((path, json.load(f)))
    text = seeds_markdown(runs)
    print(text)
    with open(argv[1], "w") as f:
      f.write(f"# New documents: {len(runs)} seeds\n\nGenerated by `python -m "
              f"experiments.gr_new_docs {' '.join(argv)}`.\n\n" + text)
    return
  args = _parse(argv)
  rows, meta = run(args)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump({"rows": rows, "meta": meta}, f, indent=1)
  if args.out:
    write_markdown(args.out, rows, meta, "python -m experiments.gr_new_docs " + " ".join(argv))


if __name__ == "__main__":
  main()
