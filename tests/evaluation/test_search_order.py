"""Which drawer each episode of a trial opened: the search order, the revisit rate, the TensorBoard text, and the
openers' measurement command."""

from __future__ import annotations

import math
from pathlib import Path

from lightning_modules.evaluation.protocol import revisits_failed_drawer, search_order, summarize

DRAWERS3 = str(Path(__file__).resolve().parents[2] / "configs" / "collect" / "drawers3_state.yaml")


def trial(target, opened, success):
    return {"trial": 0, "target": target, "opened": opened, "success": success, "success_any": success,
            "wrong_drawer_open": [o >= 0 and not s for o, s in zip(opened, success)], "return": [0.0] * len(opened)}


def test_systematic_search_never_revisits_a_failed_drawer():
    systematic = trial(2, [0, 1, 2, 2], [False, False, True, True])
    assert not revisits_failed_drawer(systematic) and search_order(systematic) == "target 2: 0 1 2 2"
    stuck = trial(1, [0, 0, 0], [False, False, False])           # the No Expl failure
    assert revisits_failed_drawer(stuck)
    back = trial(2, [0, 1, 0, 2], [False, False, False, True])   # returns to an empty drawer before the right one
    assert revisits_failed_drawer(back)
    nothing = trial(0, [-1, -1, 0], [False, False, True])        # no drawer opened is not a revisit
    assert not revisits_failed_drawer(nothing) and search_order(nothing) == "target 0: - - 0"


def test_summary_reports_the_revisit_rate_and_target_counts_per_drawer():
    trials = [trial(2, [0, 1, 2, 2], [False, False, True, True]), trial(1, [0, 0, 0, 0], [False] * 4),
              trial(0, [0, 0, 0, 0], [True] * 4)]
    summary = summarize(trials, 4, "last", num_tasks=3)
    assert summary["revisit_failed_rate"] == 1 / 3 and summary["target_counts"] == [1, 1, 1]
    old = [{k: v for k, v in t.items() if k != "opened"} for t in trials]  # results written before "opened"
    assert math.isnan(summarize(old, 4, "last", num_tasks=3)["revisit_failed_rate"])


def test_check_openers_command_measures_every_drawer(tmp_path, capsys):
    from envs.check_openers import main

    preview = tmp_path / "preview.png"
    assert main(["--config", DRAWERS3, "--episodes", "2", "--preview", str(preview),
                 "--preview-size", "32"]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| ") and "drawer" in line and "success" not in line]
    assert len(rows) == 3 and preview.stat().st_size > 0
    assert main(["--config", DRAWERS3, "--episodes", "0"]) == 2  # named error, exit 2
