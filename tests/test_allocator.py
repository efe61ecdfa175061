"""The console entry point re-executes itself on tcmalloc or jemalloc where one is installed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nerbatch import allocator

# the re-executed process names the allocator it runs on and the malloc libraries mapped into it
REPORT = (
    "from nerbatch import allocator; allocator.use_fast_allocator(); "
    "print(allocator.active(), sorted({l.split()[-1] for l in open('/proc/self/maps') if 'malloc' in l}))"
)


def report(**env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV, allocator._ACTIVE)}
    done = subprocess.run([sys.executable, "-c", REPORT], env={**clean, **env}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_library_goes_first_in_ld_preload_and_marks_the_process():
    env = allocator.preload_env({"LD_PRELOAD": "/opt/other.so", "PATH": "/bin"}, "/lib/libtcmalloc_minimal.so.4")
    assert env["LD_PRELOAD"] == "/lib/libtcmalloc_minimal.so.4:/opt/other.so"
    assert env["PATH"] == "/bin" and env[allocator._ACTIVE] == "/lib/libtcmalloc_minimal.so.4"
    assert allocator.preload_env({}, "/x/libjemalloc.so.2")["LD_PRELOAD"] == "/x/libjemalloc.so.2"


@pytest.mark.parametrize(
    "env",
    [
        {allocator._ACTIVE: "/lib/libtcmalloc.so.4"},  # already re-executed
        {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"},  # the user's own choice
        {allocator.ENV: "system"},  # asked for glibc's
    ],
)
def test_no_reexecution_where_it_is_done_or_declined(monkeypatch, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(os, "execve", lambda *args: pytest.fail(f"re-executed: {args}"))
    allocator.use_fast_allocator()


def test_a_named_library_that_does_not_exist_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv(allocator.ENV, str(tmp_path / "libnothing.so"))
    with pytest.raises(SystemExit, match="NERBATCH_MALLOC=.*libnothing.so: no such file"):
        allocator.find_library()


@pytest.mark.slow
def test_the_process_runs_on_the_installed_allocator():
    library = allocator.find_library()
    if library is None:
        pytest.skip("no tcmalloc or jemalloc installed (apt install libtcmalloc-minimal4)")
    name = allocator.name_of(library)
    found = report()
    assert found.startswith(name) and os.path.realpath(library) in found, found
    assert report(NERBATCH_MALLOC="system") == "glibc []"


@pytest.mark.slow
def test_the_console_command_runs_once_with_its_arguments_and_exit_code():
    done = subprocess.run([sys.executable, "-m", "nerbatch", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.count("version") == 1
    done = subprocess.run([sys.executable, "-m", "nerbatch", "predict"], capture_output=True, text=True)
    assert done.returncode == 2 and "Missing argument 'MODEL_DIR'" in done.stderr
