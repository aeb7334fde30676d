"""The reproduction trainer: FCMAE pre-training, fine-tuning and evaluation with the paper's recipes.

Entry points: the ``convnextv2-train`` console script and ``python -m convnextv2_hub.train`` (the
form torchrun launches); both run ``convnextv2_hub.cli.train``. Submodules: ``config`` (keys,
recipes, ``--set``), ``run`` (``Run``, one invocation), ``engine`` (the training loop, checkpoints,
resume), ``evaluation`` (top-1/top-5, the ``eval`` command), ``optim`` (param groups, layer decay,
lr schedule), ``data`` (datasets, transforms, mixup), ``models`` (the model a run trains),
``distributed``, ``rng``, ``ema``, ``runlog``; the paper's ablation tables: ``ablations`` (the tables in
``tables/`` and their commands), ``reproduce`` (running a table), ``report`` (results.md / results.json)
and ``digits`` (the built-in data set); the atomic file writes are ``convnextv2_hub.files``.
Nothing heavy is imported here, so ``--help`` is fast.
"""
