"""Med-GRIT metrics, reproducing the official BiRD evaluation scripts rule by rule.

Sources of truth (github.com/ShawnHuang497/BiRD, tests/models/BiRD/): `regularization.extract_information`
(post-processing) and `eval_{VG,RO,GC,MII}_score_modality.py`. Deliberate differences:
  * a modality with no samples reports None (the official prints 0.0); its *official* mean still counts it
    as 0, and a second, clearly labelled mean averages only the non-empty modalities;
  * VG/RO ratios are exact (the official divides by n + 1e-8, a < 1e-8 relative difference);
  * a reference box that cannot be parsed raises a one-line error (the official crashes with a traceback);
  * SPICE is reported "unavailable" when Stanford CoreNLP is not installed (the official downloads it).

Every scorer takes samples: `Sample(id, reference, response)` or plain `(id, reference, response)` triples:
`id` is the image name or dataset id (the modality is its prefix before the first `_`) and `response` is
the raw model output. The official post-processing is applied to responses only, never to references.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

Box = tuple[float, float, float, float]

MODALITIES: tuple[str, ...] = ("ct", "mr", "x", "pet", "endoscopy", "dermoscopy", "fundus", "ultrasound")
TASKS: tuple[str, ...] = ("VG", "RO", "GC", "MII")
VG_METRIC = "recall@0.5"
# The official RO script prints "acc@0.5"; there is no threshold in it, so the honest name is used here.
RO_METRIC = "accuracy"
CAPTION_METRICS: tuple[str, ...] = (
  "Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
# eval_MII_score_modality.py leaves SPICE out of its mean table (its SPICE line is commented out).
MII_MEAN_METRICS: tuple[str, ...] = CAPTION_METRICS[:-1]

# Official patterns: `<box>(.*?)</box>` without DOTALL, and the integer-only fallback `(587,126),(789,217)`.
BOX_PATTERN = re.compile(r"<box>(.*?)</box>")
FALLBACK_BOX_PATTERN = re.compile(r"\(\d+,\d+\),\(\d+,\d+\)")
_NEWLINE_SPAN = re.compile(r"\n(.*?)\n", re.DOTALL)


class Sample(NamedTuple):
  id: str
  reference: str
  response: str


# ------------------------------------------------------------------------------------- post-processing


def postprocess_response(text: str) -> str:
  """`regularization.extract_information`: the official clean-up of a decoded prediction, steps in order."""
  if ".<|im_end|>" in text:  # 1. cut at the first ".<|im_end|>" and keep the full stop
    text = text.split(".<|im_end|>")[0] + "."
  text = text.replace("<|im_end|>\n", "")  # 2.
  match = _NEWLINE_SPAN.search(text)  # 3. keep only the first "\n...\n" inner span
  if match:
    text = match.group(1)
  return text.replace("<|endoftext|>", "").strip()  # 4.


def modality_of(name: str | int) -> str:
  """Official rule `image.split("_")[0]` on the basename: `x_ray--` -> x, `fundus_photography--` -> fundus."""
  stem = os.path.basename(str(name))
  modality = stem.split("_")[0]
  if modality not in MODALITIES:
    raise ValueError(
      f"sample {name!r}: modality prefix {modality!r} is not one of {', '.join(MODALITIES)}; the id/image "
      "name must start with the SA-Med2D modality prefix (e.g. ct_00--..., x_ray--...)")
  return modality


def _as_samples(samples: Iterable[Sample | Sequence[Any]]) -> list[Sample]:
  out = []
  for s in samples:
    if len(s) != 3:
      raise ValueError(f"expected (id, reference, response) triples, got {s!r}")
    out.append(Sample(str(s[0]), str(s[1]), str(s[2])))
  return out


def _empty_modalities(metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
  return {m: {"n": 0, **{k: None for k in metrics}} for m in MODALITIES}


def _means(per_modality: dict[str, dict[str, Any]], metrics: Sequence[str]) -> tuple[dict, dict]:
  """Official mean: over all 8 modalities, empty ones as 0. Variant: over the non-empty modalities only."""
  official, nonempty = {}, {}
  for k in metrics:
    vals = [per_modality[m][k] for m in MODALITIES]
    official[k] = sum(v or 0.0 for v in vals) / len(MODALITIES)
    present = [v for m, v in zip(MODALITIES, vals, strict=True) if per_modality[m]["n"] > 0 and v is not None]
    nonempty[k] = sum(present) / len(present) if present else None
  return official, nonempty


def _result(task: str, metrics: Sequence[str], per_modality: dict, *,
            mean_metrics: Sequence[str] | None = None, unavailable: dict[str, str] | None = None,
            info: dict | None = None) -> dict[str, Any]:
  mean_metrics = list(metrics if mean_metrics is None else mean_metrics)
  official, nonempty = _means(per_modality, mean_metrics)
  return {
    "task": task,
    "metrics": list(metrics),
    "mean_metrics": mean_metrics,
    "per_modality": per_modality,
    "mean_official": official,
    "mean_nonempty": nonempty,
    "unavailable": dict(unavailable or {}),
    "info": dict(info or {}),
  }


# -------------------------------------------------------------------------------------------------- VG


def _parse_box_string(s: str) -> Box | None:
  # Official get_float_bboxs: drop parentheses, split on commas, float() each. Anything that is not exactly
  # four numbers makes the official box_iou raise, which its try/except turns into IoU 0; None stands for it.
  try:
    vals = [float(v) for v in s.replace("(", "").replace(")", "").split(",")]
  except ValueError:
    return None
  return (vals[0], vals[1], vals[2], vals[3]) if len(vals) == 4 else None


def find_box_strings(text: str, fallback: bool = True) -> tuple[list[str], bool]:
  """Raw box strings and whether the integer fallback pattern produced them."""
  found = BOX_PATTERN.findall(text)
  if found or not fallback:
    return found, False
  found = FALLBACK_BOX_PATTERN.findall(text)
  return found, bool(found)


def parse_boxes(text: str, fallback: bool = True) -> list[Box | None]:
  """Every `<box>...</box>` (else, with fallback, every `(a,b),(c,d)`); None = unparsable box (IoU 0)."""
  return [_parse_box_string(s) for s in find_box_strings(text, fallback)[0]]


def format_box(box: Sequence[float]) -> str:
  """Qwen-VL box text with integer coordinates."""
  x1, y1, x2, y2 = (int(round(v)) for v in box)
  return f"<box>({x1},{y1}),({x2},{y2})</box>"


def box_iou(pred: Box | None, ref: Box | None) -> float:
  """Official box_iou for one pair: area (x2-x1)(y2-y1) with no +1; unparsable or degenerate -> 0.

  Operation order follows the numpy original (union = area_pred + area_ref - inter). Where it yields NaN or a
  division by zero, the official `iou > 0.5` test is False, so 0 gives the same hit decision; a positive
  intersection implies both boxes have positive area, so union > 0 whenever inter > 0.
  """
  if pred is None or ref is None:
    return 0.0
  area_p = (pred[2] - pred[0]) * (pred[3] - pred[1])
  area_r = (ref[2] - ref[0]) * (ref[3] - ref[1])
  w = min(pred[2], ref[2]) - max(pred[0], ref[0])
  h = min(pred[3], ref[3]) - max(pred[1], ref[1])
  inter = (w if w > 0 else 0.0) * (h if h > 0 else 0.0)
  union = area_p + area_r - inter
  if not union > 0 or math.isnan(inter):
    return 0.0
  iou = inter / union
  return iou if not math.isnan(iou) else 0.0


def vg_sample(reference: str, response: str, postprocess: bool = True,
              sample_id: str = "?") -> dict[str, Any]:
  """Per-sample VG detail: reference/predicted boxes, best IoU per reference box, hits (strict IoU > 0.5)."""
  processed = postprocess_response(response) if postprocess else response
  ref_strings, _ = find_box_strings(reference, fallback=False)  # the official never uses the fallback on refs
  ref_boxes = [_parse_box_string(s) for s in ref_strings]
  for s, b in zip(ref_strings, ref_boxes, strict=True):
    if b is None:
      raise ValueError(
        f"sample {sample_id}: reference box <box>{s}</box> is not four numbers; fix the test file")
  pred_strings, used_fallback = find_box_strings(processed, fallback=True)
  pred_boxes = [_parse_box_string(s) for s in pred_strings]
  best = [max((box_iou(p, r) for p in pred_boxes), default=0.0) for r in ref_boxes]
  return {
    "processed_response": processed,
    "ref_boxes": ref_boxes,
    "pred_boxes": pred_boxes,
    "ious": best,
    "hits": sum(1 for v in best if v > 0.5),
    "fallback": used_fallback,
    "unparsable": sum(1 for p in pred_boxes if p is None),
  }


def vg_recall(samples: Iterable[Sample | Sequence[Any]], postprocess: bool = True) -> dict[str, Any]:
  """Recall@0.5 per modality: a reference box is hit if any predicted box has IoU > 0.5 (strict).

  Samples whose reference has no box are skipped; the denominator is the number of reference boxes.
  """
  per = _empty_modalities([VG_METRIC])
  hits = dict.fromkeys(MODALITIES, 0)
  info = {"samples": 0, "skipped_no_reference_box": 0, "no_predicted_box": 0, "fallback_used": 0,
          "unparsable_predicted_boxes": 0, "reference_boxes": 0, "hits": 0}
  for s in _as_samples(samples):
    modality = modality_of(s.id)
    d = vg_sample(s.reference, s.response, postprocess, s.id)
    info["samples"] += 1
    if not d["ref_boxes"]:
      info["skipped_no_reference_box"] += 1
      continue
    info["no_predicted_box"] += not d["pred_boxes"]
    info["fallback_used"] += d["fallback"]
    info["unparsable_predicted_boxes"] += d["unparsable"]
    info["reference_boxes"] += len(d["ref_boxes"])
    info["hits"] += d["hits"]
    per[modality]["n"] += len(d["ref_boxes"])
    hits[modality] += d["hits"]
  for m in MODALITIES:
    if per[m]["n"]:
      per[m][VG_METRIC] = hits[m] / per[m]["n"]
  return _result("VG", [VG_METRIC], per, info=info)


# -------------------------------------------------------------------------------------------------- RO


def roc_correct(reference: str, response: str, postprocess: bool = True) -> bool:
  """Official RO rule: lowercase both, split the reference on single spaces, every token a substring."""
  pred = (postprocess_response(response) if postprocess else response).lower()
  return all(tok in pred for tok in reference.lower().split(" "))


def roc_accuracy(samples: Iterable[Sample | Sequence[Any]], postprocess: bool = True) -> dict[str, Any]:
  per = _empty_modalities([RO_METRIC])
  correct = dict.fromkeys(MODALITIES, 0)
  for s in _as_samples(samples):
    modality = modality_of(s.id)
    per[modality]["n"] += 1
    correct[modality] += roc_correct(s.reference, s.response, postprocess)
  for m in MODALITIES:
    if per[m]["n"]:
      per[m][RO_METRIC] = correct[m] / per[m]["n"]
  return _result("RO", [RO_METRIC], per, info={"samples": sum(per[m]["n"] for m in MODALITIES),
                                               "correct": sum(correct.values())})


# -------------------------------------------------------------------------------------------- captions


def java_status() -> str | None:
  """None when Java is on PATH, else why caption metrics cannot run (PTBTokenizer and METEOR need it)."""
  if shutil.which("java") is None:
    return ("Java not found (pycocoevalcap's PTBTokenizer and METEOR need it): "
            "apt-get install default-jre-headless")
  return None


def spice_status() -> str | None:
  """None when SPICE can run offline; else why not (it needs Stanford CoreNLP 3.6.0, normally downloaded)."""
  if (reason := java_status()) is not None:
    return reason
  try:
    from pycocoevalcap.spice import get_stanford_models as gsm
  except ImportError as e:
    return f"pycocoevalcap not importable ({e})"
  lib = os.path.join(os.path.dirname(gsm.__file__), gsm.SPICELIB)
  jars = (f"{gsm.JAR}.jar", f"{gsm.JAR}-models.jar")
  missing = [j for j in jars if not os.path.exists(os.path.join(lib, j))]
  if missing:
    return f"SPICE needs {', '.join(missing)} in {lib} (Stanford CoreNLP, normally downloaded on first use)"
  return None


def caption_scores(samples: Iterable[Sample | Sequence[Any]], task: str = "GC", *, postprocess: bool = True,
                   skip: Iterable[str] = (), meteor: Any = None) -> dict[str, Any]:
  """COCO caption metrics per modality, as the official GC/MII scripts compute them.

  One reference per sample; image_id = the sample's index. Tokenisation (PTBTokenizer) is per sentence, so
  it runs once for all modalities; scorers run per modality (CIDEr's document frequencies are per modality).
  Per-modality values are rounded to 6 decimals before averaging, as the official does. GC means include
  SPICE when it is available; MII means omit it. `skip` drops metrics (e.g. METEOR: its JVM takes ~9 s).
  `meteor`: a running pycocoevalcap Meteor() to reuse (left open), e.g. across a trainer's periodic evals.
  """
  if task not in ("GC", "MII"):
    raise ValueError(f"caption metrics are for GC or MII, got task {task!r}")
  skip = set(skip)
  unknown = skip - set(CAPTION_METRICS)
  if unknown:
    raise ValueError(f"unknown metric(s) to skip {sorted(unknown)}; choose from {', '.join(CAPTION_METRICS)}")
  samples = _as_samples(samples)
  modalities = [modality_of(s.id) for s in samples]
  base_mean = CAPTION_METRICS if task == "GC" else MII_MEAN_METRICS
  unavailable: dict[str, str] = {}
  if (reason := java_status()) is not None:
    unavailable = dict.fromkeys(CAPTION_METRICS, reason)
  else:
    if "SPICE" not in skip and (reason := spice_status()) is not None:
      unavailable["SPICE"] = reason
    for k in skip:
      unavailable[k] = "skipped on request"
  metrics = [k for k in CAPTION_METRICS if k not in unavailable]
  per = _empty_modalities(metrics)
  for mod in modalities:
    per[mod]["n"] += 1
  processed = [postprocess_response(s.response) if postprocess else s.response for s in samples]
  if metrics and samples:
    _score_captions(samples, processed, modalities, metrics, per, unavailable, meteor)
  metrics = [k for k in metrics if k not in unavailable]  # METEOR/SPICE may fail at run time
  for m in MODALITIES:
    for k in list(per[m]):
      if k != "n" and k not in metrics:
        del per[m][k]
  mean_metrics = [k for k in base_mean if k in metrics]
  official, nonempty = _means(per, mean_metrics)
  res = _result(task, metrics, per, mean_metrics=mean_metrics, unavailable=unavailable,
                info={"samples": len(samples), "image_id": "index in the predictions list"})
  res["mean_official"] = {k: round(v, 6) for k, v in official.items()}
  res["mean_nonempty"] = {k: (None if v is None else round(v, 6)) for k, v in nonempty.items()}
  return res


def _score_captions(samples: list[Sample], processed: list[str], modalities: list[str], metrics: list[str],
                    per: dict, unavailable: dict[str, str], meteor: Any = None) -> None:
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.rouge.rouge import Rouge
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

  tok = PTBTokenizer()
  gts_all = tok.tokenize({i: [{"caption": s.reference}] for i, s in enumerate(samples)})
  res_all = tok.tokenize({i: [{"caption": p}] for i, p in enumerate(processed)})
  own_meteor = meteor is None and "METEOR" in metrics
  spice = None
  if "METEOR" not in metrics:
    meteor = None
  elif own_meteor:
    try:
      from pycocoevalcap.meteor.meteor import Meteor
      meteor = Meteor()
    except Exception as e:  # noqa: BLE001 - a failing JVM must not take the other metrics down
      unavailable["METEOR"] = f"METEOR failed to start: {e}"
  if "SPICE" in metrics:
    from pycocoevalcap.spice.spice import Spice
    spice = Spice.__new__(Spice)  # skip __init__: it would try to download CoreNLP; spice_status() checked it
  try:
    for m in MODALITIES:
      ids = [i for i, mod in enumerate(modalities) if mod == m]
      if not ids:
        continue
      gts = {i: gts_all[i] for i in ids}
      res = {i: res_all[i] for i in ids}
      scores: dict[str, float] = {}
      with contextlib.redirect_stdout(io.StringIO()):  # the scorers print progress to stdout
        if "Bleu_1" in metrics:
          bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
          scores.update({f"Bleu_{n + 1}": b for n, b in enumerate(bleu)})
        if meteor is not None and "METEOR" not in unavailable:
          try:
            scores["METEOR"] = meteor.compute_score(gts, res)[0]
          except Exception as e:  # noqa: BLE001
            unavailable["METEOR"] = f"METEOR failed: {e}"
        if "ROUGE_L" in metrics:
          scores["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
        if "CIDEr" in metrics:
          scores["CIDEr"] = Cider().compute_score(gts, res)[0]
        if spice is not None and "SPICE" not in unavailable:
          try:
            scores["SPICE"] = float(spice.compute_score(gts, res)[0])
          except Exception as e:  # noqa: BLE001 - SPICE needs 8 GB heap and CoreNLP; report, never crash
            unavailable["SPICE"] = f"SPICE failed: {e}"
      for k, v in scores.items():
        per[m][k] = round(float(v), 6)
  finally:
    if own_meteor and meteor is not None:
      _close_meteor(meteor)


def _close_meteor(meteor: Any) -> None:
  # Meteor only stops its JVM in __del__; stop it now so a long-running trainer does not keep one per eval.
  p = meteor.meteor_p
  with contextlib.suppress(Exception):
    p.stdin.close()
  with contextlib.suppress(Exception):
    p.kill()
  p.wait()


# -------------------------------------------------------------------------------------------- dispatch


def score_samples(samples: Iterable[Sample | Sequence[Any]], task: str, *, postprocess: bool = True,
                  skip_metrics: Iterable[str] = (), meteor: Any = None) -> dict[str, Any]:
  """Score (id, reference, response) triples for one task: VG, RO, GC or MII."""
  task = task.upper()
  if task == "VG":
    return vg_recall(samples, postprocess)
  if task == "RO":
    return roc_accuracy(samples, postprocess)
  if task in ("GC", "MII"):
    return caption_scores(samples, task, postprocess=postprocess, skip=skip_metrics, meteor=meteor)
  raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


# ------------------------------------------------------------------------------------------- baselines


def mean_box(train_boxes: Iterable[Sequence[float] | str]) -> Box:
  """Mean box over the training boxes; strings are answer texts whose `<box>`es are all used."""
  boxes: list[Box] = []
  for item in train_boxes:
    if isinstance(item, str):
      boxes.extend(b for b in parse_boxes(item, fallback=False) if b is not None)
    else:
      if len(item) != 4:
        raise ValueError(f"training box {item!r} is not (x1, y1, x2, y2)")
      boxes.append((float(item[0]), float(item[1]), float(item[2]), float(item[3])))
  if not boxes:
    raise ValueError("mean_box_baseline: no training boxes given; pass boxes or VG answer texts with <box>")
  n = len(boxes)
  x1, y1, x2, y2 = (sum(b[i] for b in boxes) / n for i in range(4))
  return (x1, y1, x2, y2)


def mean_box_baseline(train_boxes: Iterable[Sequence[float] | str]) -> str:
  """The class-agnostic answer to every VG question: the mean training box, as box text."""
  return format_box(mean_box(train_boxes))


def most_frequent_class_baseline(train_answers: Iterable[str]) -> str:
  """The most frequent RO answer (lowercased, stripped; ties: first seen), answered for every question."""
  counts = Counter(a.strip().lower() for a in train_answers if a.strip())
  if not counts:
    raise ValueError("most_frequent_class_baseline: no non-empty training answers given")
  return counts.most_common(1)[0][0]


# An image-blind baseline that does read the question: what a model answering from the layout prior of each
# class alone would score. On data where classes sit in fixed places (real anatomy, the phantom's
# "anatomical" layout) it is the bar that says whether the image was used.
REF_PATTERN = re.compile(r"<ref>(.*?)</ref>")


class ClassPrior(NamedTuple):
  """Mean training box per class (for VG) and per (modality, class) (for RO)."""

  by_class: dict[str, Box]
  by_modality: dict[str, dict[str, Box]]


def class_prior(labelled_boxes: Iterable[tuple[str, str, Box]]) -> ClassPrior:
  """(modality, class name, box) triples from the training split -> ClassPrior."""
  sums: dict[tuple[str, str], list[Box]] = {}
  for modality, name, box in labelled_boxes:
    sums.setdefault((modality, name.strip().lower()), []).append(box)
  by_modality: dict[str, dict[str, Box]] = {}
  by_class: dict[str, list[Box]] = {}
  for (modality, name), boxes in sums.items():
    by_modality.setdefault(modality, {})[name] = mean_box(boxes)
    by_class.setdefault(name, []).extend(boxes)
  return ClassPrior({name: mean_box(boxes) for name, boxes in by_class.items()}, by_modality)


_IMAGE_SPAN = re.compile(r"<img>.*?</img>", re.DOTALL)


def class_prior_vg_answer(question: str, prior: ClassPrior) -> str:
  """The mean training box of the class the question names (the longest class name in its words, not in its
  `<img>` path: SA-Med2D names such as `ct_00--MSD_Pancreas--pancreas_001` hold class names), as a VG answer;
  "" if it names none."""
  text = _IMAGE_SPAN.sub(" ", question).lower()
  named = [n for n in prior.by_class if re.search(rf"(?<![a-z]){re.escape(n)}(?![a-z])", text)]
  if not named:
    return ""
  name = max(named, key=len)
  return f"<ref>{name}</ref>{format_box(prior.by_class[name])}"


def class_prior_ro_answer(question: str, modality: str, prior: ClassPrior) -> str:
  """The class of `modality` whose mean training box centre is nearest the centre of the question's box."""
  boxes = [b for b in parse_boxes(question, fallback=False) if b is not None]
  classes = prior.by_modality.get(modality) or {}
  if not boxes or not classes:
    return ""
  cx, cy = (boxes[0][0] + boxes[0][2]) / 2, (boxes[0][1] + boxes[0][3]) / 2
  return min(classes, key=lambda n: ((classes[n][0] + classes[n][2]) / 2 - cx) ** 2
             + ((classes[n][1] + classes[n][3]) / 2 - cy) ** 2)
