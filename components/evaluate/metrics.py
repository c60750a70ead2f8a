"""Generation metrics: exact match, BLEU, ROUGE-L and, for small label sets, classification.

Definitions (all on the model's answer text and the expected ``output_text``):

- ``exact_match``: share of examples whose answer equals the expected output after stripping
  leading and trailing whitespace (case and inner whitespace count);
- ``bleu``: sacrebleu corpus BLEU (default 13a tokenizer, exponential smoothing off), 0 to 100;
- ``rouge_l``: mean ROUGE-L F-measure (rouge-score, its default tokenizer: lower-cased ASCII
  letters and digits, no stemming), 0 to 1; a pair where either side has no such token scores 0,
  except two empty answers, which score 1;
- classification, when the expected outputs form a label set (``label_set``): ``accuracy``
  (= exact match over the labels), ``macro_f1`` (mean over the labels of per-label F1, a label
  never predicted has F1 0) and a confusion matrix whose rows are expected labels and columns
  predicted ones; an answer that is no label (after stripping) goes to the column ``(other)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

OTHER_CATEGORY = "(other)"
MAX_LABELS = 20  # at most this many distinct expected outputs ...
MAX_LABEL_CHARS = 40  # ... each at most this long ...
MAX_LABEL_WORDS = 4  # ... and this many words ...
# ... and labels repeat: at most half as many labels as examples (10 examples -> 5 labels), so a
# short-answer QA set whose answers are all different is not taken for a classification task.


def normalize(text: str) -> str:
    """What exact match and label matching compare: the text without surrounding whitespace."""
    return text.strip()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the two texts are equal after stripping surrounding whitespace, else 0.0."""
    return float(normalize(prediction) == normalize(reference))


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu corpus BLEU (0-100) of the predictions against one reference each."""
    import sacrebleu

    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    return float(sacrebleu.corpus_bleu([normalize(p) for p in predictions],
                                       [[normalize(r) for r in references]]).score)


def sentence_bleu(prediction: str, reference: str) -> float:
    """sacrebleu sentence BLEU (0-100, exponential smoothing), for per-example scores."""
    import sacrebleu

    return float(sacrebleu.sentence_bleu(normalize(prediction), [normalize(reference)]).score)


_ROUGE_SCORER = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of one answer (0-1); see the module doc for empty texts."""
    global _ROUGE_SCORER
    if _ROUGE_SCORER is None:
        from rouge_score import rouge_scorer

        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    if not normalize(prediction) and not normalize(reference):
        return 1.0
    return float(_ROUGE_SCORER.score(reference, prediction)["rougeL"].fmeasure)


def example_scores(prediction: str, reference: str) -> dict[str, float]:
    """Per-example scores: exact match, sentence BLEU, ROUGE-L."""
    return {"exact_match": exact_match(prediction, reference),
            "bleu": sentence_bleu(prediction, reference),
            "rouge_l": rouge_l(prediction, reference)}


def label_set(references: Sequence[str]) -> list[str] | None:
    """The sorted labels when the expected outputs look like a classification task, else None.

    A classification task: at most ``MAX_LABELS`` distinct outputs (after stripping), at most
    half as many as there are examples, and each of them non-empty, at most ``MAX_LABEL_CHARS``
    characters and ``MAX_LABEL_WORDS`` words.
    """
    labels = sorted({normalize(r) for r in references})
    if len(labels) < 2 or len(labels) > MAX_LABELS or 2 * len(labels) > len(references):
        return None
    if any(not label or len(label) > MAX_LABEL_CHARS or len(label.split()) > MAX_LABEL_WORDS
           for label in labels):
        return None
    return labels


@dataclass
class ClassificationResult:
    """Accuracy, macro-F1 and the confusion matrix (rows: expected, columns: predicted)."""

    categories: list[str]  # the labels, then OTHER_CATEGORY
    matrix: list[list[int]]
    accuracy: float
    macro_f1: float
    per_label: dict[str, dict[str, float]]  # label -> precision, recall, f1, support

    def to_dict(self) -> dict:
        return {"categories": self.categories, "confusion_matrix": self.matrix,
                "accuracy": self.accuracy, "macro_f1": self.macro_f1, "per_label": self.per_label}


def classification_metrics(predictions: Sequence[str], references: Sequence[str],
                           labels: Sequence[str]) -> ClassificationResult:
    """Classification scores of ``predictions`` against ``references`` over ``labels``."""
    _check_lengths(predictions, references)
    categories = list(labels) + [OTHER_CATEGORY]
    column = {label: i for i, label in enumerate(labels)}
    other = len(labels)
    matrix = [[0] * len(categories) for _ in categories]
    for prediction, reference in zip(predictions, references):
        row = column.get(normalize(reference), other)
        matrix[row][column.get(normalize(prediction), other)] += 1
    total = sum(map(sum, matrix))
    correct = sum(matrix[i][i] for i in range(len(labels)))
    per_label = {}
    for i, label in enumerate(labels):
        true_positive = matrix[i][i]
        predicted = sum(matrix[r][i] for r in range(len(categories)))
        support = sum(matrix[i])
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    macro_f1 = sum(v["f1"] for v in per_label.values()) / len(labels) if labels else 0.0
    return ClassificationResult(categories, matrix, correct / total if total else 0.0, macro_f1,
                                per_label)


def generation_metrics(predictions: Sequence[str], references: Sequence[str],
                       labels: Sequence[str] | None = None) -> tuple[dict[str, float], list[dict[str, float]],
                                                                     ClassificationResult | None]:
    """``(aggregate metrics, per-example scores, classification result or None)``.

    Aggregates: ``exact_match``, ``bleu`` (corpus), ``rouge_l`` and, with ``labels``,
    ``accuracy`` and ``macro_f1``.
    """
    _check_lengths(predictions, references)
    per_example = [example_scores(p, r) for p, r in zip(predictions, references)]
    count = max(len(per_example), 1)
    metrics = {
        "exact_match": sum(s["exact_match"] for s in per_example) / count,
        "bleu": corpus_bleu(predictions, references),
        "rouge_l": sum(s["rouge_l"] for s in per_example) / count,
    }
    classification = None
    if labels:
        classification = classification_metrics(predictions, references, labels)
        metrics["accuracy"] = classification.accuracy
        metrics["macro_f1"] = classification.macro_f1
    return metrics, per_example, classification


def _check_lengths(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
