"""``klotski serve``: an OpenAI-compatible HTTP server over one :class:`~klotski.engine.LLM`.

Concurrent requests wait in an admission queue and are admitted together into the next batch group (up to the
engine's group size, ``LLM.max_num_seqs``, or fewer after a bounded wait), so they share each weight load.

* :mod:`klotski.serve.batcher` -- the admission queue and the one engine worker thread that owns the ``LLM``;
* :mod:`klotski.serve.decoding` -- one sequence's text: incremental decoding, stop strings, stream deltas;
* :mod:`klotski.serve.protocol` -- OpenAI request bodies -> prompts and :class:`~klotski.SamplingParams`,
  and the response bodies;
* :mod:`klotski.serve.chat` -- the model's chat template (``tokenizer_config.json``), rendered with jinja2;
* :mod:`klotski.serve.metrics` -- counters and the Prometheus text exposition;
* :mod:`klotski.serve.app` -- the FastAPI routes (imports fastapi: only loaded by ``klotski serve``);
* :mod:`klotski.serve.server` -- uvicorn, graceful drain on SIGTERM.

Nothing here is imported by ``import klotski``; fastapi and uvicorn are the optional ``serve`` extra.
"""
