"""The command-line programs: ``main`` (``convnextv2`` with ``analyze`` and ``fcmae-show``), ``export``
(``convnextv2-export``) and ``train`` (``convnextv2-train``). Each imports what a subcommand runs only
when it runs, so ``--help`` answers at once."""
