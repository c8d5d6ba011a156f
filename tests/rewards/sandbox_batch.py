"""Runs hostile programs and correct neighbours concurrently in one Sandbox, prints JSON.

Started by test_sandbox_bounds.py as its own process (as root, or as an unprivileged uid with
the system Python), inside an outer bound that the test measures; uses only the standard
library and the sandbox modules. ``argv[1]``: JSON ``{"limits": {...}, "uid": int, "phase":
"tasks"|"memory"|"isolation", "secret": path, "planted": path}``.
"""

import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from prorl_megatron.rewards.code import score_code
from prorl_megatron.rewards.sandbox import Limits, Sandbox
from prorl_megatron.rewards.text import VerifyContext

HOSTILE = {
    "tasks": {
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        # small stacks, so that the task limit is what stops it and not the address space
        "thread bomb": "import threading, time\nthreading.stack_size(256 * 1024)\nn, told = 0, False\n"
                       "while True:\n    try:\n        threading.Thread(target=time.sleep, args=(3600,)).start()\n"
                       "        n += 1\n    except RuntimeError:\n        if not told:\n"
                       "            print('threads', n, flush=True)\n            told = True",
        "tmp filler": "import itertools\nwritten = 0\ntry:\n    for i in itertools.count():\n"
                      "        with open(f'/tmp/fill{i}', 'wb') as f:\n            for _ in range(2):\n"
                      "                f.write(bytes(2**20))\n                f.flush()\n"
                      "                written += 2**20\nexcept OSError as e:\n"
                      "    print('tmp', written, e.errno, flush=True)",
    },
    "memory": {  # 16 processes of 48 MiB each, every one of them within its own RLIMIT_AS
        "memory hog": "import os, time\nfor _ in range(15):\n    if os.fork() == 0:\n        break\n"
                      "x = b'x' * (48 << 20)\ntime.sleep(3600)",
    },
}
# what the same uid could do on the host, were it not for the namespaces (paths from the test)
ISOLATION = {
    "kill everything": "import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept ProcessLookupError:\n"
                       "    pass  # nothing it may signal\nprint('alive')",
    "kill parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(1, signal.SIGKILL)\n"
                   "print('alive')",
    "read secret": "print(open({secret!r}).read())",
    "write host file": "open({planted!r}, 'w').write('x')",
    "network": "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=2)\nprint('connected')",
}
GOOD = "a, b = map(int, input().split())\nprint(a + b)"
TRUTH = {"style": "stdio", "tests": [{"input": "3 4\n", "output": "7\n"}, {"input": "10 -2", "output": "8"}]}
NEIGHBOURS = 3


def main() -> None:
    config = json.loads(sys.argv[1])
    sandbox = Sandbox(Limits(**config["limits"]), uid=config.get("uid", 65534))
    if config["phase"] == "isolation":
        hostile = {name: code.format(**config) for name, code in ISOLATION.items()}
    else:
        hostile = HOSTILE[config["phase"]]
    running = threading.Event()
    done = threading.Event()

    def attack(name: str) -> dict:
        running.set()
        start = time.monotonic()
        result = sandbox.run(hostile[name])
        return {"stdout": result.stdout[-2000:], "stderr": result.stderr[-500:], "returncode": result.returncode,
                "timed_out": result.timed_out, "memory_exceeded": result.memory_exceeded,
                "wall_s": time.monotonic() - start}

    def neighbour(_: int) -> dict:
        running.wait()
        if config["phase"] == "tasks":
            time.sleep(0.5)  # score while the bombs are at their limits (the hog is stopped within ~0.2 s)
        rewards, reasons = [], []
        while not done.is_set() or not rewards:
            score = score_code(f"```python\n{GOOD}\n```", TRUTH, VerifyContext(sandbox=sandbox))
            rewards.append(score.reward)
            reasons.append(score.info.get("reason", ""))
        return {"rewards": rewards, "reasons": [r for r in reasons if r][:3]}

    with ThreadPoolExecutor(len(hostile) + NEIGHBOURS) as pool:
        attacks = {name: pool.submit(attack, name) for name in hostile}
        neighbours = [pool.submit(neighbour, i) for i in range(NEIGHBOURS)]
        results = {name: f.result() for name, f in attacks.items()}
        done.set()
        results["neighbours"] = [f.result() for f in neighbours]
    results["guarantees"] = {g.name: [g.status, g.how] for g in sandbox.guarantees}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
