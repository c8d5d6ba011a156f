"""Model-written code runs only in the sandbox: right programs pass, hostile ones score 0 and harm nothing."""

import os
import resource
import time

import pytest

from prorl_megatron.rewards.code import extract_program, score_code
from prorl_megatron.rewards.sandbox import Limits, Sandbox, SandboxUnavailable
from prorl_megatron.rewards.text import VerifyContext
from tests import procs

LIMITS = Limits(cpu_s=2, wall_s=3, memory_mib=256, max_processes=32, max_file_mib=4)
UID = 61990


@pytest.fixture(scope="module", autouse=True)
def safety_cap():
    """A cap far above LIMITS on the sandbox uid's tasks, should the sandbox's own bound fail:
    RLIMIT_NPROC set in each run's first process before it leaves root (root is exempt)."""
    set_limits = Sandbox._set_limits

    def capped(self, *args):
        resource.setrlimit(resource.RLIMIT_NPROC, (1024, 1024))
        set_limits(self, *args)

    with pytest.MonkeyPatch.context() as mp:
        if os.geteuid() == 0:
            mp.setattr(Sandbox, "_set_limits", capped)
        yield


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(LIMITS, uid=UID)


def fenced(code: str) -> str:
    return f"Here is my solution:\n```python\n{code}\n```\n"


def sandbox_processes() -> int:
    out = procs.run(["ps", "-o", "pid=,stat=", "-u", str(UID)], timeout=60).stdout
    return sum(1 for line in out.splitlines() if line.split()[1:] and not line.split()[1].startswith("Z"))


STDIO = {"style": "stdio", "tests": [{"input": "3 4\n", "output": "7\n"}, {"input": "10 -2", "output": "8"}]}


def test_correct_and_wrong_programs(sandbox):
    ctx = VerifyContext(sandbox=sandbox)
    good = score_code(fenced("a, b = map(int, input().split())\nprint(a + b)"), STDIO, ctx)
    assert good.reward == 1.0 and good.info["pass_fraction"] == 1.0 and good.info["sandboxed"]
    half = score_code(fenced("a, b = map(int, input().split())\nprint(a + b if a < 5 else 0)"), STDIO, ctx)
    assert half.reward == 0.0 and half.info["pass_fraction"] == 0.5
    assert score_code("no code at all", STDIO, ctx).info["reason"].startswith("no ```python code block")
    fn = {"style": "function", "fn_name": "pair", "tests": [{"input": [2, 3], "output": [3, 2]},
                                                           {"input": [[1], "x"], "output": ["x", [1]]}]}
    assert score_code(fenced("def pair(a, b):\n    return (b, a)"), fn, ctx).reward == 1.0
    assert score_code(fenced("def pair(a, b):\n    return [a, b]"), fn, ctx).reward == 0.0
    assert extract_program("```py\nx=1\n```\ntext\n```python\ny=2\n```") == "y=2\n"


@pytest.fixture
def host(tmp_path):
    """Files on the host that hostile programs go after."""
    (tmp_path / "keep.txt").write_text("precious")
    (tmp_path / "secret.txt").write_text("TOP-SECRET-TOKEN-4242")
    os.chmod(tmp_path, 0o755)
    os.chmod(tmp_path / "secret.txt", 0o644)  # readable by anyone on the host: only isolation protects it
    return tmp_path


def hostile_programs(host):
    return {
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "infinite loop": "while True:\n    pass",
        "memory hog": "x = []\nwhile True:\n    x.append(bytearray(50 * 2**20))",
        "network": "import socket\ns = socket.create_connection(('1.1.1.1', 53), timeout=2)\nprint('connected')",
        "local network": "import socket\ns = socket.create_connection(('127.0.0.1', 22), timeout=2)\nprint('connected')",
        "delete host file": f"import os\nos.remove({str(host / 'keep.txt')!r})\nprint(7)",
        "write host file": f"open({str(host / 'planted.txt')!r}, 'w').write('x')\nopen('/tmp/prorl-escape', 'w')"
                           "\nprint(7)",
        "read secret": f"print(open({str(host / 'secret.txt')!r}).read())",
        "read project": "print(open('/work/main/README.md').read()[:50])",
        "kill parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(1, signal.SIGKILL)\nprint(7)",
        "kill everything": "import os, signal\nos.kill(-1, signal.SIGKILL)\nprint(7)",
        "huge output": "import sys\nwhile True:\n    sys.stdout.write('y' * 65536)",
        "huge file": "f = open('/tmp/big', 'wb')\nwhile True:\n    f.write(b'z' * 2**20)",
        "sleep forever": "import time\ntime.sleep(3600)",
        "background child": "import os, time\nif os.fork() == 0:\n    time.sleep(3600)\nprint(7)",
    }


def test_hostile_code_scores_zero_within_limits_and_leaves_the_host_untouched(sandbox, host):
    ctx = VerifyContext(sandbox=sandbox)
    truth = {"style": "stdio", "tests": [{"input": "", "output": "42"}]}  # no hostile program prints 42
    me = os.getpid()
    for name, code in hostile_programs(host).items():
        start = time.monotonic()
        score = score_code(fenced(code), truth, ctx)
        elapsed = time.monotonic() - start
        assert score.reward == 0.0, (name, score)
        assert elapsed < LIMITS.wall_s + 6, (name, elapsed)
        assert (host / "keep.txt").read_text() == "precious", name
        assert not (host / "planted.txt").exists() and not os.path.exists("/tmp/prorl-escape"), name
        assert "TOP-SECRET" not in str(score.info), name
        assert sandbox_processes() == 0, name
        os.kill(me, 0)  # still alive


def test_attacks_fail_inside_the_sandbox(sandbox, host):
    """What each attack gets: errors, not effects (the program reports it on stdout)."""
    probes = {
        f"open({str(host / 'secret.txt')!r})": "FileNotFoundError",
        f"__import__('os').remove({str(host / 'keep.txt')!r})": "FileNotFoundError",
        "open('/usr/prorl-escape', 'w')": "OSError",  # read-only system files
        "__import__('socket').create_connection(('1.1.1.1', 53), timeout=2)": "OSError",
        "__import__('os').kill(1, 9) or __import__('os').kill(1, 0) or 'init survives'": "init survives",
    }
    for expr, expected in probes.items():
        code = f"try:\n    print(repr({expr}))\nexcept Exception as e:\n    print(type(e).__mro__)"
        result = sandbox.run(code)
        assert expected in result.stdout, (expr, result.stdout, result.stderr)


def test_missing_isolation_is_refused_unless_allowed(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no bwrap on PATH
    with pytest.raises(SandboxUnavailable, match="bwrap not found.*rewards.allow_unsandboxed=true"):
        Sandbox(LIMITS, uid=UID)
    unsafe = Sandbox(LIMITS, allow_unsandboxed=True, uid=UID)
    assert not unsafe.isolated
    result = unsafe.run("print(6 * 7)")
    assert result.stdout.strip() == "42"
    assert unsafe.run("while True: pass").timed_out or unsafe.run("while True: pass").returncode != 0
