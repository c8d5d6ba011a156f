"""The cluster files hang together: shell syntax, and what the Slurm script and image must do."""

import re
from pathlib import Path

from tests import procs

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = (ROOT / "slurm" / "prorl_1p5b.sh").read_text()


def test_shell_scripts_parse():
    for path in ["slurm/prorl_1p5b.sh", "scripts/install.sh", "scripts/setup_env.sh", "scripts/demo.sh",
                 "scripts/test.sh", ".ci/run"]:
        out = procs.run(["bash", "-n", str(ROOT / path)], timeout=300)
        assert out.returncode == 0, f"{path}: {out.stderr}"


def test_sbatch_script_defaults_to_the_paper_layout_and_survives_time_limits():
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", SCRIPT, re.M))
    assert directives["nodes"] == "4" and directives["ntasks-per-node"] == "8" and directives["gpus-per-node"] == "8"
    assert "exclusive" in directives and "requeue" in directives and directives["time"]
    assert re.fullmatch(r"(B:)?USR1@\d+", directives["signal"])
    assert "SLURM_SUBMIT_DIR" in SCRIPT and "$0" not in SCRIPT  # Slurm runs a spooled copy
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in SCRIPT and "scontrol requeue" in SCRIPT
    assert "--container-image" in SCRIPT and "--container-mounts" in SCRIPT


def test_image_is_built_by_the_install_script_ci_runs():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:", dockerfile, re.M)
    assert "bash scripts/install.sh gpu" in dockerfile
    assert "scripts/install.sh\" cpu" in (ROOT / "scripts" / "setup_env.sh").read_text()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "runs", ".git"} <= set(ignored)
    out = procs.run(["bash", str(ROOT / "scripts" / "install.sh"), "sideways"], timeout=300)
    assert out.returncode == 2 and "usage" in out.stderr
