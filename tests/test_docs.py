"""The reference docs are generated from the code; they must not drift from it."""

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lafid.cli import app

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command, doc", [("stages", "docs/recipes.md"), ("schema", "docs/schema.md")])
def test_reference_docs_match_the_code(command, doc):
    generated = CliRunner().invoke(app, [command]).output
    text = (ROOT / doc).read_text()
    assert generated.strip() in text, f"{doc} is stale: regenerate with `lafid {command}`"


def test_readme_names_the_ci_test_command():
    """The command CI runs is the one the README's quick start gives, and it runs the whole suite."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    readme_commands = {line.split("#")[0].strip() for block in blocks for line in block.splitlines()}
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))]
    assert ci and all(command in readme_commands for command in ci), (ci, readme_commands)
    make = (ROOT / "Makefile").read_text()
    for command in ci:
        if command.startswith("make "):
            target = command.split()[1]
            recipe = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", make, flags=re.M)
            assert recipe, f"Makefile has no target {target}"
            body = recipe.group(1)
            assert "pytest" in body, body
            args = body.split("pytest", 1)[1].split()
            assert "-k" not in args and "-m" not in args and not any(a.startswith("tests/") for a in args)  # all tests
