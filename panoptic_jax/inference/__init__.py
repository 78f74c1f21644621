"""From input images to panoptic maps.

- `images`: the images of a prediction (`images.ImageSource.open(location)`: an image file, a folder of images, or a
  dataset's images/; local or S3); needs no flax.
- `postprocess`: the mask-wise merge (`postprocess.postprocess`, `panoptic_merge`, the per-dataset `PRESETS`).
- `predict`: the model's forward pass and the merge as one pure function (`predict.predict`), which the in-loop
  evaluation and the prediction command share.
"""
