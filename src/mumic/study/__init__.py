"""`mumic ablate`: a grid of training configurations, several seeds each, as one report.

- :mod:`mumic.study.schema`: the ablation file (``base:``, ``seeds:``, ``cells:``).
- :mod:`mumic.study.noise`: label noise on the training rows of ``noisy`` cells.
- :mod:`mumic.study.grid`: each cell and seed as a run directory, reused once finished.
- :mod:`mumic.study.report`: results.csv, results.md and plots, chosen on validation only.
"""

from mumic.study.grid import cell_config, cell_state, is_frozen, run_ablation, run_cell, select_cells
from mumic.study.noise import add_label_noise
from mumic.study.report import CSV_COLUMNS, METRICS, collect, read_results_csv, render_results, write_results
from mumic.study.schema import Ablation, Cell, describe, load_ablation, run_dir

__all__ = [
    "CSV_COLUMNS", "METRICS", "Ablation", "Cell", "add_label_noise", "cell_config", "cell_state", "collect", "describe",
    "is_frozen", "load_ablation", "read_results_csv", "render_results", "run_ablation", "run_cell", "run_dir",
    "select_cells", "write_results",
]
