"""lafid: curate pose-annotated, identity-stable face clips and train CoFE on them."""

__version__ = "0.1.0"
