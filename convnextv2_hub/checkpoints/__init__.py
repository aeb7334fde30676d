"""Checkpoints: the ``registry`` over ``weights_manifest.json``, ``download`` (Hub cache, authors' URL),
``reading`` (safe state-dict and metadata reading), ``formats`` (key layouts of ours, the authors',
timm and HF) and ``io`` (``load_checkpoint`` / ``save_checkpoint``)."""
