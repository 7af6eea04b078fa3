"""Ahead-of-time compile for TPU slices (bird_jax.compile) and the analytic FLOP count (bird_jax.flops).

The TPU compiles run on this CPU machine through libtpu (the [tpu] extra); JAX_PLATFORMS=cpu (conftest) keeps
the tests' own arrays on CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from bird_jax import sharding as shd
from bird_jax.compile import collective_bytes, compile_step, parse_slice, slice_devices
from bird_jax.flops import peak_flops, train_step_flops
from bird_jax.model import QwenVLConfig
from bird_jax.train_step import abstract_batch, build_train_step

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("libtpu", reason="the [tpu] extra (libtpu) is installed in CI: pip install -e '.[tpu]'")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def small_config(**train):
  from configs import _base

  c = _base.get_config()
  c.model = _base.model_config(QwenVLConfig.tiny(
    hidden_size=256, num_heads=4, head_dim=64, intermediate_size=1024, vocab_size=2048, vision_width=128,
    vision_heads=2, image_size=112, n_queries=16, resampler_heads=2, dtype="bfloat16"))
  c.data.seq_len = 256
  c.data.packing = False
  c.train.update({"batch_size": 8, "grad_accum": 1, **train})
  return c


def test_slice_names_map_to_libtpu_topologies():
  s = parse_slice("v4-16")
  assert (s.topology, s.chip_config, s.devices) == ("v4:2x2x2", "megacore", 8)
  assert (parse_slice("v4-128").topology, parse_slice("v4-128").devices) == ("v4:4x4x4", 64)
  assert (parse_slice("v5p-8").topology, parse_slice("v5p-8").devices) == ("v5:2x2x1", 4)
  assert (parse_slice("v5e-16").topology, parse_slice("v5e-16").chip_config, parse_slice("v5e-16").devices) == (
    "v5e:4x4", "default", 16)
  assert parse_slice("v5e-256").topology == "v5e:16x16"
  one_chip = parse_slice("v5p-2")  # smaller than a host: libtpu needs the host's bounds
  assert (one_chip.topology, one_chip.devices, one_chip.host_bounds) == ("v5:1x1x1", 1, (1, 1, 1))
  assert len(slice_devices(one_chip)) == 1
  for bad in ("v4-12", "v4-3", "v5e-12", "tpu", "v3-8"):
    with pytest.raises(ValueError, match="topology"):
      parse_slice(bad)


def test_a_small_step_compiles_for_a_v5e_slice_with_memory_flops_and_collectives():
  report = compile_step(small_config(grad_accum=2), parse_slice("v5e-4"), "small")
  assert report["device_kind"].startswith("TPU v5")
  assert report["devices"] == 4 and report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert 0 < report["params_bytes"] < report["total_bytes"] < report["hbm_bytes"]
  assert report["temp_bytes"] > 0 and report["xla_flops"] > 0 and report["analytic_flops_per_device"] > 0
  # FSDP: weights are all-gathered for the forward, gradients reduced over the batch shards.
  assert report["collectives"]["all-gather"]["count"] > 0
  assert report["collectives"]["all-gather"]["bytes"] > 0
  assert not report["warnings"]


def test_an_indivisible_micro_batch_warns_and_an_indivisible_batch_is_refused():
  report = compile_step(small_config(batch_size=8, grad_accum=4), parse_slice("v5e-4"), "small")
  assert any("do not divide" in w for w in report["warnings"]), report["warnings"]
  with pytest.raises(ValueError, match="must divide by the 4 batch shards"):
    compile_step(small_config(batch_size=6, grad_accum=3), parse_slice("v5e-4"), "small")


def test_collective_bytes_reads_sync_and_async_ops():
  hlo = """
  %ag = bf16[8,128]{1,0} all-gather(bf16[2,128]{1,0} %p), dimensions={0}
  %ags = (f32[4]{0}, f32[16]{0}) all-gather-start(f32[4]{0} %q), dimensions={0}
  %agd = f32[16]{0} all-gather-done((f32[4]{0}, f32[16]{0}) %ags)
  %ar = f32[10,10]{1,0} all-reduce(f32[10,10]{1,0} %r), to_apply=%add
  """
  out = collective_bytes(hlo)
  assert out["all-gather"] == {"count": 2, "bytes": 8 * 128 * 2 + 16 * 4}
  assert out["all-reduce"] == {"count": 1, "bytes": 400}
  assert out["reduce-scatter"]["count"] == 0


@pytest.mark.parametrize("train_vit", [False, True])
def test_analytic_flops_match_xla_on_an_unrolled_step(train_vit):
  """No loops (layers unrolled, no accumulation, whole-row loss) so XLA's count covers the whole step; full
  attention squares (the XLA path computes them)."""
  c = small_config(train_vit=train_vit, loss_chunk=0)
  c.model.dtype = "float32"
  cfg = QwenVLConfig(**c.model.to_dict())
  mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
  parts = build_train_step(c, cfg, mesh)
  state = shd.abstract_with_shardings(parts.abstract_state, parts.state_shardings)
  with jax.set_mesh(mesh):
    xla = parts.step.lower(state, abstract_batch(c, cfg, mesh)).compile().cost_analysis()["flops"]
  analytic = train_step_flops(cfg, batch=8, seq_len=256, images_per_row=1, train_vit=train_vit, causal_half=False)
  assert abs(analytic.total / xla - 1) < 0.10, (analytic, xla)


def test_peak_table():
  assert peak_flops("TPU v4") == 275e12 and peak_flops("TPU v5 lite") == 197e12 and peak_flops("TPU v5") == 459e12
  assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("cpu") is None


def test_the_seven_b_count_is_the_published_scale():
  """6 x 7.7B trained decoder params x tokens dominates; the frozen ViT adds its forward only."""
  cfg = QwenVLConfig.qwen_vl_chat_7b()
  f = train_step_flops(cfg, batch=1, seq_len=2048, images_per_row=7)
  decoder_params = cfg.num_layers * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 4096 * 151936
  assert f.llm == pytest.approx(6 * 2048 * decoder_params + 3 * 2 * 2048**2 * 4096 * 32)
  trunk = 48 * (4 * 1664**2 + 2 * 1664 * 8192) + 14 * 14 * 3 * 1664  # 1.84B: the ViT forward of 7 images only
  assert f.vit == pytest.approx(7 * (2 * 1024 * trunk + 4 * 1024**2 * 1664 * 48))
  assert train_step_flops(cfg, batch=1, seq_len=2048, images_per_row=7, train_vit=True).vit == pytest.approx(3 * f.vit)


def run_cli(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "bird_jax.compile", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)


def test_cli_refuses_a_batch_that_does_not_fit_in_one_line(tmp_path):
  r = run_cli("--config=cpu_demo", "--topology=v5e-4", "--config.train.batch_size=4096",
              "--config.data.seq_len=4096", "--config.train.grad_accum=1", "--config.model.remat_policy=none")
  assert r.returncode == 1, r.stdout + r.stderr
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error: cpu_demo does not fit v5e-4") and "Traceback" not in r.stderr, r.stderr


def test_cli_reports_and_writes_json(tmp_path):
  out = tmp_path / "r.json"
  r = run_cli("--config=cpu_demo", "--topology=v5e-8", f"--json={out}")
  assert r.returncode == 0, r.stderr
  assert "headroom" in r.stdout and "FLOPs per device" in r.stdout
  report = json.loads(out.read_text())
  assert report["devices"] == 8 and report["slice"] == "v5e-8" and 0 < report["headroom"] < 1


def test_cli_bad_input_is_one_line():
  r = run_cli("--config=cpu_demo", "--topology=v4-12")
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --topology=v4-12")
  r = run_cli("--config=cpu_demo")  # cpu_demo names no slice
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
    "error: config cpu_demo names no slice; pass --topology=v4-16 (or v5e-16, v5p-8, ...)")
  r = run_cli("--config=tpu_v4", "--min_headroom=ten")
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
    "error: --min_headroom=ten: use a fraction, e.g. 0.1 for 10 %")
  assert "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tpu_v4", "tpu_v5e", "tpu_v5p", "tpu_v5p_lora"])
def test_the_real_9_6b_step_fits_its_slice_with_headroom(name, tmp_path):
  """The configs' promise: BiRD's recipe on the 9.6B model compiles for the slice in the config's docstring
  with >= 10 % HBM headroom (about a minute or two per compile). LoRA: on one chip, its optimizer state that of
  the adapters and the resampler only (218M params x 8 bytes), its base weights bf16."""
  out = tmp_path / "r.json"
  r = run_cli(f"--config={name}", "--min_headroom=0.10", f"--json={out}")
  assert r.returncode == 0, r.stdout + r.stderr[-2000:]
  report = json.loads(out.read_text())
  assert report["batch"] == 256 and report["seq_len"] == 2048 and report["headroom"] >= 0.10
  if name.endswith("_lora"):
    assert report["devices"] == 1 and report["opt_state_bytes"] < 2 * 2**30 and report["params_bytes"] < 20 * 2**30
