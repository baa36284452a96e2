"""The router's own inference key (tsfleet/router/keys.py): its file, the swap, and the
renewal of TorchServe's key, against a stand-in for TorchServe's token API that rewrites
the key file as TorchServe does."""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from tests.polling import until
from tsfleet.errors import FleetError
from tsfleet.router.keys import (InferenceKeys, previous_keys, read_upstream_key, refreshed, rotate_router_key,
                                 router_keys)

API = "api-key"


def write_key_file(path: Path, key: str, expires_in_s: float) -> None:
    expiry = (datetime.now(timezone.utc) + timedelta(seconds=expires_in_s)).isoformat().replace("+00:00", "Z")
    path.write_text(json.dumps({"management": {"key": "m", "expiration time": expiry},
                                "inference": {"key": key, "expiration time": expiry}, "API": {"key": API}}))


class TokenApi:
    """GET /token?type=inference with the API key: a new inference key in the file, 60 s long."""

    def __init__(self, key_file: Path, lifetime_s: float = 60):
        self.key_file, self.lifetime_s, self.renewals = key_file, lifetime_s, 0
        self.numbers = itertools.count(1)
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                ok = self.path == "/token?type=inference" and self.headers.get("Authorization") == f"Bearer {API}"
                if ok:
                    api.renewals += 1
                    write_key_file(api.key_file, f"key-{next(api.numbers)}", api.lifetime_s)
                self.send_response(200 if ok else 400)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def token_api(tmp_path: Path) -> Iterator[TokenApi]:
    write_key_file(tmp_path / "key_file.json", "key-0", 60)
    api = TokenApi(tmp_path / "key_file.json")
    yield api
    api.server.shutdown()
    api.server.server_close()


def test_router_key_file_is_made_private_and_an_old_one_gains_an_inference_key(tmp_path: Path) -> None:
    fresh = router_keys(tmp_path / "new.json")
    assert set(fresh) == {"admin", "inference"} and fresh["admin"] != fresh["inference"]
    assert router_keys(tmp_path / "new.json") == fresh  # kept across restarts
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"admin": "the-admin-key"}))
    keys = router_keys(old)
    assert keys["admin"] == "the-admin-key" and len(keys["inference"]) >= 32
    assert json.loads(old.read_text()) == keys
    assert stat.S_IMODE(os.stat(old).st_mode) == 0o600


def test_torchserve_s_key_file_is_read_with_its_expiry(tmp_path: Path) -> None:
    path = tmp_path / "key_file.json"
    assert read_upstream_key(path) is None  # TorchServe not started, or token auth off
    write_key_file(path, "abc", 600)
    key = read_upstream_key(path)
    assert key is not None and (key.key, key.api, key.header) == ("abc", API, b"Bearer abc")
    # The file's mtime comes from the kernel's coarse clock, up to a tick (a few ms) behind the
    # time the expiry was computed from: the lifetime can exceed 600 s by that much (600.0018 seen).
    assert 590 < key.lifetime <= 600.05 and key.renew_at() == pytest.approx(key.expires - 60)
    path.write_text('{"inference": {"key": "ab')  # caught while TorchServe rewrites it
    assert read_upstream_key(path) is None


def test_only_the_router_s_key_is_swapped(tmp_path: Path) -> None:
    keys = InferenceKeys("router-key", tmp_path / "key_file.json", "http://127.0.0.1:1")
    assert keys.swap(b"Bearer router-key") == b"Bearer router-key"  # TorchServe's key unknown yet
    write_key_file(tmp_path / "key_file.json", "ts-key", 600)
    keys = InferenceKeys("router-key", tmp_path / "key_file.json", "http://127.0.0.1:1")
    assert keys.swap(b"Bearer router-key") == b"Bearer ts-key"
    assert keys.swap(b"Bearer router-key ") == b"Bearer ts-key"
    for other in (None, b"Bearer ts-key", b"Bearer router-ke", b"router-key", b""):
        assert keys.swap(other) is None


def test_a_refused_key_is_renewed_once_and_a_newer_one_taken_as_it_is(token_api: TokenApi) -> None:
    path = token_api.key_file
    key = refreshed(path, token_api.url, refused="key-0")
    assert key is not None and key.key == "key-1" and token_api.renewals == 1
    # Refused before someone renewed it: the file's newer key, no second renewal.
    key = refreshed(path, token_api.url, refused="key-0")
    assert key is not None and key.key == "key-1" and token_api.renewals == 1
    # Not refused and far from its expiry: left alone.
    assert refreshed(path, token_api.url, refused=None).key == "key-1" and token_api.renewals == 1


def test_concurrent_refreshers_take_turns_so_one_renews(token_api: TokenApi) -> None:
    # Router processes each hold their own lock file description; so do these threads.
    with ThreadPoolExecutor(8) as pool:
        keys = list(pool.map(lambda _: refreshed(token_api.key_file, token_api.url, "key-0"), range(8)))
    assert {k.key for k in keys} == {"key-1"} and token_api.renewals == 1


def test_a_key_near_its_expiry_is_renewed_by_the_regular_check(token_api: TokenApi) -> None:
    write_key_file(token_api.key_file, "key-0", 1.0)  # 1 s left: due within a fifth of its life

    async def scenario() -> None:
        keys = InferenceKeys("router-key", token_api.key_file, token_api.url)
        fresh = asyncio.get_running_loop().create_task(keys.keep_fresh(period_s=0.2))
        try:
            await until("the key to be renewed", lambda: keys.swap(b"Bearer router-key") == b"Bearer key-1")
        finally:
            fresh.cancel()

    asyncio.run(scenario())
    assert token_api.renewals == 1


def test_a_burst_of_refusals_shares_one_renewal(token_api: TokenApi) -> None:
    async def scenario() -> list[bytes | None]:
        keys = InferenceKeys("router-key", token_api.key_file, token_api.url)
        return await asyncio.gather(*(keys.refused(b"Bearer key-0") for _ in range(20)))

    assert set(asyncio.run(scenario())) == {b"Bearer key-1"} and token_api.renewals == 1


def test_no_token_api_leaves_the_key_and_says_nothing_better(tmp_path: Path) -> None:
    write_key_file(tmp_path / "key_file.json", "key-0", 600)

    async def scenario() -> bytes | None:
        keys = InferenceKeys("router-key", tmp_path / "key_file.json", "http://127.0.0.1:1")
        return await keys.refused(b"Bearer key-0")

    assert asyncio.run(scenario()) is None  # the client then gets TorchServe's refusal


def test_a_rotated_key_replaces_the_old_one_which_is_taken_until_its_grace_ends(tmp_path: Path) -> None:
    path = tmp_path / "router_key.json"
    old = router_keys(path)
    rotated = rotate_router_key(path, grace_s=600)
    assert rotated["admin"] == old["admin"] and rotated["inference"] != old["inference"]
    [(key, until)] = previous_keys(rotated)
    assert key == old["inference"] and until == pytest.approx(time.time() + 600, abs=5)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    write_key_file(tmp_path / "key_file.json", "ts-key", 600)
    keys = InferenceKeys(old["inference"], tmp_path / "key_file.json", "http://127.0.0.1:1")
    keys.reload(path)
    assert keys.swap(f"Bearer {rotated['inference']}".encode()) == b"Bearer ts-key"
    assert keys.swap(f"Bearer {old['inference']}".encode()) == b"Bearer ts-key"  # within its grace
    keys.take(rotated["inference"], [(old["inference"], time.time() - 1)])
    assert keys.swap(f"Bearer {old['inference']}".encode()) is None  # its grace is over

    # A second rotation within the first one's grace: clients still on the first key keep
    # working until its own grace ends.
    second = rotate_router_key(path, grace_s=60)
    assert [key for key, _ in previous_keys(second)] == [old["inference"], rotated["inference"]]
    keys.reload(path)
    for key in (old["inference"], rotated["inference"], second["inference"]):
        assert keys.swap(f"Bearer {key}".encode()) == b"Bearer ts-key"
    ends = [until - time.time() for _, until in previous_keys(second)]  # each keeps its own end
    assert ends == [pytest.approx(600, abs=5), pytest.approx(60, abs=5)]

    again = rotate_router_key(path, grace_s=0)  # a leaked key: none of the old ones is taken
    assert previous_keys(again) == []
    keys.reload(path)
    for key in (old["inference"], rotated["inference"], second["inference"]):
        assert keys.swap(f"Bearer {key}".encode()) is None
    assert keys.swap(f"Bearer {again['inference']}".encode()) == b"Bearer ts-key"


def test_a_key_file_from_an_older_router_keeps_its_previous_key(tmp_path: Path) -> None:
    path = tmp_path / "router_key.json"
    path.write_text(json.dumps({"admin": "a", "inference": "new",
                                "previous_inference": {"key": "old", "until": time.time() + 60}}))
    keys = router_keys(path)
    assert [key for key, _ in previous_keys(keys)] == ["old"]
    assert [key for key, _ in previous_keys(rotate_router_key(path, grace_s=60))] == ["old", "new"]


def test_a_refusal_with_no_key_file_says_where_the_router_looked(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> list[bytes | None]:
        keys = InferenceKeys("router-key", tmp_path / "key_file.json", "http://127.0.0.1:1")
        sent = keys.swap(b"Bearer router-key")
        assert sent == b"Bearer router-key"  # passed on as it is: TorchServe may run without auth
        return [await keys.refused(sent) for _ in range(3)]

    with caplog.at_level("WARNING", logger="tsfleet.router.keys"):
        assert asyncio.run(scenario()) == [None] * 3
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and str(tmp_path / "key_file.json") in warnings[0]  # once, not per request


def test_a_damaged_key_or_state_file_stops_the_router_with_the_file_named(tmp_path: Path) -> None:
    keys, state = tmp_path / "router_key.json", tmp_path / "router_state.json"
    keys.write_text('{"admin": "x", "inference": ')  # cut short by a full disk, or a hand edit
    with pytest.raises(FleetError, match="router_key.json is not the router's key file"):
        router_keys(keys)
    out = subprocess.run([sys.executable, "-m", "tsfleet", "--router-key-file", str(keys), "route", "--port", "0",
                          "--admin-port", "0", "--grpc-port", "0", "--state-file", str(state)],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 2 and "router_key.json is not the router's key file" in out.stderr
    assert "Traceback" not in out.stderr

    keys.unlink()
    state.write_text("[1, 2")
    out = subprocess.run([sys.executable, "-m", "tsfleet", "--router-key-file", str(keys), "route", "--port", "0",
                          "--admin-port", "0", "--grpc-port", "0", "--state-file", str(state)],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 2 and "router_state.json is not a routing state" in out.stderr
    assert "Traceback" not in out.stderr
