"""Evaluation on label maps, as the official tools compute it: PQ / SQ / RQ (panopticapi), mIoU, mask AP.

`Evaluator` accumulates the three over images; `evaluate_sides` runs it over two locations (the
`python -m panoptic_jax.evaluate` command); docs/metrics.md states the semantics. The jitted metric on label maps is
`panoptic_quality.panoptic_stats`; importing this package does not import JAX (COCO files are evaluated without it).
"""

from panoptic_jax.evaluation.evaluator import EvaluationError, Evaluator, evaluate_sides, format_table
from panoptic_jax.evaluation.segment_stats import PanopticQualityAccumulator

__all__ = ["EvaluationError", "Evaluator", "evaluate_sides", "format_table", "PanopticQualityAccumulator"]
