"""The OOF loader's earlier import path (`from pipeline.extraction import load_oof_features`), kept for users' scripts.

The feature table and its loader live in `pipeline/feature_table.py`.
"""

from pipeline.feature_table import OOFFeatures, load_oof_features

__all__ = ["OOFFeatures", "load_oof_features"]
