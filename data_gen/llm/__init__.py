"""LLM stage of data_gen: Med-GRIT conversations written by an OpenAI-compatible chat model, checked against masks.

  client.py   LLMConfig, LLMClient (async, bounded concurrency, retries, on-disk cache, token/cost accounting,
              Batch API mode), LLMError, redact
  prompts.py  the three generation stages (global description; region descriptions + overall answer;
              multi-turn refer/ground conversations as strict JSON)
  verify.py   every box / name the model writes must be a real instance box / label of that image
  stage.py    llm_records(facts, client, ...) -> Med-GRIT records + stats (what data_gen.pipeline calls)

Use: `python -m data_gen --source phantom --out DIR --llm-base-url https://api.openai.com/v1 --llm-model M`
(the key is read from $OPENAI_API_KEY, or the variable named by --llm-api-key-env, and is never written).
"""
