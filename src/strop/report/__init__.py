"""Run reports: what a run did and how well, from the files in its run directory.

`write_report(run_dir)` writes report.html (one self-contained file), report.md and report.json;
`write_comparison(run_dirs, out)` puts several runs side by side; `diagnose(records, result)` reads
a training curve into plain sentences (overfitting, underfitting, instability).
Layer: imports only `strop.core` (plus numpy, matplotlib, jinja2, pyyaml).
"""

from strop.report.compare import write_comparison
from strop.report.diagnose import diagnose
from strop.report.render import write_report

__all__ = ["diagnose", "write_comparison", "write_report"]
