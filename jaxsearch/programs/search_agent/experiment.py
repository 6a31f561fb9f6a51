"""Assembles an experiment from configs: world, tokenizer, search tool, policy and rollouts.

`setup(config)` does everything that is not training, so the launcher, the notebooks and the
inspection tools build exactly the same agent from a workdir's saved configuration.

The questions and passages come from the embedded world (`RunConfig.world`, the default) or
from files (`RunConfig.data`, a `DataConfig`): QA splits in the Search-R1 / FlashRAG formats
(`jaxsearch.data.qa_files`) or prepared TFDS datasets ("tfds:NAME:SPLIT",
`jaxsearch.data.tfds_qa`), and a Search-R1 corpus JSONL
(`jaxsearch.retrieval.corpus.load_search_r1_corpus`). `load_world` builds either as a `World`.

Example:
  >>> config = RunConfig(data=DataConfig(qa_train="nq/train.jsonl", qa_test="nq/test.jsonl",
  ...                                    corpus="wiki/corpus.jsonl"))  # doctest: +SKIP
  >>> exp = setup(config)  # doctest: +SKIP
  >>> exp.world.splits["train"][0].answers  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from jaxsearch.data import demos
from jaxsearch.data import prompts as prompts_lib
from jaxsearch.data.prompts import PromptConfig
from jaxsearch.data import qa_files
from jaxsearch.data import wordnet
from jaxsearch.data.tokenizer import SentencePieceTokenizer
from jaxsearch.data.world import SPLITS, Document, World, WorldConfig, build_world
from jaxsearch.models import lora as lora_lib
from jaxsearch.models.lora import LoraConfig
from jaxsearch.models.pretrained import load_pretrained
from jaxsearch.models.transformer import (TokenScores, Transformer, TransformerConfig, init_cache,
                                          make_decode_fn, stack_layer_params,
                                          unstack_layer_params)
from jaxsearch.retrieval.bm25 import BM25Config
from jaxsearch.retrieval.corpus import load_search_r1_corpus
from jaxsearch.generative.search_tool import GenerativeSearch
from jaxsearch.retrieval.search_tools import (BM25Search, HttpSearch, SearchContext,
                                             search_tool_from_dict)
from jaxsearch.retrieval.tool import SearchTool, build_search_tool
from jaxsearch.rewards.combine import weighted_rewards
from jaxsearch.rollout.search_env import (EnvTokens, RolloutConfig, block_width,
                                          information_block, make_rollout_fn)
from jaxsearch.train.health import HealthConfig
from jaxsearch.train.optim import OptimizerConfig, make_optimizer, train_only
from jaxsearch.train import sharding
from jaxsearch.train.sharding import MeshConfig
from jaxsearch.train.steps import CriticConfig, PolicyGradientConfig
from jaxsearch.types import PyTree


TFDS_PREFIX = "tfds:"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
  """Questions and passages from files instead of the embedded world.

  All fields empty (the default) means the embedded world (`RunConfig.world`). Otherwise
  `qa_train` and `corpus` are required; a split left "" has no questions (set
  `RunConfig.eval_split` to a split that has some).

  Each `qa_*` is one split: the path of a QA file (`jaxsearch.data.qa_files`: FlashRAG JSONL
  `{"id", "question", "golden_answers"}`, Search-R1 parquet rows, optionally gzipped JSONL),
  or "tfds:NAME:SPLIT" for a TFDS dataset prepared under `tfds_data_dir`
  (`jaxsearch.data.tfds_qa`, e.g. "tfds:natural_questions_open:validation"). Relative paths
  start at the current directory.

  Questions from files name no supporting documents, so the warm start's teacher searches
  once with the question text and answers the first golden answer (see
  `jaxsearch.data.qa_files`), and an evaluation episode counts in `support_recall` when a
  retrieved passage contains a golden answer as whole words (DPR's answer recall).

  Attributes:
    qa_train: the train split (SFT demonstrations and RL questions).
    qa_validation: the validation split (`RunConfig.eval_every`).
    qa_test: the test split.
    corpus: Search-R1 corpus JSONL[.gz], `{"id", "contents"}` or `{"id", "title", "text"}`.
    tfds_data_dir: where "tfds:" splits were prepared ("": TFDS's default directory).
    max_questions: keep the first this many questions of each split (0: all).
    max_eval_questions: then keep the first this many of the validation and test splits
      (0: all): evaluation is cheaper while RL draws from the whole train split.
    max_passage_tokens: cut every passage to this many tokens where it is indexed and shown
      in `<information>` (0: whole passages; the block of `top_k` passages must fit in
      `RolloutConfig.max_len` with the prompt). Applies to the embedded world too.
    wordnet_kinds: instead of files, the shipped WordNet world: the 7,730 named-entity
      glosses as the corpus (title: gloss) and `jaxsearch.data.wordnet.agent_questions` of
      these kinds (e.g. ("wordnet_located_in", "wordnet_category")), split by answer so no
      held-out answer is a training answer; questions carry their supporting documents.
    wordnet_split_seed: the seed of that split (fixed apart from `RunConfig.seed`, so runs
      with different seeds are evaluated on the same questions).
  """

  # Paths (field metadata "path"): run_config.json records them absolute.
  qa_train: str = dataclasses.field(default="", metadata={"path": True})
  qa_validation: str = dataclasses.field(default="", metadata={"path": True})
  qa_test: str = dataclasses.field(default="", metadata={"path": True})
  corpus: str = dataclasses.field(default="", metadata={"path": True})
  tfds_data_dir: str = dataclasses.field(default="", metadata={"path": True})
  max_questions: int = 0
  max_eval_questions: int = 0
  max_passage_tokens: int = 0
  wordnet_kinds: tuple[str, ...] = ()
  wordnet_split_seed: int = 0

  def __post_init__(self):
    if self.wordnet_kinds:
      unknown = sorted(set(self.wordnet_kinds) - set(wordnet.AGENT_KINDS))
      if unknown:
        raise ValueError(f"DataConfig.wordnet_kinds must be some of {wordnet.AGENT_KINDS}, "
                         f"got unknown {unknown}")
      if self.qa_train or self.corpus:
        raise ValueError("DataConfig.wordnet_kinds builds the WordNet world; leave qa_* and "
                         f"corpus empty (got qa_train={self.qa_train!r}, "
                         f"corpus={self.corpus!r})")
    for name in ("qa_train", "qa_validation", "qa_test", "corpus", "tfds_data_dir"):
      if not isinstance(getattr(self, name), str):
        raise ValueError(f"DataConfig.{name} must be a string (a path), got "
                         f"{getattr(self, name)!r}")
    for name in ("max_questions", "max_eval_questions", "max_passage_tokens"):
      if getattr(self, name) < 0:
        raise ValueError(f"DataConfig.{name} must be >= 0, got {getattr(self, name)}")
    if (self.qa_validation or self.qa_test or self.corpus) and not self.qa_train:
      raise ValueError("DataConfig.qa_train must name the train split's file when any other "
                       f"DataConfig path is set, got qa_train={self.qa_train!r}")
    if self.qa_train and not self.corpus:
      raise ValueError("DataConfig.corpus must name a Search-R1 corpus JSONL when qa_train is "
                       f"set, got corpus={self.corpus!r}")
    for name in ("qa_train", "qa_validation", "qa_test"):
      value = getattr(self, name)
      if value.startswith(TFDS_PREFIX) and value.count(":") != 2:
        raise ValueError(f"DataConfig.{name} must be 'tfds:NAME:SPLIT' (e.g. "
                         f"'tfds:natural_questions_open:train'), got {value!r}")

  @property
  def from_files(self) -> bool:
    """Whether the run reads files (otherwise it builds the embedded or WordNet world)."""
    return bool(self.qa_train)


def load_split(spec: str, *, max_questions: int = 0,
               tfds_data_dir: str = "") -> tuple[qa_files.QAExample, ...]:
  """The questions of one `DataConfig.qa_*` value: a QA file path or "tfds:NAME:SPLIT".

  Example:
    >>> load_split("tfds:natural_questions_open:validation", tfds_data_dir="/data/tfds")  # doctest: +SKIP
  """
  if spec.startswith(TFDS_PREFIX):
    from jaxsearch.data.tfds_qa import load_tfds_qa  # noqa: PLC0415 (imports TensorFlow)
    _, name, split = spec.split(":")
    return load_tfds_qa(name, split, tfds_data_dir or None, max_questions=max_questions)
  return qa_files.read_qa_file(spec, max_questions=max_questions)


def load_world(config: RunConfig) -> World:
  """The run's world: `build_world(config.world)`, or the files of `config.data`.

  Raises:
    ValueError: the evaluation split (or, with `eval_every`, the validation split) of a file
      world has no questions; a malformed file (`QAFormatError` / `CorpusFormatError`, named
      by path and line).

  Example:
    >>> world = load_world(RunConfig(data=DataConfig(
    ...     qa_train="nq/train.jsonl", corpus="wiki.jsonl"), eval_split="train"))  # doctest: +SKIP
  """
  data = config.data
  if data.wordnet_kinds:
    world = wordnet_world(data.wordnet_kinds, seed=data.wordnet_split_seed,
                          max_questions=data.max_questions)
  elif not data.from_files:
    world = build_world(config.world)
  else:
    world = _file_world(config)
  if data.max_eval_questions:
    world = dataclasses.replace(world, splits={
        s: qs if s == "train" else qs[:data.max_eval_questions]
        for s, qs in world.splits.items()})
  return world


def _file_world(config: RunConfig) -> World:
  data = config.data
  corpus = load_search_r1_corpus(data.corpus)
  documents = [Document(i, t, x) for i, t, x in zip(corpus.ids, corpus.titles, corpus.texts)]
  specs = dict(zip(SPLITS, (data.qa_train, data.qa_validation, data.qa_test)))
  splits = {s: load_split(spec, max_questions=data.max_questions,
                          tfds_data_dir=data.tfds_data_dir) for s, spec in specs.items() if spec}
  needed = {config.eval_split: "RunConfig.eval_split"}
  if config.eval_every:
    needed.setdefault("validation", "RunConfig.eval_every > 0")
  for split, why in needed.items():
    if split not in splits:
      raise ValueError(f"{why} needs the {split!r} split but DataConfig.qa_{split} is empty: "
                       f"set it, or set RunConfig.eval_split to one of {sorted(splits)}")
  return qa_files.make_qa_world(documents, splits)


# `RunConfig.baselines`: name -> the `evaluate` method run on the initial policy.
BASELINES = {"zero_shot": "agent", "direct": "direct", "rag": "rag"}
BASELINE_NAMES = tuple(BASELINES)


def wordnet_world(kinds, *, seed: int = 0, max_questions: int = 0) -> World:
  """The WordNet world (`DataConfig.wordnet_kinds`): entity glosses as documents (title =
  the entity's first name) and `wordnet.agent_questions(kinds, seed)`, the first
  `max_questions` of each split (0: all).

  Example:
    >>> world = wordnet_world(("wordnet_birth_year",), max_questions=100)
    >>> len(world.documents), len(world.splits["test"])
    (7730, 100)
  """
  entities = wordnet.load_wordnet_entities()
  documents = [Document(e.doc_id, e.title, e.text) for e in entities]
  splits = wordnet.agent_questions(entities, kinds=tuple(kinds), seed=seed)
  if max_questions:
    splits = {s: qs[:max_questions] for s, qs in splits.items()}
  return qa_files.QAWorld(WorldConfig(), tuple(documents), splits)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig:
  """Warm start: supervised fine-tuning on the noisy teacher's demonstrations.

  Attributes:
    steps: optimizer steps.
    batch_size: demonstrations per step.
    num_demos: demonstrations built from the train split (cycled in seeded epochs).
    teacher: how noisy the teacher is.
    optimizer: optimizer settings.
    micro_batch_size: rows per micro-batch of a step (gradient accumulation; 0: the whole
      batch at once). Only memory changes: the accumulated gradient is the batch's.
  """

  steps: int = 800
  batch_size: int = 32
  num_demos: int = 2000
  teacher: demos.TeacherConfig = demos.TeacherConfig()
  optimizer: OptimizerConfig = OptimizerConfig(learning_rate=3e-3, warmup_steps=30)
  micro_batch_size: int = 0

  def __post_init__(self):
    if self.steps < 0:
      raise ValueError(f"SFTConfig.steps must be >= 0, got {self.steps}")
    if self.micro_batch_size < 0 or (self.micro_batch_size
                                     and self.batch_size % self.micro_batch_size):
      raise ValueError(f"SFTConfig.micro_batch_size must be 0 or divide batch_size "
                       f"({self.batch_size}), got {self.micro_batch_size}")
    for name in ("batch_size", "num_demos"):
      if getattr(self, name) < 1:
        raise ValueError(f"SFTConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLConfig:
  """RL phase settings (GRPO, its variants, or PPO).

  Attributes:
    steps: RL updates (each on a fresh batch of B questions x G episodes).
    algorithm: the algorithm: advantage estimator and policy-loss options
      (`steps.PolicyGradientConfig`; GRPO, its variants and PPO).
    critic: PPO's critic (used only with `algorithm.advantage == "gae"`).
    optimizer: the policy's optimizer settings.
    reward_weights: reward name -> weight (names from `jaxsearch.rewards.REWARDS`).
    init_from: "" or the workdir of another run whose tokenizer and finished SFT checkpoint
      this run starts from (copied in; SFT runs once for several RL runs, see `loop`).
    health: thresholds of the collapse warnings (`jaxsearch.train.health`).
  """

  steps: int = 150
  algorithm: PolicyGradientConfig = PolicyGradientConfig()
  critic: CriticConfig = CriticConfig()
  optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-4, warmup_steps=5)
  reward_weights: Mapping[str, float] = dataclasses.field(
      default_factory=lambda: {"exact_match": 1.0, "format": 0.1})
  init_from: str = dataclasses.field(default="", metadata={"path": True})
  health: HealthConfig = HealthConfig()

  def __post_init__(self):
    if self.steps < 0:
      raise ValueError(f"RLConfig.steps must be >= 0, got {self.steps}")

  @staticmethod
  def upgrade_dict(data: dict[str, Any]) -> dict[str, Any]:
    """A saved config from before `grpo` was renamed `algorithm`."""
    data = dict(data)
    if "grpo" in data:
      data["algorithm"] = data.pop("grpo")
    return data


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
  """Everything one run needs; each field is one component's config (bound from gin).

  Attributes:
    seed: seeds parameters, data order and sampling.
    world: the embedded world (used when `data` names no files).
    data: QA files and a corpus to train and evaluate on instead of the embedded world.
    tokenizer_vocab_size: BPE pieces to train on the world's text (also the model's vocab size);
      ignored with `pretrained`.
    model: the policy; its `vocab_size` is overridden by `tokenizer_vocab_size`. With
      `pretrained`, only its numerics and memory fields (dtype, param_dtype, remat,
      scan_layers, logits_chunk, max_len) are used; the sizes come from the checkpoint.
    pretrained: "" to train from scratch with a tokenizer trained on the world, or a
      `jaxsearch.models.pretrained.load_pretrained` spec (e.g. "smollm2-135m-instruct",
      "gguf:PATH", "hf:DIR" for a local Hugging Face Llama / Qwen2 / Qwen3 directory): the
      policy, its tokenizer and parameters come from the checkpoint.
    protocol: how the agent writes its tags (`jaxsearch.rollout.search_env`): "text" (the tags
      are ordinary text of the model's vocabulary, Search-R1's way), "special" (one id per
      tag; a pretrained vocabulary is grown by the tags, with mean embedding rows) or "auto"
      ("text" with `pretrained`, "special" for the from-scratch world model).
    prompt: how questions are put to the policy (`jaxsearch.data.prompts`: a chat
      conversation rendered by the checkpoint's own template, or the plain format).
    lora: None trains every weight; a `LoraConfig` (`jaxsearch.models.lora`, qwix) trains
      low-rank adapters on its target projections only: the optimizer holds state for the
      adapters alone, the base weights stay frozen, and the KL reference shares them (the
      state keeps the reference's adapters only).
    bm25: the search tool's BM25 parameters.
    search_tool: the search tool (`jaxsearch.retrieval.search_tools`): `BM25Search()` (in-graph
      BM25 over token ids, the default), `HttpSearch(url=...)` (a Search-R1-style retrieval
      server over the same corpus, e.g. `python -m experiments.serve --corpus=world`) or
      `GenerativeSearch(workdir=..., beam_size=...)` (a trained DSI model over the same
      corpus, `gin/experiments/dsi_world.gin`).
    rollout: sampling settings of RL rollouts.
    eval_temperature: sampling temperature at evaluation (0: greedy).
    eval_split: the held-out split reported in summary.json.
    eval_batch_size: episodes per evaluation rollout call.
    eval_every: evaluate on the validation split every this many RL steps (0: never).
    checkpoint_every: save a checkpoint every this many steps of each phase (and at its end).
    baselines: evaluations of the initial policy before any training, reported in the
      summary as `{name}_em` ...: "zero_shot" (the agent's prompt: a pretrained model
      prompted to search), "direct" (the closed-book prompt: answer without searching) and
      "rag" (retrieve with the question, the passages in the prompt, answer once).
    sft: warm-start settings.
    rl: RL settings.
    mesh: the device mesh (default: data parallel over every device).
  """

  seed: int = 0
  world: WorldConfig = WorldConfig()
  data: DataConfig = DataConfig()
  tokenizer_vocab_size: int = 1024
  model: TransformerConfig = TransformerConfig(vocab_size=1024)
  pretrained: str = dataclasses.field(default="", metadata={"path": "spec"})  # "gguf:PATH"
  protocol: str = "auto"
  prompt: PromptConfig = PromptConfig()
  lora: LoraConfig | None = None
  bm25: BM25Config = BM25Config()
  search_tool: BM25Search | HttpSearch | GenerativeSearch = BM25Search()
  rollout: RolloutConfig = RolloutConfig()
  eval_temperature: float = 0.0
  eval_split: str = "test"
  eval_batch_size: int = 200
  eval_every: int = 0
  checkpoint_every: int = 100
  baselines: tuple[str, ...] = ()
  sft: SFTConfig = SFTConfig()
  rl: RLConfig = RLConfig()
  mesh: MeshConfig = MeshConfig()

  def __post_init__(self):
    if self.protocol not in ("auto", *prompts_lib.PROTOCOLS):
      raise ValueError(f"RunConfig.protocol must be 'auto', 'special' or 'text', got "
                       f"{self.protocol!r}")
    if self.eval_split not in ("train", "validation", "test"):
      raise ValueError(f"RunConfig.eval_split must be train/validation/test, got {self.eval_split!r}")
    unknown = sorted(set(self.baselines) - set(BASELINE_NAMES))
    if unknown:
      raise ValueError(f"RunConfig.baselines must be some of {BASELINE_NAMES}, got unknown "
                       f"{unknown}")
    for name in ("eval_batch_size", "checkpoint_every", "tokenizer_vocab_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"RunConfig.{name} must be >= 1, got {getattr(self, name)}")
    # A saved config (run_config.json) names its tool by kind.
    object.__setattr__(self, "search_tool", search_tool_from_dict(self.search_tool))
    beam = getattr(self.search_tool, "beam_size", None)
    if beam is not None and beam < self.rollout.top_k:
      raise ValueError(f"{type(self.search_tool).__name__}.beam_size ({beam}) must be >= "
                       f"RolloutConfig.top_k ({self.rollout.top_k}): the beam holds the "
                       "documents returned")

  @property
  def resolved_protocol(self) -> str:
    """"special" or "text" ("auto": text with a pretrained policy)."""
    if self.protocol != "auto":
      return self.protocol
    return "text" if self.pretrained else "special"

  @staticmethod
  def upgrade_dict(data: dict[str, Any]) -> dict[str, Any]:
    """A saved config from before search tools were configs (`search_url`,
    `generative_retriever`, `generative_beam_size`)."""
    data = dict(data)
    url = data.pop("search_url", "")
    workdir = data.pop("generative_retriever", "")
    beam = data.pop("generative_beam_size", 10)
    if url:
      data["search_tool"] = {"kind": "http", "url": url}
    elif workdir:
      data["search_tool"] = {"kind": "generative", "workdir": workdir, "beam_size": beam}
    return data


@dataclasses.dataclass(frozen=True)
class Experiment:
  """The assembled agent and its environment (no training state)."""

  config: RunConfig
  world: World
  tokenizer: Any
  env: EnvTokens
  tool: SearchTool
  model: Transformer
  prompt_width: int                       # P, every prompt padded to it (one compiled shape)
  train_rollout_fn: Callable              # jitted (params, tool_index, corpus, prompts, lens, rng)
  eval_rollout_fn: Callable
  reward_fn: Callable                     # (completions, golds) -> (total [N], parts)
  respond_fn: Callable                    # jitted (tool, query tokens, mask) -> (ids, block, len)
  pretrained_params: PyTree | None = None # the checkpoint's parameters with `pretrained`
  base_model: Transformer | None = None   # the model without adapters (LoRA); else `model`

  def init_params(self, rng: jax.Array) -> tuple[PyTree, PyTree]:
    """Returns `(params, logical_specs)`: plain parameters and their logical axis names.

    With a pretrained policy the parameters are the checkpoint's (`rng` is unused).
    """
    tokens = jnp.zeros((1, 8), jnp.int32)
    if self.pretrained_params is not None:
      with self._init_context():
        boxed = jax.eval_shape(self.model.init, rng, tokens)["params"]
      params = self.pretrained_params
      if self.model.config.scan_layers:
        params = stack_layer_params(params, self.model.config.num_layers)
      # The abstract values without `unbox` (which would constrain them to the mesh).
      abstract = jax.tree.map(lambda b: b.value if isinstance(b, nn.meta.AxisMetadata) else b,
                              boxed, is_leaf=lambda b: isinstance(b, nn.meta.AxisMetadata))
      if self.config.lora is not None:     # the checkpoint's base, fresh adapters (B = 0)
        base, _ = lora_lib.split_params(abstract)
        params = jax.tree.map(lambda x, a: jnp.asarray(x, a.dtype), params, base)
        with self._init_context():
          params = lora_lib.init_lora_params(self.model, params, rng, tokens)
      params = jax.tree.map(lambda x, a: jnp.asarray(x, a.dtype), params, abstract)
      return params, nn.get_partition_spec(boxed)
    with self._init_context():
      # One compiled program (op by op, every initialiser is its own compile), rounding as
      # op-by-op execution does (`sharding.EXACT_INIT_OPTIONS`).
      init = jax.jit(lambda key: self.model.init(key, tokens)["params"])
      boxed = init.lower(rng).compile(compiler_options=sharding.EXACT_INIT_OPTIONS)(rng)
      return nn.meta.unbox(boxed), nn.get_partition_spec(boxed)

  def _init_context(self):
    """LoRA: initialise without the logical-axis rules (qwix boxes an einsum kernel's adapters
    with the kernel's axis names, which a constraint of the wrong rank would reject); the
    parameters are placed by their specs afterwards."""
    return contextlib.nullcontext() if self.config.lora is None else nn.logical_axis_rules(())

  def init_sharded_params(self, rng: jax.Array, mesh) -> tuple[PyTree, PyTree]:
    """`init_params`, born sharded over `mesh`: the abstract shapes give the shardings, a
    jitted init writes each device's shard only (a checkpoint's weights are placed shard by
    shard). Call under `jax.set_mesh(mesh)` and the logical-axis rules.

    Returns:
      `(params, logical_specs)`.
    """
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    tokens = jnp.zeros((rows, 8), jnp.int32)
    with self._init_context():
      boxed = jax.eval_shape(self.model.init, rng, tokens)["params"]
    specs = nn.get_partition_spec(boxed)
    shardings = sharding.param_shardings(specs, mesh)
    if self.pretrained_params is not None:
      params, _ = self.init_params(rng)
      return jax.device_put(params, shardings), specs
    def init_fn(key):
      with self._init_context():
        return nn.meta.unbox(self.model.init(key, tokens)["params"])

    init = jax.jit(init_fn, out_shardings=shardings)
    # Without XLA's algebraic simplifier the jitted initialisers round exactly as the
    # op-by-op ones (`init_params`): the same seed gives the same parameters either way.
    params = init.lower(rng).compile(compiler_options=sharding.EXACT_INIT_OPTIONS)(rng)
    return params, specs

  def apply_fn(self, variables, tokens):
    return self.model.apply(variables, tokens)

  def score_fn(self, variables, tokens, targets) -> TokenScores:
    """The training steps' `steps.ScoreFn`: `Transformer.token_scores` (chunked over
    positions with `TransformerConfig.logits_chunk`, so no `[N, T, V]` logits)."""
    return self.model.apply(variables, tokens, targets, method="token_scores")

  @property
  def trainable(self) -> Callable[[tuple[str, ...]], bool] | None:
    """The policy's trained parameters, by path: the adapters with LoRA; None: all. The
    updates differentiate these only (`steps.accumulate_gradients`), the optimizer holds
    state for these only (`optimizer`)."""
    return None if self.config.lora is None else lora_lib.is_adapter_path

  def optimizer(self, config: OptimizerConfig, total_steps: int | None = None
                ) -> optax.GradientTransformation:
    """The policy's optimizer: `make_optimizer`, on the adapters only with LoRA."""
    tx = make_optimizer(config, total_steps)
    return tx if self.trainable is None else train_only(tx, self.trainable)

  def export(self, params: PyTree) -> tuple[Transformer, PyTree]:
    """`(model, params)` without adapters (LoRA merged: `W + alpha / rank * A @ B`), e.g. for
    `jaxsearch.models.hf.save_hf_checkpoint`."""
    if self.config.lora is None:
      return self.model, params
    return self.base_model, lora_lib.merge_lora(params, self.config.lora)

  def encode_prompts(self, questions, *, closed_book: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`(prompts [N, prompt_width] int32, lengths [N] int32)` of the agent's or the
    closed-book baseline's prompts (`jaxsearch.data.prompts`). The RAG baseline's prompts are
    longer: `evaluate.evaluate` builds them with its own width (`evaluate.prompt_width_for`)."""
    prompts, lens = demos.encode_prompts(self.tokenizer, questions, closed_book=closed_book,
                                         prompt=self.config.prompt, protocol=self.env.protocol)
    if prompts.shape[1] > self.prompt_width:
      raise ValueError(f"a prompt has {prompts.shape[1]} tokens, more than the prompt width "
                       f"{self.prompt_width}")
    return np.pad(prompts, ((0, 0), (0, self.prompt_width - prompts.shape[1])),
                  constant_values=self.tokenizer.pad_id), lens

  def respond(self, queries: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Answers query texts exactly as the rollout's environment does (for demonstrations).

    Returns:
      `(blocks, doc_ids)`: per query, the `<information>` block's token ids and the retrieved
      document indices.
    """
    lq = self.config.rollout.max_query_tokens
    encoded = [prompts_lib.search_query_ids(self.tokenizer, self.env.protocol, q)[:lq]
               for q in queries]
    qtok, qlen = demos.pad_sequences(encoded, self.tokenizer.pad_id, lq)
    qmask = np.arange(lq)[None, :] < qlen[:, None]
    ids, block, blen = jax.tree.map(np.asarray, self.respond_fn(self.tool, qtok, qmask))
    return [block[i, : blen[i]].tolist() for i in range(len(queries))], ids.tolist()


def passage_text(doc) -> str:
  """How a document is indexed and shown in `<information>`: its title, then its text.

  As in Search-R1's corpora, the title is part of the indexed text, so the document about an
  entity outranks passages that merely mention it. The title comes first and is followed by a
  colon so its tokens are the same as those of a query naming the entity. An untitled document
  (a corpus line without a title) is its text alone.
  """
  return f"{doc.title}: {doc.text}" if doc.title else doc.text


def passage_lead(tokenizer: Any, protocol: str) -> str:
  """What goes in front of every passage where it is tokenized (indexed and shown): " " when
  the policy's queries spell a word with a leading space and the passages would not.

  A byte-level BPE (GPT-2 / Llama 3 / Qwen / SmolLM2) writes a word differently at the start
  of a text and after a space: in `<search> Bontemps </search>` the query's first token is
  " B", while a passage "Bontemps: ..." starts with "B", so in-graph BM25 could not match the
  first word of any passage, which is the title (measured on the WordNet glosses with
  SmolLM2, 400 train questions of `gin/experiments/wordnet_agent.gin`: the ideal first
  query, the entity's name, found its gloss in the top 2 for 46% of them without the lead,
  81% with it; the second hop's 23% and 55%). With the lead, a passage's words are
  tokenized as the policy writes them in queries. SentencePiece (the world model's
  tokenizer) and the "special" protocol's queries need none ("").

  Example:
    >>> passage_lead(smollm2_tokenizer, "text"), passage_lead(world_tokenizer, "special")  # doctest: +SKIP
    (' ', '')
  """
  as_queried = prompts_lib.search_query_ids(tokenizer, protocol, "Paris")
  if as_queried != tokenizer.encode("Paris") and as_queried == tokenizer.encode(" Paris"):
    return " "
  return ""


def setup(config: RunConfig, *, tokenizer: Any | None = None) -> Experiment:
  """Builds the world, trains (or takes) the tokenizer, indexes the corpus, builds the policy.

  Args:
    config: the run's configuration.
    tokenizer: a tokenizer to reuse (e.g. the one saved in a workdir); trained when None.

  Returns:
    The assembled `Experiment`.
  """
  world = load_world(config)
  protocol = config.resolved_protocol
  pretrained_params = None
  if config.pretrained:
    loaded_config, pretrained_params, loaded_tokenizer = load_pretrained(
        config.pretrained, dtype=config.model.param_dtype, add_tags=protocol == "special")
    tokenizer = loaded_tokenizer if tokenizer is None else tokenizer
    vocab = loaded_config.vocab_size
    model_config = dataclasses.replace(
        loaded_config, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
        remat=config.model.remat, scan_layers=config.model.scan_layers,
        logits_chunk=config.model.logits_chunk,
        max_len=max(config.model.max_len, config.rollout.max_len))
  else:
    if tokenizer is None:
      texts = [*world.texts(), *(q.question for qs in world.splits.values() for q in qs)]
      tokenizer = SentencePieceTokenizer.train(texts, vocab_size=config.tokenizer_vocab_size,
                                               seed=config.seed)
    vocab = config.tokenizer_vocab_size
    model_config = dataclasses.replace(config.model, vocab_size=vocab,
                                       max_len=max(config.model.max_len, config.rollout.max_len))
  if tokenizer.vocab_size > vocab:
    raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary "
                     f"has {vocab} (RunConfig.tokenizer_vocab_size or the pretrained model)")
  base_model = Transformer(model_config)
  model = (base_model if config.lora is None
           else lora_lib.lora_model(base_model, config.lora))
  env = EnvTokens.from_tokenizer(tokenizer, protocol)
  # The in-graph BM25 index only for the in-graph BM25 tool: host, HTTP and generative tools
  # need the passages alone.
  lead = passage_lead(tokenizer, protocol)
  tool = build_search_tool([lead + passage_text(d) for d in world.documents], tokenizer, vocab,
                           bm25=config.bm25, ignore_ids=env.special_ids,
                           max_passage_tokens=config.data.max_passage_tokens or None,
                           index=getattr(config.search_tool, "uses_bm25_index", False))
  retrieve_fn = config.search_tool.build(SearchContext(
      tokenizer=tokenizer, vocab_size=vocab, doc_ids=[d.doc_id for d in world.documents],
      top_k=config.rollout.top_k, special_ids=env.special_ids,
      bm25_posting_block=config.bm25.posting_block))

  # A scanned policy decodes with its layers unrolled (`RolloutConfig.unroll_layers`): the
  # same parameters, sliced per layer once per rollout, and a cache updated in place.
  decode_model, decode_params = model, lambda params: params
  if model_config.scan_layers and config.rollout.unroll_layers:
    unrolled = Transformer(dataclasses.replace(model_config, scan_layers=False))
    decode_model = (unrolled if config.lora is None
                    else lora_lib.lora_model(unrolled, config.lora))
    decode_params = unstack_layer_params
  decode_fn = make_decode_fn(decode_model)

  def rollout_fn_for(rollout_config: RolloutConfig):
    def init_cache_fn(batch, length):
      return init_cache(model_config, batch, length, dtype=rollout_config.cache_dtype or None)

    fn = make_rollout_fn(rollout_config, env, decode_fn, init_cache_fn, retrieve_fn)
    return jax.jit(lambda params, tool, prompts, lens, rng: fn(
        decode_params(params), tool.index, tool.corpus, prompts, lens, rng))

  width = block_width(tool.corpus.tokens.shape[1], config.rollout.top_k, env)

  @jax.jit
  def respond_fn(tool: SearchTool, query_tokens, query_mask):
    ids, _ = retrieve_fn(tool.index, query_tokens, query_mask)
    block, length = information_block(tool.corpus, ids, env, width)
    return ids, block, length

  all_questions = [q for qs in world.splits.values() for q in qs]
  prompt_width = max(len(demos.prompt_ids(tokenizer, q, config.prompt, protocol=protocol,
                                          closed_book=closed_book))
                     for q in all_questions for closed_book in (False, True))
  return Experiment(
      config=config, world=world, tokenizer=tokenizer, env=env, tool=tool, model=model,
      prompt_width=prompt_width,
      train_rollout_fn=rollout_fn_for(config.rollout),
      eval_rollout_fn=rollout_fn_for(dataclasses.replace(
          config.rollout, temperature=config.eval_temperature)),
      reward_fn=weighted_rewards(dict(config.rl.reward_weights)),
      respond_fn=respond_fn,
      pretrained_params=pretrained_params,
      base_model=base_model,
  )
