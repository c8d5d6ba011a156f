from pathlib import Path

import pytest

from prorl_megatron import selfcheck

TINY = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu.yaml")


@pytest.mark.parametrize("advantage", ["grpo", "rloo", "reinforce_pp_baseline"])
def test_selfcheck_learns_and_resets(advantage, capsys):
    code = selfcheck.main(["--recipe", TINY, f"algo.advantage={advantage}"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[ok] pass@1 at least doubled" in out
    assert "reset: every 30 steps" in out and "resets: 2" in out


def test_selfcheck_fails_when_nothing_is_learned(capsys):
    # one step cannot double pass@1: the check must say so and exit 1
    code = selfcheck.main(["--recipe", TINY, "train.steps=1", "reset.every_n_steps=null"])
    out = capsys.readouterr().out
    assert code == 1 and "[FAILED] pass@1 at least doubled" in out
