"""The pre-commit hook, run by the real pre-commit tool in a temporary git repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLES = REPO_ROOT / "samples"


def _git(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}  # fmt: skip
    return subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture(scope="module")
def hook_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout's hook definition and package, committed to a throwaway repository (so that
    the test runs on the working tree, committed or not)."""
    repo = tmp_path_factory.mktemp("hook-repo")
    for name in ("pyproject.toml", "README.md", ".pre-commit-hooks.yaml"):
        shutil.copy2(REPO_ROOT / name, repo / name)
    shutil.copytree(
        REPO_ROOT / "biasinspect", repo / "biasinspect", ignore=shutil.ignore_patterns("__pycache__")
    )
    assert _git(repo, "init", "-q").returncode == 0
    assert _git(repo, "add", "-A").returncode == 0
    assert _git(repo, "commit", "-qm", "hook").returncode == 0
    return repo


def test_commit_of_an_untied_model_is_blocked_and_a_clean_one_passes(hook_repo, tmp_path):
    rev = _git(hook_repo, "rev-parse", "HEAD").stdout.strip()
    project = tmp_path / "project"
    project.mkdir()
    assert _git(project, "init", "-q").returncode == 0
    (project / ".pre-commit-config.yaml").write_text(
        f"repos:\n- repo: {hook_repo}\n  rev: {rev}\n  hooks:\n  - id: biasinspect\n    args: [--fail-on, untied]\n"
    )
    env = {**os.environ, "PRE_COMMIT_HOME": str(tmp_path / "cache")}
    pre_commit = [sys.executable, "-m", "pre_commit"]
    installed = subprocess.run(
        [*pre_commit, "install"], cwd=project, env=env, capture_output=True, text=True, timeout=300
    )
    assert installed.returncode == 0, installed.stderr

    shutil.copy2(SAMPLES / "seed_tied.onnx", project / "clean.onnx")
    _git(project, "add", ".pre-commit-config.yaml", "clean.onnx")
    clean = subprocess.run(
        ["git", "commit", "-m", "clean model"], cwd=project, env={**env, "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"},
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert clean.returncode == 0, clean.stdout + clean.stderr
    output = clean.stdout + clean.stderr  # git prints the hook's lines on stderr
    assert "biasinspect (conv bias audit)" in output and "Passed" in output

    shutil.copy2(SAMPLES / "seed_untied.onnx", project / "untied.onnx")
    _git(project, "add", "untied.onnx")
    blocked = subprocess.run(
        ["git", "commit", "-m", "untied model"], cwd=project, env={**env, "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"},
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert blocked.returncode == 1
    output = blocked.stdout + blocked.stderr
    assert "Failed" in output
    assert "biasinspect: policy: untied.onnx: 1 untied layer(s) (--fail-on untied): /conv/Conv" in output
    assert _git(project, "log", "--format=%s").stdout.split("\n")[0] == "clean model"
