"""``masklab data fetch``: downloads from a loopback HTTP server we start, never the network."""

from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest

from lit_modules.config_errors import ConfigError
from lit_modules.data import fetch as fetch_mod
from lit_modules.data.fetch import RemoteFile, fetch


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """urllib honours *_proxy variables; a proxy must not stand between us and 127.0.0.1."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the fixture's folder; any path under /broken/ answers 500."""

    def do_GET(self):
        if self.path.startswith("/broken/"):
            self.send_error(500, "server exploded")
            return
        super().do_GET()

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def server(tmp_path):
    """(base URL, served folder) of a ThreadingHTTPServer on a free loopback port."""
    root = tmp_path / "served"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _serve(server, relative: str, content: bytes, crlf_to_lf: bool = False, sha256: str | None = None) -> RemoteFile:
    """Put ``content`` on the server; the RemoteFile that fetches it (hash of the stored bytes)."""
    base, root = server
    (root / relative).parent.mkdir(parents=True, exist_ok=True)
    (root / relative).write_bytes(content)
    stored = content.replace(b"\r\n", b"\n") if crlf_to_lf else content
    return RemoteFile(relative, f"{base}/{relative}", sha256 or hashlib.sha256(stored).hexdigest(), crlf_to_lf)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_downloads_and_verifies(server, tmp_path, monkeypatch):
    a = _serve(server, "toy/a.txt", b"alpha\n" * 1000)
    b = _serve(server, "toy/sub/b.txt", b"beta\n")
    monkeypatch.setattr(fetch_mod, "SOURCES", {"toy": (a, b)})
    out = tmp_path / "data"

    paths = fetch("toy", out, timeout=5)

    assert paths == [out / "toy/a.txt", out / "toy/sub/b.txt"]
    assert paths[0].read_bytes() == b"alpha\n" * 1000
    assert paths[1].read_bytes() == b"beta\n"
    assert _files(out) == ["toy/a.txt", "toy/sub/b.txt"]  # no temp files left behind


def test_present_file_with_right_hash_is_skipped(server, tmp_path, monkeypatch):
    a = _serve(server, "toy/a.txt", b"alpha\n")
    monkeypatch.setattr(fetch_mod, "SOURCES", {"toy": (a,)})
    out = tmp_path / "data"
    (out / "toy").mkdir(parents=True)
    (out / "toy/a.txt").write_bytes(b"alpha\n")
    (server[1] / "toy/a.txt").unlink()  # a download would now fail with 404

    assert fetch("toy", out, timeout=5) == [out / "toy/a.txt"]
    assert (out / "toy/a.txt").read_bytes() == b"alpha\n"


def test_present_file_with_wrong_hash_is_replaced(server, tmp_path, monkeypatch):
    a = _serve(server, "toy/a.txt", b"alpha\n")
    monkeypatch.setattr(fetch_mod, "SOURCES", {"toy": (a,)})
    out = tmp_path / "data"
    (out / "toy").mkdir(parents=True)
    (out / "toy/a.txt").write_bytes(b"truncated")

    fetch("toy", out, timeout=5)
    assert (out / "toy/a.txt").read_bytes() == b"alpha\n"


def test_hash_mismatch_stores_nothing(server, tmp_path, monkeypatch):
    wrong = "0" * 64
    a = _serve(server, "toy/a.txt", b"tampered\n", sha256=wrong)
    monkeypatch.setattr(fetch_mod, "SOURCES", {"toy": (a,)})
    out = tmp_path / "data"

    with pytest.raises(ConfigError) as err:
        fetch("toy", out, timeout=5)
    msg = str(err.value)
    assert "\n" not in msg
    assert "toy/a.txt" in msg and wrong in msg and hashlib.sha256(b"tampered\n").hexdigest() in msg
    assert _files(out) == []

    # An existing file is left untouched by a failed download.
    (out / "toy/a.txt").write_bytes(b"old")
    with pytest.raises(ConfigError):
        fetch("toy", out, timeout=5)
    assert (out / "toy/a.txt").read_bytes() == b"old"
    assert _files(out) == ["toy/a.txt"]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 16])
def test_crlf_normalization(server, tmp_path, monkeypatch, chunk):
    # Lone \r, \r\r\n and \n\r must survive; only \r\n pairs become \n, across chunk edges.
    content = b" = Title = \r\n \r\n a\rb \r\r\n c\n\rd\r\n" * 5 + b"end\r"
    a = _serve(server, "toy/a.raw", content, crlf_to_lf=True)
    monkeypatch.setattr(fetch_mod, "SOURCES", {"toy": (a,)})
    monkeypatch.setattr(fetch_mod, "CHUNK_BYTES", chunk)
    out = tmp_path / "data"

    (path,) = fetch("toy", out, timeout=5)
    assert path.read_bytes() == content.replace(b"\r\n", b"\n")


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(ConfigError) as err:
        fetch("no-such-corpus", tmp_path)
    msg = str(err.value)
    assert "no-such-corpus" in msg and "tinyshakespeare" in msg and "wikitext-2" in msg
    assert not any(tmp_path.iterdir())


def test_mirror_replaces_the_url(server, tmp_path, monkeypatch):
    base, _ = server
    a = _serve(server, "toy/a.txt", b"alpha\n")
    # The public URL is unreachable; the mirror serves BASE/relative_path.
    unreachable = RemoteFile(a.relative_path, f"http://127.0.0.1:{_closed_port()}/x", a.sha256)
    monkeypatch.setattr(fetch_mod, "SOURCES", {"toy": (unreachable,)})

    (path,) = fetch("toy", tmp_path / "data", mirror=base + "/", timeout=5)
    assert path.read_bytes() == b"alpha\n"


def test_cli_fetch_with_mirror(server, tmp_path, monkeypatch, capsys):
    from studies.cli import main

    base, _ = server
    a = _serve(server, "toy/a.txt", b"alpha\n")
    unreachable = RemoteFile(a.relative_path, f"http://127.0.0.1:{_closed_port()}/x", a.sha256)
    monkeypatch.setattr(fetch_mod, "SOURCES", {"toy": (unreachable,)})
    out = tmp_path / "data"

    rc = main(["data", "fetch", "toy", "--mirror", base, "--data-dir", str(out), "--timeout", "5"])
    assert rc == 0
    assert (out / "toy/a.txt").read_bytes() == b"alpha\n"
    assert capsys.readouterr().out.strip() == str((out / "toy/a.txt").resolve())


@pytest.mark.parametrize("where", ["server-error", "closed-port"])
def test_network_error_is_one_line(server, tmp_path, monkeypatch, where):
    base, _ = server
    url = f"{base}/broken/a.txt" if where == "server-error" else f"http://127.0.0.1:{_closed_port()}/a.txt"
    monkeypatch.setattr(fetch_mod, "SOURCES", {"toy": (RemoteFile("toy/a.txt", url, "0" * 64),)})
    out = tmp_path / "data"

    with pytest.raises(ConfigError) as err:
        fetch("toy", out, timeout=5)
    msg = str(err.value)
    assert "\n" not in msg and url in msg and "--mirror" in msg
    if where == "server-error":
        assert "HTTP 500" in msg
    assert _files(out) == []


def test_cli_network_error_exits_2_with_one_line(server, tmp_path, monkeypatch, capsys):
    from studies.cli import main

    base, _ = server
    url = f"{base}/broken/a.txt"
    monkeypatch.setattr(fetch_mod, "SOURCES", {"toy": (RemoteFile("toy/a.txt", url, "0" * 64),)})

    rc = main(["data", "fetch", "toy", "--data-dir", str(tmp_path / "data"), "--timeout", "5"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("masklab: error:") and url in err


def test_sources_match_the_shared_copies_and_the_registry(data_dir, tmp_path):
    """Fetching from the shared data folder as a local mirror verifies every pinned hash,
    and the dataset registry then reads the fetched files from their relative paths."""
    from lit_modules.data.text import TextDataConfig
    from lit_modules.paths import Workspace
    from lit_modules.registry import DATASETS

    out = tmp_path / "data"
    for name, remotes in fetch_mod.SOURCES.items():
        assert fetch(name, out, mirror=str(data_dir)) == [out / r.relative_path for r in remotes]
        for r in remotes:
            assert r.url.startswith("https://") and len(r.sha256) == 64
            assert (out / r.relative_path).read_bytes() == (data_dir / r.relative_path).read_bytes()
        ws = Workspace.resolve(tmp_path / "runs", out)
        module = DATASETS.get(name)(TextDataConfig(name=name), block_size=8, seed=0, max_steps=1, workspace=ws)
        splits = module.read_splits()
        assert splits.train and splits.val and str(out) in splits.train_source
