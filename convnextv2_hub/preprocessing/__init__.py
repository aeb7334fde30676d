"""Images in, tensors out: ``transforms`` (each checkpoint's eval and train preprocessing) and
``image_folder`` (listing, reading and batching folders of images)."""
