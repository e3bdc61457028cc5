"""Bad input, as a hostile new user would give it: each gets a one-line named error (exit status 2 from the
commands) before any expensive work, and the files that existed before are unchanged (docs/RELIABILITY.md)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, lightning_command, subprocess_env  # noqa: E402

from envs.collect import collect_dataset
from envs.dataset import OfflineDataset, buffer_dir
from envs.integrity import IntegrityError
from envs.two_drawers import EnvConfig

TINY_ENV = EnvConfig(obs_mode="state", episode_length=10)


def snapshot(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (to show that nothing was changed)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def command(*args: str, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def assert_named(result: subprocess.CompletedProcess, *parts: str) -> str:
    """Exit status 2 and a last stderr line ``error: ...`` naming every part; returns that line."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    assert lines and lines[-1].startswith("error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for part in parts:
        assert part in lines[-1], (part, lines[-1])
    return lines[-1]


def collect(root: Path, seed: int = 0) -> None:
    collect_dataset(root, TINY_ENV, rollouts_per_task=2, seed=seed, progress=False)


def collect_cli(root: Path, *overrides: str) -> subprocess.CompletedProcess:
    return command(sys.executable, "-m", "envs.collect", f"root={root}", "rollouts_per_task=2", "preview=false",
                   "workers=0", "env.obs_mode=state", "env.episode_length=10", *overrides)


def datamodule(root: Path, **kw):
    from datamodules import MetaExplorationDataModule

    args = dict(root=str(root), obs_mode="state", episode_length=10, rollouts_per_task=2, num_segments=2,
                batch_size=2, batches_per_epoch=2, val_batches=1)
    return MetaExplorationDataModule(**{**args, **kw})


# ---------------------------------------------------------------------- datasets
def test_truncated_buffer_is_refused_and_never_grown(tmp_path):
    root = tmp_path / "ds"
    collect(root)
    state = buffer_dir(root, 0, 2) / "state.memmap"
    os.truncate(state, 100)
    before = snapshot(root)
    with pytest.raises(IntegrityError, match=r"task_0_n2 is damaged.*state.memmap has 100 bytes, its metadata implies 480"):
        OfflineDataset(root)
    assert_named(collect_cli(root), "state.memmap has 100 bytes")  # not "complete"
    with pytest.raises(IntegrityError, match="state.memmap has 100 bytes"):
        datamodule(root).prepare_data()
    assert snapshot(root) == before and os.path.getsize(state) == 100


def test_changed_bytes_fail_the_checksum(tmp_path):
    root = tmp_path / "ds"
    collect(root)
    action = buffer_dir(root, 1, 2) / "action.memmap"
    data = bytearray(action.read_bytes())
    data[-7] ^= 0x10  # one bit of the last rollout of task 1
    action.write_bytes(bytes(data))
    before = snapshot(root)
    assert_named(collect_cli(root, "--verify"), "task 1 rollout 1 does not match its checksum")
    with pytest.raises(IntegrityError, match="task 1 rollout 1 does not match its checksum"):
        datamodule(root).prepare_data()
    assert snapshot(root) == before
    ok = tmp_path / "ok"
    collect(ok)
    result = collect_cli(ok, "--verify")
    assert result.returncode == 0 and "4 rollouts verified, 4 against their checksums" in result.stdout, result.stderr


def test_non_finite_value_is_named_with_field_task_and_rollout(tmp_path):
    root = tmp_path / "ds"
    collect(root)
    OfflineDataset(root).buffers[0]["next", "reward"][1, 3] = float("nan")  # rewritten in place, as by a bad tool
    with pytest.raises(IntegrityError, match=r"non-finite value in field \('next', 'reward'\) of task 0 rollout 1 \(step 3\)"):
        OfflineDataset(root).verify()


def test_folder_without_metadata_is_never_written(tmp_path):
    root = tmp_path / "ds"
    collect_dataset(root, TINY_ENV, rollouts_per_task=2, seed=7, noise_std=0.5, progress=False)
    (root / "metadata.json").unlink()
    before = snapshot(root)
    assert_named(collect_cli(root, "seed=1"), str(root), "no metadata.json", "refusing to write")
    with pytest.raises(ValueError, match="no metadata.json: refusing to write"):
        datamodule(root).prepare_data()
    assert snapshot(root) == before


@pytest.mark.parametrize("override, named", [("seed=abc", "seed must be an integer, got 'abc'"),
                                             ("rollouts_per_task=abc", "rollouts_per_task must be an integer"),
                                             ("env.obs_mode=rgb", "unknown obs_mode 'rgb'")])
def test_collector_config_values_are_typed(tmp_path, override, named):
    assert_named(collect_cli(tmp_path / "ds", override), named)
    assert not (tmp_path / "ds").exists()  # nothing written


def test_data_module_obs_mode_is_checked():
    with pytest.raises(ValueError, match="unknown obs_mode 'rgb'"):
        datamodule(Path("unused"), obs_mode="rgb")
    with pytest.raises(ValueError, match=r"obs_mode 'state' stores only \['state'\]"):
        datamodule(Path("unused"), obs_keys=["pixels"])


def test_state_only_dataset_refuses_pixels(tmp_path):
    root = tmp_path / "ds"
    collect(root)
    dm = datamodule(root, obs_mode="pixels", image_size=32)
    with pytest.raises(ValueError, match=r"stores observation keys \['state'\], configured to deliver \['pixels'\]"):
        dm.setup("fit")


# ---------------------------------------------------------------------- checkpoints
def _fake_checkpoint(path: Path, phase: str) -> Path:
    torch.save({"phase": phase, "state_dict": {}, "global_step": 3, "hyper_parameters": {}}, path)
    return path


@pytest.mark.parametrize("config, phase, expected", [("filter_quickstart.yaml", "cql", "filter"),
                                                     ("cql_quickstart.yaml", "filter", "cql")])
def test_resuming_the_other_phase_is_refused(tmp_path, config, phase, expected):
    ckpt = _fake_checkpoint(tmp_path / "other.ckpt", phase)
    before = snapshot(tmp_path)
    result = command(*lightning_command(), "fit", "--config", str(REPO / "configs" / config), "--ckpt_path", str(ckpt),
                     "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"))
    assert_named(result, str(ckpt), f"written by phase {phase!r}", f"the config trains phase {expected!r}")
    assert snapshot(tmp_path) == before  # no run folder either


@pytest.mark.parametrize("extra, named", [([], "model.init_args.filter_checkpoint is required"),
                                          (["--model.init_args.filter_checkpoint", "{tmp}/nope.ckpt"],
                                           "filter checkpoint '{tmp}/nope.ckpt' does not exist")])
def test_phase2_without_a_filter_is_named(tmp_path, extra, named):
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    result = command(*lightning_command(), "fit", "--config", str(REPO / "configs" / "cql_quickstart.yaml"), *extra,
                     "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"))
    assert_named(result, named.replace("{tmp}", str(tmp_path)))
    assert not (tmp_path / "runs").exists()


def test_truncated_checkpoint_names_its_path(tmp_path, filter_ckpt):
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(Path(filter_ckpt).read_bytes()[:300])
    result = command(*lightning_command(), "fit", "--config", str(REPO / "configs" / "filter_quickstart.yaml"),
                     "--ckpt_path", str(ckpt), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"))
    assert_named(result, f"--ckpt_path {ckpt} could not be read")
    from lightning_modules.cql.module import LatentCQLModule

    with pytest.raises(ValueError, match=f"filter checkpoint '{ckpt}' could not be read"):
        LatentCQLModule(str(ckpt))


# ---------------------------------------------------------------------- evaluation and the pipeline
@pytest.mark.parametrize("args, named", [(["--num-envs", "0"], "--num-envs must be >= 1"),
                                         (["--trials", "0"], "--trials and --episodes must be >= 1"),
                                         (["--out", "{tmp}"], "is a folder"),
                                         (["--out", "{tmp}/a_file/results.json"], "its folder cannot be created")])
def test_evaluate_checks_arguments_before_any_trial(tmp_path, args, named):
    (tmp_path / "a_file").write_text("not a folder\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = ["--out", str(tmp_path / "r.json")] if "--out" not in args else []
    result = command(sys.executable, "-m", "lightning_modules.evaluate", "--checkpoint", str(tmp_path / "absent.ckpt"),
                     *out, *args)
    assert_named(result, named)  # named before the (absent) checkpoint is even read
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("args, named", [(["--trials", "0"], "--trials and --episodes must be >= 1"),
                                         (["--phase1-args", '"--trainer.max_steps 5'], "--phase1-args"),
                                         (["--seeds", "0", "0"], "--seeds must be distinct"),
                                         (["--jobs", "0"], "--jobs must be >= 1"),
                                         (["--jobs", "2", "--max-stages", "1"], "1 with --max-stages")])
def test_pipeline_checks_arguments_before_any_stage(tmp_path, args, named):
    result = command(sys.executable, "-m", "lightning_modules.pipeline", "--out", str(tmp_path / "out"), *args)
    assert_named(result, named)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, named", [([], "holds no finished phase-1 run"),
                                          (["--phase1-args", "--trainer.max_steps 5"], "--phase1-args has no effect")])
def test_pipeline_filters_from_needs_finished_filters(tmp_path, extra, named):
    """--filters-from a folder without a finished phase 1 (or with phase-1 args): named before any stage."""
    (tmp_path / "a" / "filters" / "synthetic" / "seed_0").mkdir(parents=True)  # started, never finished
    result = command(sys.executable, "-m", "lightning_modules.pipeline", "--out", str(tmp_path / "out"),
                     "--filters-from", str(tmp_path / "a"), *extra)
    assert_named(result, "--filters-from" if not extra else "--phase1-args", named)
    assert not (tmp_path / "out").exists()


def test_pipeline_refuses_to_reuse_stages_made_with_other_arguments(tmp_path):
    """A finished job in --out, run again with another --phase1-args: refused, naming the change; nothing rewritten."""
    from lightning_modules.pipeline import DONE, plan

    from envs.atomic import write_json_atomic

    out = tmp_path / "out"
    for stage in plan("quickstart", ["ours"], [0], out, 50, 3, ["--trainer.max_steps", "500"], [], None, []):
        if stage.run_dir is not None:  # as a finished run leaves them
            write_json_atomic(stage.run_dir / DONE, {"fingerprint": stage.fingerprint(), "seconds": 1.0})
    (out / "results.md").write_text("old results\n")
    before = snapshot(out)
    result = command(sys.executable, "-m", "lightning_modules.pipeline", "--out", str(out),
                     "--phase1-args", "--trainer.max_steps 600")
    assert_named(result, "phase 1 (synthetic, seed 0)", "with other arguments", "600", "choose another --out")
    assert snapshot(out) == before


def test_pipeline_runs_from_another_working_directory(tmp_path):
    """Config paths are the package's, not the working directory's: the data stage runs from /tmp-like folders."""
    result = command(sys.executable, "-m", "lightning_modules.pipeline", "--out", str(tmp_path / "out"),
                     "--data-root", str(tmp_path / "data"), "--data-args", "rollouts_per_task=2 env.episode_length=10",
                     "--max-stages", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(REPO / "configs" / "collect" / "quickstart_state.yaml") in result.stdout
    assert np.load(tmp_path / "data" / "progress_n2.npy").all()
