"""The padded reference scorer: every row padded, full logits, plain cross-entropy.

The straightforward definition of Vertex's token metrics, kept in the tests to check the packed
scorer (components.common.packing) against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from components.common.token_metrics import IGNORE_INDEX, TokenScores


@dataclass
class Batch:
    """Right-padded token ids, attention mask and labels (``IGNORE_INDEX`` where not a target)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def collate(examples: Sequence[tuple[np.ndarray, np.ndarray]], pad_token_id: int) -> Batch:
    """Pads ``(token_ids, loss_mask)`` examples on the right into one batch."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, mask) in enumerate(examples):
        ids_tensor = torch.from_numpy(ids.astype(np.int64))
        input_ids[row, : len(ids)] = ids_tensor
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.where(torch.from_numpy(mask.astype(bool)), ids_tensor,
                                              torch.tensor(IGNORE_INDEX))
    return Batch(input_ids, attention_mask, labels)


def score_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, TokenScores]:
    """Summed loss (a tensor, for backward) and the scores of ``logits`` against ``labels``."""
    shifted_logits = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    loss_sum = F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.size(-1)),
                               targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    is_target = targets != IGNORE_INDEX
    correct = (shifted_logits.argmax(-1) == targets) & is_target
    scores = TokenScores(float(loss_sum.detach()), int(correct.sum()), int(is_target.sum()))
    return loss_sum, scores


@torch.no_grad()
def score_dataset(model, examples: Sequence[tuple[np.ndarray, np.ndarray]], pad_token_id: int,
                  batch_size: int = 8, device: torch.device | str = "cpu") -> TokenScores:
    """Token scores of ``model`` over a whole set of examples (no gradient)."""
    total = TokenScores()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))  # less padding
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start:start + batch_size]], pad_token_id)
        batch = batch.to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        total = total.add(score_logits(logits, batch.labels)[1])
    return total
