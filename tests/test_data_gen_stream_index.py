"""The streaming reader of SA-Med2D's SAMed2D_v1.json (data_gen/sources/_json_stream.py)."""

from __future__ import annotations

import json
import re
import tracemalloc
from pathlib import Path

import pytest

from data_gen.sources._json_stream import JsonStreamError, iter_json_object

CASES = {
  "empty": "{}",
  "empty_ws": " \n\t{ \r\n }\n\n",
  "release": json.dumps({f"images/ct_00--AbdomenCT1K--Case_{i:05d}--x_{i:04d}.png":
                         [f"masks/ct_00--AbdomenCT1K--Case_{i:05d}--x_{i:04d}--{c:04d}_000.png" for c in range(i % 4)]
                         for i in range(40)}),
  "pretty": json.dumps({"images/a.png": ["masks/a--0000_000.png", "masks/a--0001_000.png"], "images/b.png": []},
                       indent=4),
  "unicode": json.dumps({"images/ß–é—漢字😀.png": ["masks/ünï—😀--0000_000.png"], "ключ": "значение"},
                        ensure_ascii=False),
  "unicode_escaped": json.dumps({"images/ß–é—漢字😀.png": ["masks/ünï—😀--0000_000.png"], "k\u0000ey": "\u2028"}),
  "escapes": r'{"a\"b\\c": ["q\"uo\"te", "back\\slash\\", "\/\b\f\n\r\t", "\ud83d\ude00\u00e9"], "\"": "\\"}',
  "nested": json.dumps({"a": [[1, [2, [3, {"x": [None, True, False]}]]], {"b": {"c": []}}],
                        "b": {"deep": {"deeper": [{"k": "v"}] * 3}}, "c": [], "d": {}}),
  "scalars": '{"int": 1234567890123456789012, "neg": -0.5e-10, "f": 3.25, "t": true, "n": null, "z": 0, '
             '"big": 12345678901234567890.125E+3, "nan": NaN, "inf": -Infinity, "s": ""}',
  "numbers_at_end": '{"a":1234567890,"b":9876543210}',
  "compact_ws": '{"a":["x","y"],"b"  :  [ "z" ] ,"c":"w"  }',
  "long_value": json.dumps({"k": ["x" * 5000] * 20, "m": "y" * 33333}),
  "long_key": json.dumps({"k" * 10000: 1, "j": 2}),
}


def _write(tmp_path: Path, text: str, name: str = "index.json", *, encoding: str = "utf-8") -> Path:
  p = tmp_path / name
  p.write_bytes(text.encode(encoding))
  return p


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 20])
@pytest.mark.parametrize("name", sorted(CASES))
def test_same_items_as_json_load(tmp_path, name, chunk):
  p = _write(tmp_path, CASES[name])
  with open(p, encoding="utf-8") as f:
    want = list(json.load(f).items())
  got = list(iter_json_object(p, chunk_size=chunk))
  assert len(got) == len(want)
  for (gk, gv), (wk, wv) in zip(got, want, strict=True):
    assert gk == wk
    if isinstance(wv, float) and wv != wv:  # NaN
      assert gv != gv
    else:
      assert gv == wv and type(gv) is type(wv)


def test_every_chunk_size_on_a_mixed_index(tmp_path):
  text = json.dumps({"é\"😀": ["a\\b", 12, [1.5, {"x": "ü"}]], "n": 123456789, "s": "x" * 40}, ensure_ascii=False)
  p = _write(tmp_path, text)
  want = list(json.loads(text).items())
  for chunk in range(1, len(text.encode()) + 2):
    assert list(iter_json_object(p, chunk_size=chunk)) == want, chunk


def test_utf8_bom_is_allowed(tmp_path):
  p = tmp_path / "bom.json"
  p.write_bytes(b"\xef\xbb\xbf" + b'{"a": ["b"]}')
  assert list(iter_json_object(p, chunk_size=2)) == [("a", ["b"])]
  p.write_bytes(b"\xef\xbb\xbf" + b'{"a": ["b"}')
  with pytest.raises(JsonStreamError, match=r"at byte 13$"):  # offsets count the BOM: they are file offsets
    list(iter_json_object(p, chunk_size=2))


def _err(p: Path, chunk: int) -> tuple[str, list]:
  got = []
  with pytest.raises(JsonStreamError) as ei:
    for kv in iter_json_object(p, chunk_size=chunk):
      got.append(kv)
  return str(ei.value), got


BAD = [
  # (text, byte offset of the fault, members yielded before it)
  ("", 0, 0),
  ("   \n", 4, 0),
  ('["a", "b"]', 0, 0),
  ('{"a": ["b", "c"]', 16, 1),  # truncated: no closing brace
  ('{"a": ["b", "c"], "d": ["e"', 27, 1),  # truncated inside a value
  ('{"a": ["b"], "d": ["ef', 19, 1),  # truncated inside a string
  ('{"a": ["b"], "d"', 16, 1),  # truncated after a key
  ('{"a": ["b"], "d":', 17, 1),  # truncated before a value
  ('{"a": ["b"],', 12, 1),
  ('{"a": ["b"] "c": []}', 12, 1),  # missing comma
  ('{"a": ["b"],, "c": []}', 12, 1),
  ('{"a": ["b",], "c": []}', 11, 0),  # trailing comma inside a value
  ('{"a": ["b"], "c": []}}', 21, 2),  # extra data
  ('{"a": ["b"], "c": [] } x', 23, 2),
  ('{"a": ["b"], c: []}', 13, 1),  # unquoted key
  ('{"a" ["b"]}', 5, 0),
  ('{"a": [tru]}', 7, 0),
  ('{"a": ["x\ty"]}', 9, 0),  # raw control character inside a string
  ('{"a": ["\\x"]}', 8, 0),  # bad escape
]


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
@pytest.mark.parametrize("text,offset,n_before", BAD)
def test_malformed_index_one_line_error_with_file_and_byte_offset(tmp_path, text, offset, n_before, chunk):
  p = _write(tmp_path, text, "SAMed2D_v1.json")
  msg, got = _err(p, chunk)
  assert "\n" not in msg
  assert msg.startswith(f"{p}: ")
  assert msg.endswith(f"at byte {offset}"), msg
  assert len(got) == n_before
  try:  # json.load agrees that the file is not one JSON object
    assert not isinstance(json.loads(text), dict)
  except ValueError:
    pass


def test_byte_offset_counts_utf8_bytes_not_characters(tmp_path):
  text = '{"😀é": ["ü"], "b": [1,]}'
  p = _write(tmp_path, text)
  for chunk in (1, 3, 7, 100):
    msg, got = _err(p, chunk)
    assert got == [("😀é", ["ü"])]
    off = int(re.search(r"at byte (\d+)$", msg).group(1))
    assert p.read_bytes()[off:off + 1] == b"]", msg


def test_invalid_utf8_names_the_byte(tmp_path):
  p = tmp_path / "bad.json"
  p.write_bytes(b'{"a": ["b"], "c\xff": []}')
  for chunk in (1, 5, 100):
    msg, got = _err(p, chunk)
    assert msg == f"{p}: invalid UTF-8 (invalid start byte) at byte 15"
  p.write_bytes(b'{"a": ["\xc3')  # cut inside a 2-byte character
  msg, _ = _err(p, 3)
  assert msg.endswith("at byte 8") and "UTF-8" in msg


def test_truncated_real_looking_index(tmp_path):
  index = {f"images/ct_00--D--c{i}--z_{i:04d}.png": [f"masks/ct_00--D--c{i}--z_{i:04d}--0000_000.png"]
           for i in range(1000)}
  data = json.dumps(index).encode()
  cut = len(data) // 2
  p = tmp_path / "SAMed2D_v1.json"
  p.write_bytes(data[:cut])
  msg, got = _err(p, 4096)
  assert str(p) in msg and "\n" not in msg
  off = int(re.search(r"at byte (\d+)$", msg).group(1))
  assert cut - 200 < off <= cut  # at (or at the start of the string cut by) the end of the file
  assert got == list(index.items())[:len(got)] and 450 < len(got) < 550


def _big_index(path: Path, n: int) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write("{")
    for i in range(n):
      stem = f"ct_00--AbdomenCT1K--Case_{i:07d}--z_{i % 1000:04d}"
      masks = [f"masks/{stem}--{c:04d}_000.png" for c in range(1 + i % 6)]
      f.write(("," if i else "") + json.dumps(f"images/{stem}.png") + ":" + json.dumps(masks))
    f.write("}")


def test_large_index_streams_in_bounded_memory(tmp_path):
  n = 200_000
  p = tmp_path / "SAMed2D_v1.json"
  _big_index(p, n)

  tracemalloc.start()
  try:
    tracemalloc.reset_peak()
    count = 0
    masks = 0
    last = None
    for k, v in iter_json_object(p):
      count += 1
      masks += len(v)
      last = k
    stream_peak = tracemalloc.get_traced_memory()[1]

    tracemalloc.reset_peak()
    with open(p, encoding="utf-8") as f:
      data = json.load(f)
    load_peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert count == len(data) == n
  assert masks == sum(len(v) for v in data.values())
  assert last == next(reversed(data))
  del data
  size = p.stat().st_size
  print(f"\nindex {size / 2**20:.1f} MiB, {n} keys: streaming peak {stream_peak / 2**20:.2f} MiB, "
        f"json.load peak {load_peak / 2**20:.1f} MiB (ratio {stream_peak / load_peak:.3f})")
  assert stream_peak < load_peak / 5
  assert stream_peak < 16 * 2**20  # O(chunk), not O(file)


# ---- wired into SamMed2DSource -----------------------------------------------------------------------------
def _tiny_release(tmp_path: Path) -> tuple[Path, dict[str, list[str]]]:
  import numpy as np
  from PIL import Image

  root = tmp_path / "SAMed2Dv1"
  (root / "images").mkdir(parents=True)
  (root / "masks").mkdir()
  rng = np.random.default_rng(0)
  index: dict[str, list[str]] = {}
  for i in range(3):
    stem = f"ct_00--AbdomenCT1K--Case_{i:05d}--z_{i:04d}"
    Image.fromarray(rng.integers(0, 255, (32, 40), dtype=np.uint8)).save(root / "images" / f"{stem}.png")
    m = np.zeros((32, 40), np.uint8)
    m[4:12, 5:20] = 255
    Image.fromarray(m).save(root / "masks" / f"{stem}--0000_000.png")
    index[f"images/{stem}.png"] = [f"masks/{stem}--0000_000.png"]
  index["images/../../etc/ct_00--AbdomenCT1K--Case_9--z_0009.png"] = []  # path traversal: counted
  index["images/ct_00--AbdomenCT1K--Case_00077--z_0077.png"] = ["masks/ct_00--AbdomenCT1K--Case_00077--z_0077"
                                                                 "--0000_000.png"]  # missing files: counted
  (root / "SAMed2D_v1_class_mapping_id.json").write_text(json.dumps({"AbdomenCT1K": {"liver": "0000"}}))
  return root, index


def test_source_streams_the_release_index_once(tmp_path, monkeypatch):
  import data_gen.sources.sam_med2d as sm
  from data_gen.pipeline import generate_dataset

  root, index = _tiny_release(tmp_path)
  (root / "SAMed2D_v1.json").write_text(json.dumps(index, indent=1))
  calls = []
  real = sm.iter_json_object

  def counting(path, **kw):
    calls.append(Path(path).name)
    return real(path, **kw)

  def no_whole_load(*a, **k):
    raise AssertionError("the release index must be streamed, not loaded whole")

  monkeypatch.setattr(sm, "iter_json_object", counting)
  monkeypatch.setattr(sm.json, "load", no_whole_load)
  src = sm.SamMed2DSource(root)
  with pytest.raises(TypeError):
    len(src)  # no second pass to count it: the pipeline's progress bar runs without a total
  assert [s.image_id for s in src] == [Path(k).stem for k in list(index)[:3]]
  assert calls == ["SAMed2D_v1.json"]
  assert src.skips.counts["path traversal"] == 1 and src.skips.counts["missing file"] == 1
  calls.clear()
  m = generate_dataset(src, tmp_path / "out", test_fraction=0.0, write_stats=False, progress=True)
  assert calls == ["SAMed2D_v1.json"]
  assert m["counts"]["images"]["train"] == {"ct": 3}


def test_source_with_truncated_index_raises_naming_file_and_byte(tmp_path):
  from data_gen.sources.sam_med2d import SamMed2DSource

  root, index = _tiny_release(tmp_path)
  data = json.dumps(index).encode()
  cut = data.index(b"images/ct_00--AbdomenCT1K--Case_00002") + 10
  (root / "SAMed2D_v1.json").write_bytes(data[:cut])
  src = SamMed2DSource(root)
  got = []
  with pytest.raises(ValueError, match=re.escape(str(root / "SAMed2D_v1.json")) + r": .* at byte \d+$"):
    for s in src:
      got.append(s.image_id)
  assert got == [Path(k).stem for k in list(index)[:2]]
