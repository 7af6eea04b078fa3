"""Token counts for estimates, budgets and `--llm-tpm` pacing, before (or without) the server's `usage`.

OpenAI model names are counted with tiktoken (the model's own encoding, e.g. o200k_base for gpt-4o*), when its
encoding file can be loaded: tiktoken downloads it once into its cache (TIKTOKEN_CACHE_DIR, default
<tmp>/data-gym-cache); offline and uncached it can't. Everything else -- local models, or tiktoken without its
file -- uses a documented approximation: ceil(characters / 3). English prose is ~4 characters per token and the
boxes / JSON of these prompts ~2-3, so chars/3 over-counts prose slightly: an estimate and a budget that err
on the high side. A chat request adds 3 tokens per message and 3 for the reply's priming (OpenAI's rule).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

log = logging.getLogger("data_gen.llm")

APPROX_CHARS_PER_TOKEN = 3.0
PER_MESSAGE = 3
PER_REPLY = 3


@functools.lru_cache(maxsize=16)
def _encoding(model: str) -> Any:
  try:
    import tiktoken

    name = tiktoken.encoding_name_for_model(model)
  except Exception:  # not an OpenAI model name (or no tiktoken): the approximation
    return None
  try:
    return tiktoken.get_encoding(name)
  except Exception as e:  # offline with an empty tiktoken cache
    log.info("tiktoken %s for %s unavailable (%s); token counts use chars/%g", name, model, type(e).__name__,
             APPROX_CHARS_PER_TOKEN)
    return None


class TokenCounter:
  """count(text) / count_messages(messages) with the model's tokenizer, else the chars/3 approximation."""

  def __init__(self, model: str) -> None:
    self.model = model
    self._enc = _encoding(model)
    self.method = f"tiktoken {self._enc.name}" if self._enc is not None else \
      f"approximation: characters / {APPROX_CHARS_PER_TOKEN:g}"
    self.exact = self._enc is not None

  def count(self, text: str) -> int:
    if not text:
      return 0
    if self._enc is not None:
      return len(self._enc.encode(text, disallowed_special=()))
    return math.ceil(len(text) / APPROX_CHARS_PER_TOKEN)

  def count_messages(self, messages: list[dict[str, str]]) -> int:
    return PER_REPLY + sum(PER_MESSAGE + self.count(m.get("role", "")) + self.count(m.get("content") or "")
                           for m in messages)
