"""Low-shot image classification with a GP ensemble of pre-trained models (arXiv 2404.00312).

`ensemble.py` holds the GP math, `features.py` the frozen models and the image-level
classifier, `baselines.py` the deterministic baselines and the calibration metrics.
"""

from kiln.gp.ensemble import GPEnsemble, Prediction, fit_gp, pack_inputs
from kiln.gp.features import FeatureExtractor, FewShotClassifier

__all__ = [
    "FeatureExtractor",
    "FewShotClassifier",
    "GPEnsemble",
    "Prediction",
    "fit_gp",
    "pack_inputs",
]
