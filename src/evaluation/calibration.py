"""Expected calibration error (ECE; Naeini et al. 2015, Guo et al. 2017).

Predictions are grouped by confidence (the top softmax probability) into `n_bins` equal-width bins
over [0, 1] (bin b holds confidences in ((b-1)/n, b/n], the first also 0); ECE is the
sample-weighted mean over bins of |accuracy - mean confidence|. 0 means the confidences are
honest: of the predictions made with 80% confidence, 80% are right.
"""

from __future__ import annotations

import torch

from src.utils.errors import AutoclsError


def expected_calibration_error(confidences: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> float:
    """ECE of predictions with top-1 `confidences` (N,) in [0, 1] and `correct` (N,) booleans."""
    if n_bins < 1:
        raise AutoclsError(f"ece_bins={n_bins} must be at least 1; 15 is the usual choice.")
    confidences, correct = confidences.double().flatten(), correct.double().flatten()
    if len(confidences) == 0:
        return 0.0
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # right-closed bins: bucketize with right=False puts c in bin b when edges[b-1] < c <= edges[b]
    bins = torch.bucketize(confidences, edges[1:-1], right=False)
    ece = torch.zeros((), dtype=torch.float64)
    for b in range(n_bins):
        members = bins == b
        count = int(members.sum())
        if count:
            gap = (correct[members].mean() - confidences[members].mean()).abs()
            ece += gap * count / len(confidences)
    return float(ece)
