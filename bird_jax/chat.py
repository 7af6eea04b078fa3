"""Multi-turn chat about an image in the terminal.

  python -m bird_jax.chat --checkpoint=/ckpt/Qwen-VL-Chat --image=ct.png
  python -m bird_jax.chat --config=cpu_demo --checkpoint=runs/cpu_demo/checkpoints --image=ct.png --out=chat_out
  printf 'Where is the liver?\\n/quit\\n' | python -m bird_jax.chat --checkpoint=... --image=ct.png   # scripted

--checkpoint is a Hugging Face Qwen-VL(-Chat) dir, or a training run's checkpoints/ folder (or one step in it);
--config=NAME (plus --config.a.b=v overrides) is only needed when that run folder has no config.json.
Commands: `/image PATH` switches the image (and starts a new conversation), `/box x1 y1 x2 y2` puts a box
given in pixels of the image into the next question (at `{box}` if the question has it, else at its end),
`/reset` forgets the conversation, `/quit` leaves. Questions may also hold `[x1, y1, x2, y2]` pixel boxes or
`<box>(x1,y1),(x2,y2)</box>` in Qwen's [0,1000) grid. Answers with boxes are drawn on the image and saved to
--out/turn_K.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = ("commands: /image PATH (new image, new conversation), /box x1 y1 x2 y2 (pixel box for the next "
        "question), /reset, /quit")


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  ap = argparse.ArgumentParser(prog="python -m bird_jax.chat", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--checkpoint", required=True, help="HF Qwen-VL dir, or a training run / checkpoints folder")
  ap.add_argument("--image", required=True, help="image to talk about (PNG/JPEG)")
  ap.add_argument("--out", default="chat_outputs", help="where drawn answers go (default ./chat_outputs)")
  ap.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=128)
  ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  ap.add_argument("--top_p", "--top-p", type=float, default=1.0)
  ap.add_argument("--top_k", "--top-k", type=int, default=0)
  ap.add_argument("--dtype", default="float32", help="compute dtype (float32 or bfloat16)")
  config_args = [a for a in argv if a.startswith("--config")]
  rest = [a for a in argv if not a.startswith("--config")]
  return ap.parse_args(rest), config_args


def _insert_box(question: str, box: str | None) -> str:
  if box is None:
    return question
  return question.replace("{box}", box, 1) if "{box}" in question else f"{question} {box}"


def main(argv: list[str] | None = None) -> int:
  args, config_args = _parse(sys.argv[1:] if argv is None else argv)
  from bird_jax import api
  from bird_jax.config_util import ConfigError

  image_path = Path(args.image)
  try:
    size = api.open_image(image_path)[0].size
    if config_args:
      model = api.load(config_args, args.checkpoint, dtype=args.dtype)
    else:
      model = api.load(args.checkpoint, dtype=args.dtype)
  except (FileNotFoundError, ValueError, ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out_dir = Path(args.out)
  interactive = sys.stdin.isatty()
  print(f"model: {model.source} | image: {image_path} ({size[0]}x{size[1]} px)")
  print(HELP)
  history: list = []
  pending_box: str | None = None
  turn = 0
  while True:
    try:
      line = input("you> " if interactive else "")
    except (EOFError, KeyboardInterrupt):
      print()
      break
    line = line.strip()
    if not line:
      continue
    if not interactive:  # echo scripted input so the transcript reads like a session
      print(f"you> {line}")
    if line.startswith("/"):
      cmd, _, arg = line.partition(" ")
      arg = arg.strip()
      if cmd in ("/quit", "/exit", "/q"):
        break
      if cmd == "/reset":
        history, pending_box = [], None
        print("(conversation reset)")
      elif cmd == "/image":
        try:
          size = api.open_image(arg)[0].size
        except (FileNotFoundError, OSError, ValueError) as e:
          print(f"error: {e}")
          continue
        image_path, history, pending_box = Path(arg), [], None
        print(f"(image {image_path}, {size[0]}x{size[1]} px; new conversation)")
      elif cmd == "/box":
        try:
          coords = [float(v) for v in arg.replace(",", " ").split()]
          pending_box = api.box_from_pixels(size, coords)
        except ValueError as e:
          print(f"error: /box needs four pixel numbers x1 y1 x2 y2 ({e})")
          continue
        print(f"(box {pending_box} goes into your next question, at {{box}} or at its end)")
      else:
        print(f"unknown command {cmd}; {HELP}")
      continue
    question = _insert_box(line, pending_box)
    pending_box = None
    try:
      answer = model.ask(image_path, question, history=history, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=turn)
    except (ValueError, OSError) as e:
      print(f"error: {e}")
      continue
    turn += 1
    history = answer.history
    print(f"bird> {answer.text}")
    if answer.boxes or answer.question_boxes:
      out_dir.mkdir(parents=True, exist_ok=True)
      path = out_dir / f"turn_{turn}.png"
      api.draw(image_path, answer).save(path)
      boxes = ", ".join(f"{ref or 'box'}: ({b[0]:.0f},{b[1]:.0f},{b[2]:.0f},{b[3]:.0f}) px"
                        for (ref, _), b in zip(answer.objects, answer.boxes_px, strict=True))
      print(f"  [{boxes or 'no boxes in the answer'}] drawn to {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
