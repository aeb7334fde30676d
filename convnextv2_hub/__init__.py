"""ConvNeXt V2 in Python: every variant and checkpoint, export, FCMAE and a reproduction trainer."""
