"""`python -m lafid.cli` (and `accelerate launch -m lafid.cli`): the `lafid` command."""

from lafid.cli import app

app()
