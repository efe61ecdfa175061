"""The memory allocator of a nerbatch process: tcmalloc where it is installed.

glibc's malloc hands the memory of freed activations back to later requests badly: batches of
many shapes leave holes between the small objects that outlive them (tokenizer output, spans), later
requests do not fit the holes, and the heap grows for as long as the job runs, freed yet resident.
tcmalloc keeps sizes apart, and peak RSS stays nearly flat at the same speed; jemalloc is only used
when named, as it ran the int8 model slower (benchmarks/README.md, "Memory allocator"). A library can
only replace malloc before the process starts, so the console entry point re-executes itself once,
first thing, with the library in `LD_PRELOAD`, as torch's CPU launcher does; the process (and its
PID, which launchers watch) stays the same.

`NERBATCH_MALLOC=system` keeps glibc's allocator; `NERBATCH_MALLOC=/path/to/lib.so` names a library.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "NERBATCH_MALLOC"
# gperftools' tcmalloc, without and with its profiler
LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
KNOWN = ("tcmalloc", "jemalloc")  # allocators an LD_PRELOAD may already name
_ACTIVE = "NERBATCH_MALLOC_ACTIVE"  # set in the re-executed process: never re-execute twice


def library_dirs() -> list[Path]:
    """Where distributions and environments put shared libraries, this environment's own first."""
    dirs = [Path(sys.prefix) / "lib"]
    if os.environ.get("CONDA_PREFIX"):
        dirs.append(Path(os.environ["CONDA_PREFIX"]) / "lib")
    machine = os.uname().machine
    dirs += [Path(f"/usr/lib/{machine}-linux-gnu"), Path("/usr/lib64"), Path("/usr/lib"), Path("/usr/local/lib")]
    return dirs


def find_library() -> str | None:
    """The path of the allocator to preload, or None: none installed, or `NERBATCH_MALLOC=system`."""
    wanted = os.environ.get(ENV, "")
    if wanted == "system":
        return None
    if wanted:
        if not Path(wanted).is_file():
            raise SystemExit(f"nerbatch: {ENV}={wanted}: no such file (a shared library, or 'system')")
        return wanted
    for directory in library_dirs():
        for name in LIBRARIES:
            if (directory / name).is_file():
                return str(directory / name)
    return None


def preloaded(env: dict[str, str]) -> bool:
    """Whether `env`'s LD_PRELOAD already names an allocator (the user's or ours)."""
    return name_of(env.get("LD_PRELOAD", "")) != "glibc"


def preload_env(env: dict[str, str], library: str) -> dict[str, str]:
    """`env` with `library` first in LD_PRELOAD and the marker that stops a second re-execution."""
    preload = f"{library}:{env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else library
    return {**env, "LD_PRELOAD": preload, _ACTIVE: library}


def use_fast_allocator() -> None:
    """Re-execute this process with tcmalloc (or `NERBATCH_MALLOC`'s library) preloaded, where
    installed and no allocator is preloaded yet; otherwise return and run on glibc's allocator. Call
    it before anything is imported."""
    env = dict(os.environ)
    if not sys.platform.startswith("linux") or not sys.executable or _ACTIVE in env or preloaded(env):
        return
    library = find_library()
    if library is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], preload_env(env, library))


def name_of(libraries: str) -> str:
    """The allocator that `libraries` (an LD_PRELOAD value, or a library path) names: tcmalloc,
    jemalloc, or glibc for none."""
    return next((name for name in KNOWN if name in libraries), "glibc")


def active() -> str:
    """The allocator this process runs on, by name."""
    return name_of(os.environ.get("LD_PRELOAD", ""))
