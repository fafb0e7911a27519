"""Seeded benchmark datasets, and byte-for-byte verification of what a pipeline restored.

Three datasets, each a pure function of its size and seed (the same arguments give the same bytes):

* a **tensor directory**: float32 normal noise in the layout of a model checkpoint (one embedding,
  a few weights per layer, tiny norms and biases, a JSON config). gzip shrinks it by only ~7%.
* a **small-file tree**: many text-like files (words drawn from a Zipf-like vocabulary) in nested
  folders ``part_NN/group_NN/file_NNNNN.txt``; gzip shrinks it about 3x.
* a **single large file** of float32 noise.

:func:`grow_tree` builds a tree four times larger (hard links to the original plus three more
generated copies with other seeds), on which the runner checks that peak memory stays flat.

Run alone to make the datasets somewhere to look at::

    python benchmarks/datasets.py OUT [--tensor-mib 770] [--small-files 50000] [--small-mib 328]
"""

from __future__ import annotations

import argparse
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "MiB",
    "Dataset",
    "VerificationError",
    "make_big_file",
    "make_small_files",
    "make_tensor_tree",
    "grow_tree",
    "manifest",
    "verify_file",
    "verify_tree",
]

MiB = 1024 * 1024
#: Largest array generated at once, so that making a large dataset needs little memory.
_GENERATE_STEP = 16 * MiB
_COMPARE_STEP = 1 * MiB
#: Per-layer tensors too small to matter for throughput, as (name, bytes).
_TINY = (("norm.f32", 4096), ("bias.f32", 16384))

#: Relative path -> size for files, ``-1`` for folders, ``"-> target"`` for symlinks.
Manifest = dict[str, int | str]


@dataclass(frozen=True)
class Dataset:
    """One generated dataset.

    Attributes:
        name: Short label used in the tables (``tensors``, ``small-files``, ``big-file``).
        path: The directory (or, for ``big-file``, the file).
        size: Total bytes of file content (what "MB/s of source bytes" divides).
        files: Number of regular files.
    """

    name: str
    path: Path
    size: int
    files: int

    @property
    def is_tree(self) -> bool:
        """Whether this is a directory (saved as an archive) rather than one file."""
        return self.path.is_dir()


class VerificationError(Exception):
    """A restored tree or file differs from its source."""


def _write_noise(path: Path, nbytes: int, rng: np.random.Generator) -> None:
    """Write ``nbytes`` (a multiple of 4) of float32 standard-normal noise to ``path``."""
    with open(path, "wb") as out:
        left = nbytes // 4
        while left:
            count = min(left, _GENERATE_STEP // 4)
            rng.standard_normal(count, dtype=np.float32).tofile(out)
            left -= count


def make_tensor_tree(root: Path, total_mib: float = 770, seed: int = 0) -> Dataset:
    """A model-checkpoint-like folder of float32 tensors totalling about ``total_mib`` MiB.

    Layout: ``model/embed.f32`` and, per layer, ``attn_qkv.f32``, ``mlp_up.f32``,
    ``mlp_down.f32`` (sharing the bulk in the ratio 24 : 4 : 8 : 8), plus a 4 KiB norm and a 16 KiB
    bias per layer and ``config.json``. Up to 24 layers; fewer for small sizes.
    """
    rng = np.random.default_rng(seed)
    total = int(total_mib * MiB)
    layers = max(1, min(24, total // (4 * MiB)))
    weights: list[tuple[str, int]] = [("model/embed.f32", 24)]
    for layer in range(layers):
        base = f"model/layers/{layer:02d}"
        weights += [(f"{base}/attn_qkv.f32", 4), (f"{base}/mlp_up.f32", 8), (f"{base}/mlp_down.f32", 8)]
    tiny = [(f"model/layers/{layer:02d}/{name}", size) for layer in range(layers) for name, size in _TINY]
    bulk = max(0, total - sum(size for _, size in tiny))
    unit = bulk / sum(weight for _, weight in weights)
    sizes = [(name, int(unit * weight) // 4 * 4) for name, weight in weights] + tiny
    config = {"layers": layers, "dtype": "float32", "seed": seed, "tensors": dict(sizes)}
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name, size in sizes:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_noise(path, size, rng)
    return _describe("tensors", root)


def _corpus(rng: np.random.Generator, nbytes: int) -> bytes:
    """Text from a 4096-word vocabulary with Zipf-like frequencies, about ``nbytes`` long."""
    letters = np.frombuffer(b"etaoinshrdlucmfwypvbgkjqxz", dtype=np.uint8)
    lengths = rng.integers(2, 11, size=4096)
    vocabulary = [bytes(rng.choice(letters, size=int(n))).decode() for n in lengths]
    probability = 1.0 / np.arange(1, len(vocabulary) + 1)
    probability /= probability.sum()
    count = nbytes // 6 + 1
    picks = rng.choice(len(vocabulary), size=count, p=probability)
    separators = np.where(rng.random(count) < 0.08, "\n", " ")
    return "".join(vocabulary[i] + sep for i, sep in zip(picks.tolist(), separators.tolist(), strict=True)).encode()


def make_small_files(root: Path, count: int = 50_000, total_mib: float = 328, seed: int = 1) -> Dataset:
    """``count`` text-like files totalling about ``total_mib`` MiB, 100 per folder, 25 folders per part.

    File sizes are uniform between a quarter and 1.75 times the mean; each file starts with a line
    naming it, followed by a slice of a shared word corpus at a random offset.
    """
    rng = np.random.default_rng(seed)
    mean = max(64, int(total_mib * MiB) // max(1, count))
    sizes = rng.integers(mean // 4, mean * 7 // 4 + 1, size=count)
    corpus = _corpus(rng, max(4 * MiB, 3 * int(sizes.max(initial=0))))
    offsets = rng.integers(0, len(corpus) - int(sizes.max(initial=0)), size=count)
    folder: Path | None = None
    for index, (size, offset) in enumerate(zip(sizes.tolist(), offsets.tolist(), strict=True)):
        parent = root / f"part_{index // 2500:02d}" / f"group_{index // 100 % 25:02d}"
        if parent != folder:
            parent.mkdir(parents=True, exist_ok=True)
            folder = parent
        header = f"# file {index} of {count}, seed {seed}\n".encode()
        body = corpus[offset : offset + max(0, size - len(header))]
        (parent / f"file_{index:05d}.txt").write_bytes(header + body)
    return _describe("small-files", root)


def make_big_file(path: Path, mib: float = 512, seed: int = 2) -> Dataset:
    """One file of ``mib`` MiB of float32 noise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_noise(path, int(mib * MiB) // 4 * 4, np.random.default_rng(seed))
    return Dataset("big-file", path, path.stat().st_size, 1)


def grow_tree(source: Dataset, dest: Path, factor: int = 4) -> Dataset:
    """A tree ``factor`` times the size of a generated ``source``: ``dest/0`` holds hard links to
    ``source`` (no data written) and ``dest/1`` .. ``dest/{factor - 1}`` new data of the same kind
    with other seeds. Every file is distinct, so an archive of it is ``factor`` times as large."""
    for rel, size in manifest(source.path).items():
        target = dest / "0" / rel
        if size == -1:
            target.mkdir(parents=True, exist_ok=True)
        elif isinstance(size, int):
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(source.path / rel, target)
    mib = source.size / MiB
    for copy in range(1, factor):
        if source.name == "tensors":
            make_tensor_tree(dest / str(copy), mib, seed=100 + copy)
        else:
            make_small_files(dest / str(copy), source.files, mib, seed=100 + copy)
    return _describe(f"{source.name} x{factor}", dest)


def _describe(name: str, root: Path) -> Dataset:
    sizes = [size for size in manifest(root).values() if isinstance(size, int) and size >= 0]
    return Dataset(name, root, sum(sizes), len(sizes))


def manifest(root: Path) -> Manifest:
    """Every entry under ``root`` (not ``root`` itself), sorted by relative path."""
    found: Manifest = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                found[rel] = "-> " + os.readlink(full)
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = -1
            else:
                found[rel] = st.st_size
    return dict(sorted(found.items()))


def verify_file(source: Path, restored: Path) -> None:
    """Raise :class:`VerificationError` unless the two files hold the same bytes."""
    if not restored.is_file():
        raise VerificationError(f"{restored}: missing or not a regular file")
    if source.stat().st_size != restored.stat().st_size:
        raise VerificationError(f"{restored}: {restored.stat().st_size} bytes, expected {source.stat().st_size}")
    with open(source, "rb") as expected, open(restored, "rb") as actual:
        offset = 0
        while block := expected.read(_COMPARE_STEP):
            if actual.read(len(block)) != block:
                raise VerificationError(f"{restored}: content differs from {source} in bytes {offset}..")
            offset += len(block)


def verify_tree(source: Path, restored: Path, expected: Manifest | None = None) -> None:
    """Raise :class:`VerificationError` unless ``restored`` has the same entries, sizes and bytes.

    ``expected`` is ``manifest(source)``, passed in to walk a large source once for many checks.
    """
    expected = manifest(source) if expected is None else expected
    actual = manifest(restored)
    if actual != expected:
        missing = sorted(set(expected) - set(actual))[:5]
        extra = sorted(set(actual) - set(expected))[:5]
        changed = sorted(k for k in set(actual) & set(expected) if actual[k] != expected[k])[:5]
        raise VerificationError(
            f"{restored}: file list differs from {source}: missing {missing}, extra {extra}, "
            f"different size or type {changed}"
        )
    for rel, size in expected.items():
        if isinstance(size, int) and size >= 0:
            verify_file(source / rel, restored / rel)


def main() -> None:
    """Make the datasets into a folder (for a look at what the benchmark uses)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to create the datasets in")
    parser.add_argument("--tensor-mib", type=float, default=770)
    parser.add_argument("--small-files", type=int, default=50_000)
    parser.add_argument("--small-mib", type=float, default=328)
    parser.add_argument("--big-mib", type=float, default=512)
    parser.add_argument("--seed", type=int, default=0, help="added to each dataset's own seed")
    args = parser.parse_args()
    made = [
        make_tensor_tree(args.out / "tensors", args.tensor_mib, seed=args.seed),
        make_small_files(args.out / "small-files", args.small_files, args.small_mib, seed=args.seed + 1),
        make_big_file(args.out / "big-file.f32", args.big_mib, seed=args.seed + 2),
    ]
    for dataset in made:
        print(f"{dataset.name:12} {dataset.size / MiB:9.1f} MiB in {dataset.files:6d} files: {dataset.path}")


if __name__ == "__main__":
    main()
