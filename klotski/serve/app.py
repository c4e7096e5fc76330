"""The HTTP routes (FastAPI): ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/health``,
``/metrics``.

Handlers run on the event loop and never wait for the engine: they parse and check a request (400 with the
reason), queue its sequences on the :class:`~klotski.serve.batcher.EngineWorker` (429 when the queue is full),
then await the events the worker posts back onto the loop. A client that goes away (its stream closed, or
the connection dropped while a non-streamed request waits) cancels its sequences.
"""
from __future__ import annotations

import asyncio
import contextlib
import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from klotski.serve import protocol
from klotski.serve.batcher import EngineWorker, Rejected, Sequence
from klotski.serve.protocol import ParsedRequest, ProtocolError, error_body


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away (the request body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _Call:
    """One request's sequences and the queue their events arrive on."""

    def __init__(self, worker: EngineWorker, req: ParsedRequest):
        loop = asyncio.get_running_loop()
        self.worker, self.req = worker, req
        self.events: asyncio.Queue = asyncio.Queue()

        def emitter(index: int):
            def emit(event: dict) -> None:  # on the worker thread
                with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
                    loop.call_soon_threadsafe(self.events.put_nowait, (index, event))
            return emit

        self.seqs = [Sequence(p, req.params, emitter(i), req.stop, req.stream) for i, p in enumerate(req.prompts)]

    def cancel(self) -> None:
        for s in self.seqs:
            self.worker.cancel(s)


def build_app(worker: EngineWorker, model_name: str, chat_template=None) -> FastAPI:
    """The app; its lifespan starts the worker and, on shutdown (after uvicorn has drained), stops it."""
    llm, metrics = worker.llm, worker.metrics
    context = llm.spec.max_position_embeddings

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, worker.stop)

    app = FastAPI(title="klotski", lifespan=lifespan, docs_url=None, redoc_url=None)

    def error(endpoint: str, e: ProtocolError | Rejected) -> JSONResponse:
        metrics.count_http(endpoint, e.status)
        if isinstance(e, Rejected):
            metrics.count_rejected(e.reason)
            return JSONResponse(error_body(e.message, e.status, code=e.reason), status_code=e.status)
        return JSONResponse(error_body(e.message, e.status, e.param, e.code), status_code=e.status)

    def check(req: ParsedRequest) -> None:
        for i, p in enumerate(req.prompts):
            try:
                llm.check_request(p, req.params)
            except ValueError as e:
                msg = str(e).removeprefix("prompt 0: ").removeprefix("prompt_token_ids[0] ")
                where = f"prompt {i}: " if len(req.prompts) > 1 else ""
                raise ProtocolError(f"{where}{msg}", param="prompt", code="context_length_exceeded"
                                    if "context" in msg else None) from None

    async def serve(request: Request, endpoint: str, parse, respond, stream_events):
        try:
            body = await _json_body(request)
            protocol.check_model(body, model_name)
            req = parse(body)
            check(req)
            call = _Call(worker, req)
            worker.submit(call.seqs)
        except (ProtocolError, Rejected) as e:
            return error(endpoint, e)
        if req.stream:
            metrics.count_http(endpoint, 200)
            return StreamingResponse(_stream(call, stream_events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            results = await _collect(request, call)
        except asyncio.CancelledError:  # uvicorn's drain deadline passed (SIGTERM): answer, then end
            metrics.count_http(endpoint, 503)
            return JSONResponse(error_body("the server shut down before this request finished (the drain "
                                           "deadline passed)", 503), status_code=503)
        if isinstance(results, ProtocolError):
            return error(endpoint, results)
        if results is None:  # the client went away
            metrics.count_http(endpoint, 499)
            return JSONResponse(error_body("client closed the request", 499), status_code=499)
        metrics.count_http(endpoint, 200)
        return JSONResponse(respond(req, results))

    async def _collect(request: Request, call: _Call):
        """Every sequence's "done" event, in order; a ProtocolError for an error; None on disconnect."""
        results: list = [None] * len(call.seqs)
        watch = asyncio.ensure_future(_disconnected(request))
        try:
            while any(r is None for r in results):
                get = asyncio.ensure_future(call.events.get())
                done, _ = await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    return None
                index, event = get.result()
                if event["type"] == "error":
                    return ProtocolError(event["message"], status=event["status"])
                if event["type"] == "done":
                    results[index] = event
            return results
        finally:
            watch.cancel()
            call.cancel()  # no-op for finished sequences

    async def _stream(call: _Call, stream_events):
        """Server-sent events: ``stream_events(call, index, event)`` -> chunks; then usage, then [DONE]."""
        pending, prompt_tokens, completion_tokens = len(call.seqs), 0, 0
        try:
            for chunk in stream_events(call, None, None):  # the opening chunk(s), if any
                yield _sse(chunk)
            while pending:
                index, event = await call.events.get()
                if event["type"] == "error":
                    yield _sse(error_body(event["message"], event["status"]))
                    break
                for chunk in stream_events(call, index, event):
                    yield _sse(chunk)
                if event["type"] == "done":
                    pending -= 1
                    prompt_tokens += event["prompt_tokens"]
                    completion_tokens += len(event["token_ids"])
            else:
                if call.req.include_usage:
                    obj = "chat.completion.chunk" if call.req.chat else "text_completion"
                    yield _sse(protocol.usage_chunk(call.req, model_name, obj, prompt_tokens, completion_tokens))
            yield "data: [DONE]\n\n"
        finally:
            call.cancel()  # the client went away mid-stream (or the stream ended: no-op)

    def completion_events(call: _Call, index, event):
        if event is None:
            return []
        if event["type"] == "delta":
            return [protocol.completion_chunk(call.req, model_name, index, event["text"], event["token_ids"])]
        return [protocol.completion_chunk(call.req, model_name, index, event["delta"], event["delta_token_ids"],
                                          event["finish_reason"])]

    def chat_events(call: _Call, index, event):
        if event is None:
            return [protocol.chat_chunk(call.req, model_name, {"role": "assistant", "content": ""}, [])]
        if event["type"] == "delta":
            return [protocol.chat_chunk(call.req, model_name, {"content": event["text"]}, event["token_ids"])]
        return [protocol.chat_chunk(call.req, model_name, {"content": event["delta"]}, event["delta_token_ids"],
                                    event["finish_reason"])]

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, "completions", lambda b: protocol.parse_completion(b, llm.tokenizer),
                           lambda req, rs: protocol.completion_body(req, model_name, rs), completion_events)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serve(request, "chat", lambda b: protocol.parse_chat(b, llm.tokenizer, chat_template, context),
                           lambda req, rs: protocol.chat_body(req, model_name, rs[0]), chat_events)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(metrics.started),
                                            "owned_by": "klotski", "max_model_len": context}]}

    @app.get("/health")
    async def health():
        if worker.alive:
            return {"status": "ok"}
        return JSONResponse({"status": "stopping"}, status_code=503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(worker.queued, worker.running, worker.group_capacity, worker.busy),
                                 media_type="text/plain; version=0.0.4")

    return app
