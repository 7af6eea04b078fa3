"""LLM stage of data_gen: Med-GRIT conversations written by an OpenAI-compatible chat model, checked against masks.

  client.py   LLMConfig, LLMClient (async, bounded concurrency, retries, on-disk cache written before parsing,
              token/cost accounting, --llm-max-cost budget, --llm-rpm/--llm-tpm pacing, Batch API mode),
              LLMError (+ LLMBudgetError, LLMQualityError), redact
  tokens.py   token counts: tiktoken for OpenAI model names when its encoding loads, else chars/3
  estimate.py --llm-dry-run: requests, tokens and price (sync and Batch) per round, nothing sent
  prompts.py  the three generation stages (global description; region descriptions + overall answer;
              multi-turn refer/ground conversations as strict JSON)
  verify.py   every box / name the model writes must be a real instance box / label of that image
  stage.py    llm_records(facts, client, ...) -> Med-GRIT records + stats (what data_gen.pipeline calls); the
              per-stage quality gate (--llm-min-accepted) and which records the LLM wrote
  cli.py      the --llm-* flags and the CLI summary

Use: `python -m data_gen --source phantom --out DIR --llm-base-url https://api.openai.com/v1 --llm-model M`
(the key is read from $OPENAI_API_KEY, or the variable named by --llm-api-key-env, and is never written).
User docs: data_gen/README.md, "LLM stage".
"""
