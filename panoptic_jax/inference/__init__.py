"""From model outputs to panoptic maps.

- `postprocess`: the mask-wise merge (`postprocess.postprocess`, `panoptic_merge`, the per-dataset `PRESETS`).
- `predict`: the model's forward pass and the merge as one pure function (`predict.predict`), which the in-loop
  evaluation and the prediction command share.
"""
