"""Images in, tensors out: ``images`` (reading image files), ``transforms`` (each checkpoint's eval and
train preprocessing, and the steps the trainer's augmentations are built from) and ``image_folder``
(listing and batching folders of images, a model's default transform)."""
