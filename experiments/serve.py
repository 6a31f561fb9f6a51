r"""Serves a corpus over HTTP in Search-R1's `/retrieve` format (`jaxsearch.retrieval.server`).

  python -m experiments.serve --corpus=wiki-18.jsonl --retriever=bm25 --port=8000 [--topk=3]
  python -m experiments.serve --corpus=world            # the embedded world's corpus

`--corpus` is a Search-R1 JSONL (`{"id", "contents"}` or `{"id", "title", "text"}`, optionally
.gz) or `world`: `corpus.from_world(build_world(WorldConfig(seed=--world_seed)))`, the corpus a
run with that world seed indexes (document ids are the world's `doc_id`s). `--retriever` is a
name of `jaxsearch.retrieval.retriever.RETRIEVERS`; the dense ones ("exact", "scann") embed the
corpus with all-MiniLM-L6-v2. `--port=0` picks a free port. The first line printed to stdout is
`serving N documents on http://HOST:PORT`, once the socket is bound. Any Search-R1 client works:

  curl -s localhost:8000/retrieve -d '{"queries": ["capital of France"], "topk": 3}'
"""
from __future__ import annotations

import sys

from absl import app, flags, logging

flags.DEFINE_string("corpus", None,
                    "Search-R1 corpus JSONL path, or 'world' for the embedded world.")
flags.DEFINE_string("retriever", "bm25", "Retriever backend: bm25, bm25_jax, exact or scann.")
flags.DEFINE_string("host", "127.0.0.1", "Interface to bind (0.0.0.0: every interface).")
flags.DEFINE_integer("port", 8000, "TCP port (0: a free one).")
flags.DEFINE_integer("topk", 3, "Documents per query when a request has no topk.")
flags.DEFINE_integer("max_topk", 100, "The largest topk a request may ask for.")
flags.DEFINE_integer("max_queries", 1024, "The most queries in one request.")
flags.DEFINE_integer("world_seed", 0, "WorldConfig.seed of --corpus=world (match the run's world).")
FLAGS = flags.FLAGS


def load_corpus(spec: str, *, world_seed: int = 0):
  """`world` -> the embedded world's corpus (`WorldConfig(seed=world_seed)`); anything else ->
  a Search-R1 JSONL path."""
  from jaxsearch.retrieval import corpus as corpus_lib  # noqa: PLC0415
  if spec == "world":
    from jaxsearch.data.world import WorldConfig, build_world  # noqa: PLC0415
    return corpus_lib.from_world(build_world(WorldConfig(seed=world_seed)))
  return corpus_lib.load_search_r1_corpus(spec)


def build(corpus_spec: str, retriever_name: str, *, world_seed: int = 0, **server_kwargs):
  """The bound (not yet serving) server for a corpus spec and a retriever name."""
  from jaxsearch.retrieval.retriever import build_retriever  # noqa: PLC0415
  from jaxsearch.retrieval.server import make_server  # noqa: PLC0415
  corpus = load_corpus(corpus_spec, world_seed=world_seed)
  kwargs = {}
  if retriever_name in ("exact", "scann"):
    from jaxsearch.retrieval.text_encoder import minilm_text_encoder  # noqa: PLC0415
    kwargs["encoder"] = minilm_text_encoder()
  retriever = build_retriever(retriever_name, corpus, **kwargs)
  return make_server(retriever, corpus, **server_kwargs)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.corpus:
    raise app.UsageError("pass --corpus=PATH.jsonl (Search-R1 format) or --corpus=world")
  server = build(FLAGS.corpus, FLAGS.retriever, host=FLAGS.host, port=FLAGS.port,
                 default_topk=FLAGS.topk, max_topk=FLAGS.max_topk, max_queries=FLAGS.max_queries,
                 world_seed=FLAGS.world_seed)
  print(f"serving {len(server.corpus)} documents on {server.url}", flush=True)
  logging.info("retriever %s, default topk %d; POST %s/retrieve", FLAGS.retriever, FLAGS.topk,
               server.url)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()


if __name__ == "__main__":
  sys.exit(app.run(main))
