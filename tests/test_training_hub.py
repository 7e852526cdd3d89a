"""HubUploader: uploads run in the background, failures are retried and logged, never raised."""

import logging
import threading
import types

import pytest

from dualtoken_hf.training import HubUploader, hub


class ScriptedApi:
    """Fails `failures` times, then succeeds; optionally blocks each upload until `release` is set."""

    def __init__(self, failures=0, release=None):
        self.failures = failures
        self.release = release
        self.calls = []

    def create_repo(self, repo_id, private=None, exist_ok=False):
        assert exist_ok

    def upload_folder(self, **kwargs):
        if self.release is not None:
            self.release.wait(timeout=10)
        self.calls.append(kwargs)
        if len(self.calls) <= self.failures:
            raise OSError(f"boom {len(self.calls)}")


@pytest.fixture
def uploader(monkeypatch):
    sleeps = []
    monkeypatch.setattr(hub, "time", types.SimpleNamespace(sleep=sleeps.append))

    def make(api):
        monkeypatch.setattr(hub, "HfApi", lambda token=None: api)
        instance = HubUploader("me/repo", max_attempts=3, retry_delay=1.0)
        instance.sleeps = sleeps
        return instance

    return make


def test_upload_runs_in_the_background(uploader, tmp_path):
    release = threading.Event()
    api = ScriptedApi(release=release)
    instance = uploader(api)
    future = instance.upload(tmp_path, path_in_repo="last-checkpoint")
    assert not future.done() and instance.has_pending()
    release.set()
    assert instance.wait() == [True]
    assert api.calls[0]["repo_id"] == "me/repo" and api.calls[0]["path_in_repo"] == "last-checkpoint"


def test_failed_upload_is_retried_with_growing_delays_and_logged(uploader, tmp_path, caplog):
    api = ScriptedApi(failures=2)
    instance = uploader(api)
    with caplog.at_level(logging.WARNING, logger=hub.__name__):
        assert instance.upload(tmp_path).result() is True
    assert len(api.calls) == 3
    assert instance.sleeps == [1.0, 2.0]
    assert "failed (attempt 1/3): OSError: boom 1" in caplog.text
    assert "failed (attempt 2/3): OSError: boom 2" in caplog.text


def test_upload_that_keeps_failing_is_logged_not_raised(uploader, tmp_path, caplog):
    instance = uploader(ScriptedApi(failures=10))
    with caplog.at_level(logging.WARNING, logger=hub.__name__):
        assert instance.upload(tmp_path).result() is False
    assert "giving up on uploading" in caplog.text
