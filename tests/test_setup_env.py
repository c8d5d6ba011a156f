"""The README commands' system-package check (scripts/system_packages.sh, run first by
scripts/setup_env.sh), on a PATH we build: real shell tools, stubs for what the check looks for,
and whatever a test hides left out."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests import procs

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ["bash", "sh", "env", "mktemp", "rm", "cat", "dirname"]  # what the scripts themselves run
STUBS = ["gcc", "bwrap", "ps", "munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo"]
IS_ROOT = os.geteuid() == 0


def stub(path: Path, body: str = "exit 0") -> None:
    path.unlink(missing_ok=True)  # never write through a symlink to a real tool
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


@pytest.fixture
def bin_dir():
    """A world-readable directory (the unprivileged run must reach it) of tools and stubs, with
    python3 the interpreter running these tests and a copy of the script."""
    d = Path(tempfile.mkdtemp(prefix="prorl-setup-"))
    d.chmod(0o755)
    for tool in TOOLS:
        (d / tool).symlink_to(shutil.which(tool))
    for name in STUBS:
        stub(d / name)
    (d / "python3").symlink_to(sys.executable)
    shutil.copy(ROOT / "scripts" / "system_packages.sh", d / "system_packages.sh")
    yield d
    shutil.rmtree(d)


def check(bin_dir: Path, needs: str, *, user: bool = False, **env: str) -> subprocess.CompletedProcess:
    """Run the check for ``needs`` with only ``bin_dir`` on PATH; ``user``: as nobody."""
    prefix = [shutil.which("setpriv"), "--reuid=65534", "--regid=65534", "--clear-groups"] if user and IS_ROOT else []
    return procs.run([*prefix, shutil.which("bash"), str(bin_dir / "system_packages.sh"), needs], timeout=60,
                     env={"PATH": str(bin_dir), "HOME": str(bin_dir), **env}, cwd=bin_dir)


def test_everything_present_passes_silently(bin_dir):
    for needs in ("demo", "test"):
        out = check(bin_dir, needs, PRORL_REQUIRE_SLURM="1")
        assert (out.returncode, out.stdout, out.stderr) == (0, "", ""), needs


def test_missing_bwrap_without_root_names_the_one_command(bin_dir):
    (bin_dir / "bwrap").unlink()
    stub(bin_dir / "apt-get", "echo apt-get must not run >&2; exit 9")
    stub(bin_dir / "python3")  # the real interpreter may live where nobody cannot read it
    out = check(bin_dir, "test", user=True)
    assert out.returncode == 1, out.stderr
    assert "the tests need system packages that are not installed: bubblewrap" in out.stderr
    assert out.stderr.splitlines()[-1].strip() == "sudo apt-get install -y bubblewrap"
    assert "must not run" not in out.stderr and out.stdout == ""


def test_installation_can_be_turned_off_as_root(bin_dir):
    (bin_dir / "bwrap").unlink()
    (bin_dir / "ps").unlink()
    stub(bin_dir / "apt-get", "exit 9")
    out = check(bin_dir, "test", PRORL_NO_SYSTEM_INSTALL="1")
    assert out.returncode == 1
    want = "apt-get install -y bubblewrap procps" if IS_ROOT else "sudo apt-get install -y bubblewrap procps"
    assert out.stderr.splitlines()[-1].strip() == want


@pytest.mark.skipif(not IS_ROOT, reason="installs only as root (or with passwordless sudo)")
def test_root_installs_what_is_missing_with_apt_get(bin_dir):
    (bin_dir / "bwrap").unlink()
    calls = bin_dir / "apt-calls"
    # a stand-in apt-get: records its arguments and "installs" bwrap on `install ... bubblewrap`
    stub(bin_dir / "apt-get", f'echo "$DEBIAN_FRONTEND $*" >> {calls}\n'
                              f'case "$*" in *"install"*bubblewrap*) printf "#!/bin/sh\\n" > {bin_dir}/bwrap; '
                              f'{shutil.which("chmod")} +x {bin_dir}/bwrap;; esac')
    out = check(bin_dir, "test")
    assert out.returncode == 0, out.stderr
    assert "installing system packages: bubblewrap (apt-get; the tests need them)" in out.stdout
    update, install = calls.read_text().splitlines()
    assert update.split()[-2:] == ["update", "-qq"]
    assert install.startswith("noninteractive ") and install.split()[-1] == "bubblewrap"


@pytest.mark.skipif(not IS_ROOT, reason="installs only as root (or with passwordless sudo)")
def test_apt_get_that_installs_nothing_fails(bin_dir):
    (bin_dir / "bwrap").unlink()
    stub(bin_dir / "apt-get")
    out = check(bin_dir, "test")
    assert out.returncode == 1 and "still missing after apt-get install bubblewrap: bwrap" in out.stderr


def test_without_apt_get_names_the_missing_programs(bin_dir):
    (bin_dir / "bwrap").unlink()
    out = check(bin_dir, "test")
    assert out.returncode == 1
    assert "the tests need these, which are missing: bwrap." in out.stderr
    assert "system's package manager (Debian: bubblewrap)" in out.stderr


def test_demo_needs_no_sandbox(bin_dir):
    for name in ("bwrap", "ps", "munged"):
        (bin_dir / name).unlink()
    out = check(bin_dir, "demo", PRORL_NO_SYSTEM_INSTALL="1")
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")


def test_python_that_cannot_make_a_venv(bin_dir):
    stub(bin_dir / "python3", "exit 1")  # e.g. Debian's python3 without python3-venv (no ensurepip)
    stub(bin_dir / "apt-get")
    out = check(bin_dir, "demo", PRORL_NO_SYSTEM_INSTALL="1")
    assert out.returncode == 1 and out.stderr.splitlines()[-1].endswith("apt-get install -y python3-venv python3-dev")


def test_slurm_only_when_required(bin_dir):
    (bin_dir / "munged").unlink()
    (bin_dir / "sinfo").unlink()
    stub(bin_dir / "apt-get")
    assert check(bin_dir, "test", PRORL_NO_SYSTEM_INSTALL="1").returncode == 0
    out = check(bin_dir, "test", PRORL_NO_SYSTEM_INSTALL="1", PRORL_REQUIRE_SLURM="1")
    assert out.returncode == 1 and out.stderr.splitlines()[-1].endswith("apt-get install -y munge slurm-wlm")


def test_readme_command_stops_before_making_the_venv(bin_dir, tmp_path):
    (bin_dir / "bwrap").unlink()
    stub(bin_dir / "apt-get")
    venv = tmp_path / "venv"
    out = procs.run([shutil.which("bash"), str(ROOT / "scripts" / "test.sh"), "--co"], timeout=60,
                    env={"PATH": str(bin_dir), "HOME": str(tmp_path), "PRORL_VENV": str(venv),
                         "PRORL_NO_SYSTEM_INSTALL": "1"})
    assert out.returncode == 1 and "bubblewrap" in out.stderr.splitlines()[-1]
    assert not venv.exists() and "creating virtual environment" not in out.stdout
