"""The HTTP search client and the rollout's host-callback retrieve_fn, over real HTTP."""
from __future__ import annotations

import doctest
import http.server
import json
import socket
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from jaxsearch.data.tokenizer import ByteTokenizer
from jaxsearch.retrieval.bm25 import tokenize_corpus
from jaxsearch.retrieval.corpus import Corpus
from jaxsearch.retrieval.http_tool import SearchClient, make_http_retrieve_fn, map_results
from jaxsearch.retrieval.retriever import build_retriever
from jaxsearch.retrieval.server import serve_in_thread
from jaxsearch.rollout.search_env import EnvTokens, RolloutConfig, make_rollout_fn
from tests.rollout import scripted

TOK = ByteTokenizer()
# The server's corpus; "x9" is unknown to the rollout's local corpus.
SERVER_CORPUS = Corpus(ids=("d0", "d1", "d2", "x9"), titles=("", "", "", ""),
                       texts=("dogs bark loudly", "cats purr softly", "dogs chase cats",
                              "volcano lava flows"))
LOCAL_IDS = ("d2", "d1", "d0")                 # local row -> document id (another order)
LOCAL_TEXTS = ("dogs chase cats", "cats purr softly", "dogs bark loudly")


def closed_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class FakeServer:
  """A server whose n-th POST gets `respond(n) -> (status, body bytes, sleep seconds)`."""

  def __init__(self, respond):
    self.attempts = 0
    lock = threading.Lock()
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        with lock:
          n = outer.attempts
          outer.attempts += 1
        status, body, sleep = respond(n)
        time.sleep(sleep)
        try:
          self.send_response(status)
          self.send_header("Content-Length", str(len(body)))
          self.end_headers()
          self.wfile.write(body)
        except OSError:
          pass    # the client timed out and left

    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.server.handle_error = lambda *a: None
    threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    self.url = f"http://127.0.0.1:{self.server.server_address[1]}/retrieve"

  def close(self):
    self.server.shutdown()
    self.server.server_close()


def ok_body(entries_per_query):
  return json.dumps({"result": entries_per_query}).encode()


class SearchClientTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.retriever = build_retriever("bm25", SERVER_CORPUS)
    cls.server, _ = serve_in_thread(cls.retriever, SERVER_CORPUS)

  @classmethod
  def tearDownClass(cls):
    cls.server.shutdown()
    cls.server.server_close()
    super().tearDownClass()

  def fake(self, respond) -> FakeServer:
    server = FakeServer(respond)
    self.addCleanup(server.close)
    return server

  def test_results_equal_the_retriever(self):
    queries = ["dogs bark", "volcano", "cats"]
    client = SearchClient(self.server.url)                # no path: /retrieve is added
    self.assertEqual(client.url, self.server.url + "/retrieve")
    before = self.server.requests_served
    got = client.search(queries, 3)
    self.assertEqual(self.server.requests_served - before, 1)   # one batched request
    ids, scores = self.retriever.search(queries, 3)
    for q in range(len(queries)):
      self.assertEqual([e["document"]["id"] for e in got[q]],
                       [SERVER_CORPUS.ids[i] for i in ids[q]])
      self.assertEqual([e["document"]["contents"] for e in got[q]],
                       [SERVER_CORPUS.contents[i] for i in ids[q]])
      np.testing.assert_array_equal(np.array([e["score"] for e in got[q]], np.float32), scores[q])
    self.assertEqual(got[0][0]["document"]["id"], "d0")          # hand-checked: both words
    self.assertEqual((client.calls, client.attempts, client.failures), (1, 1, 0))

  def test_blank_queries_are_not_sent(self):
    client = SearchClient(self.server.url + "/retrieve")
    got = client.search(["", "volcano", "  "], 1)
    self.assertEqual([len(r) for r in got], [0, 1, 0])
    self.assertEqual(got[1][0]["document"]["id"], "x9")
    before = self.server.requests_served
    self.assertEqual(client.search(["", " "], 2), [[], []])
    self.assertEqual(self.server.requests_served, before)       # nothing to ask: no request

  def test_closed_port_returns_empty_results_and_logs(self):
    client = SearchClient(f"http://127.0.0.1:{closed_port()}/retrieve", retries=2, backoff_s=0.01)
    with self.assertLogs("absl", "ERROR") as logs:
      got = client.search(["dogs", "cats"], 2)
    self.assertEqual(got, [[], []])
    self.assertEqual((client.attempts, client.failures), (3, 1))
    self.assertRegex(logs.output[0], "after 3 attempt")
    self.assertIn("cannot reach", client.last_error)

  def test_server_error_is_retried_then_given_up(self):
    fake = self.fake(lambda n: (500, b'{"error": "boom"}', 0.0))
    client = SearchClient(fake.url, retries=2, backoff_s=0.01)
    with self.assertLogs("absl", "ERROR"):
      self.assertEqual(client.search(["dogs"], 2), [[]])
    self.assertEqual(fake.attempts, 3)
    self.assertEqual(client.failures, 1)
    self.assertIn("HTTP 500", client.last_error)

  def test_timeout_is_retried_then_given_up(self):
    fake = self.fake(lambda n: (200, ok_body([[]]), 0.6))
    client = SearchClient(fake.url, timeout_s=0.15, retries=2, backoff_s=0.01)
    start = time.perf_counter()
    with self.assertLogs("absl", "ERROR"):
      self.assertEqual(client.search(["dogs"], 2), [[]])
    self.assertLess(time.perf_counter() - start, 1.5)
    self.assertEqual(fake.attempts, 3)
    self.assertEqual(client.failures, 1)

  def test_client_error_is_not_retried(self):
    fake = self.fake(lambda n: (400, b'{"error": "queries[0] must be a string"}', 0.0))
    client = SearchClient(fake.url, retries=2, backoff_s=0.01)
    with self.assertLogs("absl", "ERROR"):
      self.assertEqual(client.search(["dogs"], 2), [[]])
    self.assertEqual(fake.attempts, 1)
    self.assertIn("queries[0] must be a string", client.last_error)

  def test_malformed_answers_are_retried(self):
    bodies = [b"not json", json.dumps({"result": [[], []]}).encode()]   # wrong length
    fake = self.fake(lambda n: (200, bodies[n % 2], 0.0))
    client = SearchClient(fake.url, retries=1, backoff_s=0.01)
    with self.assertLogs("absl", "ERROR"):
      self.assertEqual(client.search(["dogs"], 2), [[]])
    self.assertEqual(fake.attempts, 2)
    self.assertIn("malformed", client.last_error)

  def test_retry_then_success(self):
    doc = {"id": "d1", "contents": '""\ncats purr softly'}
    answer = ok_body([[{"document": doc, "score": 1.5}], [doc]])      # scored and plain entries
    fake = self.fake(lambda n: (503, b"{}", 0.0) if n < 2 else (200, answer, 0.0))
    client = SearchClient(fake.url, retries=2, backoff_s=0.01)
    got = client.search(["cats", "purr"], 1)
    self.assertEqual(got, [[{"document": doc, "score": 1.5}], [{"document": doc, "score": None}]])
    self.assertEqual((fake.attempts, client.attempts, client.failures), (3, 3, 0))

  def test_bad_arguments_raise(self):
    with self.assertRaisesRegex(ValueError, "url must be an http"):
      SearchClient("localhost:8000")
    with self.assertRaisesRegex(ValueError, "retries must be an int >= 0, got -1"):
      SearchClient("http://h:1", retries=-1)
    with self.assertRaisesRegex(ValueError, "k must be an int >= 1, got 0"):
      SearchClient("http://h:1").search(["q"], 0)
    with self.assertRaisesRegex(ValueError, "one string"):
      SearchClient("http://h:1").search("q", 1)


class HttpRetrieveFnTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.retriever = build_retriever("bm25", SERVER_CORPUS)
    cls.server, _ = serve_in_thread(cls.retriever, SERVER_CORPUS)

  @classmethod
  def tearDownClass(cls):
    cls.server.shutdown()
    cls.server.server_close()
    super().tearDownClass()

  def test_docstring_examples_run(self):
    from jaxsearch.retrieval import http_tool  # noqa: PLC0415
    result = doctest.testmod(http_tool)
    self.assertGreater(result.attempted, 0)
    self.assertEqual(result.failed, 0)

  def test_map_results_by_id(self):
    results = [[{"document": {"id": "d0"}, "score": 2.0}, {"document": {"id": "x9"}, "score": 1.0},
                {"document": {"id": "d2"}, "score": None}],
               []]
    ids, scores = map_results(results, {"d2": 0, "d1": 1, "d0": 2}, 4)
    np.testing.assert_array_equal(ids, [[2, -1, 0, -1], [-1, -1, -1, -1]])
    np.testing.assert_array_equal(scores, [[2.0, -np.inf, 0.0, -np.inf], [-np.inf] * 4])

  def test_inside_jit_matches_the_local_retriever(self):
    k, lq = 2, 16
    texts = ["dogs bark", "", "volcano lava", "cats purr"]
    active = [True, False, True, True]
    tokens = np.full((4, lq), TOK.encode("z")[0], np.int32)      # junk outside the mask
    mask = np.zeros((4, lq), bool)
    for i, t in enumerate(texts):
      ids = TOK.encode(t)
      tokens[i, :len(ids)] = ids
      mask[i, :len(ids)] = active[i]
    client = SearchClient(self.server.url)
    fn = jax.jit(make_http_retrieve_fn(client, TOK, LOCAL_IDS, k))
    before = self.server.requests_served
    ids, scores = jax.tree.map(np.asarray, fn(None, jnp.asarray(tokens), jnp.asarray(mask)))
    self.assertEqual(self.server.requests_served - before, 1)
    self.assertEqual((ids.shape, ids.dtype, scores.dtype), ((4, k), np.int32, np.float32))
    # Reference: the retriever called directly, rows mapped to local rows by document id.
    local_row = {d: i for i, d in enumerate(LOCAL_IDS)}
    ref_ids, ref_scores = self.retriever.search([texts[0], texts[2], texts[3]], k)
    for got_row, ref_row in ((0, 0), (2, 1), (3, 2)):
      expect = [local_row.get(SERVER_CORPUS.ids[i], -1) for i in ref_ids[ref_row]]
      np.testing.assert_array_equal(ids[got_row], expect)
      known = np.array(expect) >= 0
      np.testing.assert_array_equal(scores[got_row][known], ref_scores[ref_row][known])
      self.assertTrue(np.all(scores[got_row][~known] == -np.inf))
    np.testing.assert_array_equal(ids[1], [-1, -1])           # not masked: not sent
    self.assertTrue(np.all(scores[1] == -np.inf))
    # Hand-checked: "dogs bark" -> d0 (local 2) then d2 (local 0); x9 is not local.
    np.testing.assert_array_equal(ids[0], [2, 0])
    self.assertEqual(ids[2, 0], -1)
    # No masked row: no request at all.
    before = self.server.requests_served
    ids, _ = fn(None, jnp.asarray(tokens), jnp.zeros_like(jnp.asarray(mask)))
    np.testing.assert_array_equal(ids, -1)
    self.assertEqual(self.server.requests_served, before)


# --- an end-to-end rollout whose searches go to the HTTP server ----------------------------

ENV = EnvTokens.from_tokenizer(TOK)
V = TOK.vocab_size


def scripted_policy(scripts):
  """The scripted policy of tests/rollout/scripted.py over this tokenizer's vocabulary."""
  return scripted.scripted_policy(scripts, V)


class HttpRolloutTest(absltest.TestCase):

  def test_rollout_searches_the_server_and_survives_its_death(self):
    server, _ = serve_in_thread(build_retriever("bm25", SERVER_CORPUS), SERVER_CORPUS)
    client = SearchClient(server.url, timeout_s=2.0, retries=1, backoff_s=0.01)
    search = [ENV.search_open, *TOK.encode("dogs bark"), ENV.search_close]
    answer = [ENV.answer_open, *TOK.encode("x"), ENV.answer_close]
    scripts = [search + answer, answer + [TOK.eos_id] * (len(search))]   # row 1 never searches
    prompt = [TOK.bos_id, *TOK.encode("q?")]
    cfg = RolloutConfig(max_len=96, top_k=2, temperature=0.0)
    decode_fn, init_cache_fn = scripted_policy(scripts)
    rollout_fn = jax.jit(make_rollout_fn(cfg, ENV, decode_fn, init_cache_fn,
                                         make_http_retrieve_fn(client, TOK, LOCAL_IDS, cfg.top_k)))
    corpus = tokenize_corpus([TOK.encode(t) for t in LOCAL_TEXTS], pad_id=TOK.pad_id)
    prompts = jnp.asarray([prompt, prompt], jnp.int32)
    lens = jnp.full((2,), len(prompt), jnp.int32)

    def run():
      out = rollout_fn(None, None, corpus, prompts, lens, jax.random.key(0))
      return jax.tree.map(np.asarray, out)

    before = server.requests_served
    r = run()
    self.assertEqual(server.requests_served - before, 1)       # one turn, one request
    # Hand-built: BM25 ranks "dogs bark loudly" (both words) above "dogs chase cats".
    block = ([ENV.info_open] + TOK.encode("dogs bark loudly") + TOK.encode("dogs chase cats")
             + [ENV.info_close])
    expected = prompt + search + block + answer
    np.testing.assert_array_equal(r.tokens[0, :r.lengths[0]], expected)
    np.testing.assert_array_equal(r.retrieved[0, 0], [2, 0])    # local rows of d0, d2
    np.testing.assert_array_equal(r.tokens[1, :r.lengths[1]], prompt + answer)
    np.testing.assert_array_equal(r.status, [1, 1])
    self.assertEqual(client.failures, 0)

    server.shutdown()
    server.server_close()
    with self.assertLogs("absl", "ERROR"):
      r = run()                                                 # same compiled rollout
    expected = prompt + search + [ENV.info_open, ENV.info_close] + answer
    np.testing.assert_array_equal(r.tokens[0, :r.lengths[0]], expected)
    np.testing.assert_array_equal(r.retrieved[0, 0], [-1, -1])
    np.testing.assert_array_equal(r.num_searches, [1, 0])
    np.testing.assert_array_equal(r.status, [1, 1])
    self.assertEqual((client.failures, client.attempts), (1, 3))


if __name__ == "__main__":
  absltest.main()
