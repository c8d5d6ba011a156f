"""Logic: Reasoning Gym puzzles (verifier: each puzzle's own ``score_answer``), generated and seeded.

Two ways to give the benchmark:

- generated here, from a spec file (``.yaml``/``.yml``): ``seed`` (int) and ``datasets`` (reasoning-gym
  dataset name -> number of puzzles), e.g. ``{seed: 0, datasets: {knights_knaves: 50, maze: 50}}``:
  the puzzles of :func:`prorl_megatron.data.sources.generate_reasoning_gym` (``reasoning_gym.create_dataset``
  per name, seeds ``seed``, ``seed + 1``, ... in name order; procedural, nothing is downloaded);
- a file of generated entries (jsonl/json/parquet), as ``reasoning_gym.create_dataset`` yields them:
  ``question``, ``answer``, ``metadata`` (with ``source_dataset``).

Converted by the training converter (:func:`prorl_megatron.data.sources.from_reasoning_gym`), whose
prompt asks for the answer inside ``<answer></answer>`` (the project's template).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prorl_megatron.benchmarks.records import LoadOptions
from prorl_megatron.data import sources
from prorl_megatron.data.dataset import DataError
from prorl_megatron.data.schema import PromptRow

SPEC_TYPES = (".yaml", ".yml")


def generate_from_spec(path: Path) -> list[dict[str, Any]]:
    """The entries a spec file describes (see the module docstring); :class:`DataError` naming the field."""
    import yaml

    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"{path}: cannot be read as a Reasoning Gym spec: {e}") from None
    if not isinstance(spec, dict) or set(spec) - {"seed", "datasets"}:
        raise DataError(f"{path}: a spec is a mapping with the keys seed and datasets")
    seed, names = spec.get("seed", 0), spec.get("datasets")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"{path}: field 'seed': an integer is required, got {seed!r}")
    if not isinstance(names, dict) or not names or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in names.values()):
        raise DataError(f"{path}: field 'datasets': a mapping of reasoning-gym dataset names to positive counts "
                        "is required")
    try:
        return list(sources.generate_reasoning_gym({str(k): v for k, v in names.items()}, seed))
    except Exception as e:  # an unknown dataset name, reasoning-gym's own configuration errors
        raise DataError(f"{path}: field 'datasets': reasoning-gym cannot generate it: {type(e).__name__}: {e}"
                        ) from None


def convert_entry(record: dict, index: int, options: LoadOptions) -> PromptRow:
    row = sources.from_reasoning_gym(record, index)
    if not options.instructions:
        row.prompt = str(record["question"])
    return row
