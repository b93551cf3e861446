"""Every console command is argument parsing and calls into the library, and is installed."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib


ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
COMMANDS = PYPROJECT["project"]["scripts"]
# Non-blank lines of a command's file, its argparse declarations included.
MOST_LINES = 150


def command_files() -> dict[str, Path]:
    """Each console command's file in the checkout, through pyproject's package-dir mapping."""
    package_dir = PYPROJECT["tool"]["setuptools"]["package-dir"]
    files = {}
    for command, target in COMMANDS.items():
        module = target.split(":")[0]
        package, _, name = module.rpartition(".")
        files[command] = ROOT / package_dir[package] / f"{name}.py"
    return files


def test_every_command_file_is_parsing_and_calls():
    files = command_files()
    assert set(files) == {"elbogap-fit", "elbogap-evaluate", "elbogap-report", "elbogap-compare",
                          "elbogap-kl-directions", "elbogap-calibrate"}
    shared = files["elbogap-fit"].parent / "command_line.py"
    for command, path in {**files, "(shared)": shared}.items():
        source = path.read_text()
        lines = [line for line in source.splitlines() if line.strip()]
        assert len(lines) <= MOST_LINES, f"{command}: {path.name} has {len(lines)} lines"
        assert "sys.path" not in source, command
        tree = ast.parse(source)
        # Only functions and constants: no classes of its own besides argparse's two (help
        # format, one-line errors), no estimator, no torch work.
        assert not [n for n in tree.body if isinstance(n, ast.ClassDef)
                    and n.name not in ("HelpFormatter", "CommandParser")], command
        imported = {n.module.split(".")[0] for n in ast.walk(tree)
                    if isinstance(n, ast.ImportFrom) and n.module}
        assert imported <= {"__future__", "argparse", "collections", "dataclasses", "elbogap",
                            "pathlib", "sys", "traceback", "pyro", "os", "typing"}, (command, imported)


def test_console_commands_are_installed():
    for command in COMMANDS:
        path = shutil.which(command) or str(Path(sys.executable).parent / command)
        result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "usage: " + command in result.stdout, result.stderr


def test_the_benchmark_is_not_a_command_and_not_in_the_package():
    assert not (ROOT / "scripts" / "benchmark.py").exists()
    assert (ROOT / "benchmarks" / "benchmark.py").is_file()
    assert not any("benchmark" in target for target in COMMANDS.values())
