"""Evaluation on label maps, as the official tools compute it: PQ / SQ / RQ (panopticapi), mIoU, mask AP.

`Evaluator` accumulates the three over images; `evaluate_sides` runs it over two locations (the
`python -m panoptic_jax.evaluate` command); docs/metrics.md states the semantics.
"""

from panoptic_jax.evaluation.evaluator import EvaluationError, Evaluator, evaluate_sides, format_table
from panoptic_jax.evaluation.panoptic_quality import PanopticQualityAccumulator, panoptic_stats

__all__ = ["EvaluationError", "Evaluator", "evaluate_sides", "format_table", "PanopticQualityAccumulator",
           "panoptic_stats"]
