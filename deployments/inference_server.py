"""HTTP inference service for a deployment bundle (FastAPI + uvicorn; no Prefect).

``python -m deployments.inference_server --model runs/<name>/<ts>/deployment_model [--host 127.0.0.1 --port 8000]``

Routes:
- ``POST /predict``: the image file's bytes as the body (any format OpenCV reads, or a NumPy ``.npy`` array:
  HxW gray, HxWx3 BGR or HxWx4 BGRA, 8 or 16 bits, read without pickle); JSON
  ``{"polygons": [...], "summary": {...}}``, plus ``"classmap_png"`` (base64 PNG of the class index map) with
  ``?classmap=true``;
- ``GET /health``: ``{"status": "ok", ...}`` once the model is loaded;
- ``GET /model``: the bundle's ``model.json`` (and the runtime in use).

The model is loaded once, at start-up (:class:`tasks.predict.predictor.Predictor`). Requests that arrive together
are batched: each decoded image waits at most ``--batch-window-ms`` in a queue, and the images taken together go
through one :meth:`~tasks.predict.predictor.Predictor.predict_batch`. A bad request gets a 4xx with a one-line
reason and the service keeps serving: 400 empty body, 415 not a readable image, 413 over the pixel limit (read
from the header before decoding) or the body limit, 422 pixel depth or channels not supported.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from tasks.imageio import ImageTooLargeError, InputDataError, UnsupportedPixelsError, encode_png
from tasks.predict.predictor import Prediction, Predictor

logger = logging.getLogger("patchflow.server")
MAX_BODY_BYTES = 512 * 2**20


class RequestError(Exception):
    """A bad request: its HTTP status and one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def request_error(exc: InputDataError) -> RequestError:
    """The HTTP status of an image that cannot be predicted (see the module docstring)."""
    if isinstance(exc, ImageTooLargeError):
        return RequestError(413, str(exc))
    if isinstance(exc, UnsupportedPixelsError):
        return RequestError(422, str(exc))
    return RequestError(415, str(exc))


@dataclass
class Batcher:
    """Gathers the images of requests that arrive together (up to ``window_s`` apart, at most ``max_images``)
    and predicts them in one batch, on one worker thread (the event loop keeps accepting requests)."""

    predictor: Predictor
    window_s: float = 0.005
    max_images: int = 16
    batches: int = 0
    images: int = 0
    _queue: asyncio.Queue | None = field(default=None, repr=False)
    _task: asyncio.Task | None = field(default=None, repr=False)
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "predict"), repr=False)

    def start(self) -> None:
        """Start the batching loop (inside the running event loop)."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop the loop and the worker thread."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def predict(self, image: np.ndarray) -> Prediction:
        """The prediction of one decoded BGR image, batched with the images queued at the same time."""
        assert self._queue is not None, "Batcher.start() first"
        done: asyncio.Future[Prediction] = asyncio.get_running_loop().create_future()
        await self._queue.put((image, done))
        return await done

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.window_s
            while len(batch) < self.max_images:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except TimeoutError:
                    break
            results = await loop.run_in_executor(self._pool, self._predict, [img for img, _ in batch])
            self.batches, self.images = self.batches + 1, self.images + len(batch)
            for (_, fut), res in zip(batch, results):
                if fut.done():  # the client went away
                    continue
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)

    def _predict(self, images: list[np.ndarray]) -> list[Prediction | BaseException]:
        try:
            return list(self.predictor.predict_batch(images))
        except Exception:  # one image's failure is its own request's only: predict them one by one
            out: list[Prediction | BaseException] = []
            for img in images:
                try:
                    out.append(self.predictor.predict(img))
                except Exception as exc:
                    out.append(exc)
            return out


def response(pred: Prediction, classmap: bool) -> dict[str, Any]:
    """JSON body of a prediction: polygons, summary and (``classmap``) the class map as a base64 PNG."""
    body = pred.to_json()
    if classmap:
        png = encode_png(pred.class_map.astype(np.uint8 if pred.class_map.max(initial=0) < 256 else np.uint16), "")
        body["classmap_png"] = base64.b64encode(png).decode("ascii")
    return body


def create_app(predictor: Predictor, window_s: float = 0.005, max_images: int = 16) -> FastAPI:
    """The FastAPI application serving ``predictor`` (see the module docstring)."""
    batcher = Batcher(predictor, window_s, max_images)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="patchflow inference", lifespan=lifespan)

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "runtime": predictor.runtime, "batches": batcher.batches, "images": batcher.images}

    @app.get("/model")
    async def model() -> dict[str, Any]:
        return {**predictor.bundle.meta, "runtime": predictor.runtime, "bundle": str(predictor.bundle.root)}

    @app.post("/predict")
    async def predict(request: Request, classmap: bool = False) -> dict[str, Any]:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise RequestError(
                413, f"request body of {declared} bytes is over {MAX_BODY_BYTES} bytes; send a smaller image"
            )
        data = await request.body()
        if not data:
            raise RequestError(400, "empty request body; send the image file's bytes as the body")
        try:
            image = await run_in_threadpool(predictor.image, data, "request body")
        except InputDataError as exc:
            raise request_error(exc) from None
        return response(await batcher.predict(image), classmap)

    return app


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point: load the bundle once, then serve until Ctrl-C."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="deployment_model/ folder (or a file in it)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runtime", default="auto", choices=["auto", "full-onnx", "two-part"])
    ap.add_argument("--batch-window-ms", type=float, default=5.0, help="how long a request waits for others")
    ap.add_argument("--max-batch", type=int, default=16, help="most images predicted together")
    ap.add_argument("--max-image-pixels", type=int, help="refuse larger images (default 200000000)")
    ap.add_argument("--log-level", default="warning")
    ap.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load a bundle without _manifest.json or with a pickled classifier: only for bundles you trust",
    )
    a = ap.parse_args(argv)
    try:
        predictor = Predictor.load(
            a.model, a.device, a.runtime, trust_pickle=a.trust_pickle, max_image_pixels=a.max_image_pixels
        )
        predictor.predict(np.zeros((8, 8, 3), np.uint8))  # warm-up: the first request is not the slow one
    except Exception as exc:
        from tasks.cli import cli_error

        known = cli_error(exc)
        if known is None:
            raise
        print(f"error: {known[1]}", file=sys.stderr)
        raise SystemExit(known[0]) from None
    import uvicorn

    app = create_app(predictor, a.batch_window_ms / 1000.0, a.max_batch)
    print(f"serving {predictor.bundle.root} ({predictor.runtime}) on http://{a.host}:{a.port}", flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, access_log=False)


if __name__ == "__main__":
    main(sys.argv[1:])
