"""Downloads: the real HTTP client against a loopback server (redirects, resume, hashes, errors, token)."""
import errno
import hashlib
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import yaml
from safetensors.torch import save as safetensors_bytes

from lorafind_utils.catalog import fetch as fetch_mod
from lorafind_utils.catalog.civitai import fetch_thumbnails
from lorafind_utils.catalog.fetch import (
    BASE_MODEL_PATTERNS,
    CONTROLNET_PATTERNS,
    fetch,
    fetch_loras,
    fetch_models,
    fetch_resnet50_weights,
    needed_items,
)
from lorafind_utils.core import download as download_mod
from lorafind_utils.core.config import load_profile
from lorafind_utils.core.download import DiskFullError, FetchError, HashMismatchError, download
from lorafind_utils.models.loras import inspect_lora

TOKEN = "good-token"
SECRET = "s3cr3t-token"


def _lora_bytes(seed: int) -> bytes:
    """A small real kohya-layout SD1.5 LoRA (two attention modules, rank 4) as safetensors bytes."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for m in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
              "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"):
        sd[f"{m}.lora_down.weight"] = torch.randn(4, 320, generator=g)
        sd[f"{m}.lora_up.weight"] = torch.randn(320, 4, generator=g)
        sd[f"{m}.alpha"] = torch.tensor(4.0)
    return safetensors_bytes(sd)


def _pickle_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, buf)
    return buf.getvalue()


FILES = {"a": _lora_bytes(1), "b": _lora_bytes(2), "evil": _pickle_bytes()}
#: Civitai preview files served under /img/<name>.
PREVIEWS = {"p0.jpeg": b"\xff\xd8 preview zero", "p1.png": b"\x89PNG preview one", "p2": b"\xff\xd8 preview two",
            "clip.mp4": b"video", "loop.webm": b"video too"}
QUERY_SECRET = "q-secret-value"


def _model_version(vid: str, port: int):
    """The JSON body of ``/api/v1/model-versions/<vid>`` (None: 404; bytes: sent as they are)."""
    img = f"http://127.0.0.1:{port}/img"
    if vid == "501":  # 3 images, a video (typed) and a webm (untyped) in between
        return {"id": 501, "images": [
            {"url": f"{img}/p0.jpeg", "type": "image", "nsfwLevel": 1, "width": 512, "height": 768},
            {"url": f"{img}/clip.mp4", "type": "video", "nsfwLevel": 1, "width": 512, "height": 512},
            {"url": f"{img}/p1.png?token={QUERY_SECRET}", "type": "image", "nsfwLevel": 1, "width": 512, "height": 512},
            {"url": f"{img}/loop.webm", "nsfwLevel": 1},
            {"url": f"{img}/p2", "type": "image", "nsfwLevel": 2, "width": 640, "height": 480}]}
    if vid == "502":  # only a video: no images
        return {"id": 502, "images": [{"url": f"{img}/clip.mp4", "type": "video"}]}
    if vid == "777":
        return b"<html>not json"
    return None


class _Handler(BaseHTTPRequestHandler):
    """Routes: /file/x (Range), /redirect/x, /xredirect/x (to localhost), /drop/x (drops the first answer
    half-way), /halfdrop/x (drops every answer half-way), /flaky/x (503 every other request), /auth/x,
    /auth-xredirect/x (auth, then a redirect to another host)."""

    server: "_Server"

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        self.server.log.append({"path": self.path, "host": self.headers.get("Host"),
                                "authorization": self.headers.get("Authorization"),
                                "range": self.headers.get("Range")})
        parts = self.path.split("?")[0].strip("/").split("/")
        route, name = parts[0], (parts[1] if len(parts) > 1 else "")
        if parts[:3] == ["api", "v1", "model-versions"] and len(parts) == 4:
            body = _model_version(parts[3], self.server.server_port)
            if body is None:
                return self._status(404)
            return self._serve(body if isinstance(body, bytes) else json.dumps(body).encode())
        if route == "img" and name in PREVIEWS:
            return self._serve(PREVIEWS[name])
        if name not in FILES:
            return self._status(404)
        if route == "file":
            return self._serve(FILES[name])
        if route == "redirect":
            return self._redirect(f"/file/{name}")
        if route == "xredirect":
            return self._redirect(f"http://localhost:{self.server.server_port}/file/{name}")
        if route in ("auth", "auth-xredirect"):
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._status(401)
            if route == "auth":
                return self._serve(FILES[name])
            return self._redirect(f"http://localhost:{self.server.server_port}/file/{name}")
        if route == "flaky":
            if sum(r["path"] == self.path for r in self.server.log) % 2:
                return self._status(503)
            return self._serve(FILES[name])
        if route == "drop" and self.headers.get("Range"):
            return self._serve(FILES[name])
        if route in ("drop", "halfdrop"):
            rng = self.headers.get("Range")
            start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
            body = FILES[name][start:]
            self.send_response(206 if rng else 200)
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{len(FILES[name]) - 1}/{len(FILES[name])}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])  # then the connection drops
            self.wfile.flush()
            self.close_connection = True
            return None
        return self._status(404)

    def _status(self, code: int):
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _redirect(self, location: str):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve(self, data: bytes):
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = data[start:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    log: list


@pytest.fixture(scope="module")
def server():
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.log = []
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def base(server, monkeypatch):
    """The server's base URL, with an empty request log and no proxy in the way."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("CIVITAI_TOKEN", raising=False)
    monkeypatch.setattr(download_mod, "RETRY_BACKOFF", 0.0)  # retry at once
    # the loopback server plays Civitai here (the allow-list itself: tests/test_hostile.py)
    monkeypatch.setattr(download_mod, "TOKEN_HOSTS", ("127.0.0.1",))
    server.log.clear()
    return f"http://127.0.0.1:{server.server_port}"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_fetch_errors_make_the_cli_exit_2_with_the_message(monkeypatch, capsys):
    import lorafind_utils.catalog.fetch as fetch_mod
    from lorafind_utils.app.cli import main

    for err in (
        FetchError("anime: HTTP 404"),
        HashMismatchError("anime: SHA-256 mismatch"),
        DiskFullError("disk full"),
    ):

        def failing(cfg, what=None, err=err):
            raise err

        monkeypatch.setattr(fetch_mod, "fetch", failing)
        assert main(["fetch", "--profile", "paper"]) == 2
        assert capsys.readouterr().err.strip() == f"lorafind: error: {err}"


def test_redirect_is_followed_and_file_verified(base, server, tmp_path):
    dest = tmp_path / "a.safetensors"
    res = download(f"{base}/redirect/a", dest, expected_sha256=sha(FILES["a"]), progress=False)
    assert dest.read_bytes() == FILES["a"]
    assert (res.path, res.sha256, res.bytes, res.resumed, res.skipped) == (dest, sha(FILES["a"]), len(FILES["a"]),
                                                                          False, False)
    assert [r["path"] for r in server.log] == ["/redirect/a", "/file/a"]
    assert not dest.with_name("a.safetensors.part").exists()
    assert inspect_lora(dest).layout == "kohya"


def test_token_is_sent_to_first_host_only(base, server, tmp_path):
    dest = tmp_path / "a.safetensors"
    res = download(f"{base}/auth-xredirect/a", dest, token=TOKEN, progress=False)
    assert res.sha256 == sha(FILES["a"])
    first, second = server.log
    assert first["path"] == "/auth-xredirect/a" and first["host"].startswith("127.0.0.1:")
    assert first["authorization"] == f"Bearer {TOKEN}"
    assert second["path"] == "/file/a" and second["host"].startswith("localhost:")
    assert second["authorization"] is None  # dropped when the redirect changed host
    assert all(TOKEN not in r["path"] for r in server.log)  # never in a URL
    # same-host redirect keeps it (requests' rule), cross-host without auth is plain
    server.log.clear()
    download(f"{base}/xredirect/b", tmp_path / "b.safetensors", token=TOKEN, progress=False)
    assert [r["authorization"] for r in server.log] == [f"Bearer {TOKEN}", None]


def test_dropped_connection_resumes_with_range(base, server, tmp_path):
    dest = tmp_path / "a.safetensors"
    res = download(f"{base}/drop/a", dest, expected_sha256=sha(FILES["a"]), progress=False)
    assert dest.read_bytes() == FILES["a"]
    assert res.sha256 == sha(FILES["a"]) and res.resumed is True and res.skipped is False
    half = len(FILES["a"]) // 2
    assert [(r["path"], r["range"]) for r in server.log] == [("/drop/a", None), ("/drop/a", f"bytes={half}-")]


def test_leftover_part_of_a_killed_run_is_resumed(base, server, tmp_path):
    dest = tmp_path / "a.safetensors"
    part = tmp_path / "a.safetensors.part"
    part.write_bytes(FILES["a"][:1000])
    res = download(f"{base}/file/a", dest, expected_sha256=sha(FILES["a"]), progress=False)
    assert res.resumed is True and dest.read_bytes() == FILES["a"] and not part.exists()
    assert [r["range"] for r in server.log] == ["bytes=1000-"]
    # a .part that is already complete: the server answers 416 and the file is taken as it is
    server.log.clear()
    dest2 = tmp_path / "b.safetensors"
    (tmp_path / "b.safetensors.part").write_bytes(FILES["b"])
    res2 = download(f"{base}/file/b", dest2, expected_sha256=sha(FILES["b"]), progress=False)
    assert res2.sha256 == sha(FILES["b"]) and dest2.read_bytes() == FILES["b"]
    assert [r["range"] for r in server.log] == [f"bytes={len(FILES['b'])}-"]
    # a .part longer than the file (not a prefix of it): started over from byte 0
    server.log.clear()
    dest3 = tmp_path / "c.safetensors"
    (tmp_path / "c.safetensors.part").write_bytes(b"x" * (len(FILES["a"]) + 10))
    res3 = download(f"{base}/file/a", dest3, progress=False)
    assert dest3.read_bytes() == FILES["a"] and res3.resumed is False
    assert [r["range"] for r in server.log] == [f"bytes={len(FILES['a']) + 10}-", None]


def test_transient_errors_are_retried_and_exhausted_retries_keep_the_part(base, server, tmp_path):
    res = download(f"{base}/flaky/a", tmp_path / "a.safetensors", progress=False)
    assert res.sha256 == sha(FILES["a"]) and [r["path"] for r in server.log] == ["/flaky/a"] * 2
    server.log.clear()
    dest = tmp_path / "b.safetensors"
    part = tmp_path / "b.safetensors.part"
    with pytest.raises(FetchError) as exc:
        download(f"{base}/halfdrop/b", dest, progress=False, retries=2, token=SECRET)
    starts = [0]  # three attempts (1 + 2 retries), each receiving half of what is left
    for _ in range(3):
        starts.append(starts[-1] + (len(FILES["b"]) - starts[-1]) // 2)
    kept = starts[-1]
    msg = str(exc.value)
    assert "failed after 2 retries" in msg and f"the {kept} bytes downloaded are kept in {part}" in msg
    assert SECRET not in msg and part.read_bytes() == FILES["b"][:kept] and not dest.exists()
    assert [r["range"] for r in server.log] == [None, f"bytes={starts[1]}-", f"bytes={starts[2]}-"]
    res = download(f"{base}/file/b", dest, expected_sha256=sha(FILES["b"]), progress=False)
    assert res.resumed is True and dest.read_bytes() == FILES["b"]


def test_wrong_hash_is_quarantined(base, tmp_path):
    dest = tmp_path / "loras" / "a.safetensors"
    wrong = "0" * 64
    with pytest.raises(HashMismatchError) as exc:
        download(f"{base}/file/a", dest, expected_sha256=wrong, progress=False)
    q = tmp_path / "loras" / "quarantine" / "a.safetensors"
    msg = str(exc.value)
    assert f"expected {wrong}" in msg and f"got {sha(FILES['a'])}" in msg and str(q) in msg
    assert not dest.exists() and not dest.with_name("a.safetensors.part").exists()
    assert q.read_bytes() == FILES["a"]


def test_existing_file_with_wrong_hash_is_moved_aside_and_downloaded_again(base, server, tmp_path):
    dest = tmp_path / "a.safetensors"
    dest.write_bytes(b"damaged")
    res = download(f"{base}/file/a", dest, expected_sha256=sha(FILES["a"]), progress=False)
    assert res.skipped is False and dest.read_bytes() == FILES["a"]
    assert (tmp_path / "quarantine" / "a.safetensors").read_bytes() == b"damaged"
    assert len(server.log) == 1


def test_401_says_a_token_is_needed_and_never_shows_it(base, tmp_path):
    dest = tmp_path / "a.safetensors"
    with pytest.raises(FetchError) as exc:
        download(f"{base}/auth/a", dest, token=SECRET, progress=False, label="anime (Civitai version 60568)")
    msg = str(exc.value)
    assert "HTTP 401" in msg and "set CIVITAI_TOKEN (a Civitai API key)" in msg and "refused the token" in msg
    assert SECRET not in msg and SECRET not in repr(exc.value.args)
    assert exc.value.__cause__ is None and exc.value.__context__ is None
    assert not dest.exists() and list(tmp_path.iterdir()) == []  # nothing written anywhere
    with pytest.raises(FetchError, match=r"needs a token \(HTTP 401\); set CIVITAI_TOKEN \(a Civitai API key"):
        download(f"{base}/auth/a", dest, progress=False)
    res = download(f"{base}/auth/a", dest, token=TOKEN, progress=False)
    assert res.sha256 == sha(FILES["a"])


def test_404_names_the_model_and_url_without_secret_query(base, tmp_path):
    with pytest.raises(FetchError) as exc:
        download(f"{base}/file/nope?type=Model&token={SECRET}", tmp_path / "x.safetensors", progress=False,
                 label="disco (Civitai version 169568)")
    msg = str(exc.value)
    assert "disco (Civitai version 169568)" in msg and "HTTP 404" in msg
    assert f"{base}/file/nope?type=Model&token=<redacted>" in msg and SECRET not in msg
    with pytest.raises(FetchError, match=r"/missing: not found \(HTTP 404\)"):
        download(f"{base}/missing", tmp_path / "y.safetensors", progress=False)


def test_second_call_downloads_nothing(base, server, tmp_path):
    dest = tmp_path / "a.safetensors"
    first = download(f"{base}/file/a", dest, progress=False)
    n = len(server.log)
    second = download(f"{base}/file/a", dest, expected_sha256=first.sha256, progress=False)
    third = download(f"{base}/file/a", dest, progress=False)
    assert n == 1 and len(server.log) == 1
    assert (second.skipped, second.resumed, second.sha256, second.bytes) == (True, False, first.sha256, len(FILES["a"]))
    assert third.skipped is True


class _FullDisk:
    """A file whose writes fail with ENOSPC once ``budget`` bytes are written (the rest are real)."""

    def __init__(self, f, budget: int):
        self.f, self.budget = f, budget

    def write(self, data: bytes) -> int:
        if self.budget < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget -= len(data)
        return self.f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_full_disk_keeps_the_part_for_a_later_resume(base, tmp_path, monkeypatch):
    dest = tmp_path / "a.safetensors"
    part = tmp_path / "a.safetensors.part"
    monkeypatch.setattr(download_mod, "open", lambda p, mode="rb": _FullDisk(open(p, mode), 2048), raising=False)
    with pytest.raises(DiskFullError) as exc:
        download(f"{base}/file/a", dest, progress=False, chunk=1024)
    msg = str(exc.value)
    assert msg.startswith(f"disk full while writing {dest}") and str(part) in msg
    assert part.read_bytes() == FILES["a"][:2048] and not dest.exists()
    monkeypatch.undo()
    res = download(f"{base}/file/a", dest, expected_sha256=sha(FILES["a"]), progress=False)
    assert res.resumed is True and dest.read_bytes() == FILES["a"]


def _paper_cfg(tmp_path, base, entries):
    cat = tmp_path / "catalog.yaml"
    cat.write_text(yaml.safe_dump({"base_model": "SD 1.5", "loras": entries}))
    return load_profile("paper", {"catalog": str(cat), "lora_dir": str(tmp_path / "loras")})


def _entry(slug, url, sha256=None):
    return {"slug": slug, "name": slug.title(), "civitai_version_id": 1000 + len(slug), "url": url,
            "base_model": "SD 1.5", "sha256": sha256}


def test_fetch_loras_records_hashes_then_finds_them_present(base, server, tmp_path, capsys):
    cfg = _paper_cfg(tmp_path, base, [_entry("anime", f"{base}/redirect/a"), _entry("disco", f"{base}/drop/b")])
    lock = tmp_path / "loras" / "hashes.json"
    first = fetch(cfg, what=["loras"], progress=False)["loras"]
    assert [(r["slug"], r["status"], r["sha256"]) for r in first] == [
        ("anime", "downloaded", sha(FILES["a"])), ("disco", "resumed", sha(FILES["b"]))]
    assert json.loads(lock.read_text()) == {"anime": sha(FILES["a"]), "disco": sha(FILES["b"])}
    assert (tmp_path / "loras" / "anime.safetensors").read_bytes() == FILES["a"]
    out = capsys.readouterr().out
    assert "lora anime: downloaded" in out and "lora disco: resumed" in out
    n = len(server.log)
    second = fetch_loras(cfg, progress=False)
    assert [r["status"] for r in second] == ["present", "present"] and len(server.log) == n
    # the lock file is what later runs verify against: a changed upstream file is refused
    lock.write_text(json.dumps({"anime": sha(FILES["a"]), "disco": sha(FILES["a"])}))
    (tmp_path / "loras" / "disco.safetensors").unlink()
    with pytest.raises(FetchError) as exc:
        fetch_loras(cfg, progress=False)
    msg = str(exc.value)
    assert "1 of 2 LoRAs failed (1 fine: anime)" in msg and "SHA-256 mismatch" in msg
    assert str(lock) in msg and "delete the 'disco' entry" in msg
    assert (tmp_path / "loras" / "quarantine" / "disco.safetensors").read_bytes() == FILES["b"]


def test_fetch_loras_uses_the_catalog_hash_and_the_env_token(base, tmp_path, monkeypatch):
    monkeypatch.setenv("CIVITAI_TOKEN", TOKEN)
    cfg = _paper_cfg(tmp_path, base, [_entry("anime", f"{base}/auth/a", sha(FILES["a"]))])
    res = fetch_loras(cfg, progress=False)
    assert [(r["slug"], r["status"]) for r in res] == [("anime", "downloaded")]
    assert not (tmp_path / "loras" / "hashes.json").exists()  # the catalog has the hash; nothing to record


def test_fetch_loras_quarantines_a_pickle(base, tmp_path):
    cfg = _paper_cfg(tmp_path, base, [_entry("evil", f"{base}/file/evil"), _entry("anime", f"{base}/file/a")])
    with pytest.raises(FetchError) as exc:
        fetch_loras(cfg, progress=False)
    msg = str(exc.value)
    q = tmp_path / "loras" / "quarantine" / "evil.safetensors"
    assert "1 of 2 LoRAs failed (1 fine: anime)" in msg
    assert "evil: the downloaded file is not a usable safetensors LoRA" in msg and "pickle" in msg and str(q) in msg
    assert q.read_bytes() == FILES["evil"] and not (tmp_path / "loras" / "evil.safetensors").exists()
    assert (tmp_path / "loras" / "anime.safetensors").read_bytes() == FILES["a"]
    assert json.loads((tmp_path / "loras" / "hashes.json").read_text()) == {"anime": sha(FILES["a"])}


def test_fetch_does_what_the_profile_needs(tiny_cfg, capsys):
    assert needed_items(load_profile("paper")) == ["models", "loras", "resnet50", "thumbnails"]
    own_queries = {"stages": {"05_retrieve_thumbnails": {"queries_dir": "/somewhere"}}}
    assert needed_items(load_profile("paper", own_queries)) == ["models", "loras", "resnet50"]
    assert needed_items(tiny_cfg) == []
    assert fetch(tiny_cfg, progress=False) == {}
    assert "profile 'standin': nothing to download" in capsys.readouterr().out
    with pytest.raises(FetchError, match="no LoRA has a download url"):
        fetch_loras(tiny_cfg, progress=False)
    with pytest.raises(FetchError, match="unknown fetch item"):
        fetch(tiny_cfg, what=["weights"])


def test_fetch_models_downloads_base_and_controlnet(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def fake(repo_id, **kw):
        calls.append((repo_id, kw["allow_patterns"]))
        return str(tmp_path / repo_id.replace("/", "--"))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    out = fetch_models(load_profile("paper"))
    assert [c[0] for c in calls] == ["stable-diffusion-v1-5/stable-diffusion-v1-5", "lllyasviel/sd-controlnet-canny"]
    base_patterns, cn_patterns = calls[0][1], calls[1][1]
    assert base_patterns == list(BASE_MODEL_PATTERNS) and cn_patterns == list(CONTROLNET_PATTERNS)
    assert "unet/diffusion_pytorch_model.safetensors" in base_patterns
    assert not any("safety_checker" in p or "fp16" in p or p.endswith((".bin", ".ckpt")) for p in base_patterns)
    assert [(m["role"], m["status"]) for m in out] == [("base", "cached"), ("controlnet", "cached")]
    assert out[1]["path"] == str(tmp_path / "lllyasviel--sd-controlnet-canny")
    calls.clear()
    tiny = fetch_models(load_profile("tiny"))
    assert calls == [] and [m["status"] for m in tiny] == ["local", "local"]


def test_fetch_models_offline_with_nothing_cached_says_what_to_do(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FetchError) as exc:
        fetch_models(load_profile("paper"), progress=False, cache_dir=tmp_path / "hf")
    msg = str(exc.value)
    assert msg.startswith("stable-diffusion-v1-5/stable-diffusion-v1-5: not (completely) in the Hugging Face cache")
    assert "without HF_HUB_OFFLINE on a machine with access" in msg


def test_resnet50_weights_failure_is_a_fetch_error(monkeypatch, tmp_path):
    import urllib.error

    import torchvision.models._api as tv_api

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    seen = {}

    def offline(url, **kw):
        seen.update(kw, url=url)
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    with pytest.raises(FetchError, match=r"ResNet50 ImageNet weights: download of .*resnet50-11ad3fa6\.pth"):
        fetch_resnet50_weights(progress=False)
    assert seen["check_hash"] is True
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", lambda url, **kw: {})
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "resnet50-11ad3fa6.pth").write_bytes(b"cached")
    assert fetch_resnet50_weights(progress=False) == {"path": str(tmp_path / "checkpoints" / "resnet50-11ad3fa6.pth"),
                                                      "status": "present"}


def _thumb_cfg(tmp_path, entries):
    cat = tmp_path / "catalog.yaml"
    cat.write_text(yaml.safe_dump({"base_model": "SD 1.5", "loras": [
        {"slug": slug, "name": slug.title(), "civitai_version_id": vid, "url": None, "sha256": None}
        for slug, vid in entries]}))
    return load_profile("paper", {"catalog": str(cat), "lora_dir": str(tmp_path / "loras"),
                                  "runs_dir": str(tmp_path / "runs")})


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_fetch_thumbnails_downloads_images_writes_manifest_and_skips_on_rerun(base, server, tmp_path, monkeypatch):
    from lorafind_utils.core.config import load_catalog
    from lorafind_utils.stages.retrieval import read_queries

    monkeypatch.setenv("CIVITAI_TOKEN", SECRET)
    api = f"{base}/api/v1"
    cfg = _thumb_cfg(tmp_path, [("anime", 501), ("disco", 502), ("plain", None)])
    folder = tmp_path / "runs" / "thumbnails"
    res = fetch_thumbnails(cfg, per_lora=2, progress=False, api_base=api)
    assert [(r["slug"], r["civitai_version_id"], r["status"], r["images"]) for r in res] == [
        ("anime", 501, "downloaded", 3), ("disco", 502, "no images", 0)]  # "plain" has no version id
    assert res[0]["files"] == [str(folder / "anime" / "00.jpeg"), str(folder / "anime" / "01.png")]
    assert (folder / "anime" / "00.jpeg").read_bytes() == PREVIEWS["p0.jpeg"]
    assert (folder / "anime" / "01.png").read_bytes() == PREVIEWS["p1.png"]
    assert sorted(p.name for p in (folder / "anime").iterdir()) == ["00.jpeg", "01.png"]
    assert not (folder / "disco").exists()
    paths = [r["path"] for r in server.log]
    assert paths == ["/api/v1/model-versions/501", "/img/p0.jpeg", f"/img/p1.png?token={QUERY_SECRET}",
                     "/api/v1/model-versions/502"]  # no video requested
    assert server.log[0]["authorization"] == f"Bearer {SECRET}"  # the token: a header, never in a URL
    assert all(SECRET not in p for p in paths)
    how = "Civitai preview image of model version 501"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["queries"] == [
        {"file": "anime/00.jpeg", "lora": "anime", "how": how, "url": f"{base}/img/p0.jpeg"},
        {"file": "anime/01.png", "lora": "anime", "how": how, "url": f"{base}/img/p1.png?token=<redacted>"}]
    queries = read_queries(folder, load_catalog(cfg))
    assert [(q.id, q.lora, q.how, q.path) for q in queries] == [
        ("anime/00", "anime", how, folder / "anime" / "00.jpeg"),
        ("anime/01", "anime", how, folder / "anime" / "01.png")]
    files = _tree(tmp_path / "runs")
    assert not any(SECRET.encode() in b or QUERY_SECRET.encode() in b for b in files.values())
    # a second run: everything is in place, not a single request
    server.log.clear()
    again = fetch_thumbnails(cfg, per_lora=2, progress=False, api_base=api)
    assert server.log == [] and [r["status"] for r in again] == ["present", "no images"]
    assert again[0]["files"] == res[0]["files"] and _tree(tmp_path / "runs") == files
    # more per LoRA: the API is asked again, only the new image is downloaded (no suffix in its URL: .jpg)
    more = fetch_thumbnails(cfg, per_lora=5, progress=False, api_base=api)
    assert [r["path"] for r in server.log] == ["/api/v1/model-versions/501", "/img/p2"]
    assert [r["status"] for r in more] == ["downloaded", "no images"]
    assert (folder / "anime" / "02.jpg").read_bytes() == PREVIEWS["p2"]
    assert [q["file"] for q in json.loads((folder / "manifest.json").read_text())["queries"]] == [
        "anime/00.jpeg", "anime/01.png", "anime/02.jpg"]
    server.log.clear()
    fetch_thumbnails(cfg, per_lora=5, progress=False, api_base=api)
    assert server.log == []


def test_fetch_thumbnails_errors_name_the_lora_and_never_show_the_token(base, server, tmp_path, monkeypatch, capsys):
    api = f"{base}/api/v1"
    cfg = _thumb_cfg(tmp_path, [("gone", 404404), ("anime", 501), ("broken", 777)])
    with pytest.raises(FetchError) as exc:
        fetch_thumbnails(cfg, per_lora=1, token=SECRET, progress=False, api_base=api)
    msg = str(exc.value)
    assert "2 of 3 LoRAs' preview images failed (1 fine: anime)" in msg
    assert "gone (Civitai version 404404)" in msg and "HTTP 404" in msg
    assert "broken (Civitai version 777)" in msg and "valid JSON" in msg
    assert SECRET not in msg and SECRET not in repr(exc.value.args) and exc.value.__context__ is None
    folder = tmp_path / "runs" / "thumbnails"
    # the LoRA that worked is in place and in the manifest
    assert (folder / "anime" / "00.jpeg").read_bytes() == PREVIEWS["p0.jpeg"]
    assert [q["file"] for q in json.loads((folder / "manifest.json").read_text())["queries"]] == ["anime/00.jpeg"]
    assert not any(SECRET.encode() in b for b in _tree(tmp_path / "runs").values())
    assert SECRET not in capsys.readouterr().out
    with pytest.raises(FetchError, match="no LoRA has a civitai_version_id"):
        fetch_thumbnails(_thumb_cfg(tmp_path, [("plain", None)]), progress=False, api_base=api)


def test_fetch_dispatches_thumbnails(base, tmp_path, monkeypatch, capsys):
    cfg = _thumb_cfg(tmp_path, [("anime", 501)])
    calls = []

    def spy(cfg, **kw):
        calls.append(kw)
        return fetch_thumbnails(cfg, api_base=f"{base}/api/v1", per_lora=1, **kw)

    monkeypatch.setattr(fetch_mod, "fetch_thumbnails", spy)
    out = fetch(cfg, what=["thumbnails"], progress=False)
    assert calls == [{"progress": False}] and [r["status"] for r in out["thumbnails"]] == ["downloaded"]
    assert "thumbnails anime: downloaded (1 of 3 preview images of Civitai version 501)" in capsys.readouterr().out
