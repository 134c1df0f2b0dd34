"""Bad option values for ``lamda-peft train`` and ``eval``: each is refused before any data, model or output folder
is touched, with exit code 2, one line on stderr that starts with the flag, and nothing written.

The cases name a data file and a model that do not exist: a check that ran after loading them would report those
instead of the flag. Each case runs in its own process, forked from a server process that imported the CLI once
(multiprocessing's forkserver): a fresh interpreter spends 5 to 9 s on 2 busy cores importing peft and transformers
(``import lamda_peft``) before the CLI parses anything. ``test_real_command_*`` run the real console command end to end.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, NamedTuple, Optional

import pytest

PRELOAD = ["lamda_peft.cli", "lamda_peft.cli.train", "lamda_peft.cli.eval", "lamda_peft.cli.spectrum",
           "lamda_peft.cli.report", __name__]
NOBODY = 65534  # as root, permission cases run the command as this user (root may write anywhere)
TRAIN = ["train", "--train-file", "missing-train.csv", "--validation-file", "missing-dev.csv",
         "--model", "./no-such-model", "--output-dir", "out"]
EVAL = ["eval", "--adapter", "missing-adapter"]


class Result(NamedTuple):
    code: Optional[int]
    stdout: str
    stderr: str


def _cli_child(argv: list[str], cwd: str, logs: str, uid: Optional[int]) -> None:
    """In the forked process: stdout and stderr to files, run the command in ``cwd``, exit with its code."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(os.path.join(logs, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.chdir(cwd)
    if uid is not None:
        os.setgid(uid)
        os.setuid(uid)
    from lamda_peft.cli import main

    sys.exit(main(argv))


@pytest.fixture(scope="module")
def cli_process():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


@pytest.fixture
def open_tmp():
    """A folder that another user can traverse (pytest's tmp_path is private to root), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="lamda-cli-validation-"))
    folder.chmod(0o755)
    yield folder
    for path in folder.rglob("*"):  # give back what a case locked, so that it can be removed
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    shutil.rmtree(folder)


@pytest.fixture
def run_cli(cli_process, open_tmp, tmp_path):
    """run_cli(argv, unprivileged=False) -> Result, in ``open_tmp / 'work'`` (the command's working folder)."""
    work = open_tmp / "work"
    work.mkdir()
    work.chmod(0o755)

    def run(argv: list[str], unprivileged: bool = False) -> Result:
        logs = tmp_path / f"logs{len(list(tmp_path.iterdir()))}"
        logs.mkdir()
        uid = NOBODY if unprivileged and os.geteuid() == 0 else None
        process = cli_process.Process(target=_cli_child, args=(argv, str(work), str(logs), uid))
        process.start()
        process.join(120)
        if process.is_alive():
            process.kill()
            pytest.fail(f"lamda-peft {' '.join(argv)} still running after 120 s")
        return Result(process.exitcode, (logs / "stdout").read_text(), (logs / "stderr").read_text())

    run.work = work
    return run


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its mode and size: what "nothing written" compares."""
    return {str(p.relative_to(folder)): (p.lstat().st_mode, p.lstat().st_size) for p in folder.rglob("*")}


def assert_refused(result: Result, flag: str, *fragments: str) -> None:
    assert result.code == 2, result
    assert result.stdout == "" and "Traceback" not in result.stderr, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lamda-peft: error: {flag}"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------- the cases


def locked(path: str) -> Callable[[Path], None]:
    """Set-up: ``path`` (under the working folder) is a folder nobody but root may write in."""
    def make(work: Path) -> None:
        (work / path).mkdir(parents=True)
        (work / path).chmod(0o555)
    return make


def a_file(path: str) -> Callable[[Path], None]:
    def make(work: Path) -> None:
        (work / path).write_text("not a folder\n")
    return make


def a_folder(path: str) -> Callable[[Path], None]:
    def make(work: Path) -> None:
        (work / path).mkdir()
    return make


class Case(NamedTuple):
    argv: list[str]
    flag: str  # the message starts with it
    fragments: tuple[str, ...] = ()
    setup: Optional[Callable[[Path], None]] = None
    unprivileged: bool = False


def case(command: list[str], option: str, value: str, *fragments: str, got: bool = True,
         setup: Optional[Callable[[Path], None]] = None, unprivileged: bool = False) -> Case:
    """``command`` with one bad ``option value``: the message starts with the option and (``got``) quotes the value."""
    return Case([*command, option, value], option, ((f"got {value}",) if got else ()) + fragments, setup, unprivileged)


def train(option: str, value: str, *fragments: str, **kw) -> Case:
    return case(TRAIN, option, value, *fragments, **kw)


def evaluate(option: str, value: str, *fragments: str, **kw) -> Case:
    return case(EVAL, option, value, *fragments, **kw)


CASES = {
    # the tracebacks after the model loaded
    "lr-negative": train("--lr", "-0.001"),
    "lr-nan": train("--lr", "nan"),
    "epochs-negative": train("--epochs", "-1"),
    "freeze-ratio-above-1": train("--freeze-ratio", "1.5", "[0, 1]"),
    "freeze-ratio-negative": train("--freeze-ratio", "-0.1"),
    "lora-alpha-negative": train("--lora-alpha", "-5"),
    "output-dir-under-unwritable-folder": train("--output-dir", "locked/out", "cannot write in", got=False,
                                                setup=locked("locked"), unprivileged=True),
    "output-dir-parent-is-a-file": train("--output-dir", "notes.txt/out", "notes.txt is a file", got=False,
                                         setup=a_file("notes.txt")),
    # the silent substitutions: refused, never replaced by the default
    "epochs-zero": train("--epochs", "0"),
    "lr-zero": train("--lr", "0"),
    "lora-alpha-zero": train("--lora-alpha", "0", "does nothing"),
    # NaN and infinity on every float option, and the ranges
    "lr-inf": train("--lr", "inf"),
    "lr-S-nan": train("--lr-S", "nan"),
    "lr-B-zero": train("--lr-B", "0"),
    "lr-head-inf": train("--lr-head", "inf"),
    "epochs-nan": train("--epochs", "nan"),
    "freeze-ratio-nan": train("--freeze-ratio", "nan"),
    "lora-alpha-nan": train("--lora-alpha", "nan"),
    "lora-alpha-inf": train("--lora-alpha", "inf"),
    "weight-decay-negative": train("--weight-decay", "-0.1"),
    "weight-decay-nan": train("--weight-decay", "nan"),
    "weight-decay-inf": train("--weight-decay", "inf"),
    "warmup-ratio-one": train("--warmup-ratio", "1", "[0, 1)"),
    "warmup-ratio-negative": train("--warmup-ratio", "-0.1"),
    "warmup-ratio-nan": train("--warmup-ratio", "nan"),
    # counts
    "r-zero": train("--r", "0"),
    "max-steps-zero": train("--max-steps", "0"),
    "max-steps-negative": train("--max-steps", "-3"),
    "batch-size-zero": train("--batch-size", "0"),
    "gradient-accumulation-zero": train("--gradient-accumulation-steps", "0"),
    "max-length-zero": train("--max-length", "0"),
    "save-steps-zero": train("--save-steps", "0"),
    "logging-steps-zero": train("--logging-steps", "0"),
    "eval-steps-negative": train("--eval-steps", "-1"),
    "num-generate-negative": train("--num-generate", "-1"),
    "max-new-tokens-zero": train("--max-new-tokens", "0"),
    "seed-negative": train("--seed", "-1"),
    "seed-too-large": train("--seed", str(2**32)),
    # the options run_glue / run_clm users expect (issue 27)
    "max-train-samples-zero": train("--max-train-samples", "0"),
    "max-eval-samples-negative": train("--max-eval-samples", "-1"),
    "lora-dropout-one": train("--lora-dropout", "1", "[0, 1)"),
    "lora-dropout-nan": train("--lora-dropout", "nan"),
    "warmup-steps-negative": train("--warmup-steps", "-1"),
    "max-grad-norm-negative": train("--max-grad-norm", "-1", "0: no clipping"),
    "max-grad-norm-inf": train("--max-grad-norm", "inf"),
    "save-total-limit-zero": train("--save-total-limit", "0"),
    "warmup-steps-with-ratio": Case([*TRAIN, "--warmup-steps", "2", "--warmup-ratio", "0.1"], "give --warmup-ratio",
                                    ("--warmup-steps, not both",)),
    "save-total-limit-without-save-steps": Case([*TRAIN, "--save-total-limit", "2"], "--save-total-limit",
                                                ("needs --save-steps",)),
    "lora-dropout-with-full": Case([*TRAIN, "--method", "full", "--lora-dropout", "0.1"], "--lora-dropout",
                                   ("not --method full",)),
    "eval-max-eval-samples-zero": evaluate("--max-eval-samples", "0"),
    # an empty string is not a request for the default
    "model-empty": train("--model", "", "is empty", got=False),
    "target-modules-empty": train("--target-modules", "", "is empty", got=False),
    # the output folder
    "output-dir-is-a-file": train("--output-dir", "notes.txt", "is a file", got=False, setup=a_file("notes.txt")),
    "output-dir-under-a-file-deeper": train("--output-dir", "notes.txt/a/out", "notes.txt is a file", got=False,
                                            setup=a_file("notes.txt")),
    "output-dir-dot": train("--output-dir", ".", "does not name a new folder", got=False),
    "output-dir-empty": train("--output-dir", "", "is empty", got=False),
    "output-dir-unwritable-folder": train("--output-dir", "locked", "cannot write in that folder", got=False,
                                          setup=locked("locked"), unprivileged=True),
    "default-output-dir-runs-is-a-file": Case([a for a in TRAIN if a not in ("--output-dir", "out")],
                                              "--output-dir (default)", ("runs is a file",), a_file("runs")),
    # eval shares the options
    "eval-batch-size-zero": evaluate("--batch-size", "0"),
    "eval-max-length-zero": evaluate("--max-length", "0"),
    "eval-num-generate-negative": evaluate("--num-generate", "-2"),
    "eval-max-new-tokens-zero": evaluate("--max-new-tokens", "0"),
    "eval-model-empty": evaluate("--model", "", "is empty", got=False),
    "eval-output-is-a-folder": evaluate("--output", "results", "is a folder", got=False, setup=a_folder("results")),
    "eval-output-under-a-file": evaluate("--output", "notes.txt/eval.json", "notes.txt is a file", got=False,
                                         setup=a_file("notes.txt")),
    "eval-output-under-unwritable-folder": evaluate("--output", "locked/eval.json", "cannot write in", got=False,
                                                    setup=locked("locked"), unprivileged=True),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_option_is_refused_before_anything_is_loaded(case: Case, run_cli):
    if case.setup:
        case.setup(run_cli.work)
    before = tree(run_cli.work)
    assert_refused(run_cli(case.argv, unprivileged=case.unprivileged), case.flag, *case.fragments)
    assert tree(run_cli.work) == before  # no output folder, no temporary folder, nothing changed


@pytest.mark.parametrize("flag, value", [("--lr", "0"), ("--epochs", "0"), ("--lora-alpha", "0")])
def test_zero_is_refused_not_replaced_by_the_default(flag, value, run_cli):
    """Issue 27: ``args.x or default`` trained --lr 0 at 1e-3, --epochs 0 for one epoch, --lora-alpha 0 as 16."""
    result = run_cli([*TRAIN, flag, value])
    assert_refused(result, flag, "got 0")
    assert not (run_cli.work / "out").exists()


# ---------------------------------------------------------------------------------------------- defaults


def parsed(*argv: str):
    from lamda_peft.cli import build_parser
    from lamda_peft.cli.train_args import check_args

    args = build_parser().parse_args(["train", *argv])
    check_args(args)
    return args


def test_options_left_out_get_their_defaults_and_given_ones_are_kept(tmp_path, monkeypatch):
    from lamda_peft.cli.training import epochs, eval_every, total_steps

    monkeypatch.chdir(tmp_path)  # the default output folder (runs/) is checked here
    args = parsed()
    assert (args.lr, args.lora_alpha, args.epochs, args.max_steps) == (1e-3, 16.0, None, None)
    assert epochs(args) == 1 and total_steps(100, args) == 7  # ceil(100 / 16) batches, one epoch
    assert eval_every(args, 7) == 2
    assert parsed("--method", "full").lr == 5e-5
    assert parsed("--r", "4").lora_alpha == 8.0
    given = parsed("--lr", "2e-4", "--lora-alpha", "4", "--epochs", "0.5", "--eval-steps", "3")
    assert (given.lr, given.lora_alpha, given.epochs) == (2e-4, 4.0, 0.5)
    assert total_steps(100, given) == 4 and eval_every(given, 4) == 3
    steps = SimpleNamespace(batch_size=16, epochs=None, max_steps=5, eval_steps=0)
    assert total_steps(1000, steps) == 5 and eval_every(steps, 5) == 2  # 0: only the final evaluation (no eval set)
    assert not (tmp_path / "runs").exists()


def test_lamda_defaults_to_the_gradient_init_with_b_over_70_percent(tmp_path, monkeypatch):
    """The command line's LaMDA is the benchmark's best setting (docs/results/glue.md): the gradient init with B's
    freezing window at 0.7; ``--init spectral`` is the paper's method with its 0.3; a given ratio is kept."""
    monkeypatch.chdir(tmp_path)
    for method in ("lamda", "lamda++"):
        args = parsed("--method", method)
        assert (args.init, args.freeze_ratio) == ("gradient", 0.7)
        assert (parsed("--method", method, "--init", "spectral").freeze_ratio) == 0.3
    assert parsed("--init", "activations").freeze_ratio == 0.3
    assert parsed("--init", "spectral", "--freeze-ratio", "0.5").freeze_ratio == 0.5
    assert parsed("--freeze-ratio", "0.2").init == "gradient"
    for method in ("lora", "lora-fa", "full"):  # the other methods get neither (and refuse both: above)
        args = parsed("--method", method)
        assert (args.init, args.freeze_ratio) == (None, None)


def test_a_run_recorded_under_the_old_defaults_resumes_with_init_spectral():
    """Before session 12 a LaMDA run's config left out the init and freeze ratio of then (spectral, 0.3): it is the
    same run as today's ``--init spectral``, and a different one from today's defaults (gradient, 0.7)."""
    from lamda_peft.cli.checkpoints import differing_options

    old = {"method": "lamda", "freeze_ratio": None, "lr": 1e-3}
    assert differing_options(old, {"method": "lamda", "init": "spectral", "freeze_ratio": 0.3, "lr": 1e-3}) == []
    assert differing_options(old, {"method": "lamda", "init": "gradient", "freeze_ratio": 0.7, "lr": 1e-3}) == [
        "freeze_ratio", "init"]
    old_gradient = {"method": "lamda++", "init": "gradient", "freeze_ratio": None}  # then: B over 0.3
    assert differing_options(old_gradient, {"method": "lamda++", "init": "gradient", "freeze_ratio": 0.3}) == []
    lora = {"method": "lora", "freeze_ratio": None}
    assert differing_options(lora, dict(lora)) == []


def test_eval_keeps_a_given_value_over_the_runs():
    from lamda_peft.cli.eval import _given

    assert _given(None, 128) == 128 and _given(64, 128) == 64 and _given(0, 128) == 0


# ---------------------------------------------------------------------------------------------- the real command


def real_command(argv: list[str], cwd: Path, console_script: bool = False) -> tuple[Result, float]:
    command = ([str(Path(sys.executable).parent / "lamda-peft")] if console_script
               else [sys.executable, "-m", "lamda_peft.cli"])
    started = time.monotonic()
    proc = subprocess.run([*command, *argv], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return Result(proc.returncode, proc.stdout, proc.stderr), time.monotonic() - started


def assert_refused_by_real_command(result: Result, flag: str, fragment: str) -> None:
    """As ``assert_refused``, but imports may print warnings first (bitsandbytes does, from ``import peft``): the
    command's own output is its last line, and the only ``lamda-peft:`` line."""
    assert result.code == 2 and "Traceback" not in result.stderr, result
    ours = [line for line in result.stderr.splitlines() if line.startswith("lamda-peft:")]
    assert ours == [result.stderr.splitlines()[-1]] and ours[0].startswith(f"lamda-peft: error: {flag}"), result
    assert fragment in ours[0]


def test_real_command_refuses_a_bad_value_before_loading(tmp_path):
    result, seconds = real_command([*TRAIN, "--lr", "nan"], tmp_path)
    assert_refused_by_real_command(result, "--lr", "got nan")
    assert list(tmp_path.iterdir()) == []
    print(f"python -m lamda_peft.cli train --lr nan: exit 2 after {seconds:.1f} s")


def test_real_console_script_eval_refuses_a_bad_value(tmp_path):
    result, seconds = real_command([*EVAL, "--batch-size", "0"], tmp_path, console_script=True)
    assert_refused_by_real_command(result, "--batch-size", "got 0")
    assert list(tmp_path.iterdir()) == []
    print(f"lamda-peft eval --batch-size 0: exit 2 after {seconds:.1f} s")
