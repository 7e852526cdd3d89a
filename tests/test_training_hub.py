"""HubUploader: uploads run in the background through huggingface_hub's `run_as_future`, in order; failures are
logged, never raised; `wait` blocks until every upload has ended."""

import logging
import threading
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from huggingface_hub.hf_api import future_compatible

from dualtoken_hf.training import HubUploader, hub


class ScriptedApi(HfApi):
    """A real `HfApi` (its background queue included) whose Hub calls are recorded: uploads whose number (from 1) is
    in `failing` raise; every upload first waits for `release`, when given."""

    def __init__(self, failing=(), release=None):
        super().__init__(token="hf_test")
        self.failing = set(failing)
        self.release = release
        self.calls = []

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))

    @future_compatible
    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, commit_message=None, ignore_patterns=None,
                      run_as_future=False):
        if self.release is not None:
            assert self.release.wait(timeout=10)
        self.calls.append(("upload_folder", Path(folder_path).name, path_in_repo, ignore_patterns))
        if ignore_patterns is not None:
            ignore_patterns += [".git"]  # as the real one extends the list it is given
        if len([call for call in self.calls if call[0] == "upload_folder"]) in self.failing:
            raise OSError("hub unreachable")


@pytest.fixture
def uploader(monkeypatch):
    def make(api):
        monkeypatch.setattr(hub, "HfApi", lambda token=None: api)
        return HubUploader("me/repo", private=True)

    return make


def test_uploads_run_in_the_background_in_submission_order(uploader, tmp_path):
    release = threading.Event()
    api = ScriptedApi(release=release)
    instance = uploader(api)
    first = instance.upload(tmp_path / "checkpoint-1", path_in_repo="last-checkpoint")
    instance.upload(tmp_path / "checkpoint-2", path_in_repo="last-checkpoint")
    assert not first.done()  # the caller goes on while the upload waits
    release.set()
    assert instance.wait() == [True, True]
    assert api.calls == [
        ("create_repo", "me/repo", True, True),
        ("upload_folder", "checkpoint-1", "last-checkpoint", None),
        ("upload_folder", "checkpoint-2", "last-checkpoint", None),
    ]


def test_failed_upload_is_logged_not_raised_and_the_next_one_goes_ahead(uploader, tmp_path, caplog):
    api = ScriptedApi(failing={1})
    instance = uploader(api)
    with caplog.at_level(logging.INFO, logger=hub.__name__):
        instance.upload(tmp_path / "checkpoint-1", path_in_repo="last-checkpoint")
        instance.upload(tmp_path, commit_message="End of training")
        assert instance.wait() == [False, True]
    assert f"upload of {tmp_path / 'checkpoint-1'} to me/repo/last-checkpoint failed: OSError: hub unreachable" in (
        caplog.text
    )
    assert f"upload of {tmp_path} to me/repo done" in caplog.text


def test_uploads_leave_the_callers_ignore_patterns_unchanged(uploader, tmp_path):
    api = ScriptedApi()
    patterns = ["checkpoint-*", "logs/**"]
    instance = uploader(api)
    instance.upload(tmp_path, ignore_patterns=patterns)
    instance.upload(tmp_path, ignore_patterns=patterns)
    assert instance.wait() == [True, True]
    assert patterns == ["checkpoint-*", "logs/**"]
    assert api.calls[-1][3] == ["checkpoint-*", "logs/**", ".git"]
