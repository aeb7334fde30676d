"""``python -m convnextv2_hub.train ...``: the form ``torchrun ... -m convnextv2_hub.train`` launches."""
import sys

from ..cli.train import main

if __name__ == "__main__":
    sys.exit(main())
