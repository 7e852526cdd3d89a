"""Hub side of training: background uploads that never stop the run."""

import logging
from concurrent.futures import Future
from pathlib import Path

from huggingface_hub import HfApi


logger = logging.getLogger(__name__)

# What a tokenizer folder under --output_dir holds that is not part of the model.
OUTPUT_DIR_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "logs/**", "validation/**", "*.jsonl"]


class HubUploader:
    """
    Uploads folders to one Hub model repository in the background with huggingface_hub's own
    `upload_folder(..., run_as_future=True)`: one worker thread per `HfApi`, jobs in submission order (the repository
    is created first), so training goes on while files are sent.

    huggingface_hub retries transient HTTP failures itself; an upload that still fails is logged, never raised, and
    the next one goes ahead (a later checkpoint replaces a lost one in `last-checkpoint/`).

    Args:
        repo_id (`str`): `"user/name"` of the model repository.
        token (`str`, *optional*): Hub token; defaults to the logged-in one.
        private (`bool`, *optional*): Create the repository as private.
    """

    def __init__(self, repo_id: str, token: str | None = None, private: bool | None = None):
        self.repo_id = repo_id
        self.api = HfApi(token=token)
        self._futures: list[Future] = []
        created = self.api.run_as_future(self.api.create_repo, repo_id, private=private, exist_ok=True)
        created.add_done_callback(lambda future: self._log_outcome(future, f"creation of the repository {repo_id}"))

    def upload(
        self,
        folder: str | Path,
        path_in_repo: str | None = None,
        commit_message: str = "Upload tokenizer",
        ignore_patterns: list[str] | None = None,
    ) -> Future:
        """Queue an upload of `folder` (to `path_in_repo`, default the repository root); returns its future, whose
        outcome is logged when it ends."""
        future = self.api.upload_folder(
            repo_id=self.repo_id,
            folder_path=str(folder),
            path_in_repo=path_in_repo,
            commit_message=commit_message,
            # A copy: `upload_folder` extends the list it is given.
            ignore_patterns=list(ignore_patterns) if ignore_patterns else None,
            run_as_future=True,
        )
        target = f"{self.repo_id}/{path_in_repo}" if path_in_repo else self.repo_id
        future.add_done_callback(lambda done: self._log_outcome(done, f"upload of {folder} to {target}"))
        self._futures.append(future)
        return future

    def wait(self) -> list[bool]:
        """Block until every queued upload has ended; returns whether each succeeded, in submission order."""
        return [future.exception() is None for future in self._futures]

    @staticmethod
    def _log_outcome(future: Future, job: str) -> None:
        error = future.exception()
        if error is None:
            logger.info("%s done", job)
        else:
            logger.error("%s failed: %s: %s", job, type(error).__name__, error)
