"""The Jinja templates of stages/templates/, loaded once each."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import jinja2

TEMPLATES = Path(__file__).resolve().parent.parent / "stages" / "templates"


@lru_cache(maxsize=None)
def template(name: str) -> jinja2.Template:
    """stages/templates/<name>, with block trimming and errors on undefined variables."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    return env.from_string((TEMPLATES / name).read_text())
