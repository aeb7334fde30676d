"""The network: ``ConvNeXtV2`` (classification, features, FCMAE masks, export) built from ``layers``,
the eight ``variants``, the ``sparse`` rows of the FCMAE fast path, the ``fcmae`` pre-training wrapper
and ``factory.create`` (a name to a ready model)."""
