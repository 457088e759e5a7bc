"""SLC-AUC (see slc_auc.py); this folder is also an `evaluate` module: `evaluate.load(SLC_AUC_MODULE)`."""

from pathlib import Path

from .slc_auc import area_under_log_curve, slc_auc

# Pass to `evaluate.load` to get SLC-AUC through the `evaluate` interface.
SLC_AUC_MODULE = str(Path(__file__).parent)

__all__ = ["SLC_AUC_MODULE", "area_under_log_curve", "slc_auc"]
