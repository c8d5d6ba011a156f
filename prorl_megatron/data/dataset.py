"""Prompt datasets from local jsonl/parquet files (Hugging Face ``datasets``), and the mixture.

:func:`load_rows` reads files (never the hub), validates every row against
:mod:`prorl_megatron.data.schema`, and either stops at the first bad row with its file, row
number and field, or — with ``on_bad_row="skip"`` — skips it, counting and logging each.
:class:`PromptMixture` draws prompts from the domains by the recipe's weights, in a
deterministic shuffled order, and resumes exactly from :meth:`PromptMixture.state_dict`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from prorl_megatron.data.schema import DOMAINS, BadRow, PromptRow, parse_row

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data file that cannot be used; the message names the file (and row and field)."""


@dataclass
class LoadReport:
    rows: list[PromptRow]
    skipped: list[str] = field(default_factory=list)  # "file:row: problem", one per skipped row


def _check_json_lines(path: Path) -> None:
    """Name the line of a jsonl syntax error (Arrow's reader only says the file is bad)."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    json.loads(line)
                except ValueError as e:
                    raise DataError(f"{path}:{number}: not valid JSON ({e})") from None


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of one local jsonl or parquet file, read with Hugging Face ``datasets``."""
    import datasets

    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        _check_json_lines(path)
        builder = "json"
    elif suffix == ".parquet":
        builder = "parquet"
    else:
        raise DataError(f"{path}: unsupported data file type {suffix!r} (use .jsonl or .parquet)")
    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # Arrow schema conflicts, unreadable parquet, ...
        raise DataError(f"{path}: cannot be read as {builder}: {type(e).__name__}: {e}") from None
    return table.to_list()


def load_rows(files: list[str], on_bad_row: str = "error") -> LoadReport:
    """Every valid row of ``files`` (in file order). Rows are numbered from 1 (jsonl: the Nth record)."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row: expected 'error' or 'skip', got {on_bad_row!r}")
    report = LoadReport(rows=[])
    for name in files:
        path = Path(name)
        for number, raw in enumerate(read_records(path), start=1):
            where = f"{path}: row {number}"
            try:
                report.rows.append(parse_row(raw, source=where))
            except BadRow as e:
                if on_bad_row == "error":
                    raise DataError(f"{where}: {e}") from None
                report.skipped.append(f"{where}: {e}")
                log.warning("skipped bad row %s: %s", where, e)
    if report.skipped:
        log.warning("skipped %d bad rows of %d (data.on_bad_row=skip)", len(report.skipped),
                    len(report.skipped) + len(report.rows))
    return report


class PromptMixture:
    """An endless, deterministic stream of prompts mixed over domains.

    Each draw picks a domain with probability proportional to its weight (default: its
    number of rows), then that domain's next row in an order reshuffled every epoch from
    ``(seed, domain, epoch)``.
    """

    def __init__(self, rows: list[PromptRow], weights: Optional[dict[str, float]] = None, seed: int = 0) -> None:
        self.by_domain = {d: [r for r in rows if r.domain == d] for d in DOMAINS}
        self.by_domain = {d: rs for d, rs in self.by_domain.items() if rs}
        if not self.by_domain:
            raise DataError("no prompts to draw from")
        self.domains = sorted(self.by_domain)
        self.set_weights(weights)
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._cursor = {d: (0, 0) for d in self.domains}  # (epoch, index)
        self._orders: dict[tuple[str, int], np.ndarray] = {}
        self.drawn = 0

    def set_weights(self, weights: Optional[dict[str, float]]) -> None:
        """Draw domains by ``weights`` from now on (None or empty: by row counts); the position in
        every domain's order and the draw RNG are kept (a stage change mid-run)."""
        weights = dict(weights or {})
        missing = [d for d, w in weights.items() if w > 0 and d not in self.by_domain]
        if missing:
            raise DataError(f"data.domain_weights gives weight to {missing}, which have no rows")
        raw = [weights.get(d, 0.0) if weights else float(len(self.by_domain[d])) for d in self.domains]
        total = sum(raw)
        if total <= 0:
            raise DataError("data.domain_weights leave no domain with rows a positive weight")
        self.probabilities = np.array(raw) / total

    def _order(self, domain: str, epoch: int) -> np.ndarray:
        key = (domain, epoch)
        if key not in self._orders:
            rng = np.random.default_rng([self.seed, DOMAINS.index(domain), epoch])
            self._orders = {k: v for k, v in self._orders.items() if k[0] != domain}  # keep one per domain
            self._orders[key] = rng.permutation(len(self.by_domain[domain]))
        return self._orders[key]

    def next(self, n: int) -> list[PromptRow]:
        """The next ``n`` prompts."""
        out = []
        for domain_index in self._rng.choice(len(self.domains), size=n, p=self.probabilities):
            domain = self.domains[domain_index]
            epoch, index = self._cursor[domain]
            out.append(self.by_domain[domain][int(self._order(domain, epoch)[index])])
            index += 1
            self._cursor[domain] = (epoch + 1, 0) if index == len(self.by_domain[domain]) else (epoch, index)
        self.drawn += n
        return out

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position: the RNG state, each domain's (epoch, index), prompts drawn."""
        return {"rng": self._rng.bit_generator.state, "cursor": {d: list(c) for d, c in self._cursor.items()},
                "drawn": self.drawn, "seed": self.seed, "domains": self.domains,
                "sizes": {d: len(rs) for d, rs in self.by_domain.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sizes = {d: len(rs) for d, rs in self.by_domain.items()}
        if state["seed"] != self.seed or state["domains"] != self.domains or state["sizes"] != sizes:
            raise DataError(f"data position is for another dataset (seed {state['seed']}, domains "
                            f"{state['sizes']}); this one has seed {self.seed}, domains {sizes}")
        self._rng.bit_generator.state = state["rng"]
        self._cursor = {d: (int(e), int(i)) for d, (e, i) in state["cursor"].items()}
        self.drawn = int(state["drawn"])
