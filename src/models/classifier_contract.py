"""timm's classifier contract, shared by the project's own CNNs.

A subclass builds `forward_features` (the feature map before pooling) and the `global_pool`, `head_drop`
and `fc` modules, and sets `num_features` and `num_classes`; `fc` comes from `_make_classifier`. Then the
network answers like a timm model: `get_classifier`/`reset_classifier` (fine-tuning to another class
count), `forward_head(x, pre_logits=True)` (features for distillation and NAS), `forward`.
"""

from __future__ import annotations

import torch
from torch import nn


class TimmClassifier(nn.Module):
    def _make_classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a fresh one for `num_classes` (0: identity, as in timm)."""
        self.num_classes = num_classes
        self.fc = self._make_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, flatten and dropout; then classify unless `pre_logits` (returns (B, num_features))."""
        x = self.head_drop(self.global_pool(x).flatten(1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
