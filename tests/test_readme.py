"""The README's claims that a test can check: what its commands write is ignored by git, and its
planner figures come out of the commands printed beside them."""
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _output_dirs() -> list[str]:
    """The folders the README's commands write into when run from the checkout's root."""
    from train.config import Config
    from train.evaluate.__main__ import parser as evaluate_parser

    found = re.findall(r"--out(?:-dir)?[ =]([\w./-]+)", README)
    dirs = {Config().out_dir, evaluate_parser().get_default("out"), *found}
    return sorted(d for d in dirs if not d.isupper())  # DIR, CHECKOUT: placeholders


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
@pytest.mark.parametrize("folder", _output_dirs())
def test_outputs_are_ignored(folder):
    probe = str(Path(folder) / "file")
    proc = subprocess.run(["git", "check-ignore", "-q", "--no-index", probe], cwd=ROOT)
    assert proc.returncode == 0, f"{folder}: written by a README command, not in .gitignore"


PLANNER = README[README.index("## Cluster planner"):README.index("## Benchmarks")]


def _commands(text: str, prefix: str) -> list[str]:
    """The commands of ``text``'s fenced code blocks that start with ``prefix``: continuation lines
    joined, comments dropped."""
    commands = []
    for block in re.findall(r"```\w*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if line.startswith(prefix):
                commands.append(line)
    return commands


def _plan(command: str, capsys) -> str:
    from train.plan.cli import main

    argv = shlex.split(command)
    assert main(argv[3:]) == 0, command
    return capsys.readouterr().out


def test_planner_table_is_what_validate_prints(capsys):
    """Each row's published and predicted tokens/s and its error are one row of `--validate`, and
    the summary row's range is that of the Table 1 rows."""
    assert "python -m train.plan --validate" in _commands(PLANNER, "python -m train.plan")
    lines = _plan("python -m train.plan --validate", capsys).splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in PLANNER.splitlines() if line.startswith("|")]
    checked = 0
    for cells in rows:
        if len(cells) == 5 and re.fullmatch(r"[\d,]+", cells[3]):
            published, predicted, error = cells[2], cells[3], cells[4]
            assert any({published, predicted, error} <= set(line.split()) for line in lines), cells
            checked += 1
    assert checked >= 5
    table1 = [float(line.split()[-4].rstrip("%")) for line in lines if "(Table 1)" in line]
    summary = next(c for c in rows if "Table 1" in c[0])[4]
    assert summary == f"{min(table1):+.1f}% to {max(table1):+.1f}%", (summary, table1)


def test_planner_single_runs_print_the_readme_figure(capsys):
    """The single-run commands beside the table print the tokens/s that the table gives their row
    (the Meditron row needs --no-distributed-optimizer --eager-kernels, issue 21)."""
    commands = [c for c in _commands(PLANNER, "python -m train.plan") if "--validate" not in c]
    assert commands, "no single-run command beside the planner table"
    for command in commands:
        out = _plan(command, capsys)
        tokens = re.search(r"^tokens/s ([\d,]+) ", out, re.M).group(1)
        assert f"| {tokens} |" in PLANNER, (command, tokens)


def test_ci_runs_the_readme_test_command():
    """.ci/run runs the suite exactly as the README tells a user to."""
    command = _commands(README, "python -m pytest")[0]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci, (command, [line for line in ci if "pytest" in line])
