"""Jobs over folders of any size: ``predict_files`` (top-k per image into a .jsonl/.csv file, resumable) and
``embed_files`` (features per image into .npy/.npz/.parquet), both on one data path.

That path: ``preprocessing.image_folder.image_files_loader`` decodes and preprocesses the images in
DataLoader worker processes, in order, while the main process runs the model on the batch before; an
unreadable file comes back as an error for that file and the job goes on; a tqdm bar on stderr shows
images/s; results are written batch by batch (``result_files``), so memory stays flat.
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Tuple

from ..files import PathLike
from ..preprocessing.image_folder import FileBatch, image_files_loader
from .result_files import EmbeddingFile, PredictionFile

if TYPE_CHECKING:
    from .predictor import Predictor


@dataclass
class JobSummary:
    """What a job did: images in the job, those skipped because the output had them already, those run
    now, the unreadable ones among them (``(path, error)``), and the seconds it took."""

    total: int
    skipped: int = 0
    processed: int = 0
    errors: List[Tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def describe(self, output: PathLike) -> str:
        """One line for the end of a job: counts, speed and where the results are."""
        done = f"{self.processed} images in {self.seconds:.1f} s ({self.images_per_s:.1f} img/s)"
        skipped = f", {self.skipped} already in {output} skipped" if self.skipped else ""
        errors = f", {len(self.errors)} unreadable" if self.errors else ""
        return f"{done}{skipped}{errors}; results in {output}"


def default_workers() -> int:
    """Decoding workers when none are asked for: the CPUs this process may use, one left to the process
    that runs the model, at most 8 (the trainer's rule for one process per node)."""
    from ..train.data import default_num_workers

    return default_num_workers(local_processes=1)


def _run(predictor: "Predictor", paths: Sequence[str], handle: Callable[[FileBatch], None], summary: JobSummary,
         workers: Optional[int], progress: Optional[bool], desc: str) -> JobSummary:
    """Feed ``paths`` through the predictor's transform in worker processes; ``handle`` each batch."""
    from tqdm import tqdm

    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0: decode in the main process), got {workers}")
    if not paths:
        return summary  # all done already: no worker processes to start
    loader = image_files_loader(paths, predictor.transform, predictor.batch_size, workers,
                                pin_memory=predictor.device.type == "cuda")
    start = time.perf_counter()
    # progress=None: a bar only where stderr is a terminal (logs and CI stay clean), as for downloads.
    with tqdm(total=summary.total, initial=summary.skipped, unit="img", desc=desc, file=sys.stderr,
              disable=None if progress is None else not progress, dynamic_ncols=True, smoothing=0.1) as bar:
        for batch in loader:
            handle(batch)
            n = len(batch.indices) + len(batch.errors)
            summary.processed += n
            summary.errors.extend((paths[i], e) for i, e in batch.errors)
            bar.update(n)
    summary.seconds = time.perf_counter() - start
    return summary


def _remaining(paths: Sequence[str], done: Counter) -> List[str]:
    """``paths`` less those already done (as many times as each was done: a path listed twice runs twice)."""
    left = Counter(done)
    out = []
    for p in paths:
        if left[p] > 0:
            left[p] -= 1
        else:
            out.append(p)
    return out


def predict_files(predictor: "Predictor", paths: Sequence[str], output: PathLike, topk: int = 5,
                  workers: Optional[int] = None, overwrite: bool = False,
                  progress: Optional[bool] = None) -> JobSummary:
    """Classify ``paths`` into ``output`` (.jsonl or .csv), one line per image, in the order given.

    A line holds the path as given, the top-k labels and probabilities, or the error that kept the image
    from being read. An ``output`` that exists is resumed: its images are skipped and the others appended
    (a torn last line from a crash is cut off first and that image run again); ``overwrite=True`` starts
    it afresh. The lines are handed to the OS batch by batch and fsynced every few seconds
    (``files.LineAppender``). ``workers``: decoding processes (None: ``default_workers()``; 0: none).
    """
    from .predictor import check_topk

    check_topk(topk)
    predictor.require_head()
    k = min(topk, predictor.num_classes)
    with PredictionFile(output, topk=k, overwrite=overwrite) as out:
        todo = _remaining(paths, out.done)
        summary = JobSummary(total=len(paths), skipped=len(paths) - len(todo))

        def handle(batch: FileBatch) -> None:
            rows = {i: (todo[i], [], e) for i, e in batch.errors}
            if batch.images is not None:
                for i, top in zip(batch.indices, predictor.predict_batch(batch.images, topk=k)):
                    rows[i] = (todo[i], top, None)
            out.write([rows[i] for i in sorted(rows)])

        return _run(predictor, todo, handle, summary, workers, progress, desc="predict")


def embed_files(predictor: "Predictor", paths: Sequence[str], output: PathLike, stage: Optional[int] = None,
                pool: bool = True, workers: Optional[int] = None, progress: Optional[bool] = None) -> JobSummary:
    """Embed ``paths`` into ``output`` (.npy + .paths.txt, .npz or .parquet; ``result_files.EmbeddingFile``),
    written atomically when the job ends: on an error or an interruption the previous file stays as it was.

    ``stage=None``: pooled pre-logits features (``Predictor.embed``); ``stage=s``: stage ``s``'s map,
    global-average-pooled unless ``pool=False``. Unreadable images are left out of the file (its paths
    say which rows are which) and listed in the summary's ``errors``.
    """
    with EmbeddingFile(output) as out:

        def handle(batch: FileBatch) -> None:
            if batch.images is not None:
                feats = predictor.embed_batch(batch.images, stage=stage, pool=pool)
                out.write([paths[i] for i in batch.indices], feats.cpu().numpy())

        return _run(predictor, paths, handle, JobSummary(total=len(paths)), workers, progress, desc="embed")


__all__ = ["JobSummary", "default_workers", "embed_files", "predict_files"]
