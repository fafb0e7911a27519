"""The floor of an incremental save's walk: listing a tree and ``lstat`` of every entry, measured
natively and from Python (issue 21's second-save target; results in benchmarks/README.md).

    python benchmarks/walkfloor.py [--quick] [--files N] [--mib N] [--tree DIR] [--scratch DIR]
                                   [--repeat N]

A second incremental save must look at every entry of the tree (a file is told unchanged by its
``lstat``), so no save can be faster than listing the tree and ``lstat`` of each entry. This
measures that work several ways on the small-file tree of ``incremental.py``
(``make_small_files``, 50,000 files of 328 MiB by default, built in ``--scratch``, tmpfs where
there is one, unless ``--tree`` names a tree to walk):

* **native** (a C program compiled with the system's ``cc``, skipped without one): the listing
  alone (sorted names, folders found from the listing's type), the listing and ``fstatat`` of
  each entry relative to its folder's descriptor (as the save does) on one thread, the same with
  the ``fstatat`` calls split over two threads, and the same ``statx`` calls submitted through
  ``io_uring`` in batches of up to 1,024 (one system call a batch); ``find -printf`` as a tool's
  figure;
* **Python**: the listing alone (``os.scandir``, sorted), a bare loop of
  ``os.stat(name, dir_fd=..., follow_symlinks=False)`` over the entries (the listings taken before
  the clock), the same loop split over two threads (each takes every other folder), and
  ``_archive.walk_runs`` as a save walks (its checks included);
* ``scandir_rs`` (a Rust walker that lists and stats on its own threads), when it is importable.

Each figure is the median of ``--repeat`` runs (wall and CPU seconds; the CPU of the child
process for the native ones). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.datasets import make_small_files  # noqa: E402
from benchmarks.measure import clean_up_on_sigterm  # noqa: E402
from checkpointio import _archive  # noqa: E402

#: The native walker: ``walk ROOT list|stat|2|uring`` prints "entries wall cpu".
_C_SOURCE = r"""
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#ifdef __has_include
#if __has_include(<linux/io_uring.h>)
#include <linux/io_uring.h>
#include <sys/mman.h>
#define HAVE_URING 1
#endif
#endif

enum { LIST, STAT, SPLIT, URING };
static int mode;
static long count;
typedef struct { int fd; char **names; int n; } folder;
static folder *folders;
static int nfolders, capfolders;

static int cmp(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }
static double now(clockid_t clock) {
  struct timespec ts;
  clock_gettime(clock, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

#ifdef HAVE_URING
#define DEPTH 1024
static int ring;
static unsigned *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
static struct io_uring_sqe *sqes;
static struct io_uring_cqe *cqes;
static struct statx results[DEPTH];

static void ring_setup(void) {
  struct io_uring_params p;
  memset(&p, 0, sizeof p);
  ring = syscall(__NR_io_uring_setup, DEPTH, &p);
  if (ring < 0) { perror("io_uring_setup"); exit(2); }
  int rw = PROT_READ | PROT_WRITE;
  char *sq = mmap(0, p.sq_off.array + p.sq_entries * sizeof(unsigned), rw, MAP_SHARED, ring, IORING_OFF_SQ_RING);
  size_t cq_bytes = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
  char *cq = mmap(0, cq_bytes, rw, MAP_SHARED, ring, IORING_OFF_CQ_RING);
  sqes = mmap(0, p.sq_entries * sizeof(struct io_uring_sqe), rw, MAP_SHARED, ring, IORING_OFF_SQES);
  sq_tail = (unsigned *)(sq + p.sq_off.tail);
  sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
  sq_array = (unsigned *)(sq + p.sq_off.array);
  cq_head = (unsigned *)(cq + p.cq_off.head);
  cq_tail = (unsigned *)(cq + p.cq_off.tail);
  cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
  cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
}

static void ring_stat(int fd, char **names, int n) {
  for (int start = 0; start < n; start += DEPTH) {
    int m = n - start < DEPTH ? n - start : DEPTH;
    unsigned tail = *sq_tail;
    for (int i = 0; i < m; i++) {
      unsigned at = (tail + i) & *sq_mask;
      struct io_uring_sqe *e = &sqes[at];
      memset(e, 0, sizeof *e);
      e->opcode = IORING_OP_STATX; e->fd = fd; e->addr = (unsigned long)names[start + i];
      e->len = STATX_BASIC_STATS; e->off = (unsigned long)&results[i]; e->statx_flags = AT_SYMLINK_NOFOLLOW;
      sq_array[at] = at;
    }
    __atomic_store_n(sq_tail, tail + m, __ATOMIC_RELEASE);
    unsigned head = *cq_head, done = 0;
    if (syscall(__NR_io_uring_enter, ring, m, m, IORING_ENTER_GETEVENTS, NULL, 0) < 0) {
      perror("io_uring_enter");
      exit(2);
    }
    while (done < (unsigned)m) {
      unsigned end = __atomic_load_n(cq_tail, __ATOMIC_ACQUIRE);
      for (; head != end; head++, done++) count++;
      __atomic_store_n(cq_head, head, __ATOMIC_RELEASE);
      if (done < (unsigned)m) syscall(__NR_io_uring_enter, ring, 0, m - done, IORING_ENTER_GETEVENTS, NULL, 0);
    }
  }
}
#endif

static void walk(int fd) {
  DIR *dir = fdopendir(dup(fd));
  struct dirent *e;
  char **names = NULL, **subfolders = NULL;
  int n = 0, nsub = 0, cap = 0;
  while ((e = readdir(dir))) {
    if (e->d_name[0] == '.' && (!e->d_name[1] || (e->d_name[1] == '.' && !e->d_name[2]))) continue;
    if (n == cap) {
      cap = cap ? 2 * cap : 64;
      names = realloc(names, cap * sizeof *names);
      subfolders = realloc(subfolders, cap * sizeof *names);
    }
    names[n++] = strdup(e->d_name);
    if (e->d_type == DT_DIR) subfolders[nsub++] = names[n - 1];
  }
  closedir(dir);
  qsort(names, n, sizeof *names, cmp);
  struct stat st;
  if (mode == STAT) for (int i = 0; i < n; i++) count += fstatat(fd, names[i], &st, AT_SYMLINK_NOFOLLOW) == 0;
#ifdef HAVE_URING
  if (mode == URING) ring_stat(fd, names, n);
#endif
  if (mode == LIST) count += n;
  for (int i = 0; i < nsub; i++) {
    int child = openat(fd, subfolders[i], O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    walk(child);
    if (mode == SPLIT) continue;  /* stat later, on the threads */
    close(child);
  }
  free(subfolders);
  if (mode == SPLIT) {
    if (nfolders == capfolders) {
      capfolders = capfolders ? 2 * capfolders : 64;
      folders = realloc(folders, capfolders * sizeof *folders);
    }
    folders[nfolders++] = (folder){fd, names, n};
    return;
  }
  for (int i = 0; i < n; i++) free(names[i]);
  free(names);
}

static void *stat_half(void *arg) {
  long half = (long)arg, mine = 0;
  struct stat st;
  for (int f = (int)half; f < nfolders; f += 2)
    for (int i = 0; i < folders[f].n; i++)
      mine += fstatat(folders[f].fd, folders[f].names[i], &st, AT_SYMLINK_NOFOLLOW) == 0;
  __atomic_add_fetch(&count, mine, __ATOMIC_RELAXED);
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 3) return 2;
  mode = !strcmp(argv[2], "list") ? LIST : !strcmp(argv[2], "stat") ? STAT : !strcmp(argv[2], "2") ? SPLIT : URING;
#ifdef HAVE_URING
  if (mode == URING) ring_setup();
#else
  if (mode == URING) return 3;
#endif
  int fd = open(argv[1], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) { perror(argv[1]); return 2; }
  double wall = now(CLOCK_MONOTONIC), cpu = now(CLOCK_PROCESS_CPUTIME_ID);
  walk(fd);
  if (mode == SPLIT) {
    pthread_t other;
    pthread_create(&other, NULL, stat_half, (void *)1L);
    stat_half((void *)0L);
    pthread_join(other, NULL);
  }
  printf("%ld %.6f %.6f\n", count, now(CLOCK_MONOTONIC) - wall, now(CLOCK_PROCESS_CPUTIME_ID) - cpu);
  return 0;
}
"""


def _median(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(wall for wall, _ in samples), statistics.median(cpu for _, cpu in samples)


def _timed(work: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median wall and process CPU seconds of ``work()`` in this process."""
    samples = []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        work()
        samples.append((time.perf_counter() - wall, time.process_time() - cpu))
    return _median(samples)


def _native(scratch: Path, tree: Path, repeat: int) -> list[tuple[str, tuple[float, float]]]:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        print("no C compiler: the native rows are skipped", file=sys.stderr)
        return []
    source, program = scratch / "walkfloor.c", scratch / "walkfloor"
    source.write_text(_C_SOURCE)
    subprocess.run([compiler, "-O2", "-pthread", "-o", str(program), str(source)], check=True)
    rows = []
    for mode, label in [
        ("list", "C: listing alone (readdir, sorted)"),
        ("stat", "C: listing and fstatat of every entry, 1 thread"),
        ("2", "C: listing, then fstatat on 2 threads"),
        ("uring", "C: listing and statx through io_uring, batches of <= 1,024"),
    ]:
        samples = []
        for _ in range(repeat):
            done = subprocess.run([str(program), str(tree), mode], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"{label}: not measured ({done.stderr.strip() or done.returncode})", file=sys.stderr)
                break
            _, took, used = done.stdout.split()
            samples.append((float(took), float(used)))
        if samples:
            rows.append((label, _median(samples)))
    if shutil.which("find"):
        samples = []
        for _ in range(repeat):
            before = os.times()
            wall = time.perf_counter()
            subprocess.run(["find", str(tree), "-printf", r"%s %T@ %i\n"], stdout=subprocess.DEVNULL, check=True)
            after = os.times()
            cpu = after.children_user + after.children_system - before.children_user - before.children_system
            samples.append((time.perf_counter() - wall, cpu))
        rows.append(("find -printf '%s %T@ %i'", _median(samples)))
    return rows


def _python(tree: Path, repeat: int) -> list[tuple[str, tuple[float, float]]]:
    folders: list[tuple[int, list[str]]] = []  # every folder's descriptor and sorted names

    def listing(fd: int, into: list[tuple[int, list[str]]] | None) -> None:
        with os.scandir(fd) as entries:
            listed = sorted(entries, key=lambda entry: entry.name)
        if into is not None:
            into.append((fd, [entry.name for entry in listed]))
        for entry in listed:
            if entry.is_dir(follow_symlinks=False):
                child = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                try:
                    listing(child, into)
                finally:
                    if into is None:
                        os.close(child)

    top = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    try:
        listing(top, folders)

        def bare(part: list[tuple[int, list[str]]]) -> None:
            lstat = os.stat
            for fd, names in part:
                [lstat(name, dir_fd=fd, follow_symlinks=False) for name in names]

        def two_threads() -> None:
            other = threading.Thread(target=bare, args=(folders[1::2],))
            other.start()
            bare(folders[0::2])
            other.join()

        def walk() -> None:
            with contextlib.closing(_archive.walk_runs(str(tree))) as runs:
                for _ in runs:
                    pass

        rows = [
            ("Python: listing alone (os.scandir, sorted)", _timed(lambda: listing(top, None), repeat)),
            ("Python: a bare loop of os.stat(name, dir_fd=...)", _timed(lambda: bare(folders), repeat)),
            ("Python: the same loop on 2 threads (every other folder)", _timed(two_threads, repeat)),
            ("Python: _archive.walk_runs (listing, lstat, checks), as a save walks", _timed(walk, repeat)),
        ]
    finally:
        for fd, _ in folders:
            os.close(fd)
    try:
        import scandir_rs  # type: ignore[import-not-found]
    except ImportError:
        return rows

    def rust() -> None:
        scandir_rs.Scandir(str(tree), return_type=scandir_rs.ReturnType.Ext, sorted=True).collect()

    rows.append(("scandir_rs.Scandir(Ext, sorted).collect()", _timed(rust, repeat)))
    return rows


def _check_walkable(tree: Path) -> None:
    """Exit with a message, not a crash, where a walk cannot go: every walk here holds a descriptor
    of each folder at once, and none skips a folder it cannot open."""

    def unlisted(error: OSError) -> None:
        sys.exit(f"walkfloor: cannot list {error.filename}: {error.strerror}")

    folders = [tree]
    for top, names, _ in os.walk(tree, onerror=unlisted):
        folders.extend(Path(top, name) for name in names)
    for folder in folders:
        try:
            os.close(os.open(folder, os.O_RDONLY | os.O_DIRECTORY))
        except OSError as error:
            sys.exit(f"walkfloor: cannot open {folder}: {error.strerror}; give a tree whose every folder can be read")
    needed = len(folders) + 64  # the walks' descriptors and the interpreter's own
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if needed > soft:
        if hard != resource.RLIM_INFINITY and needed > hard:
            sys.exit(
                f"walkfloor: {tree} has {len(folders):,} folders and a walk holds a descriptor of each,"
                f" {needed:,} with the process's own; it may open {hard:,} (raise `ulimit -Hn`, or give a smaller tree)"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))  # this script's own process (and its C walks)


def main() -> None:
    clean_up_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2,000 files of 13 MiB")
    parser.add_argument("--files", type=int, default=50_000)
    parser.add_argument("--mib", type=float, default=328)
    parser.add_argument("--tree", type=Path, help="walk this tree instead of building one")
    parser.add_argument("--scratch", type=Path, help="where the tree is built (default: /dev/shm where it exists)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    files, mib = (2_000, 13.0) if args.quick else (args.files, args.mib)
    base = args.scratch or (Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    with tempfile.TemporaryDirectory(prefix="walkfloor-", dir=base) as scratch:
        tree = args.tree
        if tree is None:
            tree = Path(scratch) / "tree"
            make_small_files(tree, files, mib)
        _check_walkable(tree)
        entries = sum(len(names) + len(folders) for _, folders, names in os.walk(tree))
        rows = _native(Path(scratch), tree, args.repeat) + _python(tree, args.repeat)
    print(f"{tree if args.tree else f'{files:,} files, {mib:g} MiB'}: {entries:,} entries; medians of {args.repeat}")
    print("| walk | wall s | CPU s |")
    print("|---|---|---|")
    for label, (wall, cpu) in rows:
        print(f"| {label} | {wall:.3f} | {cpu:.3f} |")


if __name__ == "__main__":
    main()
