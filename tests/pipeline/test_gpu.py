"""The GPU path (marked ``gpu``: skipped without CUDA, run on the lent GPU machine): the paper configs as shipped
(``accelerator: auto``, bf16-mixed, the buffers on the GPU) through the console script at tiny scale, phase 2 of the
state quickstart on the GPU, evaluation on the GPU, and checkpoints trained there that load on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO, assert_ok, load_ckpt, subprocess_env  # noqa: E402
from helpers import run_lightning as lightning  # noqa: E402

pytestmark = pytest.mark.gpu

TINY_PHASE2 = """\
trainer:
  max_steps: 4
  limit_val_batches: 1
  enable_model_summary: false
  callbacks:
    - class_path: lightning_modules.callbacks.meta_rollout_evaluation.MetaRolloutEvaluation
      init_args: {every_n_steps: 2, trials: 2, episodes: 2, seed: 0, video: false, plot: false}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {monitor: null, every_n_train_steps: 2, save_top_k: 1, save_last: true, filename: "{step}"}
model:
  init_args: {hidden_dim: 32, num_random: 4, belief_cache_batches: 2, refresh_every: 1, transition_batch_size: 32}
"""


def _paper_data(root: str) -> list[str]:
    """The paper's data block at tiny scale; ``device: cuda`` (the buffers on the GPU) is kept as shipped."""
    return (f"--data.init_args.root {root} --data.init_args.image_size 32 --data.init_args.rollouts_per_task 3 "
            "--data.init_args.episode_length 10 --data.init_args.batch_size 2 --data.init_args.batches_per_epoch 2 "
            "--data.init_args.val_batches 1 --data.init_args.num_segments 2").split()


def _finite_weights(ckpt: dict) -> bool:
    return all(torch.isfinite(v.float()).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_paper_configs_train_and_evaluate_on_the_gpu(tmp_path, tiny_pixel_dataset):
    from lightning_modules.filter.belief_filter import BeliefFilter

    runs, data = tmp_path / "runs", _paper_data(str(tiny_pixel_dataset.root))
    phase1 = lightning("fit", "--config", "configs/filter_paper.yaml", "--trainer.max_steps", "3",
                       "--trainer.logger.init_args.save_dir", str(runs), "--model.init_args.cnn_depth", "8",
                       "--model.init_args.deter_dim", "16", "--model.init_args.stoch_dim", "4",
                       "--model.init_args.hidden_dim", "16", "--trainer.enable_model_summary", "false", *data)
    assert_ok(phase1)
    assert "GPU available: True (cuda), used: True" in phase1.stdout + phase1.stderr
    filter_ckpt = runs / "filter_paper" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = load_ckpt(filter_ckpt)
    assert ckpt["global_step"] == 3 and _finite_weights(ckpt)
    assert BeliefFilter.load(filter_ckpt, map_location="cpu").image_size == 32  # a GPU file on the CPU

    overlay = tmp_path / "tiny_phase2.yaml"
    overlay.write_text(TINY_PHASE2)
    phase2 = lightning("fit", "--config", "configs/cql_paper.yaml", "--config", str(overlay),
                       "--trainer.logger.init_args.save_dir", str(runs), "--trainer.precision", "bf16-mixed",
                       "--model.init_args.filter_checkpoint", str(filter_ckpt), *data)
    assert_ok(phase2)
    run2 = runs / "cql_paper" / "version_0"
    ckpt2 = load_ckpt(run2 / "checkpoints" / "last.ckpt")
    assert ckpt2["global_step"] == 4 and _finite_weights(ckpt2)
    steps = [e["step"] for e in json.loads((run2 / "eval_results.json").read_text())["evaluations"]]
    assert steps == [2, 4]  # the rollout evaluation ran with the GPU policy

    for device in ("cuda", "cpu"):  # the final evaluation on the GPU, and the GPU checkpoint on the CPU
        out = tmp_path / f"eval_{device}.json"
        result = subprocess.run([sys.executable, "-m", "lightning_modules.evaluate", "--checkpoint",
                                 str(run2 / "checkpoints" / "last.ckpt"), "--trials", "2", "--episodes", "2",
                                 "--device", device, "--out", str(out)], cwd=REPO, env=subprocess_env(),
                                capture_output=True, text=True, timeout=600)
        assert_ok(result)
        [evaluation] = json.loads(out.read_text())["evaluations"]
        assert len(evaluation["summary"]["success_per_episode"]) == 2


def test_state_quickstart_phase2_on_the_gpu(tmp_path, tiny_state_dataset, filter_ckpt):
    """The CPU quickstart's phase 2 moved to the GPU by two flags, bf16-mixed, on a filter trained on the CPU."""
    overlay = tmp_path / "tiny_phase2.yaml"
    overlay.write_text(TINY_PHASE2)
    result = lightning("fit", "--config", "configs/cql_quickstart.yaml", "--config", str(overlay),
                       "--trainer.accelerator", "gpu", "--trainer.precision", "bf16-mixed",
                       f"--data.init_args.root={tiny_state_dataset.root}",
                       f"--data.init_args.rollouts_per_task={tiny_state_dataset.rollouts_per_task}",
                       "--data.init_args.batch_size=2", "--data.init_args.num_segments=2",
                       "--data.init_args.batches_per_epoch=2", "--data.init_args.val_batches=1",
                       "--trainer.check_val_every_n_epoch=1", f"--model.init_args.filter_checkpoint={filter_ckpt}",
                       f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}")
    assert_ok(result)
    assert "GPU available: True (cuda), used: True" in result.stdout + result.stderr
    [run] = list((tmp_path / "runs" / "cql_quickstart").glob("version_*"))
    ckpt = load_ckpt(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4 and _finite_weights(ckpt)
    assert bool(ckpt["state_dict"]["normalizer.ready"])
