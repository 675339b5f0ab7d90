"""Models (herl/models/): `herl init-model` builds a loadable model with a chat template;
processes that need the tiny model at once share one build."""

from __future__ import annotations

import subprocess
import sys

import pytest

from herl.models.tokenizer import load_tokenizer
from tests.helpers import ROOT


def test_init_model_builds_a_loadable_model(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from herl.commands.cli import main

    assert main(["init-model", str(tmp_path / "m")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.config.num_hidden_layers == 2
    text, ids = __import__("herl.generation.engines", fromlist=["render_chat"]).render_chat(
        load_tokenizer(tmp_path / "m"), [{"role": "user", "content": "hi"}])
    assert text.endswith("<|im_start|>assistant\n") and len(ids) > 3


def test_processes_needing_the_tiny_model_at_once_share_one_build(tmp_path):
    """Parallel runs on a fresh machine: the first use of builtin:tiny builds it once, and
    every process sees the same folder (its fingerprint is recorded by the stages)."""
    import os

    code = ("from herl.models.paths import resolve_model_path; from herl.runs.rundir import fingerprint; "
            "print(fingerprint(resolve_model_path('builtin:tiny')))")
    env = {**os.environ, "HERL_HOME": str(tmp_path / "home")}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    prints = {out.strip() for out, _ in outs}
    after = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300).stdout.strip()
    assert prints == {after}


def test_a_hub_id_resolves_through_the_hugging_face_cache_offline(tmp_path, monkeypatch):
    """model.path = "OWNER/NAME", as a TRL user writes it: found in the Hugging Face cache
    laid out as huggingface_hub lays it out (models--OWNER--NAME/refs/main ->
    snapshots/<commit>/), with no network; not cached: one line naming the id and the
    command that fetches it."""
    from herl.models.paths import hub_id, model_location, resolve_model_path
    from herl.models.tiny import build_tiny_model
    from schemas.errors import MissingError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--SomeOrg--tiny-policy"
    build_tiny_model(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert hub_id("SomeOrg/tiny-policy") == ("SomeOrg/tiny-policy", None)
    assert hub_id("builtin:tiny") is None and hub_id("./SomeOrg/x") is None
    found = resolve_model_path("SomeOrg/tiny-policy")
    assert found == (repo / "snapshots" / commit).resolve() or found == repo / "snapshots" / commit
    assert (found / "config.json").exists() and model_location("SomeOrg/tiny-policy") == found
    with pytest.raises(MissingError, match=r"'SomeOrg/not-cached'.*Hugging Face cache.*herl init-model SomeOrg/not-cached"):
        resolve_model_path("SomeOrg/not-cached")
