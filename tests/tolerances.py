"""Tolerances for tests that compare two computations of the same numbers, from the arithmetic.

A sum of n terms computed in floating point, in any order, lies within gamma_n = n u / (1 - n u)
times the sum of the terms' absolute values of the exact sum (Higham, "Accuracy and Stability
of Numerical Algorithms", 3.1), u the dtype's unit roundoff: two orders (a C kernel's and
oneDNN's, whose order changes with the CPU's instruction set) differ by up to twice that. A
value computed through stages of sums (a layer's products, attention's scores, softmax sum and
weighted sum) gathers, to first order, each stage's relative error: :func:`chain_bound` adds
them, relative to the scale of the terms (the caller's ``magnitude``). Worst cases, not
observations: rounding errors of random data grow like sqrt(n), well inside them.
"""
from __future__ import annotations

from typing import Sequence

import torch

UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def unit_roundoff(dtype: torch.dtype = torch.float32) -> float:
    """Half the distance from 1 to the next number of ``dtype``: the most rounding changes a
    value, relative to it."""
    return UNIT_ROUNDOFF[dtype]


def sum_bound(length: int, magnitude, dtype: torch.dtype = torch.float32):
    """How far two orders of adding ``length`` terms, whose absolute values add up to
    ``magnitude`` (a number or a tensor of them), can be apart: 2 gamma_length magnitude."""
    rounding = length * unit_roundoff(dtype)
    return 2 * rounding / (1 - rounding) * magnitude


def chain_bound(lengths: Sequence[int], magnitude, dtype: torch.dtype = torch.float32):
    """How far two computations of a value through sums of ``lengths`` terms, one stage after
    another, can be apart, to first order: the stages' relative errors add up, each relative
    to the scale of the terms (``magnitude``)."""
    return sum(sum_bound(length, magnitude, dtype) for length in lengths)


def float16_rounding_bound(magnitude):
    """How far two float32 values a little apart can be once each is rounded to float16: one
    float16 step where they fall either side of a rounding boundary, 2 u16 |value|."""
    return 2 * unit_roundoff(torch.float16) * magnitude


def attention_bound(query: torch.Tensor, key: torch.Tensor, scale: float, tokens: int) -> float:
    """How far two computations of causal attention over at most ``tokens`` positions can be
    apart, relative to the values' scale: each score adds head_dim products (its absolute
    error, :func:`sum_bound` of ``scale |q||k|``, changes a softmax weight by up to twice it,
    relative, to first order), exp within 2 ulp (4 u) on each side (avx2_math.h; the
    reference's is closer), the division by the sum, then the softmax's sum and the weighted
    sum over the positions."""
    largest = [t.detach().abs().flatten(0, -2).amax(0) for t in (query, key)]  # per dimension
    magnitude = scale * float((largest[0] * largest[1]).sum())  # bounds every score's terms
    return (2 * sum_bound(query.shape[-1], magnitude) + (2 * 4 + 2) * unit_roundoff()
            + chain_bound([tokens, tokens], 1.0))


def decoder_lengths(config, tokens: int) -> list[int]:
    """The lengths of the sums a Llama decoder's logit goes through, attending over at most
    ``tokens`` positions: per layer RMSNorm's mean of squares, the query/key/value products,
    the scores, softmax's sum and the weighted sum over positions, the output projection,
    RMSNorm, the gate/up products and the down product; then the final RMSNorm and the head."""
    hidden, head_dim = config.hidden_size, config.hidden_size // config.num_attention_heads
    layer = [hidden, hidden, head_dim, tokens, tokens, hidden, hidden, hidden,
             config.intermediate_size]
    return layer * config.num_hidden_layers + [hidden, hidden]


def logit_magnitude(model) -> float:
    """A bound on the sum of the absolute values of a logit's terms: a row of the head times the
    final RMSNorm's output, whose root mean square is 1 before its weight, so (Cauchy-Schwarz)
    at most the largest row norm times sqrt(hidden size) times the largest norm weight (an
    ``Int8Linear`` head: its dequantized weight)."""
    head = getattr(model.lm_head, "dequantized_weight", lambda: model.lm_head.weight)()
    head = head.detach().float()
    norm = model.model.norm.weight.detach().float()
    return float(head.norm(dim=1).max() * head.shape[1] ** 0.5 * norm.abs().max())


def cross_entropy_bound(logit_bound: float, vocabulary: int) -> float:
    """How far two computations of a token's cross-entropy, log sum exp z - z_target, can be
    apart when their logits are within ``logit_bound``: the exact value moves by at most
    2 ``logit_bound`` (its gradient, softmax - one-hot, has absolute values adding up to at most
    2), and each log-sum-exp adds ``vocabulary`` positive terms: a relative error of that sum,
    :func:`sum_bound`, is an absolute one of its log."""
    return 2 * logit_bound + sum_bound(vocabulary, 1.0)


def loss_sum_bound(model, tokens: int, targets: int, loss_sum: float) -> float:
    """How far two computations of the cross-entropy summed over ``targets`` tokens, by forwards
    of ``model`` attending over at most ``tokens`` positions in other orders, can be apart: the
    logits within the decoder's chain, each token within :func:`cross_entropy_bound`, then the
    sum over the targets (of absolute values ``loss_sum``, a cross-entropy being positive)."""
    logits = chain_bound(decoder_lengths(model.config, tokens), logit_magnitude(model))
    return (targets * cross_entropy_bound(logits, model.config.vocab_size)
            + sum_bound(targets, loss_sum))


def gradient_bound(config, tokens: int, positions: int, scale) -> float:
    """How far two computations of a weight's gradient, by forwards and backwards attending over
    at most ``tokens`` positions in other orders, can be apart, relative to the gradient's
    ``scale``: the forward's chain, the backward's (the same sums, transposed), then the sum of
    the weight's products over the ``positions`` it is applied at."""
    lengths = decoder_lengths(config, tokens)
    return chain_bound(2 * lengths + [positions], scale)


def gradient_norm_bound(config, tokens: int, positions: int, norm: float) -> float:
    """How far two computations of a gradient's ``norm`` can be apart: at most the norm of their
    difference, each entry within :func:`gradient_bound` relative to its terms' scale, so
    within that relative to the norm."""
    return gradient_bound(config, tokens, positions, norm)


def adam_drift_bound(learning_rate: float, steps: int, betas=(0.9, 0.999)) -> float:
    """How far two AdamW runs' weights (no weight decay) can be apart after ``steps`` steps at
    learning rates of at most ``learning_rate``, whatever their gradients: a step moves a weight
    by lr |m/sqrt(v)| (bias-corrected), at most lr sqrt(sum a_i^2 / b_i) by Cauchy-Schwarz, a_i
    and b_i the averages' weights of the step's gradients (1.00 to 1.03 for 8 steps), the two
    runs possibly opposite ways. They do differ by that much where rounding flips the sign of a
    gradient entry close to zero."""
    drift = 0.0
    for step in range(1, steps + 1):
        weights = [((1 - b) * b ** (step - i) / (1 - b ** step)) for b in betas
                   for i in range(1, step + 1)]
        first, second = weights[:step], weights[step:]
        drift += 2 * learning_rate * sum(a * a / b for a, b in zip(first, second)) ** 0.5
    return drift


def drifted_loss_bound(drift: float, parameters: int, grad_norm: float) -> float:
    """How far a loss can move, to first order, when each of ``parameters`` weights moves by at
    most ``drift``: the gradient's 1-norm, at most sqrt(parameters) times its 2-norm, times it."""
    return drift * parameters ** 0.5 * grad_norm


def training_record_bounds(model, tokens: int, positions: int, parameters: int,
                           learning_rate: float, record: dict) -> dict[str, float]:
    """How far two training runs' metrics of step ``record["step"]`` (the reference's record)
    can be apart, their sums in other orders (processes, micro-batches, compiled graphs), from
    the same weights at step 1 (LoRA starts where ``model`` is): the mean loss within the
    forward's bound over the longest example (``tokens``), plus, from step 2, the first-order
    effect of Adam's drift (:func:`adam_drift_bound`) of the ``parameters`` trained weights;
    the fraction of correct targets by one argmax flipped between two logits within rounding;
    the gradient norm at step 1 within :func:`gradient_norm_bound` (``positions`` products a
    weight's gradient adds), later unbounded (curvature) and not compared."""
    targets, mean = record["train_num_predictions"], record["train_total_loss"]
    drift = adam_drift_bound(learning_rate, record["step"] - 1)
    bounds = {"train_total_loss": loss_sum_bound(model, tokens, targets, mean * targets) / targets
              + drifted_loss_bound(drift, parameters, record["grad_norm"]),
              "train_fraction_of_correct_next_step_preds": 1 / targets,
              "train_num_predictions": 0}
    if record["step"] == 1:
        bounds["grad_norm"] = gradient_norm_bound(model.config, tokens, positions,
                                                  record["grad_norm"])
    return bounds


def probabilistic_sum_bound(magnitude, roundings: int, dtype: torch.dtype = torch.bfloat16,
                            sigmas: float = 6.0):
    """How far two computations of a sum can be apart where ``roundings`` roundings to ``dtype``
    (of intermediates both sides) change each term by up to u relative, in a way independent
    from term to term (random data; Higham and Mary, "A new approach to probabilistic rounding
    error analysis", 2019): by Hoeffding's inequality the errors of terms t_i add up to less
    than ``sigmas`` k u sqrt(sum t_i^2) but with probability 2 exp(-sigmas^2 / 2) (3e-8 for 6).
    Terms of random signs have a root-sum-square about the size of their sum, so ``magnitude``
    is the sum's scale. Worst cases (:func:`sum_bound`) grow like the number of terms instead
    and are useless at bfloat16's u of 2^-8."""
    return sigmas * roundings * unit_roundoff(dtype) * magnitude


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound, what: str = "") -> None:
    """``actual`` equals ``expected`` within ``bound`` (a number or a tensor, elementwise)."""
    difference = (actual.detach().float() - expected.detach().float()).abs()
    excess = difference - torch.as_tensor(bound, dtype=torch.float32)
    worst = int(excess.argmax())
    assert float(excess.flatten()[worst]) <= 0, (
        f"{what}: |difference| {float(difference.flatten()[worst]):.3g} over its bound "
        f"{float(torch.as_tensor(bound).expand_as(difference).flatten()[worst]):.3g} at flat "
        f"index {worst}; largest difference {float(difference.max()):.3g}")
