"""experiments/generative_retrieval.py: seeds averaged, standard deviations, missing runs."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from experiments import generative_retrieval as table


def _summary(unseen_r1: float, seed_bm25: float, latency: float) -> dict:
  """The summary.json keys the table reads, for a DSI run with beams 1 and 20."""
  s = {"beam_sizes": [1, 20], "final_system": "dsi", "docid_length": 1, "num_codes": 448,
       "num_docs": 448, "num_params": 1000, "steps": 600, "ddro_steps": 0,
       "pseudo_queries": "none", "train_seconds": 100.0, "wall_seconds": 150.0,
       "pseudo_unseen_coverage": 0.0, "unseen_dsi_free_beam20_recall@1": unseen_r1,
       "unseen_dsi_free_beam20_invalid": 0.05, "latency_ms_dsi_beam1": latency,
       "latency_ms_dsi_beam20": 2 * latency, "latency_ms_bm25": 0.1}
  for split in ("seen", "unseen"):
    for m in table.MEASURES:
      s[f"{split}_gr_{m}"] = unseen_r1 if split == "unseen" else 1.0
      s[f"{split}_bm25_{m}"] = seed_bm25
  return s


def _write(runs_dir: str, name: str, summary: dict) -> None:
  os.makedirs(os.path.join(runs_dir, name))
  with open(os.path.join(runs_dir, name, "summary.json"), "w") as f:
    json.dump(summary, f)


def test_seeds_are_averaged_with_their_standard_deviation(tmp_path):
  runs = str(tmp_path / "runs")
  values = {0: 0.1, 1: 0.3, 2: 0.5}
  for seed, v in values.items():
    _write(runs, table.workdir_name(table.ROWS[0], seed), _summary(v, 0.9 + seed / 100, v))
  md = str(tmp_path / "table.md")
  out = table.main(["--runs_dir", runs, "--rows", table.ROWS[0].name, "--seeds", "0,1,2",
                    "--markdown", md])
  dsi = [r for r in out if r["system"] == "dsi-atomic"]
  assert [r["seed"] for r in dsi] == [0, 1, 2]
  assert [r["unseen_recall@1"] for r in dsi] == [0.1, 0.3, 0.5]
  text = open(md).read()
  mean, std = np.mean(list(values.values())), np.std(list(values.values()), ddof=1)
  assert f"{mean:.3f} ± {std:.3f}" in text                 # 0.300 ± 0.200
  bm25 = [np.mean([0.9, 0.91, 0.92]), np.std([0.9, 0.91, 0.92], ddof=1)]
  assert f"| world | bm25 | 3 | – | – | {bm25[0]:.3f} |" in text
  assert f"{bm25[0]:.3f} ± {bm25[1]:.3f}" in text
  assert "| 0.30 / – / 0.60 |" in text                     # latency means: b1, no b10, b20
  assert "Not run yet" not in text


def test_seed_zero_keeps_the_plain_workdir_and_missing_seeds_are_listed(tmp_path):
  runs = str(tmp_path / "runs")
  row = table.ROWS[0]
  assert table.workdir_name(row, 0) == row.name
  assert table.workdir_name(row, 2) == f"{row.name}_seed2"
  assert "--gin_bindings=SEED = 2" in table.command(row, runs, 2)
  assert not any(c.startswith("--gin_bindings=SEED") for c in table.command(row, runs, 0))
  _write(runs, row.name, _summary(0.25, 1.0, 1.0))
  md = str(tmp_path / "table.md")
  table.main(["--runs_dir", runs, "--rows", row.name, "--seeds", "0,2", "--markdown", md])
  text = open(md).read()
  [line] = [l for l in text.splitlines() if l.startswith("| world | DSI atomic |")]
  assert "| 1 | 1 | 448 |" in line and "| 0.250 |" in line and "±" not in line
  assert f"Not run yet: `{row.name}_seed2`" in text


def test_rows_use_their_own_seeds_by_default(tmp_path):
  runs = str(tmp_path / "runs")
  row = table.ROWS[0]
  assert row.seeds == table.WORLD_SEEDS and len(row.seeds) > 1
  _write(runs, row.name, _summary(0.25, 1.0, 1.0))
  md = str(tmp_path / "table.md")
  table.main(["--runs_dir", runs, "--rows", row.name, "--markdown", md])
  missing = open(md).read().split("Not run yet:")[1]
  assert [f"`{row.name}_seed{s}`" in missing for s in row.seeds] == [False] + [True] * (
      len(row.seeds) - 1)


@pytest.mark.parametrize("seeds", ["a,1", ",", "-1"])
def test_bad_seeds_are_refused(tmp_path, seeds, capsys):
  with pytest.raises(SystemExit):
    table.main(["--runs_dir", str(tmp_path), "--seeds", seeds, "--markdown", ""])
  assert "--seeds" in capsys.readouterr().err


def test_new_docs_seeds_summary_averages_each_method(tmp_path):
  from experiments import gr_new_docs  # noqa: PLC0415

  def result(seed, new_r1, seconds):
    row = {"new_data": "pseudo", "method": "edit", "old_heldout_recall@1": 1.0,
           "new_train_recall@1": 1.0, "new_heldout_recall@1": new_r1,
           "new_heldout_recall@10": 1.0, "seconds": seconds}
    only = {**row, "method": "replay", "new_heldout_recall@1": 0.5} if seed == 0 else None
    return {"rows": [row] + ([only] if only else []), "meta": {"args": {"seed": seed}}}

  paths = []
  for seed, (r1, sec) in enumerate([(0.2, 10.0), (0.6, 14.0)]):
    paths.append(str(tmp_path / f"seed{seed}.json"))
    with open(paths[-1], "w") as f:
      json.dump(result(seed, r1, sec), f)
  out = str(tmp_path / "seeds.md")
  gr_new_docs.main(["--summarize", out, *paths])
  text = open(out).read()
  std = np.std([0.2, 0.6], ddof=1)
  assert f"| pseudo | edit | 2 | 1.000 ± 0.000 | 1.000 ± 0.000 | 0.400 ± {std:.3f} |" in text
  assert f"| 12.0 ± {np.std([10.0, 14.0], ddof=1):.1f} |" in text
  assert "| pseudo | replay | 1 | 1.000 | 1.000 | 0.500 | 1.000 |" in text
  assert "seeds 0, 1" in text
  with pytest.raises(SystemExit, match="usage"):
    gr_new_docs.main(["--summarize", out])
