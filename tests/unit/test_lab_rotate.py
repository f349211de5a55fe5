"""What ``lab rotate`` waits for: a daemon's log saying it uses the files just written."""

from __future__ import annotations

import json
from pathlib import Path

from meridio import pki
from meridio.lab.lab import NOT_LOADED_EVENT, _loaded
from meridio.runtime.tls import Tls, files_digest, resolve_paths


def test_the_digest_a_daemon_logs_is_the_one_of_its_files(tmp_path: Path) -> None:
    out = pki.ensure_credentials(tmp_path, "nsp", "nsp")
    paths = resolve_paths(str(out))
    assert paths is not None
    tls = Tls(paths, "nsp")
    assert tls.describe()["files"] == files_digest(paths)
    pki.issue(tmp_path, "nsp", "nsp", out)
    assert tls.describe()["files"] != files_digest(paths)
    assert tls.poll() and tls.describe()["files"] == files_digest(paths)


def test_loaded_reads_the_log_from_the_mark(tmp_path: Path) -> None:
    log = tmp_path / "log"
    old = json.dumps({"event": "tls credentials reloaded", "files": "aaaa"})
    log.write_text(f"{old}\nnot json aaaa bbbb\n")
    mark = log.stat().st_size
    assert _loaded(log, 0, "aaaa") == (True, None)
    assert _loaded(log, mark, "aaaa") == (False, None)  # before the mark
    assert _loaded(tmp_path / "none", 0, "aaaa") == (False, None)
    with log.open("a") as f:
        f.write(json.dumps({"event": NOT_LOADED_EVENT, "files": "bbbb", "error": "bad"}) + "\n")
        f.write(json.dumps({"event": "mutual tls", "files": "cccc"}) + "\n")  # started anew
    assert _loaded(log, mark, "bbbb") == (False, "bad")
    assert _loaded(log, mark, "cccc") == (True, None)
    log.write_text(json.dumps({"event": "mutual tls", "files": "dddd"}) + "\n")  # a new log
    assert _loaded(log, mark, "dddd") == (True, None)
