"""Train/test split by case (patient / volume), never by slice: neighbouring slices are near-duplicates.

Stratified by modality so every modality present gets test cases (the evaluation averages per modality).
Deterministic: depends only on the set of (case_id, modality) pairs and the seed, not on input order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def _key(seed: int, case_id: str) -> bytes:
  return hashlib.sha256(f"{seed}\x00{case_id}".encode()).digest()


def split_cases(cases: Iterable[tuple[str, str]], test_fraction: float,
                seed: int) -> tuple[set[str], set[str]]:
  """cases: (case_id, modality) pairs (duplicates fine) -> (train case ids, test case ids).

  Per modality with n cases, round(test_fraction * n) go to test, at least 1 when n >= 2 and
  test_fraction > 0, and at least one case always stays in train.
  """
  if not 0.0 <= test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
  by_mod: dict[str, set[str]] = {}
  case_mod: dict[str, str] = {}
  for case_id, modality in cases:
    if case_mod.setdefault(case_id, modality) != modality:
      raise ValueError(f"case {case_id!r} appears with modalities {case_mod[case_id]!r} and {modality!r}; "
                       "case ids must be unique per modality (prefix them with the modality)")
    by_mod.setdefault(modality, set()).add(case_id)
  train: set[str] = set()
  test: set[str] = set()
  for modality in sorted(by_mod):
    # Order by a seeded hash: a stable shuffle that needs no global RNG state.
    ids = sorted(by_mod[modality], key=lambda c: _key(seed, c))
    n = len(ids)
    k = round(test_fraction * n)
    if test_fraction > 0 and n >= 2:
      k = max(k, 1)
    k = min(k, n - 1) if n >= 1 else 0
    test.update(ids[:k])
    train.update(ids[k:])
  return train, test
