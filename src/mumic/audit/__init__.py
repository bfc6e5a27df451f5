"""`mumic audit`: which tags of a training manifest look wrong, from out-of-fold probabilities.

:func:`cross_fit` trains K folds with a run's own configuration (mumic.audit.folds);
:func:`score_cells` and :func:`suspects` rank missing, wrong and swapped tags
(mumic.audit.scores, whose docstring states each score's formula); :func:`corrected_manifest`
writes a fixed copy of the manifest (mumic.audit.fixes); :func:`run_audit` does all of it
and writes AUDIT/suspects.csv and AUDIT/report.md.
"""

from __future__ import annotations

from mumic.audit.fixes import corrected_manifest, read_fixes, top_rows, top_suggestions
from mumic.audit.folds import OOF, audit_config, audited_rows, cross_fit, fold_of
from mumic.audit.job import run_audit
from mumic.audit.scores import KINDS, METHODS, Scores, score_cells, suspects

__all__ = ["KINDS", "METHODS", "OOF", "Scores", "audit_config", "audited_rows", "corrected_manifest", "cross_fit", "fold_of",
           "read_fixes", "run_audit", "score_cells", "suspects", "top_rows", "top_suggestions"]
