"""Verifiers: one module per ProRL domain, each a thin adapter over a maintained library.

- :mod:`.math` — math-verify; :mod:`.stem` — multiple choice letters, numbers via math-verify;
- :mod:`.code` — the model's program against unit tests, run only in :mod:`.sandbox`;
- :mod:`.logic` — reasoning-gym's own ``score_answer``; :mod:`.instruction` — IFEval checkers
  from if-verifiable;
- :mod:`.pool` — runs them in worker processes with per-sample timeouts (the batch API).
"""
