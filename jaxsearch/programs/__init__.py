"""The training programs, each a thin module on the trainer skeleton (`jaxsearch.train`).

  search_agent/          the search agent: warm start (SFT), RL (GRPO family, PPO), evaluation
  reward_model           a Bradley-Terry reward model over search episodes
  dense_retriever        a dual encoder (InfoNCE, in-batch + BM25 hard negatives)
  realm                  REALM-style retriever + reader trained end to end
  generative_retrieval   DSI / DDRO: a decoder that emits document identifiers

Nothing in the library (data, models, retrieval, generative, rollout, rewards, losses) or the
training machinery (`jaxsearch.train`) imports a program.
"""
