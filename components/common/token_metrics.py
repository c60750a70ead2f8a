"""Vertex's token-level metrics, one definition for the tuner and for evaluate.

For every target token (nonzero loss mask) the model predicts it from the tokens before it:

- ``total_loss``: mean cross-entropy over target tokens;
- ``fraction_of_correct_next_step_preds``: share of target tokens that are the argmax prediction;
- ``num_predictions``: number of target tokens.

Vertex writes them as ``/train_*`` and ``/eval_*`` TensorBoard scalars. They are computed by
:mod:`components.common.packing` (padding-free, logits only at target positions).
"""
from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100


@dataclass
class TokenScores:
    """Sums over target tokens, added up across batches; ``metrics()`` gives the means."""

    loss_sum: float = 0.0
    num_correct: int = 0
    num_predictions: int = 0

    def add(self, other: "TokenScores") -> "TokenScores":
        return TokenScores(self.loss_sum + other.loss_sum, self.num_correct + other.num_correct,
                           self.num_predictions + other.num_predictions)

    def metrics(self, prefix: str) -> dict[str, float]:
        """``{prefix}_total_loss``, ``{prefix}_fraction_of_correct_next_step_preds``, ``{prefix}_num_predictions``."""
        count = max(self.num_predictions, 1)
        return {
            f"{prefix}_total_loss": self.loss_sum / count,
            f"{prefix}_fraction_of_correct_next_step_preds": self.num_correct / count,
            f"{prefix}_num_predictions": float(self.num_predictions),
        }
