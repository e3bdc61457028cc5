"""The main job end to end at tiny scale (every shipped training config through the real CLI), and the
Figure-2 notebook executed on what it produced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

TINY_PHASE2 = """
trainer:
  max_steps: 2
  limit_val_batches: 1
  enable_model_summary: false
  callbacks:
    - class_path: lightning_modules.callbacks.meta_rollout_evaluation.MetaRolloutEvaluation
      init_args: {every_n_steps: 2, trials: 2, episodes: 2, seed: 0, video: false}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {monitor: eval/success_mean, mode: max, every_n_train_steps: 2, save_top_k: 1, save_last: true,
                  filename: "best-{step}"}
model:
  init_args: {hidden_dim: 32, num_random: 4, belief_cache_batches: 2, refresh_every: 1, transition_batch_size: 32}
"""
TINY_DATA = ("--data.init_args.rollouts_per_task 4 --data.init_args.episode_length 10 --data.init_args.batch_size 4 "
             "--data.init_args.batches_per_epoch 2 --data.init_args.val_batches 1")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _tiny_pipeline(tmp_path: Path, *options: str) -> tuple[list[str], Path]:
    """The main job at tiny scale (4 rollouts of 10 steps, 2 filter steps, the tiny phase 2, 2 trials of 2 episodes)
    with ``options``, and its --out."""
    overlay = tmp_path / "tiny_phase2.yaml"
    overlay.write_text(TINY_PHASE2)
    out, data = tmp_path / "out", tmp_path / "data"
    return [sys.executable, "-m", "lightning_modules.pipeline", *options,
            "--out", str(out), "--data-root", str(data), "--data-args", "rollouts_per_task=4 env.episode_length=10",
            "--phase1-args", f"--trainer.max_steps 2 --trainer.enable_model_summary false {TINY_DATA}",
            "--phase2-args", f"--config {overlay} {TINY_DATA}", "--trials", "2", "--episodes", "2"], out


def test_pipeline_all_methods_tiny_then_notebook(tmp_path):
    cmd, out = _tiny_pipeline(tmp_path, "--methods", "ours", "no_expl", "no_cql")
    run = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "$ lightning fit --config configs/filter_quickstart.yaml --config configs/ablations/no_expl.yaml" in run.stdout
    assert "--config configs/ablations/no_cql.yaml" in run.stdout
    for method in ("ours", "no_expl", "no_cql"):
        results = json.loads((out / method / "seed_0" / "eval_results.json").read_text())
        assert len(results["evaluations"][-1]["summary"]["success_per_episode"]) == 2
        assert (out / method / "seed_0" / "phase2" / "eval_results.json").exists()  # periodic evaluations
    assert sorted(p.name for p in (out / "filters").iterdir()) == ["no_expl", "synthetic"]  # no_cql shares the filter
    assert (out / "figure2.png").stat().st_size > 0 and "No Expl" in (out / "results.md").read_text()
    assert "$ python -m lightning_modules.evaluate --checkpoint " + str(out / "ours" / "seed_0" / "phase2" / "checkpoints"
                                                                        / "last.ckpt") in run.stdout  # the final one
    assert "Final checkpoint (last.ckpt" in (out / "results.md").read_text()
    assert (out / "learning_curves.png").stat().st_size > 0 and list((out / "learning_curves" / "ours").glob("events.*"))

    again = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done already") == 8  # 2 filters + 3 x (phase 2, evaluation); data re-checked

    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    notebook = nbformat.read(REPO / "notebooks" / "figure2.ipynb", as_version=4)
    os.environ["FIGURE2_RUN_ROOT"], os.environ["FIGURE2_OUT"] = str(out), str(tmp_path / "fig.png")
    try:
        NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    finally:
        os.environ.pop("FIGURE2_RUN_ROOT"), os.environ.pop("FIGURE2_OUT")
    assert (tmp_path / "fig.png").stat().st_size > 0
    printed = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "| Ours |" in printed and "| No CQL |" in printed


def test_jobs_run_the_seeds_in_lanes(tmp_path):
    """--jobs 2: the data stage first, then each seed's chain in its own single-threaded lane, its commands' output in
    <out>/logs/seed_<k>.log; the same stages and results as one after another (a second run finds them done)."""
    from lightning_modules.lanes import lane_env, lanes_of
    from lightning_modules.pipeline import plan

    stages = plan("quickstart", ["ours", "no_cql"], [0, 1], tmp_path / "planned", 2, 2, [], [])
    first, chains = lanes_of(stages)
    assert [s.name for s in first] == ["data"] and sorted(chains) == [0, 1]
    assert [s.name for s in chains[1]] == ["phase 1 (synthetic, seed 1)", "phase 2 (ours, seed 1)",
                                           "evaluation (ours, seed 1)", "phase 2 (no_cql, seed 1)",
                                           "evaluation (no_cql, seed 1)"]
    assert lane_env(2)["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))

    cmd, out = _tiny_pipeline(tmp_path, "--seeds", "0", "1", "--jobs", "2")
    run = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 lane(s), 2 at a time" in run.stdout
    for seed in (0, 1):
        log = (out / "logs" / f"seed_{seed}.log").read_text()
        assert f"=== phase 2 (ours, seed {seed})" in log and "lightning fit" in log
        results = json.loads((out / "ours" / f"seed_{seed}" / "eval_results.json").read_text())
        assert len(results["evaluations"][-1]["summary"]["success_per_episode"]) == 2
    assert "| Ours |" in (out / "results.md").read_text()
    again = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done already") == 6  # 2 x (filter, phase 2, evaluation)


def test_paper_configs_at_tiny_scale(tmp_path, tiny_pixel_dataset):
    """configs/filter_paper.yaml and configs/cql_paper.yaml through the console script on 32 px pixels, CPU."""
    root = str(tiny_pixel_dataset.root)
    data = (f"--data.init_args.root {root} --data.init_args.image_size 32 --data.init_args.rollouts_per_task 3 "
            "--data.init_args.episode_length 10 --data.init_args.batch_size 2 --data.init_args.batches_per_epoch 2 "
            "--data.init_args.val_batches 1 --data.init_args.device null --data.init_args.in_memory false "
            "--data.init_args.num_segments 2").split()
    runs = tmp_path / "runs"
    phase1 = [sys.executable, "-m", "lightning_modules.cli", "fit", "--config", "configs/filter_paper.yaml",
              "--trainer.accelerator", "cpu", "--trainer.max_steps", "2", "--trainer.logger.init_args.save_dir",
              str(runs), "--model.init_args.image_size", "32", "--model.init_args.cnn_depth", "8",
              "--model.init_args.deter_dim", "16", "--model.init_args.stoch_dim", "4", "--model.init_args.hidden_dim", "16",
              "--trainer.enable_model_summary", "false", *data]
    run = subprocess.run(phase1, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    filter_ckpt = runs / "filter_paper" / "version_0" / "checkpoints" / "last.ckpt"
    assert filter_ckpt.exists()
    overlay = tmp_path / "tiny_phase2.yaml"
    overlay.write_text(TINY_PHASE2)
    phase2 = [sys.executable, "-m", "lightning_modules.cli", "fit", "--config", "configs/cql_paper.yaml", "--config",
              str(overlay), "--trainer.accelerator", "cpu", "--trainer.logger.init_args.save_dir", str(runs),
              "--model.init_args.filter_checkpoint", str(filter_ckpt), *data]
    run = subprocess.run(phase2, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (runs / "cql_paper" / "version_0" / "checkpoints" / "last.ckpt").exists()
    assert (runs / "cql_paper" / "version_0" / "eval_results.json").exists()


def test_online_selection_is_opt_in_and_labelled(tmp_path):
    """--online-selection turns on save_best of the shipped evaluation callback (the list passed whole, one change),
    adds a diagnostic evaluation of best_eval.ckpt, and results.md reports it apart, labelled."""
    from lightning_modules.pipeline import ONLINE, plan, summarize

    plain = plan("quickstart", ["ours"], [0], tmp_path, 5, 3, [], [])
    assert not any("best_eval" in " ".join(s.argv) for s in plain)
    assert any(s.argv[-1].endswith("ours/seed_0/eval_results.json") and
               str(tmp_path / "ours" / "seed_0" / "phase2" / "checkpoints" / "last.ckpt") in s.argv for s in plain)
    stages = plan("quickstart", ["ours"], [0], tmp_path, 5, 3, [], [], online_selection=True)
    phase2 = next(s for s in stages if s.name.startswith("phase 2"))
    callbacks = json.loads(phase2.argv[phase2.argv.index("--trainer.callbacks") + 1])
    evaluator = next(c for c in callbacks if c["class_path"].endswith("MetaRolloutEvaluation"))
    assert evaluator["init_args"]["save_best"] is True and evaluator["init_args"]["trials"] == 50
    assert any("ModelCheckpoint" in c["class_path"] for c in callbacks)
    diagnostic = stages[-1]
    assert diagnostic.name.startswith("diagnostic: online-selected") and any("best_eval.ckpt" in a for a in diagnostic.argv)

    def fake(path, rates):
        path.mkdir(parents=True)
        (path / "eval_results.json").write_text(json.dumps({"evaluations": [
            {"step": 8000, "summary": {"success_per_episode": rates, "trials": 50}}]}))

    fake(tmp_path / "ours" / "seed_0", [0.5, 0.9, 0.9])
    fake(tmp_path / ONLINE / "ours" / "seed_0", [0.5, 1.0, 1.0])
    summarize(tmp_path)
    text = (tmp_path / "results.md").read_text()
    final, diag = text.split("DIAGNOSTIC")
    assert "0.90" in final and "1.00" not in final and "chosen with online rollouts" in diag and "1.00" in diag


def test_drawers3_preset_tiny(tmp_path):
    """The 3-drawer preset through the real CLI at tiny scale: N = 3 is taken from the data by every stage, the
    final evaluation plays 4-episode trials, and each trial records which drawer was open after each episode."""
    overlay = tmp_path / "tiny_phase2.yaml"
    overlay.write_text(TINY_PHASE2.replace("episodes: 2", "episodes: 4").replace("trials: 2", "trials: 3"))
    out, data = tmp_path / "out", tmp_path / "data"
    cmd = [sys.executable, "-m", "lightning_modules.pipeline", "--preset", "drawers3", "--methods", "ours",
           "--out", str(out), "--data-root", str(data), "--data-args", "rollouts_per_task=3 env.episode_length=10",
           "--phase1-args", f"--trainer.max_steps 2 --trainer.enable_model_summary false {TINY_DATA}",
           "--phase2-args", f"--config {overlay} {TINY_DATA}", "--trials", "3"]
    run = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "--config configs/filter_quickstart.yaml --config configs/drawers3/filter.yaml" in run.stdout
    meta = json.loads((data / "metadata.json").read_text())
    assert meta["num_tasks"] == 3 and meta["env"]["num_drawers"] == 3
    final = json.loads((out / "ours" / "seed_0" / "eval_results.json").read_text())["evaluations"][-1]
    assert len(final["summary"]["success_per_episode"]) == 4 and final["summary"]["target_counts"] == [1, 1, 1]
    assert all(len(t["opened"]) == 4 and set(t["opened"]) <= {-1, 0, 1, 2} for t in final["trials"])
    assert (out / "figure2.png").stat().st_size > 0

    ours = torch.load(out / "ours" / "seed_0" / "phase2" / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)["hyper_parameters"]
    assert ours["conservative"] and ours["bc_weight"] == 3.0 and ours["bc_filter"] == "search"

    # the No CQL ablation on the same filters (search-shaped phase-2 data): no phase 1 is run, and it is SAC (no
    # conservative term, no BC term), whatever the preset's phase 2 regularizes with
    out2 = tmp_path / "out2"
    variant = list(cmd)
    variant[variant.index("--methods") + 1] = "no_cql"
    variant[variant.index("--out"):variant.index("--out") + 2] = []
    variant[variant.index("--phase1-args"):variant.index("--phase1-args") + 2] = []
    variant[variant.index("--phase2-args") + 1] += " --data.init_args.search_fraction 0.5"
    run = subprocess.run([*variant, "--out", str(out2), "--filters-from", str(out)], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "=== phase 1" not in run.stdout and not (out2 / "filters").exists()
    assert f"--model.init_args.filter_checkpoint {out / 'filters' / 'synthetic' / 'seed_0'}" in run.stdout
    assert "search_fraction 0.5" in run.stdout and (out2 / "no_cql" / "seed_0" / "eval_results.json").exists()
    sac = torch.load(out2 / "no_cql" / "seed_0" / "phase2" / "checkpoints" / "last.ckpt", map_location="cpu",
                     weights_only=False)["hyper_parameters"]
    assert not sac["conservative"] and sac["bc_weight"] == 0.0


def test_drawers3_pixels_preset_tiny(tmp_path):
    """Three drawers from pixels through the real CLI at tiny scale: the 3-drawer scene rendered at 32 px (pixels
    only), the pixels filter with the drawers3 memory settings, 4-episode trials from rendered frames."""
    overlay = tmp_path / "tiny_phase2.yaml"
    overlay.write_text(TINY_PHASE2.replace("episodes: 2", "episodes: 4").replace("trials: 2", "trials: 3"))
    out, data = tmp_path / "out", tmp_path / "data"
    cmd = [sys.executable, "-m", "lightning_modules.pipeline", "--preset", "drawers3_pixels", "--methods", "ours",
           "--out", str(out), "--data-root", str(data),
           "--data-args", "rollouts_per_task=3 env.episode_length=10 workers=0",
           "--phase1-args", f"--trainer.max_steps 2 --trainer.enable_model_summary false {TINY_DATA}",
           "--phase2-args", f"--config {overlay} {TINY_DATA}", "--trials", "3"]
    run = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert ("--config configs/filter_quickstart.yaml --config configs/pixels/filter.yaml "
            "--config configs/drawers3_pixels/filter.yaml") in run.stdout
    meta = json.loads((data / "metadata.json").read_text())
    assert meta["num_tasks"] == 3 and meta["env"]["num_drawers"] == 3
    assert meta["env"]["obs_mode"] == "pixels" and meta["env"]["image_size"] == 32 and meta["fail_fraction"] == 0.15
    ckpt = torch.load(out / "filters" / "synthetic" / "seed_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["belief_filter"]["kwargs"]["obs_keys"] == ["pixels"] and ckpt["hyper_parameters"]["beta"] == 10000.0
    final = json.loads((out / "ours" / "seed_0" / "eval_results.json").read_text())["evaluations"][-1]
    assert len(final["summary"]["success_per_episode"]) == 4 and final["summary"]["target_counts"] == [1, 1, 1]
    assert all(len(t["opened"]) == 4 and set(t["opened"]) <= {-1, 0, 1, 2} for t in final["trials"])


def test_pixels_preset_tiny(tmp_path):
    """The pixels preset through the real CLI at tiny scale: 32 px images only (no state stored or read), the
    filter reads pixels alone, phase 2 and the final evaluation run from rendered frames."""
    overlay = tmp_path / "tiny_phase2.yaml"
    overlay.write_text(TINY_PHASE2)
    out, data = tmp_path / "out", tmp_path / "data"
    cmd = [sys.executable, "-m", "lightning_modules.pipeline", "--preset", "pixels", "--methods", "ours",
           "--out", str(out), "--data-root", str(data),
           "--data-args", "rollouts_per_task=3 env.episode_length=10 workers=0",
           "--phase1-args", f"--trainer.max_steps 2 --trainer.enable_model_summary false {TINY_DATA}",
           "--phase2-args", f"--config {overlay} {TINY_DATA}", "--trials", "2", "--episodes", "2"]
    run = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "--config configs/filter_quickstart.yaml --config configs/pixels/filter.yaml" in run.stdout
    meta = json.loads((data / "metadata.json").read_text())
    assert meta["env"]["obs_mode"] == "pixels" and meta["env"]["image_size"] == 32
    assert meta["fail_fraction"] == 0.15  # the preset's failed attempts
    ckpt = torch.load(out / "filters" / "synthetic" / "seed_0" / "checkpoints" / "last.ckpt", weights_only=False)
    spec = ckpt["belief_filter"]["kwargs"]
    assert spec["obs_keys"] == ["pixels"] and spec["image_size"] == 32 and spec["cnn_depth"] == 16
    assert ckpt["hyper_parameters"]["recon_fraction"] < 1.0
    final = json.loads((out / "ours" / "seed_0" / "eval_results.json").read_text())["evaluations"][-1]
    assert len(final["summary"]["success_per_episode"]) == 2
    assert (out / "figure2.png").stat().st_size > 0
