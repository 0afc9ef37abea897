"""The inference service (issue 15, part 3): routes, batching, bad requests answered with a 4xx and one line,
the service serving on after each. In process (FastAPI's TestClient, real model) and end to end (the real
server started as a subprocess on 127.0.0.1, real HTTP)."""

from __future__ import annotations

import base64
import io
import socket
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests._bundles import demo_bundle

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_bundle(tmp_path_factory.mktemp("server"))


@pytest.fixture(scope="module")
def images(bundle: Path) -> list[Path]:
    return sorted((bundle.parent / "raw" / "images").glob("*.png"))


@pytest.fixture(scope="module")
def predictor(bundle: Path):
    from tasks import Predictor

    return Predictor.load(bundle, max_image_pixels=20_000)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (valid CRC, no pixel data to speak of)."""
    ok, buf = cv2.imencode(".png", np.zeros((4, 4), np.uint8))
    assert ok
    data = bytearray(buf.tobytes())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def npy(arr: np.ndarray) -> bytes:
    """``np.save``'s bytes of ``arr`` (a raw frame sent without image encoding)."""
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def bad_requests() -> list[tuple[bytes, int, str]]:
    """``(body, expected status, words of the reason)`` of each kind of bad request."""
    ok, tiff = cv2.imencode(".tiff", np.zeros((16, 16), np.float32))
    assert ok
    ok, big = cv2.imencode(".png", np.zeros((200, 200, 3), np.uint8))  # 40000 px over the 20000 px limit
    return [
        (npy(np.zeros((40, 40, 2), np.uint8)), 422, "is not an image of 1, 3 (BGR) or 4 (BGRA) channels"),
        (npy(np.zeros((40, 40, 5), np.uint16)), 422, "is not an image of 1, 3 (BGR) or 4 (BGRA) channels"),
        (npy(np.zeros((200, 200), np.uint8)), 413, "over the limit"),
        (b"", 400, "empty request body"),
        (b"this is not an image", 415, "not a readable image"),
        (png_claiming(100_000, 100_000), 413, "over the limit"),
        (big.tobytes(), 413, "over the limit"),
        (tiff.tobytes(), 422, "float32 pixels are not supported"),
    ]


def check_prediction(body: dict, want, classmap: bool) -> None:
    assert body["summary"] == want.summary
    assert [p["points"] for p in body["polygons"]] == [p["points"] for p in want.polygons]
    if classmap:
        png = np.frombuffer(base64.b64decode(body["classmap_png"]), np.uint8)
        np.testing.assert_array_equal(cv2.imdecode(png, cv2.IMREAD_UNCHANGED), want.class_map)
    else:
        assert "classmap_png" not in body


def test_routes_and_bad_requests_in_process(predictor, images) -> None:
    from fastapi.testclient import TestClient

    from deployments.inference_server import create_app

    with TestClient(create_app(predictor)) as client:
        assert client.get("/health").json()["status"] == "ok"
        meta = client.get("/model").json()
        assert meta["classes"] == predictor.bundle.meta["classes"] and meta["runtime"] == "full-onnx"
        for body, status, words in bad_requests():
            r = client.post("/predict", content=body)
            assert r.status_code == status, (status, r.text)
            assert words in r.json()["detail"] and "\n" not in r.json()["detail"]
            good = client.post("/predict?classmap=true", content=images[0].read_bytes())  # still serving
            assert good.status_code == 200
            check_prediction(good.json(), predictor.predict(images[0]), classmap=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def server(bundle: Path):
    """The real server on a free loopback port; its base URL once /health answers (at most 90 s)."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "deployments.inference_server", "--model", str(bundle), "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--max-image-pixels", "20000", "--batch-window-ms", "20"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not answer /health within 90 s"
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.mark.slow
def test_server_end_to_end_good_bad_and_concurrent_requests(server: str, predictor, images) -> None:
    import httpx

    with httpx.Client(base_url=server, timeout=30) as client:
        assert client.get("/model").json()["full_model"]["file"] == "model_full.onnx"
        r = client.post("/predict", params={"classmap": "true"}, content=images[0].read_bytes())
        assert r.status_code == 200
        check_prediction(r.json(), predictor.predict(images[0]), classmap=True)
        raw = cv2.imread(str(images[2]), cv2.IMREAD_GRAYSCALE).astype(np.uint16) << 8  # a raw 16-bit gray frame
        r = client.post("/predict", content=npy(raw))
        assert r.status_code == 200, r.text
        check_prediction(r.json(), predictor.predict(raw), classmap=False)
        for body, status, words in bad_requests():  # 8 bad requests, each followed by a good one
            bad = client.post("/predict", content=body)
            assert bad.status_code == status and words in bad.json()["detail"], bad.text
            assert client.post("/predict", content=images[1].read_bytes()).status_code == 200
        before = client.get("/health").json()

    def send(path: Path) -> dict:
        with httpx.Client(base_url=server, timeout=30) as c:
            resp = c.post("/predict", content=path.read_bytes())
            assert resp.status_code == 200, resp.text
            return resp.json()

    sent = [images[i % len(images)] for i in range(16)]
    with ThreadPoolExecutor(8) as pool:  # 16 requests from 8 clients at once
        answers = list(pool.map(send, sent))
    for path, body in zip(sent, answers):
        check_prediction(body, predictor.predict(path), classmap=False)
    after = httpx.get(f"{server}/health", timeout=10).json()
    assert after["images"] - before["images"] == 16
    assert after["batches"] - before["batches"] < 16  # requests that arrived together shared a batch
