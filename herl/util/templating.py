"""Jinja templates: those of herl/templates/ (loaded once each) and users' own files."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import jinja2

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


@cache
def template(name: str) -> jinja2.Template:
    """herl/templates/<name>, with block trimming and errors on undefined variables."""
    return template_file(TEMPLATES / name)


def template_file(path: Path) -> jinja2.Template:
    """A Jinja template file, with block trimming and errors on undefined variables."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    try:
        return env.from_string(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"cannot read template {path}: {exc}") from None
