"""Planted-bug check: each core numerical test must be able to fail.

For every bug below, the bug is patched into the real code in-process (monkeypatch), the existing test(s) that
guard against it are called directly, and each must raise AssertionError; `test_guards_pass_without_the_bugs`
then runs every guard once unpatched. A planted bug that edits source text asserts that the text is still there,
so a refactor that moves it fails loudly here instead of silently planting nothing. Compiled JAX programs are
cleared around every planted run, so no program traced with a bug leaks into a later test.

Rerun: `pytest -q tests/test_planted_bugs.py`; the table of bugs and guards is in docs/testing.md.
"""

from __future__ import annotations
import __future__

import inspect
import textwrap
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_grain_pipeline
import test_metrics
import test_tokenizer
import test_train

from bird_jax import metrics, tokenizer, train_step
from bird_jax.data import pipeline
from bird_jax.model import QwenVLConfig, qwen

# Module-scoped fixtures of the guarded test modules, requested lazily (only by the bugs whose guards need them).
env = test_grain_pipeline.env
demo = test_tokenizer.demo


# ------------------------------------------------------------------------------- a guard this check added

def test_packed_segment_equals_the_segment_alone():
  """A packed row's second segment gives the same logits as that segment alone in its own row (positions
  restarting from 0, padding after it): attention never crosses a segment boundary."""
  cfg = QwenVLConfig.tiny(attention_impl="xla", initializer_range=0.3)
  rng = np.random.default_rng(0)
  n1, n2, length = 7, 9, 16
  first, second = rng.integers(0, 400, n1), rng.integers(0, 400, n2)
  ids = np.zeros((2, length), np.int32)
  seg = np.zeros((2, length), np.int32)
  pos = np.zeros((2, length), np.int32)
  ids[0, :n1], ids[0, n1:n1 + n2] = first, second  # row 0: [first | second]
  seg[0, :n1], seg[0, n1:n1 + n2] = 1, 2
  pos[0, :n1], pos[0, n1:n1 + n2] = np.arange(n1), np.arange(n2)
  ids[1, :n2], seg[1, :n2], pos[1, :n2] = second, 1, np.arange(n2)  # row 1: [second | padding]
  model = qwen.QwenLM(cfg)
  params = jax.jit(lambda k: nn.unbox(model.init(k, jnp.asarray(ids[:1]))["params"]))(jax.random.key(0))
  logits = np.asarray(jax.jit(lambda p, i, s, q: model.apply({"params": p}, i, segment_ids=s, positions=q))(
    params, jnp.asarray(ids), jnp.asarray(seg), jnp.asarray(pos)))
  assert np.abs(logits[1, :n2]).max() > 1.0  # not a degenerate model
  np.testing.assert_allclose(logits[0, n1:n1 + n2], logits[1, :n2], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ guards

GUARDS: dict[str, Callable[[Callable[[str], object]], None]] = {
  "test_train::test_gradient_accumulation_matches_the_big_batch":
    lambda fx: test_train.test_gradient_accumulation_matches_the_big_batch(),
  "test_train::test_frozen_towers_do_not_move_and_get_no_gradient":
    lambda fx: test_train.test_frozen_towers_do_not_move_and_get_no_gradient(),
  "test_train::test_chunked_loss_equals_the_full_logits_loss":
    lambda fx: test_train.test_chunked_loss_equals_the_full_logits_loss(),
  "test_planted_bugs::test_packed_segment_equals_the_segment_alone":
    lambda fx: test_packed_segment_equals_the_segment_alone(),
  "test_metrics::test_parse_boxes_tags_fallback_and_errors":
    lambda fx: test_metrics.test_parse_boxes_tags_fallback_and_errors(),
  "test_metrics::test_vg_strict_threshold_exactly_half_is_a_miss":
    lambda fx: test_metrics.test_vg_strict_threshold_exactly_half_is_a_miss(),
  "test_metrics::test_vg_matches_official_algorithm_on_random_samples":
    lambda fx: test_metrics.test_vg_matches_official_algorithm_on_random_samples(),
  "test_metrics::test_modality_mapping_and_means":
    lambda fx: test_metrics.test_modality_mapping_and_means(),
  "test_grain_pipeline::test_batch_fields_masks_and_images":
    lambda fx: test_grain_pipeline.test_batch_fields_masks_and_images(fx("env")),
  "test_grain_pipeline::test_packing_with_official_mask_never_crosses_segments":
    lambda fx: test_grain_pipeline.test_packing_with_official_mask_never_crosses_segments(fx("env")),
  "test_tokenizer::test_round_trip_and_chatml_assistant_mask[demo]":
    lambda fx: test_tokenizer.test_round_trip_and_chatml_assistant_mask("demo", None, fx("demo")),
}


# -------------------------------------------------------------------------------------------------- bugs

def _edit_source(monkeypatch, module, name: str, old: str, new: str) -> None:
  """Replace `module.name` (a function) by a copy whose source has `old` replaced by `new`, compiled in the
  module's namespace. `old` must occur exactly once, so the planted bug stays the one described."""
  fn = getattr(module, name)
  src = textwrap.dedent(inspect.getsource(fn))
  assert src.count(old) == 1, f"{module.__name__}.{name} no longer contains {old!r} once: update this bug"
  code = compile(src.replace(old, new), inspect.getsourcefile(fn), "exec",
                 flags=__future__.annotations.compiler_flag, dont_inherit=True)
  scope: dict = {}
  exec(code, vars(module), scope)  # noqa: S102 -- a test-only copy of the project's own function
  monkeypatch.setattr(module, name, scope[name])


def _loss_halved(mp):
  orig = train_step.chunked_token_nll
  mp.setattr(train_step, "chunked_token_nll", lambda *a, **k: 0.5 * orig(*a, **k))


def _loss_mask_ignored(mp):
  orig = train_step.chunked_token_nll
  mp.setattr(train_step, "chunked_token_nll",
             lambda hidden, head, labels, weights, chunk: orig(hidden, head, labels, jnp.ones_like(weights), chunk))


def _segments_ignored(mp):
  orig = qwen.causal_segment_mask
  mp.setattr(qwen, "causal_segment_mask", lambda segment_ids, batch, length: orig(None, batch, length))


def _segments_merged(mp):  # padding still masked, but packed records attend to each other
  _edit_source(mp, qwen, "causal_segment_mask", "return causal & same & (segment_ids[:, None, :] != 0)",
               "return causal & (segment_ids[:, None, :] != 0)")


def _accumulated_gradient_scaled(mp):  # the example: the accumulated gradient times 1/4
  _edit_source(mp, train_step, "make_train_step", "(g / denom).astype(p.dtype)",
               "(g / denom * (0.25 if grad_accum > 1 else 1.0)).astype(p.dtype)")
  mp.setattr(test_train, "make_train_step", train_step.make_train_step)


def _frozen_tower_trained(mp):  # the trainable mask lost: the frozen ViT trunk is updated
  mp.setattr(train_step, "trainable_of", lambda tc, params: jax.tree.map(lambda _: True, params))
  mp.setattr(test_train, "trainable_of", train_step.trainable_of)


def _box_xy_swapped(mp):
  orig = metrics._parse_box_string

  def swapped(s):
    b = orig(s)
    return None if b is None else (b[1], b[0], b[3], b[2])

  mp.setattr(metrics, "_parse_box_string", swapped)


def _iou_threshold_ge(mp):
  _edit_source(mp, metrics, "vg_sample", "if v > 0.5)", "if v >= 0.5)")


def _recall_over_predictions(mp):
  _edit_source(mp, metrics, "vg_recall", 'per[modality]["n"] += len(d["ref_boxes"])',
               'per[modality]["n"] += len(d["pred_boxes"])')


def _label_mask_not_shifted(mp):  # the loss mask marks the input token instead of the label: off by one
  _edit_source(mp, pipeline, "build_row", "np.concatenate([targets[1:] * same, np.zeros(1, np.float32)])",
               "np.concatenate([targets[:-1] * same, np.zeros(1, np.float32)])")


def _answer_mask_off_by_one(mp):  # chatml target mask starts one token early (the last header token)
  _edit_source(mp, tokenizer, "_role_block", "mask = [0] * len(head) + [c] * len(body) + [c] + [0] * len(nl)",
               "mask = [0] * (len(head) - 1) + [c] * (len(body) + 1) + [c] + [0] * len(nl)")


BUGS: dict[str, tuple[Callable, list[str]]] = {
  "loss_sum_halved": (_loss_halved, ["test_train::test_chunked_loss_equals_the_full_logits_loss"]),
  "loss_mask_ignored_in_chunked_loss": (
    _loss_mask_ignored, ["test_train::test_chunked_loss_equals_the_full_logits_loss"]),
  "segment_ids_ignored_in_the_model": (
    _segments_ignored, ["test_planted_bugs::test_packed_segment_equals_the_segment_alone"]),
  "packed_segments_attend_to_each_other": (
    _segments_merged, ["test_planted_bugs::test_packed_segment_equals_the_segment_alone"]),
  "accumulated_gradient_scaled": (_accumulated_gradient_scaled, [
    "test_train::test_gradient_accumulation_matches_the_big_batch"]),
  "frozen_tower_updated": (_frozen_tower_trained, ["test_train::test_frozen_towers_do_not_move_and_get_no_gradient"]),
  "box_x_y_swapped": (_box_xy_swapped, ["test_metrics::test_parse_boxes_tags_fallback_and_errors"]),
  "iou_threshold_ge_instead_of_gt": (_iou_threshold_ge, [
    "test_metrics::test_vg_strict_threshold_exactly_half_is_a_miss",
    "test_metrics::test_vg_matches_official_algorithm_on_random_samples"]),
  # (test_vg_multiple_references_duplicates_and_any_match has 7 reference and 7 predicted boxes: blind to it)
  "recall_over_predicted_boxes": (_recall_over_predictions, [
    "test_metrics::test_modality_mapping_and_means",
    "test_metrics::test_vg_matches_official_algorithm_on_random_samples"]),
  "pipeline_loss_mask_off_by_one": (_label_mask_not_shifted, [
    "test_grain_pipeline::test_batch_fields_masks_and_images",
    "test_grain_pipeline::test_packing_with_official_mask_never_crosses_segments"]),
  "chatml_answer_mask_off_by_one": (_answer_mask_off_by_one, [
    "test_tokenizer::test_round_trip_and_chatml_assistant_mask[demo]"]),
}


@pytest.fixture
def planted(monkeypatch):
  """monkeypatch with JAX's compiled programs cleared before and after, so nothing traced with a bug is reused."""
  jax.clear_caches()
  yield monkeypatch
  monkeypatch.undo()
  jax.clear_caches()


@pytest.mark.parametrize("bug", list(BUGS))
def test_planted_bug_turns_its_guards_red(bug, planted, request):
  plant, guards = BUGS[bug]
  plant(planted)
  for name in guards:
    with pytest.raises(AssertionError):
      GUARDS[name](request.getfixturevalue)


def test_guards_pass_without_the_bugs(request):
  used = {name for _, guards in BUGS.values() for name in guards}
  assert used <= set(GUARDS)
  # Guards defined in this file also run as ordinary tests above; the others are called here, once, except the
  # train-step tests (the slowest, 15-25 s each), which tests/test_train.py runs clean in the same suite.
  for name in sorted(used):
    if not name.startswith("test_planted_bugs::") and not name.startswith("test_train::"):
      GUARDS[name](request.getfixturevalue)
