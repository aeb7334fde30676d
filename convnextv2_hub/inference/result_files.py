"""Result files of jobs over many images: predictions (JSON Lines or CSV, one line per image, appended as the
job goes and resumable) and embeddings (.npy + .paths.txt, .npz or .parquet, written atomically at the end).

Predictions file: a job over a large folder must keep what it has done when it is interrupted, so this
file is appended to (``files.LineAppender``: every batch flushed to the OS, fsynced every few seconds)
instead of being renamed into place at the end. A crash can at worst leave its last line torn; opening the
file again (``PredictionFile``) cuts that line off (``files.drop_torn_tail``), reads the images already
done, and the job appends the others. A line that cannot be read anywhere but at the end means the file is
not one of ours (or was edited): that is an error, not something to repair.

Embeddings file: rows are streamed into a temporary file next to the target and renamed over it when the
job ends (``files.atomic_path``), so the target is the old file or the complete new one.
"""
from __future__ import annotations

import csv
import io
import json
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..files import LineAppender, PathLike, atomic_path, atomic_write, drop_torn_tail

PREDICTION_FORMATS = (".jsonl", ".csv")
EMBEDDING_FORMATS = (".npy", ".npz", ".parquet")
TopK = Sequence[Tuple[str, float]]
# Probabilities in result files: six decimals, as the `convnextv2 predict --json` output.
PROB_DECIMALS = 6


def prediction_record(image: str, topk: TopK, error: Optional[str]) -> Dict[str, Any]:
    """One image's result as written to JSON: ``{"image", "topk": [{"label", "prob"}, ...], "error"}``."""
    return {"image": image, "topk": [{"label": label, "prob": round(p, PROB_DECIMALS)} for label, p in topk],
            "error": error}


def output_format(path: PathLike, allowed: Sequence[str], what: str) -> str:
    """``path``'s extension (lower case) if it is one of ``allowed``, else a ``ValueError`` naming them."""
    suffix = Path(path).suffix.lower()
    if suffix not in allowed:
        raise ValueError(f"{what} file {os.fspath(path)} must end in {' or '.join(allowed)} (the format is taken from "
                         "the extension)")
    return suffix


class PredictionFile:
    """Append one line per image to ``path`` (.jsonl or .csv), resuming what is already there.

    ``done`` counts the images the file already holds (by path, as written), so a job run again skips
    them. ``overwrite=True`` starts the file afresh. A CSV file starts with a header (``image``, then
    ``label_1``, ``prob_1`` ... ``label_K``, ``prob_K``, then ``error``); resuming it with another ``topk``
    is refused, as its rows would not fit the header.
    """

    def __init__(self, path: PathLike, topk: int, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.format = output_format(path, PREDICTION_FORMATS, "the predictions")
        self.topk = topk
        self.header = ""
        if self.format == ".csv":
            names = [f"{kind}_{i}" for i in range(1, topk + 1) for kind in ("label", "prob")]
            self.header = self._csv_line(["image", *names, "error"])
        if overwrite and self.path.exists():
            self.path.unlink()
        dropped = drop_torn_tail(self.path) if self.path.exists() else 0
        if dropped:
            warnings.warn(f"{self.path}: cut off an incomplete last line ({dropped} bytes) left by an interrupted "
                          "run; its image runs again", stacklevel=2)
        self.done: Counter = Counter(self._read_done()) if self.path.exists() else Counter()
        self._out = LineAppender(self.path, header=self.header)

    def write(self, results: Sequence[Tuple[str, TopK, Optional[str]]]) -> None:
        """Append ``(image, topk, error)`` results, one line each, handed to the OS at once."""
        if self.format == ".jsonl":
            text = "".join(json.dumps(prediction_record(*r), ensure_ascii=False) + "\n" for r in results)
        else:
            text = "".join(self._csv_row(*r) for r in results)
        self._out.write(text)

    def close(self) -> None:
        self._out.close()

    def __enter__(self) -> "PredictionFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- CSV ---------------------------------------------------------------------------------------
    @staticmethod
    def _csv_line(cells: Sequence[Any]) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(cells)
        return buf.getvalue()

    def _csv_row(self, image: str, topk: TopK, error: Optional[str]) -> str:
        cells: List[Any] = [image]
        for i in range(self.topk):
            cells += [topk[i][0], f"{topk[i][1]:.{PROB_DECIMALS}f}"] if i < len(topk) else ["", ""]
        return self._csv_line(cells + [error or ""])

    # --- resume ------------------------------------------------------------------------------------
    def _read_done(self) -> Iterator[str]:
        """The image of every complete record; a last record that cannot be read is cut off."""
        # surrogateescape, as the file was written: names that are not UTF-8 read back equal, and bytes a
        # crash left read as something (to be cut off) rather than fail.
        with open(self.path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            text = f.read()
        if self.format == ".jsonl":
            records, ends = self._jsonl_records(text)
        else:
            records, ends = self._csv_records(text)
        for n, image in enumerate(records):
            if image is None:
                if n < len(records) - 1:
                    raise ValueError(f"{self.path}: record {n + 1} is not a prediction of `convnextv2 predict` "
                                     f"with --topk {self.topk}; to start it afresh, pass --overwrite (or choose "
                                     "another --output)")
                # The last record half written by a crash (a power cut can leave it complete but damaged).
                start = ends[n - 1] if n else 0
                with open(self.path, "r+b") as raw:
                    raw.truncate(len(text[:start].encode("utf-8", errors="surrogateescape")))
                warnings.warn(f"{self.path}: cut off a damaged last record left by an interrupted run; its image "
                              "runs again", stacklevel=3)
                continue
            yield image

    @staticmethod
    def _jsonl_records(text: str) -> Tuple[List[Optional[str]], List[int]]:
        records: List[Optional[str]] = []
        ends: List[int] = []
        pos = 0
        for line in text.splitlines(keepends=True):
            pos += len(line)
            try:
                obj = json.loads(line)
                image = obj["image"] if isinstance(obj, dict) and isinstance(obj.get("image"), str) else None
            except ValueError:
                image = None
            records.append(image)
            ends.append(pos)
        return records, ends

    def _csv_records(self, text: str) -> Tuple[List[Optional[str]], List[int]]:
        if not text:
            return [], []  # a torn header was cut off: the file starts afresh
        if not text.startswith(self.header):
            raise ValueError(f"{self.path} does not start with the header of a `convnextv2 predict --topk "
                             f"{self.topk}` CSV file ({self.header.strip()}); resume it with the --topk it was "
                             "written with, or pass --overwrite to start it afresh")
        records: List[Optional[str]] = []
        ends: List[int] = []
        width = 2 + 2 * self.topk
        body = io.StringIO(text[len(self.header):], newline="")
        reader = csv.reader(body)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error:
                row = []
            records.append(row[0] if len(row) == width else None)
            ends.append(len(self.header) + body.tell())
        return records, ends


class _Aborted(Exception):
    """The embedding job stopped before its file was complete."""


class EmbeddingFile:
    """Collect embeddings row by row and write them, with their image paths, atomically on ``commit``.

    - ``.npy``: the features, (N, ...) float32, and the paths in ``NAME.paths.txt`` (one per line, as the
      file names' bytes), row i of the array being line i. The two are written one after the other, array first:
      ``load_embeddings`` refuses a pair whose counts differ.
    - ``.npz``: ``features`` and ``paths`` in one file.
    - ``.parquet``: a table with a ``path`` column and an ``embedding`` column (list of float32; maps
      flattened, their shape in the table's metadata under ``embedding_shape``). Needs pyarrow.

    Rows are streamed to a temporary .npy next to the target (memory stays flat whatever the folder's
    size), or for parquet straight into the temporary parquet file.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self.format = output_format(path, EMBEDDING_FORMATS, "the embeddings")
        if self.format == ".parquet":
            _require_pyarrow()
        self.paths: List[str] = []
        self.shape: Optional[Tuple[int, ...]] = None
        self._atomic = atomic_path(self.path if self.format != ".npz" else self.path.with_suffix(".npy"))
        self._tmp = self._atomic.__enter__()
        self._file: Any = None
        self._parquet: Any = None

    def write(self, paths: Sequence[str], features: np.ndarray) -> None:
        """Append the rows ``features`` (float32, one per path) of ``paths``."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        if self.shape is None:
            self.shape = tuple(features.shape[1:])
            self._open()
        elif tuple(features.shape[1:]) != self.shape:
            raise ValueError(f"embedding shape changed from {self.shape} to {tuple(features.shape[1:])}: all images "
                             "must be preprocessed to one size")
        if self._parquet is not None:
            self._write_parquet(paths, features)
        else:
            self._file.write(features.tobytes())
        self.paths.extend(paths)

    def commit(self) -> None:
        """Finish the file(s) and rename them into place."""
        if self.shape is None:
            self.shape = (0,)
            self._open()
        if self._parquet is not None:
            self._parquet.close()
        else:
            self._file.seek(0)
            # numpy leaves room in the header for the first axis to grow, so it is rewritten in place.
            np.lib.format.write_array_header_1_0(self._file, self._header(len(self.paths)))
            self._file.close()
        if self.format == ".npz":
            self._commit_npz()
            return
        self._atomic.__exit__(None, None, None)
        if self.format == ".npy":
            data = b"".join(os.fsencode(p) + b"\n" for p in self.paths)  # a file name's own bytes
            atomic_write(paths_file(self.path), lambda f: f.write(data))

    def abort(self) -> None:
        """Drop what was written; the target stays as it was."""
        for f in (self._file, self._parquet):
            if f is not None:
                try:
                    f.close()
                except Exception:  # noqa: BLE001  (the job's own error is the one to report)
                    pass
        # atomic_path removes its temporary file when the block it guards fails: tell it so.
        self._atomic.__exit__(_Aborted, _Aborted(), None)

    def __enter__(self) -> "EmbeddingFile":
        return self

    def __exit__(self, kind: Optional[type], *rest: object) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()

    def _header(self, rows: int) -> Dict[str, Any]:
        return {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                "shape": (rows, *self.shape)}

    def _open(self) -> None:
        if self.format == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            size = int(np.prod(self.shape))
            schema = pa.schema([("path", pa.string()), ("embedding", pa.list_(pa.float32(), size))],
                               metadata={"embedding_shape": json.dumps(list(self.shape))})
            self._parquet = pq.ParquetWriter(self._tmp, schema)
            return
        self._file = open(self._tmp, "xb")
        np.lib.format.write_array_header_1_0(self._file, self._header(0))

    def _write_parquet(self, paths: Sequence[str], features: np.ndarray) -> None:
        import pyarrow as pa

        flat = features.reshape(len(paths), -1)
        column = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])
        self._parquet.write_table(pa.table({"path": pa.array(list(paths), pa.string()), "embedding": column},
                                           schema=self._parquet.schema))

    def _commit_npz(self) -> None:
        staged = np.load(self._tmp, mmap_mode="r")
        paths = np.array(self.paths, dtype=str)
        try:
            atomic_write(self.path, lambda f: np.savez(f, features=staged, paths=paths))
        finally:
            self.abort()  # the temporary .npy was only the staging area


def paths_file(npy_path: PathLike) -> Path:
    """``feats.npy`` -> ``feats.paths.txt``: the image paths of an .npy embeddings file, one per row."""
    p = Path(npy_path)
    return p.with_name(p.stem + ".paths.txt")


class MissingDependencyError(ImportError, RuntimeError):
    """An optional package a format needs is not installed (a RuntimeError too, so the CLIs print it as
    one line)."""


def _require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise MissingDependencyError("writing or reading .parquet needs pyarrow, which is not installed: "
                                     "pip install pyarrow (or write .npy or .npz, which need nothing more)") from None


def check_embedding_output(path: PathLike) -> None:
    """Refuse, before any work, an embeddings file name of an unknown format or one that needs a missing pyarrow."""
    if output_format(path, EMBEDDING_FORMATS, "the embeddings") == ".parquet":
        _require_pyarrow()


def load_embeddings(path: PathLike) -> Tuple[np.ndarray, List[str]]:
    """``(features, paths)`` of a file written by ``convnextv2 embed`` (.npy with its .paths.txt, .npz, .parquet)."""
    suffix = output_format(path, EMBEDDING_FORMATS, "the embeddings")
    if suffix == ".npz":
        with np.load(path) as data:
            return data["features"], [str(p) for p in data["paths"]]
    if suffix == ".parquet":
        _require_pyarrow()
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        shape = json.loads(table.schema.metadata[b"embedding_shape"])
        flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(len(table), *shape).astype(np.float32), table.column("path").to_pylist()
    features = np.load(path)
    names = paths_file(path)
    with open(names, "rb") as f:
        paths = [os.fsdecode(line) for line in f.read().split(b"\n")[:-1]]
    if len(paths) != len(features):
        raise ValueError(f"{path} has {len(features)} rows but {names} lists {len(paths)} paths: the pair is from "
                         "two different runs (one was interrupted between the two files); run the embedding again")
    return features, paths


__all__ = ["EMBEDDING_FORMATS", "PREDICTION_FORMATS", "EmbeddingFile", "MissingDependencyError", "PredictionFile",
           "check_embedding_output", "load_embeddings", "output_format", "paths_file", "prediction_record"]
