"""The sweep's page in a real browser (headless Chromium, skipped where it is not installed): one band per
config in every panel, drawn in the config's colour."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "ui"))
from report_fixtures import browser  # noqa: E402

from fedsup.ui import sweep_report  # noqa: E402

ROUNDS = 4


chromium = browser.chromium_binary


def fake_sweep(folder: Path, configs: list[str], seeds: int) -> Path:
    """A sweep directory as the sweep leaves it: sweep.json, and each run's rounds.jsonl and summary.json."""
    runs = []
    for c, config in enumerate(configs):
        for seed in range(seeds):
            path = folder / f"{config}.seed-{seed}"
            path.mkdir(parents=True)
            lines = [json.dumps({"round": r, "train_metrics": {"loss": 2.0 / r + c * 0.1 + seed * 0.01},
                                 "eval_metrics": {"accuracy": 0.2 * c + 0.1 * r + 0.02 * seed}})
                     for r in range(1, ROUNDS + 1)]
            (path / "rounds.jsonl").write_text("\n".join(lines) + "\n")
            (path / "summary.json").write_text(json.dumps({"status": "finished"}))
            runs.append({"name": path.name, "config": config, "seed": seed, "path": str(path)})
    (folder / "sweep.json").write_text(json.dumps({"name": "fake", "metric": "eval_accuracy", "runs": runs}))
    return folder


def test_the_sweep_page_draws_one_band_per_config(chromium: str, tmp_path: Path) -> None:
    folder = fake_sweep(tmp_path / "sweep", ["fedavg", "fedprox", "scaffold"], seeds=3)
    page = sweep_report.write_sweep_report(folder)
    dom = browser.dump_dom(chromium, page)
    for metric in ("loss", "eval_accuracy"):
        bands = [c for c in ("fedavg", "fedprox", "scaffold")
                 if f'data-config="{c}" data-metric="{metric}"' in dom]
        assert bands == ["fedavg", "fedprox", "scaffold"], metric
    assert dom.count('class="band"') == 6
    png = tmp_path / "sweep.png"
    result = browser.screenshot(chromium, page, png)
    assert result.returncode == 0, result.stderr[-2000:]
    colours = browser.read_png(png).colours()
    for colour in sweep_report.PALETTE[:3]:
        rgb = int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)
        assert colours.get(rgb, 0) > 50, f"{colour}'s mean line is not on the screen"
    order = [row["config"] for row in sweep_report.table_json(sweep_report.load_sweep_dir(folder))["configs"]]
    assert order == ["scaffold", "fedprox", "fedavg"], "sorted by eval_accuracy, best first"
