"""The reproduction trainer: FCMAE pre-training, fine-tuning and evaluation with the paper's recipes.

Entry points: the ``convnextv2-train`` console script and ``python -m convnextv2_hub.train`` (the
form torchrun launches). Submodules: ``config`` (keys, recipes, ``--set``), ``optim`` (param
groups, layer decay, lr schedule), ``data`` (datasets, transforms, mixup), ``engine`` (the loop,
checkpoints, resume), ``evaluation`` (top-1/top-5, the ``eval`` command), ``models`` (the model a
run trains), ``distributed``, ``rng``, ``ema``, ``runlog``, ``atomic_files``, ``cli``. Nothing heavy
is imported here, so ``--help`` is fast.
"""
