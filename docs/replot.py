"""Redraw the figures of docs/ from the recorded results, with the current plotting code.

The experiment runs behind docs/results.md and docs/transformers.md took minutes to hours; their
JSON reports are kept beside the pages, so their figures can be redrawn without rerunning
anything (the numbers stay the recorded ones)::

    python docs/replot.py

Writes every figure the pages show: per recorded harness run the headline accuracy plot (and
``..._more.png`` with the other criteria when there are more than fit one panel), the main run's
cost plot, and the GPT runs' perplexity plots. The main run's significance histograms are not
redrawn: its JSON copy dropped the per-unit values.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from bingo import gpt
from bingo.experiment import report as reporting

DOCS = Path(__file__).resolve().parent
RESULTS = DOCS / "results"

HARNESS_RUNS: dict[str, str] = {
    "mnist-lenet300-2026-11-26": "",
    "issue7-lenet300-neuron-2026-11-26": "issue7-lenet300-neuron-",
    "issue7-lenet300-neuron-6seeds-2026-11-26": "issue7-lenet300-neuron-6seeds-",
    "issue7-lenet300-weight-2026-11-26": "issue7-lenet300-weight-",
    "issue7-lenet5-neuron-2026-11-26": "issue7-lenet5-neuron-",
    "issue7-ls-lenet300-neuron-6seeds-2026-12-02": "issue7-ls-lenet300-neuron-6seeds-",
    "issue7-ls-lenet300-weight-2026-12-02": "issue7-ls-lenet300-weight-",
    "issue7-ls-lenet5-neuron-2026-12-02": "issue7-ls-lenet5-neuron-",
    "issue7-ls-lenet5-neuron-20ep-2026-12-03": "issue7-ls-lenet5-neuron-20ep-",
}
"""Recorded report (docs/results/<name>.json) -> prefix of its figures' file names."""
MAIN_RUN = "mnist-lenet300-2026-11-26"
"""The run whose cost plot docs/results.md shows (``wall_time.png``)."""
GPT_RUNS = ("seed0", "seed1", "seed2")
"""docs/transformers/<run>/report.json."""


def harness_figures(name: str, prefix: str) -> list[Path]:
    """Redraw one recorded harness run's figures into docs/results/."""
    report = json.loads((RESULTS / f"{name}.json").read_text())
    written = []
    with tempfile.TemporaryDirectory() as scratch:
        files = reporting._plots(report, Path(scratch))  # noqa: SLF001 (the report's own figures)
        wanted = {"curves": reporting.CURVES_PNG, "more_curves": reporting.MORE_CURVES_PNG}
        if name == MAIN_RUN:
            wanted["wall_time"] = reporting.TIME_PNG
        for key, file_name in wanted.items():
            if key in files:
                target = RESULTS / f"{prefix}{file_name}"
                shutil.copyfile(files[key], target)
                written.append(target)
    return written


def main() -> None:
    for name, prefix in HARNESS_RUNS.items():
        for path in harness_figures(name, prefix):
            print(f"wrote {path.relative_to(DOCS)}")
    for run in GPT_RUNS:
        folder = DOCS / "transformers" / run
        report = json.loads((folder / "report.json").read_text())
        path = gpt.plot(report, str(folder / "perplexity_vs_sparsity.png"))
        print(f"wrote {Path(path).relative_to(DOCS)}")


if __name__ == "__main__":
    main()
