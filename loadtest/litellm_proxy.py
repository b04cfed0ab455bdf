"""The LiteLLM proxy as a peer: a pinned release in a virtualenv of its own, never a project dependency.

``ensure_venv`` creates ``~/.cache/stopgate/litellm-<version>`` once (``python -m venv`` and
``pip install 'litellm[proxy]==<version>'`` through the machine's ordinary pip configuration) and
marks it complete only when the install succeeded, so an interrupted install is redone.
``config`` is a proxy config whose ``model_list`` sends the benchmark's model to the upstream as
an OpenAI-compatible provider; ``command`` starts the proxy with one worker on loopback.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

VERSION = "1.108.7"
CACHE = Path.home() / ".cache" / "stopgate"


def venv_dir(version: str = VERSION) -> Path:
    return CACHE / f"litellm-{version}"


def ensure_venv(version: str = VERSION, log: Path | None = None) -> Path:
    """The virtualenv's python, installing the pinned proxy first if needed (a few minutes, once)."""
    root = venv_dir(version)
    python, done = root / "bin" / "python", root / ".stopgate-complete"
    if done.exists() and python.exists():
        return python
    if root.exists():
        shutil.rmtree(root)  # an install that did not finish
    root.parent.mkdir(parents=True, exist_ok=True)
    log = log or root.parent / f"litellm-{version}-install.log"
    print(f"peer: installing litellm[proxy]=={version} into {root} (once; log {log})", file=sys.stderr)
    with open(log, "wb") as out:
        # The base interpreter, not the project's virtualenv: nothing of the project's packages leaks in.
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(root)], check=True, stdout=out, stderr=subprocess.STDOUT)
        pip = [str(python), "-m", "pip", "install", "--quiet", f"litellm[proxy]=={version}"]
        result = subprocess.run(pip, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"installing litellm[proxy]=={version} failed (exit {result.returncode}); see {log}")
    done.write_text(version + "\n")
    return python


def config(upstream: str, model: str, path: Path) -> Path:
    """Write a proxy config (JSON is YAML) that serves ``model`` from ``upstream`` (an OpenAI-compatible base)."""
    body = {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {"model": f"openai/{model}", "api_base": f"{upstream}/v1", "api_key": "none"},
            }
        ],
        "litellm_settings": {"drop_params": True},
        # No master key, as stopgate runs with --auth off; since 1.108 the proxy refuses to start without one
        # unless told this. No database and no callbacks: otherwise as shipped.
        "general_settings": {"dangerously_permit_weak_or_unset_master_key": True},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path


def command(python: Path, config_path: Path, port: int) -> list[str]:
    return [
        str(python), "-m", "litellm.proxy.proxy_cli", "--config", str(config_path),
        "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1",
    ]  # fmt: skip
