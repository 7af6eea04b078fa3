"""Med-GRIT metrics against hand-built cases with known answers and against the official scripts' algorithms.

The `_official_*` helpers below are verbatim transcriptions of github.com/ShawnHuang497/BiRD
tests/models/BiRD/{regularization,eval_VG_score_modality,eval_RO_score_modality}.py (numpy IoU, try/except,
`image.split("_")[0]`), used as an independent oracle on randomised inputs.
"""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from bird_jax import metrics as M

CT = "ct_00--Phantom--case_0001--z_0003"
MR = "mr_00--Phantom--case_0002--z_0001"
XRAY = "x_ray--Phantom--case_0003--2d_none"
FUNDUS = "fundus_photography--Phantom--case_0004--2d_none"


def box(x1, y1, x2, y2) -> str:
  return f"<box>({x1},{y1}),({x2},{y2})</box>"


# ------------------------------------------------------------------------------------------- official oracle


def _official_extract_information(string):
  if ".<|im_end|>" in string:
    string = string.split(".<|im_end|>")[0] + "."
  string = string.replace("<|im_end|>\n", "")
  match = re.search(r"\n(.*?)\n", string, re.DOTALL)
  if match:
    string = match.group(1)
  string = string.replace("<|endoftext|>", "")
  return string.strip()


def _official_box_iou(boxes1, boxes2):
  area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  area1, area2 = area(boxes1), area(boxes2)
  lt = np.maximum(boxes1[:, np.newaxis, :2], boxes2[:, :2])
  rb = np.minimum(boxes1[:, np.newaxis, 2:], boxes2[:, 2:])
  wh = np.clip(rb - lt, a_min=0, a_max=None)
  inter = wh[:, :, 0] * wh[:, :, 1]
  union = area1[:, None] + area2 - inter
  return inter / union, union


def _official_get_float_bboxs(str_bbox_lst):
  out = []
  for s in str_bbox_lst:
    out.append([float(n) for n in s.replace("(", "").replace(")", "").split(",")])
  return np.array(out)


def _official_vg(items):
  """(image, annotation, response) -> {modality: [hits, boxes]} exactly as eval_VG_score_modality.py."""
  pattern = r"<box>(.*?)</box>"
  d = {m: [0, 0] for m in M.MODALITIES}
  for image, annotation, response in items:
    response = _official_extract_information(response)
    modality = image.split("_")[0]
    target = re.findall(pattern, annotation)
    pred = re.findall(pattern, response)
    if len(pred) == 0:
      pred = re.findall(r"\(\d+,\d+\),\(\d+,\d+\)", response)
    if len(target) == 0:
      continue
    if len(pred) != 0:
      for t in target:
        for p in pred:
          tf = _official_get_float_bboxs([t])
          try:
            pf = _official_get_float_bboxs([p])
            with np.errstate(all="ignore"):
              iou, _ = _official_box_iou(pf, tf)
          except Exception:
            iou = [[0]]
          if iou[0][0] > 0.5:
            d[modality][0] += 1
            break
    d[modality][1] += len(target)
  return d


def _official_ro(items):
  d = {m: [0, 0] for m in M.MODALITIES}
  for image, annotation, response in items:
    response = _official_extract_information(response).lower()
    modality = image.split("_")[0]
    flag = all(tok in response for tok in annotation.lower().split(" "))
    d[modality][0] += flag
    d[modality][1] += 1
  return d


# ------------------------------------------------------------------------------------------- post-processing


@pytest.mark.parametrize("raw, expected", [
  # step 1: cut at the first ".<|im_end|>", keep the full stop (later text, even another answer, is dropped)
  ("The liver.<|im_end|>\nmore text<|endoftext|>", "The liver."),
  ("a.<|im_end|>b.<|im_end|>", "a."),
  # step 2: "<|im_end|>\n" removed; a bare "<|im_end|>" (no newline, no full stop) stays
  ("kidney<|im_end|>\n<|endoftext|>", "kidney"),
  ("kidney<|im_end|>", "kidney<|im_end|>"),
  # step 3: only the first "\n...\n" inner span survives (non-greedy, DOTALL)
  ("header\nanswer\nfooter", "answer"),
  ("a\nb\nc\nd", "b"),
  ("a\n\nb", ""),
  # step 2 runs before step 3: removing "<|im_end|>\n" leaves a single newline, so no span is cut out
  ("x<|im_end|>\nA\nB", "xA\nB"),
  # step 1 runs before step 3: the cut removes the second newline
  ("a\nb.<|im_end|>\nc\n", "a\nb."),
  # step 4: every <|endoftext|> removed, whitespace stripped (the official script's own example)
  ("Lesion<|endoftext|><|endoftext|>", "Lesion"),
  ("  liver <|endoftext|> ", "liver"),
])
def test_postprocess_steps(raw, expected):
  assert M.postprocess_response(raw) == expected
  assert _official_extract_information(raw) == expected


def test_postprocess_matches_official_on_random_strings():
  rng = random.Random(0)
  pieces = ["a", "b ", ".", "\n", "<|im_end|>", "<|im_end|>\n", ".<|im_end|>", "<|endoftext|>", " ", "x\n"]
  for _ in range(2000):
    s = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
    assert M.postprocess_response(s) == _official_extract_information(s), repr(s)


# ------------------------------------------------------------------------------------------------ boxes, IoU


def test_parse_boxes_tags_fallback_and_errors():
  assert M.parse_boxes(f"<ref>liver</ref>{box(1, 2, 3, 4)}{box(5, 6, 7, 8)}") == [(1, 2, 3, 4), (5, 6, 7, 8)]
  assert M.parse_boxes("<box>(0.5439, 0.0557), (0.7109, 0.2549)</box>") == [(0.5439, 0.0557, 0.7109, 0.2549)]
  # integer fallback only when there is no <box> tag at all, and only without spaces
  assert M.parse_boxes("the liver is at (587,126),(789,217).") == [(587, 126, 789, 217)]
  assert M.parse_boxes("at (587,126),(789,217)", fallback=False) == []
  assert M.parse_boxes("at (587, 126),(789, 217)") == []
  assert M.parse_boxes("at (5.5,1),(7,2)") == []
  assert M.parse_boxes("<box>(1,2),(3)</box> (1,2),(3,4)") == [None]
  # anything that is not four numbers is the unparsable marker
  for bad in ["<box>abc</box>", "<box></box>", "<box>(1,2),(3,4),(5)</box>", "<box>(1,2)</box>"]:
    assert M.parse_boxes(bad) == [None], bad
  # the official pattern is not DOTALL: a box split over lines is not a box
  assert M.parse_boxes("<box>(1,2),\n(3,4)</box>") == []


def test_box_iou_no_plus_one_and_degenerate():
  assert M.box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
  assert M.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)  # +1 would give 66/176
  assert M.box_iou((0, 0, 100, 100), (0, 0, 100, 50)) == 0.5
  assert M.box_iou((0, 0, 300, 100), (100, 0, 400, 100)) == 0.5
  assert M.box_iou((0, 0, 1, 1), (5, 5, 6, 6)) == 0.0
  assert M.box_iou(None, (0, 0, 1, 1)) == 0.0
  assert M.box_iou((3, 3, 3, 3), (3, 3, 3, 3)) == 0.0  # 0/0 in the official -> NaN -> not a hit
  assert M.box_iou((10, 10, 0, 0), (0, 0, 10, 10)) == 0.0  # reversed corners never overlap


# ------------------------------------------------------------------------------------------------------- VG


def test_vg_strict_threshold_exactly_half_is_a_miss():
  ref = f"<ref>liver</ref>{box(0, 0, 100, 100)}"
  r = M.vg_recall([(CT, ref, box(0, 0, 100, 50)), (MR, ref, box(0, 0, 100, 51))])
  assert r["per_modality"]["ct"] == {"n": 1, "recall@0.5": 0.0}
  assert r["per_modality"]["mr"] == {"n": 1, "recall@0.5": 1.0}
  r = M.vg_recall([(CT, f"<ref>a</ref>{box(0, 0, 300, 100)}", box(100, 0, 400, 100))])
  assert r["per_modality"]["ct"]["recall@0.5"] == 0.0


def test_vg_multiple_references_duplicates_and_any_match():
  a, b = box(0, 0, 100, 100), box(500, 500, 600, 600)
  samples = [
    (CT, f"<ref>kidney</ref>{a}{b}", a),            # 2 reference boxes, one found -> 1/2
    (CT, f"<ref>liver</ref>{a}", a + a + a),        # duplicated predictions count once -> 1/1
    (CT, f"<ref>x</ref>{a}{a}", a),                 # duplicated references: one prediction hits both -> 2/2
    (CT, f"<ref>y</ref>{a}", b + box(0, 0, 100, 90)),  # the second predicted box matches -> 1/1
    (CT, f"<ref>z</ref>{a}", "no box here"),        # counted in the denominator, no hit -> 0/1
  ]
  r = M.vg_recall(samples)
  assert r["per_modality"]["ct"] == {"n": 7, "recall@0.5": 5 / 7}
  assert r["info"]["no_predicted_box"] == 1


def test_vg_parse_errors_fallback_skips_and_postprocessing():
  a = box(0, 0, 100, 100)
  samples = [
    (MR, f"<ref>a</ref>{a}", "<box>(0,0),(100)</box>"),             # unparsable -> IoU 0
    (MR, f"<ref>a</ref>{a}", "<box>(0,0),(100)</box>" + a),         # a bad box does not spoil a good one
    (MR, f"<ref>a</ref>{a}", "the organ is at (0,0),(100,100)"),   # fallback pattern
    (MR, f"<ref>a</ref>{a}", box(500, 500, 600, 600) + " (0,0),(100,100)"),  # tag present -> no fallback
    (MR, "a kidney", a),                                            # reference without a box: skipped
    (MR, f"<ref>a</ref>{a}", f"<ref>a</ref>{a}<|im_end|>\n<|endoftext|>"),  # post-processed response
    (MR, f"<ref>a</ref>{a}", f"first line\n{box(500, 500, 600, 600)}\n{a}"),  # step 3 keeps only line 2
  ]
  r = M.vg_recall(samples)
  assert r["per_modality"]["mr"] == {"n": 6, "recall@0.5": 3 / 6}
  assert r["info"]["skipped_no_reference_box"] == 1
  assert r["info"]["fallback_used"] == 1
  assert r["info"]["unparsable_predicted_boxes"] == 2
  with pytest.raises(ValueError, match="reference box"):
    M.vg_recall([(CT, "<box>(1,2),(3)</box>", a)])


def test_modality_mapping_and_means():
  a = box(0, 0, 100, 100)
  ref = f"<ref>a</ref>{a}"
  r = M.vg_recall([(XRAY, ref, a), (XRAY + ".png", ref, "none"), ("images/" + FUNDUS + ".png", ref, a),
                   (CT, ref, a)])
  per = r["per_modality"]
  assert per["x"] == {"n": 2, "recall@0.5": 0.5}
  assert per["fundus"] == {"n": 1, "recall@0.5": 1.0}
  assert per["ct"] == {"n": 1, "recall@0.5": 1.0}
  assert per["pet"] == {"n": 0, "recall@0.5": None}
  assert r["mean_official"]["recall@0.5"] == pytest.approx(2.5 / 8)   # 5 empty modalities count as 0
  assert r["mean_nonempty"]["recall@0.5"] == pytest.approx(2.5 / 3)
  with pytest.raises(ValueError, match="modality prefix 'microscopy'"):
    M.vg_recall([("microscopy_00--a--b", ref, a)])
  assert M.modality_of("x_ray--Chest_Image--u--2d_none.png") == "x"
  assert M.modality_of("fundus_photography--a") == "fundus"


def _random_box_text(rng: random.Random) -> str:
  c = sorted(rng.randint(0, 20) * 5 for _ in range(2))
  d = sorted(rng.randint(0, 20) * 5 for _ in range(2))
  kind = rng.random()
  if kind < 0.1:
    return f"<box>({c[0]},{d[0]}),({c[1]})</box>"
  if kind < 0.2:
    return f"({c[0]},{d[0]}),({c[1]},{d[1]})"
  if kind < 0.25:
    return f"<box>({c[1]},{d[1]}),({c[0]},{d[0]})</box>"  # reversed corners
  return box(c[0], d[0], c[1], d[1])


def test_vg_matches_official_algorithm_on_random_samples():
  rng = random.Random(1)
  ids = [CT, MR, XRAY, FUNDUS, "pet_00--a", "ultrasound_00--b"]
  items = []
  for _ in range(600):
    n_ref = rng.choice([0, 1, 1, 2, 3])
    refs = []
    for _ in range(n_ref):
      x = sorted(rng.sample(range(0, 105, 5), 2))
      y = sorted(rng.sample(range(0, 105, 5), 2))
      refs.append(box(x[0], y[0], x[1], y[1]))
    ref = "<ref>t</ref>" + "".join(refs) if refs else "plain answer"
    pred = " ".join(_random_box_text(rng) for _ in range(rng.choice([0, 1, 2])))
    if refs and rng.random() < 0.6:  # a jittered copy of a reference box: IoU spread around 0.5
      x1, y1, x2, y2 = M.parse_boxes(rng.choice(refs))[0]
      j = lambda v: max(0, int(v) + rng.choice([-10, -5, 0, 5, 10]))
      pred = rng.choice(["", pred]) + box(j(x1), j(y1), j(x2), j(y2))
    tail = rng.choice(["", "<|im_end|>\n<|endoftext|>", ".<|im_end|>", "\n"])
    items.append((rng.choice(ids), ref, pred + tail))
  official = _official_vg(items)
  r = M.vg_recall(items)
  assert sum(v[1] for v in official.values()) > 500
  assert 100 < sum(v[0] for v in official.values()) < sum(v[1] for v in official.values()) - 100
  for m in M.MODALITIES:
    hits, n = official[m]
    assert r["per_modality"][m]["n"] == n
    if n:
      assert r["per_modality"][m]["recall@0.5"] == pytest.approx(hits / n)


# ------------------------------------------------------------------------------------------------------- RO


def test_roc_substring_rules():
  samples = [
    (CT, "liver", "deliver"),                          # substring counts
    (CT, "left kidney", "The kidney on the LEFT."),    # every token, any order, case-insensitive
    (CT, "left kidney", "kidney"),                     # a token missing
    (CT, "Left  Kidney", "left kidney"),               # split on single spaces: "" always matches
    (MR, "a\nliver\nb", "liver"),                      # the reference is never post-processed
    (MR, "liver", "x\nliver\ny"),                      # the response is (step 3 keeps "liver")
    (XRAY, "lung", "Lung.<|im_end|>\nheart"),          # step 1 cuts "heart" off; lung stays
  ]
  r = M.roc_accuracy(samples)
  assert r["per_modality"]["ct"] == {"n": 4, "accuracy": 3 / 4}
  assert r["per_modality"]["mr"] == {"n": 2, "accuracy": 1 / 2}
  assert r["per_modality"]["x"] == {"n": 1, "accuracy": 1.0}
  assert r["mean_official"]["accuracy"] == pytest.approx((0.75 + 0.5 + 1.0) / 8)
  assert r["mean_nonempty"]["accuracy"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)


def test_roc_matches_official_algorithm_on_random_samples():
  rng = random.Random(2)
  words = ["left", "kidney", "liver", "deliver", "lung", "Lung", "heart", "", ".", "\n"]
  ids = [CT, MR, XRAY, FUNDUS]
  items = []
  for _ in range(500):
    ref = " ".join(rng.choice(words[:6]) for _ in range(rng.randint(1, 3)))
    resp = " ".join(rng.choice(words) for _ in range(rng.randint(0, 5))) + rng.choice(["", "<|endoftext|>"])
    items.append((rng.choice(ids), ref, resp))
  official = _official_ro(items)
  r = M.roc_accuracy(items)
  for m in M.MODALITIES:
    ok, n = official[m]
    assert r["per_modality"][m]["n"] == n
    if n:
      assert r["per_modality"][m]["accuracy"] == pytest.approx(ok / n)


# ------------------------------------------------------------------------------------------------ captions

CAPTIONS = [
  (CT, "This region contains the liver, an abdominal organ.", "This region contains the liver."),
  (CT, "The left kidney filters blood.", "the kidney on the left filters blood<|im_end|>\n<|endoftext|>"),
  (CT, "A round lesion in the liver.", "A lesion in the spleen."),
  (MR, "The brain stem connects the brain and spinal cord.", "The brain stem links brain and cord."),
  (MR, "The ventricles hold cerebrospinal fluid.", "Fluid is held in the ventricles."),
  (XRAY, "Both lungs are clear.", "The lungs are clear."),
]


def _official_caption_scores(samples, meteor=None):
  """Per modality: pycocotools COCO/loadRes, PTBTokenizer per modality, scorers called directly."""
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.rouge.rouge import Rouge
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
  from pycocotools.coco import COCO

  out = {}
  for m in M.MODALITIES:
    idx = [i for i, s in enumerate(samples) if s[0].split("_")[0] == m]
    if not idx:
      continue
    coco = COCO()
    coco.dataset = {"annotations": [{"image_id": i, "id": i, "caption": samples[i][1]} for i in idx],
                    "images": [{"id": i} for i in idx]}
    coco.createIndex()
    preds = [{"image_id": i, "caption": _official_extract_information(samples[i][2])} for i in idx]
    res = coco.loadRes(preds)
    ids = coco.getImgIds()
    tok = PTBTokenizer()
    g = tok.tokenize({i: coco.imgToAnns[i] for i in ids})
    r = tok.tokenize({i: res.imgToAnns[i] for i in ids})
    bleu, _ = Bleu(4).compute_score(g, r, verbose=0)
    scores = {f"Bleu_{k + 1}": v for k, v in enumerate(bleu)}
    scores["ROUGE_L"] = Rouge().compute_score(g, r)[0]
    scores["CIDEr"] = Cider().compute_score(g, r)[0]
    if meteor is not None:
      scores["METEOR"] = meteor.compute_score(g, r)[0]
    out[m] = {k: round(v, 6) for k, v in scores.items()}
  return out


def test_caption_metrics_match_pycocoevalcap_without_meteor():
  r = M.caption_scores(CAPTIONS, "GC", skip=["METEOR"])
  oracle = _official_caption_scores(CAPTIONS)
  assert set(oracle) == {"ct", "mr", "x"}
  for m, scores in oracle.items():
    for k, v in scores.items():
      assert r["per_modality"][m][k] == pytest.approx(v, abs=1e-6), (m, k)
  assert r["per_modality"]["ct"]["n"] == 3 and r["per_modality"]["pet"]["n"] == 0
  assert r["per_modality"]["pet"]["CIDEr"] is None
  assert r["per_modality"]["ct"]["Bleu_1"] > 0.3
  assert "METEOR" not in r["metrics"] and r["unavailable"]["METEOR"] == "skipped on request"
  # SPICE: computed if CoreNLP happens to be installed, otherwise reported, never a crash
  assert ("SPICE" in r["metrics"]) == (M.spice_status() is None)
  if M.spice_status() is not None:
    assert "SPICE" in r["unavailable"] and "SPICE" not in r["mean_official"]
  for k in ("Bleu_4", "ROUGE_L", "CIDEr"):
    vals = [oracle[m][k] for m in ("ct", "mr", "x")]
    assert r["mean_official"][k] == pytest.approx(round(sum(vals) / 8, 6), abs=1e-6)
    assert r["mean_nonempty"][k] == pytest.approx(round(sum(vals) / 3, 6), abs=1e-6)


def test_caption_metrics_meteor_matches_pycocoevalcap():
  from pycocoevalcap.meteor.meteor import Meteor

  samples = CAPTIONS[:2] + CAPTIONS[3:5]
  meteor = Meteor()  # one JVM (5-10 s to load) shared by both sides; it is pycocoevalcap's, not ours
  r = M.caption_scores(samples, "MII", meteor=meteor)
  oracle = _official_caption_scores(samples, meteor)
  assert meteor.meteor_p.poll() is None  # a caller's Meteor is left running
  for m in ("ct", "mr"):
    assert r["per_modality"][m]["METEOR"] == pytest.approx(oracle[m]["METEOR"], abs=1e-6)
    assert r["per_modality"][m]["CIDEr"] == pytest.approx(oracle[m]["CIDEr"], abs=1e-6)
  assert r["per_modality"]["ct"]["METEOR"] > 0.1
  assert "METEOR" in r["mean_metrics"] and "SPICE" not in r["mean_metrics"]  # MII never averages SPICE


def test_caption_rejects_unknown_skip_and_task():
  with pytest.raises(ValueError, match="unknown metric"):
    M.caption_scores(CAPTIONS, "GC", skip=["BLEU"])
  with pytest.raises(ValueError, match="GC or MII"):
    M.caption_scores(CAPTIONS, "VG")
  assert M.MII_MEAN_METRICS == M.CAPTION_METRICS[:-1] and "SPICE" not in M.MII_MEAN_METRICS


# ------------------------------------------------------------------------------------------------ baselines


def test_baselines():
  b50 = box(50, 50, 200, 200)
  train = [box(0, 0, 100, 100), (100, 100, 300, 300), f"<ref>a</ref>{b50}{b50}"]
  # mean of (0,0,100,100), (100,100,300,300), (50,50,200,200) x2 = (50, 50, 200, 200)
  answer = M.mean_box_baseline(train)
  assert answer == box(50, 50, 200, 200)
  test = [(CT, f"<ref>a</ref>{box(40, 40, 200, 200)}", answer),
          (CT, f"<ref>b</ref>{box(0, 0, 50, 50)}", answer)]
  assert M.vg_recall(test)["per_modality"]["ct"]["recall@0.5"] == 0.5
  assert M.most_frequent_class_baseline(["Liver", "kidney", " liver ", "kidney", "liver"]) == "liver"
  assert M.most_frequent_class_baseline(["b", "a"]) == "b"  # tie -> first seen
  with pytest.raises(ValueError):
    M.mean_box_baseline(["no boxes"])
  r = M.score_samples([(CT, "liver", "liver"), (MR, "lung", "liver")], "ro")
  assert r["per_modality"]["ct"]["accuracy"] == 1.0 and r["per_modality"]["mr"]["accuracy"] == 0.0


def test_class_prior_baselines_read_the_question_not_the_image():
  prior = M.class_prior([
    ("ct", "Liver", (100, 100, 300, 300)), ("ct", "liver", (200, 200, 400, 400)),
    ("ct", "left kidney", (600, 600, 800, 800)), ("us", "kidney", (0, 0, 100, 100)),
  ])
  assert prior.by_class["liver"] == (150, 150, 350, 350)
  # the longest class name the question holds wins ("left kidney", not "kidney"); whole words only
  left = "<ref>left kidney</ref><box>(600,600),(800,800)</box>"
  assert M.class_prior_vg_answer("Where is the left kidney?", prior) == left
  assert M.class_prior_vg_answer("Where is the kidney?", prior).startswith("<ref>kidney</ref>")
  assert M.class_prior_vg_answer("Where is the deliverable?", prior) == ""
  # RO: the nearest mean-box centre among the classes seen with that modality
  assert M.class_prior_ro_answer("What is at <box>(550,650),(750,700)</box>?", "ct", prior) == "left kidney"
  assert M.class_prior_ro_answer("What is at <box>(0,0),(90,90)</box>?", "ct", prior) == "liver"
  assert M.class_prior_ro_answer("What is at <box>(0,0),(90,90)</box>?", "us", prior) == "kidney"
  assert M.class_prior_ro_answer("What is at <box>(0,0),(90,90)</box>?", "mr", prior) == ""
