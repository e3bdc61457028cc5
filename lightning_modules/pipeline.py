"""The main job: dataset -> phase 1 (filter) -> phase 2 (latent CQL) -> evaluation -> Figure 2, per method and seed.

    python -m lightning_modules.pipeline                                   # CPU quickstart, the method ("ours")
    python -m lightning_modules.pipeline --methods no_expl no_cql          # the two ablations beside it
    python -m lightning_modules.pipeline --preset pixels --methods ours no_expl no_cql   # from 32 px images (CPU)
    python -m lightning_modules.pipeline --preset paper --seeds 0 1 2      # paper scale (GPU)
    python -m lightning_modules.pipeline --preset drawers3 --methods ours no_expl no_cql   # 3 drawers, 4-episode trials
    python -m lightning_modules.pipeline --filters-from runs/a --out runs/b --phase2-args="..."  # phase-2 variant

Every stage is the command a user would type (``python -m envs.collect``, ``lightning fit --config ...``,
``python -m lightning_modules.evaluate``), printed before it runs. Stages that finished are skipped and a
training stage that was interrupted resumes from its ``last.ckpt``, so the job can be run again after a kill (or
in chunks with ``--max-stages``); ``--jobs 2`` runs the seeds side by side in two single-threaded lanes
(``lightning_modules/lanes.py``). Layout under ``--out``::

    data stage                 -> the preset's dataset root (configs/collect/<preset>...yaml)
    filters/<mode>/seed_<k>/   -> phase-1 run (TensorBoard logs, config.yaml, checkpoints/last.ckpt)
    <method>/seed_<k>/phase2/  -> phase-2 run (logs, eval_results.json of the periodic evaluations, checkpoints)
    <method>/seed_<k>/eval_results.json   final evaluation of the FINAL phase-2 checkpoint (last.ckpt, fresh trials)
    figure2.png, results.md    success vs episode for every method and seed found under --out
    learning_curves.png, learning_curves/   periodic evaluations vs updates, mean and 95% interval over seeds
                                            (PNG, and TensorBoard: tensorboard --logdir <out>/learning_curves)

No model selection with online rollouts: the reported model is the last one. ``--online-selection`` (a diagnostic,
opt-in) also keeps the checkpoint with the best periodic online evaluation (``best_eval.ckpt``) and evaluates it
into ``online_selected/<method>/seed_<k>/eval_results.json``; ``results.md`` lists it in a separate table labelled
as chosen with online rollouts.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from envs.atomic import write_json_atomic, write_text_atomic
from envs.errors import run_command
from lightning_modules.lanes import DONE, STARTED, run_lanes, run_stage

REPO = Path(__file__).resolve().parents[1]  # configs are found here, whatever the working directory

PRESETS = {  # preset -> its data config and the configs of each phase (later ones overlay earlier ones)
    "quickstart": dict(data="configs/collect/quickstart_state.yaml", filter=["configs/filter_quickstart.yaml"],
                       cql=["configs/cql_quickstart.yaml"]),
    "paper": dict(data="configs/collect/two_drawers.yaml", filter=["configs/filter_paper.yaml"],
                  cql=["configs/cql_paper.yaml"]),
    "pixels": dict(data="configs/collect/pixels.yaml",
                   filter=["configs/filter_quickstart.yaml", "configs/pixels/filter.yaml"],
                   cql=["configs/cql_quickstart.yaml", "configs/pixels/cql.yaml"]),
    "drawers3": dict(data="configs/collect/drawers3_state.yaml",
                     filter=["configs/filter_quickstart.yaml", "configs/drawers3/filter.yaml"],
                     cql=["configs/cql_quickstart.yaml", "configs/drawers3/cql.yaml"]),
    "drawers3_pixels": dict(data="configs/collect/drawers3_pixels.yaml",
                            filter=["configs/filter_quickstart.yaml", "configs/pixels/filter.yaml",
                                    "configs/drawers3_pixels/filter.yaml"],
                            cql=["configs/cql_quickstart.yaml", "configs/drawers3/cql.yaml",
                                 "configs/drawers3_pixels/cql.yaml"]),
}
METHODS = {  # method -> (data mode of both phases, overlays of phase 1, overlays of phase 2)
    "ours": ("synthetic", [], []),
    "no_expl": ("no_expl", ["configs/ablations/no_expl.yaml"], ["configs/ablations/no_expl.yaml"]),
    "no_cql": ("synthetic", [], ["configs/ablations/no_cql.yaml"]),
}
ONLINE = "online_selected"  # the diagnostic's folder under --out (never read by the main table)
EVALUATOR = "lightning_modules.callbacks.meta_rollout_evaluation.MetaRolloutEvaluation"


def config_path(relative: str) -> str:
    """A config of the repository: as written when the working directory is the repository root, else absolute."""
    here = Path(relative)
    return relative if here.exists() and here.resolve() == (REPO / relative).resolve() else str(REPO / relative)


@dataclass
class Stage:
    """One command of the pipeline and the folder whose markers say it started / finished, with which arguments."""

    name: str
    argv: list[str]
    run_dir: Path | None = None
    lane: int | None = None  # the seed whose chain it belongs to (``--jobs``); None: runs before every lane

    def fingerprint(self) -> dict:
        """The stage's command and the contents of every config file it reads (what makes its result)."""
        configs = {}
        for i, arg in enumerate(self.argv[:-1]):
            if arg == "--config":
                path = Path(self.argv[i + 1])
                text = path.read_text() if path.is_file() else ""
                configs[_repo_relative(path)] = hashlib.sha256(text.encode()).hexdigest()
                block = _data_block(path, text)  # the data-module block it names (configs/data/*.yaml), if any
                if block is not None:
                    configs[_repo_relative(block)] = hashlib.sha256(block.read_bytes()).hexdigest()
        return {"argv": [_repo_relative(Path(a)) if a.endswith(".yaml") else a for a in self.argv[1:]],
                "configs": configs}

    def recorded(self, marker: str) -> dict | None:
        """The fingerprint stored in ``marker`` (``{}`` for a marker of an older pipeline), None without one."""
        path = self.run_dir / marker if self.run_dir is not None else None
        if path is None or not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return data.get("fingerprint", {}) if isinstance(data, dict) else {}

    def check_same(self) -> None:
        """``ValueError`` when this folder holds a stage run with other arguments or configs (naming what changed)."""
        mine = self.fingerprint()
        for marker in (DONE, STARTED):
            theirs = self.recorded(marker)
            if theirs is not None and theirs != mine:
                raise ValueError(f"stage '{self.name}': {self.run_dir} holds a run made {_difference(theirs, mine)}: "
                                 f"refusing to reuse or resume it; choose another --out (or delete that folder)")

    def done(self) -> bool:
        self.check_same()
        return self.recorded(DONE) is not None


def _data_block(config: Path, text: str) -> Path | None:
    """The file a config's ``data:`` names (a path relative to the config's folder), when it names one."""
    import yaml

    try:
        named = (yaml.safe_load(text) or {}).get("data") if text else None
    except yaml.YAMLError:
        return None
    block = config.parent / named if isinstance(named, str) else None
    return block if block is not None and block.is_file() else None


def _repo_relative(path: Path) -> str:
    """A path inside the repository as relative to it (the same whatever the working directory), else as given."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _difference(old: dict, new: dict) -> str:
    if not old:
        return "by an older pipeline (no record of its arguments)"
    was, now = old.get("argv", []), new.get("argv", [])
    if was != now:
        gone = [a for a in was if a not in now][:4]
        added = [a for a in now if a not in was][:4]
        return f"with other arguments (was: {shlex.join(gone)}; now: {shlex.join(added)})"
    changed = sorted(k for k in set(old.get("configs", {})) | set(new.get("configs", {}))
                     if old.get("configs", {}).get(k) != new.get("configs", {}).get(k))
    return f"with other config contents ({', '.join(changed[:3])})"


def _lightning(*args: str) -> list[str]:
    return [sys.executable, "-m", "lightning_modules.cli", *args]


def _fit_stage(name: str, configs: list[str], run_dir: Path, seed: int, extra: list[str]) -> Stage:
    """``lightning fit`` into ``run_dir`` (resumed from its last.ckpt when one exists)."""
    argv = _lightning("fit", *[a for c in configs for a in ("--config", c)]) + [
        "--seed_everything", str(seed), "--data.init_args.seed", str(seed),
        "--trainer.logger.init_args.save_dir", str(run_dir.parent.parent),
        "--trainer.logger.init_args.name", run_dir.parent.name,
        "--trainer.logger.init_args.version", run_dir.name, *extra]
    return Stage(name, argv, run_dir, lane=seed)


def preset_episodes(preset: str) -> int:
    """Episodes per final-evaluation trial: the evaluation's default for the preset's drawers (N + 1)."""
    import yaml

    from lightning_modules.evaluation.protocol import default_episodes

    env = (yaml.safe_load(Path(config_path(PRESETS[preset]["data"])).read_text()) or {}).get("env") or {}
    return default_episodes(int(env.get("num_drawers", 2)))


def online_selection_args(configs: str | list[str]) -> list[str]:
    """``lightning fit`` arguments that turn on ``save_best`` of the periodic evaluation callback of the configs
    (the last one that lists callbacks; the list is passed whole, as JSON, with that one change)."""
    import yaml

    callbacks: list = []
    for config in [configs] if isinstance(configs, str) else configs:
        listed = (yaml.safe_load(Path(config).read_text()).get("trainer") or {}).get("callbacks")
        callbacks = copy.deepcopy(listed) if listed else callbacks
    found = [c for c in callbacks if isinstance(c, dict) and c.get("class_path") == EVALUATOR]
    if not found:
        raise ValueError(f"--online-selection: {configs} has no {EVALUATOR.rsplit('.', 1)[1]} callback")
    for c in found:
        c.setdefault("init_args", {})["save_best"] = True
    return ["--trainer.callbacks", json.dumps(callbacks)]


def plan(preset: str, methods: list[str], seeds: list[int], out: Path, trials: int, episodes: int,
         phase1_args: list[str], phase2_args: list[str], data_root: str | None = None,
         data_args: list[str] | None = None, online_selection: bool = False,
         filters_from: Path | None = None) -> list[Stage]:
    """The stages to run, in order (phase 1 of a data mode is shared by the methods that use it; with
    ``filters_from``, phase 1 is not run: the filters are that --out's ``filters/<mode>/seed_<k>``)."""
    preset_cfg = PRESETS[preset]
    cfg = {"data": config_path(preset_cfg["data"]), "filter": [config_path(c) for c in preset_cfg["filter"]],
           "cql": [config_path(c) for c in preset_cfg["cql"]]}
    if online_selection:
        phase2_args = [*online_selection_args(cfg["cql"]), *phase2_args]
    data_args = list(data_args or [])
    if data_root is not None:
        data_args.append(f"root={data_root}")
        phase1_args = ["--data.init_args.root", data_root, *phase1_args]
        phase2_args = ["--data.init_args.root", data_root, *phase2_args]
    stages = [Stage("data", [sys.executable, "-m", "envs.collect", "--config", cfg["data"], *data_args])]
    filters: dict[tuple[str, int], Path] = {}
    for seed in seeds:
        for method in methods:
            mode, overlays1, overlays2 = METHODS[method]
            overlays1, overlays2 = [config_path(c) for c in overlays1], [config_path(c) for c in overlays2]
            key = (mode, seed)
            if key not in filters and filters_from is not None:
                filters[key] = filters_from / "filters" / mode / f"seed_{seed}"
            elif key not in filters:
                run = out / "filters" / mode / f"seed_{seed}"
                filters[key] = run
                stages.append(_fit_stage(f"phase 1 ({mode}, seed {seed})", [*cfg["filter"], *overlays1], run, seed, phase1_args))
            filter_ckpt = filters[key] / "checkpoints" / "last.ckpt"
            run2 = out / method / f"seed_{seed}" / "phase2"
            stages.append(_fit_stage(f"phase 2 ({method}, seed {seed})", [*cfg["cql"], *overlays2], run2, seed,
                                     ["--model.init_args.filter_checkpoint", str(filter_ckpt), *phase2_args]))
            final = out / method / f"seed_{seed}"
            stages.append(_eval_stage(f"evaluation ({method}, seed {seed})", run2 / "checkpoints" / "last.ckpt",
                                      final, trials, episodes, seed))
            if online_selection:
                stages.append(_eval_stage(f"diagnostic: online-selected checkpoint ({method}, seed {seed})",
                                          run2 / "checkpoints" / "best_eval.ckpt", out / ONLINE / method / f"seed_{seed}",
                                          trials, episodes, seed))
    return stages


def check_filters(stages: list[Stage]) -> None:
    """``FileNotFoundError`` naming the first phase-1 checkpoint that phase 2 reads and no finished run wrote."""
    for stage in stages:
        if "--model.init_args.filter_checkpoint" not in stage.argv:
            continue
        ckpt = Path(stage.argv[stage.argv.index("--model.init_args.filter_checkpoint") + 1])
        run = ckpt.parent.parent
        if not (run / DONE).is_file() or not ckpt.is_file():
            raise FileNotFoundError(f"--filters-from: {run} holds no finished phase-1 run ({DONE} and "
                                    f"checkpoints/last.ckpt); run the pipeline with --out {run.parent.parent.parent} first")


def _eval_stage(name: str, checkpoint: Path, folder: Path, trials: int, episodes: int, seed: int) -> Stage:
    """``python -m lightning_modules.evaluate`` of ``checkpoint`` on fresh trials (seed 1000 + seed)."""
    return Stage(name, [sys.executable, "-m", "lightning_modules.evaluate", "--checkpoint", str(checkpoint),
                        "--trials", str(trials), "--episodes", str(episodes), "--seed", str(1000 + seed),
                        "--out", str(folder / "eval_results.json")], folder / "final_eval", lane=seed)


def summarize(out: Path) -> None:
    """Write ``figure2.png`` and ``results.md`` for every method and seed under ``out``."""
    from lightning_modules.evaluation.curves import (collect_learning_curves, learning_curve_figure,
                                                     write_tensorboard_curves)
    from lightning_modules.evaluation.results import collect_curves, figure2, results_table

    curves = collect_curves(out)
    table = ("Final checkpoint (last.ckpt, no model selection), fresh trials; mean ± 95% interval over seeds\n\n"
             + results_table(curves))
    if (out / ONLINE).is_dir() and list((out / ONLINE).glob("*/*/eval_results.json")):
        table += ("\n\nDIAGNOSTIC, not an offline result: the checkpoint with the best periodic ONLINE evaluation "
                  "(best_eval.ckpt, chosen with online rollouts), on fresh trials\n\n"
                  + results_table(collect_curves(out / ONLINE)))
    write_text_atomic(out / "results.md", table + "\n")
    fig = figure2(curves, num_tasks=max(c.num_tasks for c in curves))
    fig.savefig(out / "figure2.png", dpi=150)
    print(f"\n{table}\n\nwrote {out / 'figure2.png'} and {out / 'results.md'}")
    learning = collect_learning_curves(out)
    if learning:
        learning_curve_figure(learning).savefig(out / "learning_curves.png", dpi=150)
        folder = write_tensorboard_curves(learning, out)
        print(f"wrote {out / 'learning_curves.png'} and TensorBoard learning curves over seeds in {folder}")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m lightning_modules.pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="quickstart")
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["ours"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--out", type=Path, default=None, help="default: runs/pipeline_<preset>")
    p.add_argument("--trials", type=int, default=50, help="final evaluation trials per run")
    p.add_argument("--episodes", type=int, default=None, help="episodes per final-evaluation trial (default: the "
                   "preset's: 3, or 4 for drawers3)")
    p.add_argument("--phase1-args", default="", metavar="ARGS",
                   help='extra `lightning fit` args of phase 1, one string: --phase1-args="--trainer.max_steps 500"')
    p.add_argument("--phase2-args", default="", metavar="ARGS", help="extra `lightning fit` args of phase 2, likewise")
    p.add_argument("--filters-from", type=Path, default=None, metavar="OUT",
                   help="take the finished phase-1 runs of another job's --out (OUT/filters/<mode>/seed_<k>) "
                        "instead of training phase 1: phase-2 variants on the same filters")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the preset's data config)")
    p.add_argument("--data-args", default="", metavar="ARGS", help='extra key=value overrides of the data stage, one string')
    p.add_argument("--online-selection", action="store_true",
                   help="diagnostic: also keep and evaluate the checkpoint chosen by the periodic online evaluations "
                        "(online interaction; reported separately, labelled)")
    p.add_argument("--max-stages", type=int, default=None, help="run at most this many unfinished stages, then stop")
    p.add_argument("--jobs", type=int, default=1, help="run the seeds side by side in this many lanes, each with "
                   "cores // jobs torch threads (lightning_modules/lanes.py; on 2 cores, --jobs 2 ran two drawers3 "
                   "seeds in 34 min, one alone took 53: docs/RESULTS.md)")
    args = p.parse_args(argv)
    return run_command(lambda: _run(args))


def _split(option: str, text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as err:
        raise ValueError(f"{option} {text!r} cannot be split into arguments ({err}): quote it as one string, "
                         f'e.g. {option}="--trainer.max_steps 500"') from err


def _check_writable(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {folder} is not writable")


def _run(args: argparse.Namespace) -> int:
    """Validate every argument (before any work), then run the stages that are not done."""
    if args.episodes is None:
        args.episodes = preset_episodes(args.preset)
    if args.trials < 1 or args.episodes < 1:
        raise ValueError(f"--trials and --episodes must be >= 1, got {args.trials} and {args.episodes}")
    if any(seed < 0 for seed in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds must be distinct and >= 0, got {args.seeds}")
    if args.max_stages is not None and args.max_stages < 1:
        raise ValueError(f"--max-stages must be >= 1, got {args.max_stages}")
    if args.jobs < 1 or (args.jobs > 1 and args.max_stages is not None):
        raise ValueError(f"--jobs must be >= 1 (and 1 with --max-stages), got {args.jobs}")
    extra = {name: _split(f"--{name.replace('_', '-')}", getattr(args, name))
             for name in ("phase1_args", "phase2_args", "data_args")}
    if args.filters_from is not None and extra["phase1_args"]:
        raise ValueError("--phase1-args has no effect with --filters-from (phase 1 is not run): drop one of them")
    out = args.out or Path("runs") / f"pipeline_{args.preset}"
    stages = plan(args.preset, args.methods, args.seeds, out, args.trials, args.episodes,
                  extra["phase1_args"], extra["phase2_args"], args.data_root, extra["data_args"],
                  args.online_selection, args.filters_from)
    if args.filters_from is not None:
        check_filters(stages)
    _check_writable(out)
    for stage in stages:
        stage.check_same()  # every folder, before the first stage runs
    if args.jobs > 1:
        failed = run_lanes(stages, args.jobs, out / "logs")
        if failed:
            print(f"stage(s) failed: {'; '.join(failed)}: fix the problem and run the same command again", file=sys.stderr)
            return 1
        summarize(out)
        return 0
    ran = 0
    for stage in stages:
        if stage.done():
            print(f"=== {stage.name}: done already ({stage.run_dir})")
            continue
        if args.max_stages is not None and ran >= args.max_stages:
            print(f"stopping after {ran} stage(s) (--max-stages); run the same command again to continue")
            return 0
        try:
            run_stage(stage)
        except subprocess.CalledProcessError as err:
            print(f"stage '{stage.name}' failed (exit {err.returncode}): fix the problem and run the same command again",
                  file=sys.stderr)
            return 1
        ran += 1
    summarize(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
