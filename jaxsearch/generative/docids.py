"""Document identifiers (docIDs) for generative retrieval: DSI's atomic, naive and semantic
docIDs, residual-quantisation (TIGER-style) docIDs and WordNet hypernym-path docIDs.

A docID is a variable-length sequence of codes in [0, K) followed by an END code (= K). A
`DocIds` holds them as a padded matrix (`-1` after each row's length). Every builder returns
unique docIDs, so a trie over them (`jaxsearch.generative.trie`) maps a decoded sequence back to
exactly one document row.

Builders:

- `atomic_docids(n)`: doc i -> [i]; K = n.
- `naive_docids(n, base)`: doc i -> the base-`base` digits of i, fixed width
  `max(1, ceil(log_base(n)))`, most significant first; K = base.
- `semantic_docids(emb, k, c)`: DSI hierarchical k-means. Cluster the documents into k
  clusters; a cluster with more than c documents is clustered again (recursively); a cluster
  with <= c documents gives each member its index within the cluster (row order) as the last
  code. So a docID is [cluster at level 1, ..., cluster at level d, index in leaf], every code
  but the last is in [0, k) and the last is in [0, c); K = max(k, c). If k-means cannot split
  a cluster (identical embeddings) it is split into k contiguous chunks, so recursion always
  ends.
- `rq_docids(emb, levels, codebook_size)`: residual quantisation. Level l runs k-means with
  `min(codebook_size, N)` centroids on the residuals `r_l = x - sum_{j<l} C_j[code_j]`; the
  code at level l is the nearest centroid. If two documents share all `levels` codes, every
  docID gets one more (suffix) code, the document's rank among those sharing its codes (row
  order), so all docIDs have length `levels` or all `levels + 1`;
  K = max(codebook_size, largest suffix + 1).
- `hypernym_docids(paths)`: root-first class paths (WordNet `hypernym_path`) form a tree
  whose nodes are path prefixes. The children of a node are its child classes (sorted by
  name), followed by the documents whose path ends at that node (row order). A docID is the
  sequence of child indices from the (virtual) root down to the document, so the final code
  disambiguates documents sharing a path and no docID is a prefix of another.
  K = the largest child count.

k-means (`kmeans`) is plain numpy: k-means++ seeding, then Lloyd iterations (stopping early
once assignments stop changing), float64, deterministic given the seed.

Example:
  >>> ids = naive_docids(12, base=10)
  >>> ids.codes[:3].tolist(), ids.num_codes, docid_strings(ids)[11]
  ([[0, 0], [0, 1], [0, 2]], 10, '1-1')
  >>> docid_tokens(ids, code_offset=100)[11].tolist()     # codes + 100, END = 100 + K
  [101, 101, 110]
  >>> hypernym_docids([("entity", "city"), ("entity", "city"), ("entity",)]).codes.tolist()
  [[0, 0, 0], [0, 0, 1], [0, 1, -1]]
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from jaxsearch.registry import Registry

# The docID builders by kind, each `(its inputs by name) -> DocIds`; `build_docids` calls one.
DOCID_BUILDERS: Registry[Callable[..., "DocIds"]] = Registry("docID kind")


class DocIds(NamedTuple):
  """Docids of N documents (row i = document row i of the corpus)."""

  codes: np.ndarray     # [N, L] int32, the codes of doc row i; -1 after its length
  lengths: np.ndarray   # [N] int32, number of codes of each docID (>= 1, END not counted)
  num_codes: int        # K; code K is END
  kind: str             # "atomic" | "naive" | "semantic" | "rq" | "hypernym"

  @property
  def num_docs(self) -> int:
    """N."""
    return int(self.codes.shape[0])

  @property
  def max_length(self) -> int:
    """L, the longest docID (END not counted)."""
    return int(self.codes.shape[1])


def _check_int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
  return int(value)


def _check_embeddings(embeddings) -> np.ndarray:
  x = np.asarray(embeddings)
  if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
    raise ValueError(f"embeddings must be a non-empty [N, D] array, got shape {x.shape}")
  if not np.issubdtype(x.dtype, np.number):
    raise ValueError(f"embeddings must be numeric, got dtype {x.dtype}")
  x = x.astype(np.float64)
  if not np.all(np.isfinite(x)):
    raise ValueError("embeddings must be finite, got NaN or inf values")
  return x


def validate_docids(docids: DocIds) -> None:
  """Raises ValueError unless `docids` is well formed and its docIDs are unique.

  Checks: codes [N, L] int with N, L >= 1; lengths [N] in [1, L]; codes in [0, K) before each
  length and -1 after; no two rows equal.
  """
  codes, lengths = np.asarray(docids.codes), np.asarray(docids.lengths)
  k = docids.num_codes
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"DocIds.num_codes must be an int >= 1, got {k!r}")
  if codes.ndim != 2 or codes.shape[0] < 1 or codes.shape[1] < 1:
    raise ValueError(f"DocIds.codes must be a non-empty [N, L] array, got shape {codes.shape}")
  if not np.issubdtype(codes.dtype, np.integer):
    raise ValueError(f"DocIds.codes must be integers, got dtype {codes.dtype}")
  n, l = codes.shape
  if lengths.shape != (n,) or np.any(lengths < 1) or np.any(lengths > l):
    raise ValueError(f"DocIds.lengths must be [N] = [{n}] with values in [1, {l}], got "
                     f"shape {lengths.shape}, range [{lengths.min()}, {lengths.max()}]")
  inside = np.arange(l)[None, :] < lengths[:, None]
  bad = inside & ((codes < 0) | (codes >= k))
  if np.any(bad):
    i, j = np.argwhere(bad)[0]
    raise ValueError(f"DocIds.codes[{i}, {j}] = {codes[i, j]} is outside [0, K = {k})")
  if np.any(~inside & (codes != -1)):
    i, j = np.argwhere(~inside & (codes != -1))[0]
    raise ValueError(f"DocIds.codes[{i}, {j}] = {codes[i, j]} must be -1 (after length "
                     f"{lengths[i]})")
  uniq, first, counts = np.unique(codes, axis=0, return_index=True, return_counts=True)
  if np.any(counts > 1):
    dup = np.flatnonzero(np.all(codes == uniq[np.argmax(counts > 1)], axis=1))
    raise ValueError(f"docIDs are not unique: rows {dup[:5].tolist()} share "
                     f"{codes[dup[0], :lengths[dup[0]]].tolist()}")


def make_docids(sequences: Sequence[Sequence[int]], *, num_codes: int | None = None,
                kind: str = "custom") -> DocIds:
  """Packs code sequences (one per document) into a validated `DocIds`.

  Args:
    sequences: N non-empty sequences of codes in [0, K).
    num_codes: K; default `max code + 1`.
    kind: a label stored in the result.

  Returns:
    `DocIds` with codes [N, max length] padded with -1.

  Example:
    >>> make_docids([[0, 1], [1]]).codes.tolist()
    [[0, 1], [1, -1]]
  """
  seqs = [list(map(int, s)) for s in sequences]
  if not seqs:
    raise ValueError("sequences must hold at least one docID, got none")
  if any(len(s) == 0 for s in seqs):
    raise ValueError(f"every docID needs >= 1 code; sequence {[len(s) for s in seqs].index(0)} "
                     "is empty")
  lengths = np.array([len(s) for s in seqs], np.int32)
  codes = np.full((len(seqs), int(lengths.max())), -1, np.int32)
  for i, s in enumerate(seqs):
    codes[i, :len(s)] = s
  if num_codes is None:
    num_codes = max(int(codes.max()) + 1, 1)
  out = DocIds(codes=codes, lengths=lengths, num_codes=int(num_codes), kind=kind)
  validate_docids(out)
  return out


def atomic_docids(n: int) -> DocIds:
  """Doc i -> the single code i (DSI "atomic"); K = n, L = 1.

  Example:
    >>> atomic_docids(3).codes.tolist()
    [[0], [1], [2]]
  """
  n = _check_int("n", n, 1)
  return DocIds(codes=np.arange(n, dtype=np.int32)[:, None], lengths=np.ones(n, np.int32),
                num_codes=n, kind="atomic")


def naive_docids(n: int, base: int = 10) -> DocIds:
  """Doc i -> its base-`base` digits, fixed width, most significant first; K = base.

  Example:
    >>> naive_docids(5, base=2).codes.tolist()
    [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0]]
  """
  n = _check_int("n", n, 1)
  base = _check_int("base", base, 2)
  width, top = 1, base
  while top < n:
    width, top = width + 1, top * base
  rows = np.arange(n, dtype=np.int64)
  codes = np.stack([(rows // base ** (width - 1 - j)) % base for j in range(width)], axis=1)
  return DocIds(codes=codes.astype(np.int32), lengths=np.full(n, width, np.int32),
                num_codes=base, kind="naive")


def _nearest(x: np.ndarray, x_sq: np.ndarray, c: np.ndarray) -> np.ndarray:
  """Index of the nearest centroid of every point (squared distances, norms precomputed)."""
  return np.argmin(x_sq[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :], axis=1)


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator,
            num_iters: int) -> tuple[np.ndarray, np.ndarray]:
  n = x.shape[0]
  k = min(k, n)
  x_sq = (x * x).sum(1)
  idx = [int(rng.integers(n))]
  d2 = np.maximum(x_sq - 2.0 * x @ x[idx[0]] + x_sq[idx[0]], 0.0)
  for _ in range(1, k):
    total = d2.sum()
    if total <= 0:         # every point coincides with a centre: fewer distinct centres
      break
    i = int(rng.choice(n, p=d2 / total))
    idx.append(i)
    d2 = np.minimum(d2, np.maximum(x_sq - 2.0 * x @ x[i] + x_sq[i], 0.0))
  centroids = x[idx].copy()
  assign = _nearest(x, x_sq, centroids)
  for _ in range(num_iters):
    order = np.argsort(assign, kind="stable")
    counts = np.bincount(assign, minlength=len(centroids))
    nonempty = counts > 0
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[nonempty]
    sums = np.add.reduceat(x[order], starts, axis=0)
    centroids[nonempty] = sums / counts[nonempty, None]   # empty: keep the old one
    new = _nearest(x, x_sq, centroids)
    if np.array_equal(new, assign):
      break
    assign = new
  return centroids, assign


def kmeans(points, k: int, *, seed: int = 0, num_iters: int = 10
           ) -> tuple[np.ndarray, np.ndarray]:
  """k-means++ seeding then Lloyd iterations, in numpy (float64), deterministic given `seed`.

  Args:
    points: [N, D] embeddings.
    k: clusters wanted; at most `min(k, N)` (fewer when points coincide).
    seed: numpy seed of the k-means++ draws.
    num_iters: Lloyd iterations at most (stops when assignments no longer change).

  Returns:
    (centroids [k', D] float64, assignments [N] int64 in [0, k')). Every point is assigned to
    its nearest centroid.

  Example:
    >>> c, a = kmeans(np.array([[0.], [0.1], [5.], [5.1]]), 2)
    >>> bool(a[0] == a[1] != a[2] == a[3])
    True
  """
  x = _check_embeddings(points)
  k = _check_int("k", k, 1)
  num_iters = _check_int("num_iters", num_iters, 0)
  return _kmeans(x, k, np.random.default_rng(seed), num_iters)


def semantic_docids(embeddings, *, k: int = 10, c: int = 100, seed: int = 0,
                    num_iters: int = 10) -> DocIds:
  """DSI semantically structured docIDs by hierarchical k-means (see the module docstring).

  Args:
    embeddings: [N, D] document embeddings.
    k: clusters per level (>= 2).
    c: largest leaf cluster (>= 1); the last code is the index within the leaf, in [0, c).
    seed: numpy seed; the result is deterministic given it.
    num_iters: Lloyd iterations per k-means.

  Returns:
    `DocIds` of kind "semantic", K = max(k, c), variable lengths (>= 1).

  Example:
    >>> emb = np.array([[0.], [0.1], [9.], [9.1]])
    >>> semantic_docids(emb, k=2, c=2).lengths.tolist()
    [2, 2, 2, 2]
  """
  x = _check_embeddings(embeddings)
  k = _check_int("k", k, 2)
  c = _check_int("c", c, 1)
  num_iters = _check_int("num_iters", num_iters, 0)
  rng = np.random.default_rng(seed)
  n = x.shape[0]
  seqs: list[list[int]] = [[] for _ in range(n)]
  stack = [(np.arange(n), [])]
  while stack:
    rows, prefix = stack.pop()
    if len(rows) <= c:
      for j, i in enumerate(rows):
        seqs[i] = prefix + [j]
      continue
    _, assign = _kmeans(x[rows], k, rng, num_iters)
    labels = np.unique(assign)
    if len(labels) < 2:         # identical points: split into contiguous chunks
      assign = np.arange(len(rows)) * min(k, len(rows)) // len(rows)
      labels = np.unique(assign)
    children = [(rows[assign == lab], prefix + [j]) for j, lab in enumerate(labels)]
    stack.extend(reversed(children))
  out = make_docids(seqs, num_codes=max(k, c), kind="semantic")
  return out


def residual_quantize(embeddings, *, levels: int = 3, codebook_size: int = 256, seed: int = 0,
                      num_iters: int = 10) -> tuple[np.ndarray, list[np.ndarray]]:
  """Residual k-means: the codes and codebooks behind `rq_docids`.

  Args:
    embeddings: [N, D].
    levels: number of quantisation levels (>= 1).
    codebook_size: centroids per level (>= 1), clipped to N.
    seed: numpy seed.
    num_iters: Lloyd iterations per level.

  Returns:
    (codes [N, levels] int32, codebooks: `levels` arrays [K_l, D] float64). The reconstruction
    from the first m levels is `sum_{l<m} codebooks[l][codes[:, l]]`; its squared error does
    not increase with m.

  Example:
    >>> codes, books = residual_quantize(np.eye(4), levels=2, codebook_size=2)
    >>> codes.shape, len(books)
    ((4, 2), 2)
  """
  x = _check_embeddings(embeddings)
  levels = _check_int("levels", levels, 1)
  codebook_size = _check_int("codebook_size", codebook_size, 1)
  num_iters = _check_int("num_iters", num_iters, 0)
  rng = np.random.default_rng(seed)
  resid = x.copy()
  codes, books = [], []
  for _ in range(levels):
    cents, assign = _kmeans(resid, min(codebook_size, x.shape[0]), rng, num_iters)
    resid = resid - cents[assign]
    codes.append(assign)
    books.append(cents)
  return np.stack(codes, axis=1).astype(np.int32), books


def rq_docids(embeddings, *, levels: int = 3, codebook_size: int = 256, seed: int = 0,
              num_iters: int = 10) -> DocIds:
  """Residual-quantisation docIDs with a collision suffix (see the module docstring).

  Args:
    embeddings: [N, D].
    levels: quantisation levels (>= 1).
    codebook_size: centroids per level (>= 1), clipped to N at each level.
    seed: numpy seed; deterministic given it.
    num_iters: Lloyd iterations per level.

  Returns:
    `DocIds` of kind "rq": fixed length `levels`, or `levels + 1` when some documents share
    all levels; K = max(codebook_size, largest suffix + 1).

  Example:
    >>> ids = rq_docids(np.zeros((3, 2)), levels=2, codebook_size=4)   # all collide
    >>> ids.codes.tolist(), ids.num_codes
    ([[0, 0, 0], [0, 0, 1], [0, 0, 2]], 4)
  """
  codes, _ = residual_quantize(embeddings, levels=levels, codebook_size=codebook_size,
                               seed=seed, num_iters=num_iters)
  _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
  inverse = inverse.reshape(-1)
  num_codes = codebook_size
  if np.any(counts > 1):
    seen = np.zeros(len(counts), np.int64)
    suffix = np.empty(len(codes), np.int32)
    for i, g in enumerate(inverse):
      suffix[i] = seen[g]
      seen[g] += 1
    codes = np.concatenate([codes, suffix[:, None]], axis=1)
    num_codes = max(codebook_size, int(suffix.max()) + 1)
  out = DocIds(codes=codes.astype(np.int32), lengths=np.full(len(codes), codes.shape[1],
                                                             np.int32),
               num_codes=num_codes, kind="rq")
  validate_docids(out)
  return out


def hypernym_docids(paths: Sequence[Sequence[str]]) -> DocIds:
  """DocIDs from root-first class paths (e.g. WordNet `hypernym_path`); see the module docstring.

  Args:
    paths: N non-empty sequences of class names (hashable, sortable), root first.

  Returns:
    `DocIds` of kind "hypernym": doc i has `len(paths[i]) + 1` codes (its classes, then its
    index among the children of its last class); K = the largest child count.

  Example:
    >>> hypernym_docids([("a", "c"), ("a", "b"), ("a", "b")]).codes.tolist()
    [[0, 1, 0], [0, 0, 0], [0, 0, 1]]
  """
  if isinstance(paths, (str, bytes)):
    raise ValueError(f"paths must be a sequence of paths, got a string {paths!r}")
  paths = [p for p in paths]
  if not paths:
    raise ValueError("paths must hold at least one path, got none")
  tuples = []
  for i, p in enumerate(paths):
    if isinstance(p, (str, bytes)):
      raise ValueError(f"paths[{i}] must be a sequence of class names, got the string {p!r}")
    p = tuple(p)
    if not p:
      raise ValueError(f"paths[{i}] is empty; every document needs a class path")
    tuples.append(p)
  child_classes: dict[tuple, set] = {}
  docs_at: dict[tuple, list[int]] = {}
  for i, p in enumerate(tuples):
    for d in range(len(p)):
      child_classes.setdefault(p[:d], set()).add(p[d])
    docs_at.setdefault(p, []).append(i)
  try:
    order = {node: {name: j for j, name in enumerate(sorted(names))}
             for node, names in child_classes.items()}
  except TypeError as e:
    raise ValueError(f"class names must be sortable (e.g. all str): {e}") from None
  seqs = [None] * len(tuples)
  for p, rows in docs_at.items():
    base = len(child_classes.get(p, ()))
    prefix = [order[p[:d]][p[d]] for d in range(len(p))]
    for r, i in enumerate(rows):
      seqs[i] = prefix + [base + r]
  num_codes = max(max(len(v) for v in child_classes.values()),
                  max(len(child_classes.get(p, ())) + len(r) for p, r in docs_at.items()))
  return make_docids(seqs, num_codes=num_codes, kind="hypernym")


def docid_tokens(docids: DocIds, code_offset: int) -> np.ndarray:
  """Model token ids of every docID, END included.

  Args:
    docids: N docIDs, K codes.
    code_offset: token id of code 0 (code c -> `code_offset + c`, END -> `code_offset + K`).

  Returns:
    [N, L + 1] int32, padded with -1 after END.

  Example:
    >>> docid_tokens(make_docids([[0, 1], [1]]), code_offset=10).tolist()
    [[10, 11, 12], [11, 12, -1]]
  """
  code_offset = _check_int("code_offset", code_offset, 0)
  codes, lengths = np.asarray(docids.codes), np.asarray(docids.lengths)
  n, l = codes.shape
  out = np.full((n, l + 1), -1, np.int32)
  out[:, :l] = np.where(codes >= 0, codes + code_offset, -1)
  out[np.arange(n), lengths] = code_offset + docids.num_codes
  return out


def docid_strings(docids: DocIds) -> list[str]:
  """Human-readable docIDs, codes joined by "-" (END not shown).

  Example:
    >>> docid_strings(make_docids([[3, 1, 7], [2]]))
    ['3-1-7', '2']
  """
  codes, lengths = np.asarray(docids.codes), np.asarray(docids.lengths)
  return ["-".join(str(int(c)) for c in row[:n]) for row, n in zip(codes, lengths)]


DOCID_BUILDERS.register("atomic")(atomic_docids)
DOCID_BUILDERS.register("naive")(naive_docids)
DOCID_BUILDERS.register("semantic")(semantic_docids)
DOCID_BUILDERS.register("rq")(rq_docids)
DOCID_BUILDERS.register("hypernym")(hypernym_docids)
KINDS = ("atomic", "naive", "semantic", "rq", "hypernym")   # the registered kinds, in table order


def build_docids(kind: str, inputs: Mapping[str, Any]) -> DocIds:
  """The docIDs of `kind` (a name of `DOCID_BUILDERS`), from whichever of `inputs` its builder
  takes (matched by parameter name: `n`, `base`, `embeddings`, `k`, `c`, `levels`,
  `codebook_size`, `seed`, `paths`, ...). A callable input is called only if the builder
  takes it (e.g. embeddings computed only for "semantic" / "rq").

  Example:
    >>> build_docids("naive", {"n": 12, "base": 10, "embeddings": lambda: 1 / 0}).codes[11]
    array([1, 1], dtype=int32)
  """
  fn = DOCID_BUILDERS.get(kind)
  params = inspect.signature(fn).parameters
  missing = [name for name, p in params.items()
             if p.default is inspect.Parameter.empty and name not in inputs]
  if missing:
    raise ValueError(f"docID kind {kind!r} needs inputs {missing}; got {sorted(inputs)}")
  kwargs = {name: (value() if callable(value) else value)
            for name, value in inputs.items() if name in params}
  return fn(**kwargs)
