"""Fixtures shared by several test files."""
from pathlib import Path
from typing import List, Sequence

import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's small-tensor tests on one intra-op thread, restored afterwards.

    On the 2 shared cores of the test machine a second OpenMP thread only spins at barriers against
    other jobs: small ops ran 10-20x slower with 2 threads than with 1 under load.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def write_skimage_photos(folder: Path, names: Sequence[str]) -> List[str]:
    """scikit-image's sample photos saved as PNG files in ``folder`` (real images, not noise)."""
    from skimage import data as skimage_data

    paths = []
    for name in names:
        p = folder / f"{name}.png"
        Image.fromarray(getattr(skimage_data, name)()).save(p)
        paths.append(str(p))
    return paths
