"""launch/: the SLURM scripts parse, pass shellcheck and hand their arguments to nerbatch unchanged;
the YAML files parse."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.slow  # bash, shellcheck and the scripts run as processes

PRINT_ARGS = "import json, sys; print(json.dumps(sys.argv[1:]))"
SCRIPTS = sorted((REPO / "launch").glob("*.slurm")) + [REPO / "benchmarks" / "gpu" / "run.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_pass_shellcheck(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    done = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def fake_commands(directory: Path) -> Path:
    """srun (runs its command as node 0), scontrol (one host) and accelerate (prints its arguments)."""
    directory.mkdir()
    commands = {
        "srun": '#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\nSLURM_NODEID=0 exec "$@"\n',
        "scontrol": "#!/usr/bin/env bash\necho node-a\n",
        "accelerate": f'#!/usr/bin/env bash\nexec {sys.executable} -c "{PRINT_ARGS}" "$@"\n',
    }
    for name, text in commands.items():
        (directory / name).write_text(text)
        (directory / name).chmod(stat.S_IRWXU)
    return directory


def test_annotate_slurm_passes_a_quoted_glob_and_options_through_unexpanded(tmp_path):
    bin_dir = fake_commands(tmp_path / "bin")
    (tmp_path / "dump").mkdir()
    for name in ("a.parquet", "b.parquet"):  # a glob the shell could expand, if it were allowed to
        (tmp_path / "dump" / name).touch()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8"}
    env |= {"SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_CPUS_PER_TASK": "64"}
    glob = str(tmp_path / "dump" / "*.parquet")
    done = subprocess.run(
        ["bash", str(REPO / "launch" / "annotate.slurm"), "runs/model", "/out/ner", glob, "--keep-columns", "a b"],
        env=env, capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    args = json.loads(done.stdout.strip().splitlines()[-1])
    expected = ["-m", "nerbatch", "annotate", "runs/model", glob, "--keep-columns", "a b", "--output", "/out/ner"]
    assert args[args.index("-m") :] == [*expected, "--no-progress"]
    # 64 cores, 8 GPUs, 4 cores a process: 2 processes per GPU on each of 2 nodes
    assert args[args.index("--num_processes") + 1] == "32" and args[args.index("--num_machines") + 1] == "2"


def test_annotate_slurm_without_inputs_says_how_to_call_it(tmp_path):
    bin_dir = fake_commands(tmp_path / "bin")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", str(REPO / "launch" / "annotate.slurm"), "m", "out"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 2 and "usage: sbatch launch/annotate.slurm MODEL_DIR OUT_DIR INPUT" in done.stderr


@pytest.mark.parametrize("config", sorted((REPO / "launch").glob("*.yaml")), ids=lambda p: p.name)
def test_yaml_files_parse(config):
    document = yaml.safe_load(config.read_text())
    assert isinstance(document, dict) and document
    if document.get("kind") == "RayJob":
        entrypoint = document["spec"]["entrypoint"]
        assert "--engine ray" in entrypoint and "--output s3://" in entrypoint
