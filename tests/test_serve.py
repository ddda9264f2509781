"""`edge-sdk serve` with real, unmodified clients (openai, webuiapi) against a live server:
their images are the Pipeline's for the same seed; progress, interrupt, a client that leaves,
a full queue, model switching, health, and draining on SIGTERM."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image, ImageFilter

from edge_sdk import Pipeline
from tests.conftest import SERVE_KEY, SERVE_PASSWORD, SERVE_USER, needs_serve
from tests.serve_helpers import LiveServer, decode

pytestmark = needs_serve
SHAPES = {"sd_model_checkpoint": "shapes"}


@pytest.fixture(scope="module")
def pipes():
    return {name: Pipeline.load(name) for name in ("shapes", "shapes-lcm")}


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_openai_client_generates_the_pipelines_images(live_server, pipes):
    import openai
    client = openai.OpenAI(base_url=live_server.url + "/v1", api_key=SERVE_KEY)
    got = client.images.generate(model="shapes", prompt="two green squares", n=2,
                                 size="64x48", extra_body={"seed": 5, "steps": 6})
    want = pipes["shapes"]("two green squares", seed=5, steps=6, width=64, height=48,
                           num_images=2)
    assert len(got.data) == 2
    for item, image in zip(got.data, want):
        assert np.array_equal(decode(item.b64_json), _pixels(image))
    # another model by name; size omitted = its native size; its default steps
    lcm = client.images.generate(model="shapes-lcm", prompt="a red circle",
                                 extra_body={"seed": 3})
    assert np.array_equal(decode(lcm.data[0].b64_json),
                          _pixels(pipes["shapes-lcm"]("a red circle", seed=3)))
    assert sorted(m.id for m in client.models.list()) == ["shapes", "shapes-lcm"]
    log = live_server.log.read_text()
    assert "POST /v1/images/generations 200" in log and "two green squares" not in log


def test_openai_edit_inpaints_where_the_mask_is_transparent(live_server, pipes):
    import openai
    client = openai.OpenAI(base_url=live_server.url + "/v1", api_key=SERVE_KEY)
    source = pipes["shapes"]("a blue square", seed=1, steps=6, width=64, height=64)
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))  # OpenAI: transparent = edit
    files = {}
    for name, img in (("image", source), ("mask", mask)):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        files[name] = (f"{name}.png", buf.getvalue(), "image/png")
    got = client.images.edit(model="shapes", prompt="a red circle", image=files["image"],
                             mask=files["mask"], extra_body={"seed": 2, "steps": 6})
    white = Image.new("L", (64, 64), 0)
    white.paste(255, (16, 16, 48, 48))
    want = pipes["shapes"]("a red circle", seed=2, steps=6, image=source, mask_image=white)
    assert np.array_equal(decode(got.data[0].b64_json), _pixels(want))


def test_webuiapi_txt2img_and_img2img_match_the_pipeline(live_server, pipes):
    import webuiapi
    port = int(live_server.url.rsplit(":", 1)[1])
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, username=SERVE_USER,
                            password=SERVE_PASSWORD)
    shapes = pipes["shapes"]
    got = api.txt2img(prompt="a (blue:1.2) triangle", seed=9, steps=6, width=64, height=64,
                      cfg_scale=3, batch_size=2, override_settings=SHAPES)
    want = shapes("a (blue:1.2) triangle", seed=9, steps=6, width=64, height=64,
                  guidance_scale=3, scheduler="euler_a", num_images=2)
    assert [np.array_equal(_pixels(g), _pixels(w)) for g, w in zip(got.images, want)] == \
        [True, True]
    assert got.info["all_seeds"] == [9, 10] and "Sampler: Euler a" in got.info["infotexts"][0]
    assert got.images[0].info["parameters"].startswith("a (blue:1.2) triangle\nSteps: 6")
    source = want[0]
    plain = api.img2img(images=[source], prompt="a red circle", seed=4, steps=6, width=64,
                        height=64, cfg_scale=3, denoising_strength=0.6,
                        sampler_name="DPM++ 2M", scheduler="Karras", override_settings=SHAPES)
    ref = shapes("a red circle", seed=4, steps=6, guidance_scale=3, image=source, strength=0.6,
                 scheduler="dpmpp_2m_karras")
    assert np.array_equal(_pixels(plain.image), _pixels(ref))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    # the API key as basic auth's password, with any user name, works as well
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, username="anyone", password=SERVE_KEY)
    masked = api.img2img(images=[source], mask_image=mask, mask_blur=0, inpaint_full_res=False,
                         prompt="a red circle", seed=4, steps=6, width=64, height=64,
                         cfg_scale=3, denoising_strength=0.9, override_settings=SHAPES)
    ref = shapes("a red circle", seed=4, steps=6, guidance_scale=3, image=source,
                 mask_image=mask, strength=0.9, scheduler="euler_a")
    assert np.array_equal(_pixels(masked.image), _pixels(ref))
    # webuiapi's defaults: the mask blurred by 4, only the masked region repainted
    # ("inpaint_full_res", padding 0), at the request's size: diffusers' padding_mask_crop
    default = api.img2img(images=[source], mask_image=mask, prompt="a red circle", seed=4,
                          steps=6, width=64, height=64, cfg_scale=3, denoising_strength=0.9,
                          override_settings=SHAPES)
    ref = shapes("a red circle", seed=4, steps=6, guidance_scale=3, image=source,
                 mask_image=mask.filter(ImageFilter.GaussianBlur(4)), strength=0.9,
                 scheduler="euler_a", padding_mask_crop=0, width=64, height=64)
    assert np.array_equal(_pixels(default.image), _pixels(ref))


def _post_async(server: LiveServer, path: str, body: dict) -> tuple[threading.Thread, list]:
    out: list = []
    t = threading.Thread(target=lambda: out.append(
        server.request("POST", path, body, key=SERVE_KEY)))
    t.start()
    return t, out


def _wait_running(server: LiveServer, min_step: int = 1, timeout: float = 60,
                  preview: bool = False) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, _, p = server.request("GET", "/sdapi/v1/progress", key=SERVE_KEY)
        if p["state"]["sampling_step"] >= min_step and (p["current_image"] or not preview):
            return p
        time.sleep(0.02)
    raise AssertionError("no generation started")


def _wait_queued(server: LiveServer, n: int = 1, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while server.request("GET", "/health")[2]["queued"] < n:
        assert time.monotonic() < deadline, "nothing was queued"
        time.sleep(0.01)


LONG = {"prompt": "a red circle", "steps": 150, "width": 256, "height": 256, "seed": 1,
        "override_settings": SHAPES}


def test_progress_preview_and_interrupt(live_server):
    thread, out = _post_async(live_server, "/sdapi/v1/txt2img", LONG)
    p = _wait_running(live_server, min_step=10, preview=True)  # every 10 steps (A1111's)
    assert 0 < p["progress"] < 1 and p["state"]["sampling_steps"] == 150
    assert decode(p["current_image"]).shape == (256, 256, 3)
    assert live_server.request("POST", "/sdapi/v1/interrupt", key=SERVE_KEY)[0] == 200
    thread.join(60)
    status, _, body = out[0]
    assert status == 200 and len(body["images"]) == 1  # A1111: the image so far
    info = json.loads(body["info"])
    assert info["interrupted"] is True
    # the worker is free: the next request is served
    status, _, body = live_server.request("POST", "/sdapi/v1/txt2img", {
        "prompt": "a square", "steps": 4, "width": 64, "height": 64}, key=SERVE_KEY)
    assert status == 200 and not json.loads(body["info"])["interrupted"]


def _open_post(host: str, port: int, body: bytes) -> socket.socket:
    """A txt2img request sent by hand on a socket left open (to be closed mid-request)."""
    sock = socket.create_connection((host, port))
    sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                 b"application/json\r\nAuthorization: Bearer " + SERVE_KEY.encode() +
                 b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


def test_a_client_that_leaves_frees_the_worker(live_server):
    host, port = live_server.url.removeprefix("http://").rsplit(":", 1)
    body = (b'{"prompt": "a red circle", "steps": 150, "width": 256, "height": 256, '
            b'"override_settings": {"sd_model_checkpoint": "shapes"}}')
    sock = _open_post(host, int(port), body)
    _wait_running(live_server, min_step=2)
    sock.close()
    deadline = time.monotonic() + 30
    while live_server.request("GET", "/health")[2]["running"]:
        assert time.monotonic() < deadline, "the generation went on after its client left"
        time.sleep(0.02)
    log = live_server.log.read_text()
    assert "stopping (disconnected)" in log and "(the client left)" in log
    # a queued request whose client leaves is dropped before it runs
    first, out = _post_async(live_server, "/sdapi/v1/txt2img", LONG)
    _wait_running(live_server)
    queued = _open_post(host, int(port), body)
    _wait_queued(live_server)
    queued.close()
    deadline = time.monotonic() + 30
    while live_server.request("GET", "/health")[2]["queued"]:
        assert time.monotonic() < deadline, "the queued request stayed after its client left"
        time.sleep(0.02)
    assert "dropped (disconnected)" in live_server.log.read_text()
    live_server.request("POST", "/sdapi/v1/interrupt", key=SERVE_KEY)
    first.join(60)
    assert out[0][0] == 200
    status, _, _ = live_server.request("POST", "/v1/images/generations", {
        "prompt": "a square", "size": "64x64", "steps": 4}, key=SERVE_KEY)
    assert status == 200


def test_a_full_queue_answers_429_with_retry_after(live_server):
    first, out1 = _post_async(live_server, "/sdapi/v1/txt2img", LONG)
    _wait_running(live_server)
    second, out2 = _post_async(live_server, "/sdapi/v1/txt2img", {**LONG, "steps": 4})
    _wait_queued(live_server)
    status, headers, body = live_server.request("POST", "/v1/images/generations", {
        "prompt": "a square", "size": "64x64"}, key=SERVE_KEY)
    assert status == 429 and int(headers["retry-after"]) >= 1
    assert body["error"]["type"] == "BusyError"
    live_server.request("POST", "/sdapi/v1/interrupt", key=SERVE_KEY)
    first.join(60), second.join(60)
    assert out1[0][0] == 200 and out2[0][0] == 200


def test_models_options_samplers_and_health(live_server):
    status, _, models = live_server.request("GET", "/sdapi/v1/sd-models", key=SERVE_KEY)
    assert status == 200 and [m["model_name"] for m in models] == ["shapes", "shapes-lcm"]
    lcm = models[1]["title"]
    assert live_server.request("POST", "/sdapi/v1/options", {"sd_model_checkpoint": lcm},
                               key=SERVE_KEY)[0] == 200
    opts = live_server.request("GET", "/sdapi/v1/options", key=SERVE_KEY)[2]
    assert opts["sd_model_checkpoint"] == lcm
    health = live_server.request("GET", "/health")  # open: no credentials needed
    assert health[0] == 200 and health[2]["model"] == "shapes-lcm"
    assert health[2]["worker_alive"] and health[2]["model_loaded"]
    names = [s["name"] for s in live_server.request("GET", "/sdapi/v1/samplers",
                                                    key=SERVE_KEY)[2]]
    assert {"Euler a", "DPM++ 2M Karras", "LCM"} <= set(names)
    assert live_server.request("POST", "/sdapi/v1/options", {"sd_model_checkpoint": "shapes"},
                               key=SERVE_KEY)[0] == 200


def test_sigterm_drains_the_running_generation_and_refuses_the_queued(tmp_path):
    server = LiveServer(["--log-prompts"], tmp_path / "server.log")
    try:
        first, out1 = _post_async(server, "/sdapi/v1/txt2img", {**LONG, "steps": 60})
        _wait_running(server)
        second, out2 = _post_async(server, "/sdapi/v1/txt2img", {**LONG, "steps": 4})
        _wait_queued(server)
    finally:
        code = server.stop()
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with pytest.raises(OSError):  # it no longer listens
        socket.create_connection((host, int(port)), timeout=5)
    first.join(60), second.join(60)
    assert out1[0][0] == 200 and len(out1[0][2]["images"]) == 1  # finished, whole
    assert not json.loads(out1[0][2]["info"])["interrupted"]
    assert out2[0][0] == 503 and "shutting down" in out2[0][2]["detail"]
    assert code in (0, 143), code
    assert "prompt='a red circle'" in server.log.read_text()  # --log-prompts


def test_beyond_loopback_it_refuses_to_start_without_credentials():
    proc = subprocess.run([sys.executable, "-m", "edge_sdk.cli", "serve", "--host", "0.0.0.0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--api-key-file" in proc.stderr
    assert "--insecure" in proc.stderr

