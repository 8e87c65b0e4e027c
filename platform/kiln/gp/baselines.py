"""Deterministic low-shot baselines on the same cached features, and calibration metrics.

Every baseline returns class probabilities [N_test, C]. Hyper-parameters are the published
defaults, never tuned on test data (the GP tunes its own by marginal likelihood only):

- zero-shot CLIP: softmax(s · cos(image, class text)), s = the CLIP's learned logit scale.
- linear probe: multinomial logistic regression (scikit-learn, L2, C = 1) on the concatenated
  L2-normalised features of every model (the GP ensemble's inputs, minus the CLIP scores).
- Tip-Adapter (Zhang et al., arXiv 2207.09519, training-free): logits = s · cos(f, W) +
  α · exp(−β (1 − f Fᵀ)) L, with f, F the normalised CLIP image features of the test and the
  cached shots, L their one-hot labels, α = 1, β = 5.5 (its defaults); s replaces its 100.
- kNN: the k = shots nearest shots by cosine similarity on the concatenated features; the
  probabilities are the vote fractions.

Metrics: accuracy; expected calibration error over 15 equal-width bins of the top-class
confidence (Guo et al., arXiv 1706.04599); NLL = mean −log p(true class), with p clamped at
1e-12 so a confidently wrong hard vote costs 27.6 nats rather than infinity.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

ECE_BINS = 15


def concatenated(features: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each model's features L2-normalised, side by side: [N, Σ D_i]."""
    return torch.cat(
        [torch.nn.functional.normalize(f.double(), dim=-1) for f in features.values()], 1
    )


def zero_shot(scores: torch.Tensor, logit_scale: float) -> torch.Tensor:
    return torch.softmax(logit_scale * scores.double(), dim=-1)


def linear_probe(
    train: torch.Tensor, labels: torch.Tensor, test: torch.Tensor, num_classes: int
) -> torch.Tensor:
    probe = LogisticRegression(C=1.0, max_iter=2000).fit(train.numpy(), labels.numpy())
    probabilities = np.zeros((len(test), num_classes))
    probabilities[:, probe.classes_] = probe.predict_proba(test.numpy())
    return torch.as_tensor(probabilities)


def tip_adapter(
    train_clip: torch.Tensor,
    labels: torch.Tensor,
    test_clip: torch.Tensor,
    test_scores: torch.Tensor,
    logit_scale: float,
    alpha: float = 1.0,
    beta: float = 5.5,
) -> torch.Tensor:
    keys = torch.nn.functional.normalize(train_clip.double(), dim=-1)
    queries = torch.nn.functional.normalize(test_clip.double(), dim=-1)
    values = torch.nn.functional.one_hot(labels, test_scores.shape[1]).double()
    cache = torch.exp(-beta * (1 - queries @ keys.T)) @ values
    return torch.softmax(logit_scale * test_scores.double() + alpha * cache, dim=-1)


def knn(
    train: torch.Tensor, labels: torch.Tensor, test: torch.Tensor, num_classes: int, k: int
) -> torch.Tensor:
    nearest = (test @ train.T).topk(min(k, len(train)), dim=1).indices
    votes = torch.nn.functional.one_hot(labels[nearest], num_classes).double()
    return votes.mean(1)


def calibration_bins(probabilities: torch.Tensor, labels: torch.Tensor) -> dict[str, np.ndarray]:
    """Per confidence bin: count, mean confidence, accuracy (empty bins hold NaN)."""
    confidence, predicted = probabilities.max(1)
    correct = (predicted == labels).double()
    which = (confidence * ECE_BINS).long().clamp(max=ECE_BINS - 1)
    count = torch.bincount(which, minlength=ECE_BINS).double()
    mean_confidence = torch.bincount(which, confidence, minlength=ECE_BINS) / count
    accuracy = torch.bincount(which, correct, minlength=ECE_BINS) / count
    return {
        "count": count.numpy(),
        "confidence": mean_confidence.numpy(),
        "accuracy": accuracy.numpy(),
    }


def scores(probabilities: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """accuracy, ece, nll of probabilities [N, C] against labels [N]."""
    bins = calibration_bins(probabilities, labels)
    gaps = np.nan_to_num(np.abs(bins["accuracy"] - bins["confidence"]))
    own = probabilities[torch.arange(len(labels)), labels].clamp(min=1e-12)
    return {
        "accuracy": (probabilities.argmax(1) == labels).double().mean().item(),
        "ece": float((bins["count"] * gaps).sum() / len(labels)),
        "nll": -own.log().mean().item(),
    }
