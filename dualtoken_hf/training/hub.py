"""Hub side of training: a background uploader that never stops the run."""

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from huggingface_hub import HfApi


logger = logging.getLogger(__name__)

# What a tokenizer folder under --output_dir holds that is not part of the model.
OUTPUT_DIR_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "logs/**", "validation/**", "*.jsonl"]


class HubUploader:
    """
    Uploads folders to one Hub model repository from a single background thread, in submission order (as
    transformers' `Trainer` does with `hub_strategy="checkpoint"`), so training goes on while files are sent.

    Each upload creates the repository if needed and then calls `upload_folder`; a failure is logged and retried
    up to `max_attempts` times with a growing delay, and a final failure is logged, never raised.

    Args:
        repo_id (`str`): `"user/name"` of the model repository.
        token (`str`, *optional*): Hub token; defaults to the logged-in one.
        private (`bool`, *optional*): Create the repository as private.
        max_attempts (`int`, defaults to 3): Tries per upload.
        retry_delay (`float`, defaults to 10.0): Seconds before the second try; doubled for each later one.
    """

    def __init__(
        self,
        repo_id: str,
        token: str | None = None,
        private: bool | None = None,
        max_attempts: int = 3,
        retry_delay: float = 10.0,
    ):
        self.repo_id = repo_id
        self.private = private
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.api = HfApi(token=token)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-upload")
        self._futures: list[Future] = []

    def upload(
        self,
        folder: str | Path,
        path_in_repo: str | None = None,
        commit_message: str = "Upload tokenizer",
        ignore_patterns: list[str] | None = None,
    ) -> Future:
        """Queue an upload of `folder` (to `path_in_repo`, default the repository root); returns its future, which
        resolves to `True` on success and `False` once every attempt has failed."""
        future = self._executor.submit(
            self._upload_with_retries, str(folder), path_in_repo, commit_message, ignore_patterns
        )
        self._futures.append(future)
        return future

    def has_pending(self) -> bool:
        return any(not future.done() for future in self._futures)

    def wait(self) -> list[bool]:
        """Block until every queued upload has finished; returns their outcomes in submission order."""
        return [future.result() for future in self._futures]

    def _upload_with_retries(
        self, folder: str, path_in_repo: str | None, commit_message: str, ignore_patterns: list[str] | None
    ) -> bool:
        target = f"{self.repo_id}/{path_in_repo or ''}"
        for attempt in range(1, self.max_attempts + 1):
            try:
                self.api.create_repo(self.repo_id, private=self.private, exist_ok=True)
                self.api.upload_folder(
                    repo_id=self.repo_id,
                    folder_path=folder,
                    path_in_repo=path_in_repo,
                    commit_message=commit_message,
                    ignore_patterns=ignore_patterns,
                )
            except Exception as error:  # noqa: BLE001 -- an upload must never end the training run
                logger.warning(
                    "upload of %s to %s failed (attempt %d/%d): %s: %s",
                    folder, target, attempt, self.max_attempts, type(error).__name__, error,
                )
                if attempt < self.max_attempts:
                    time.sleep(self.retry_delay * 2 ** (attempt - 1))
                continue
            logger.info("uploaded %s to %s", folder, target)
            return True
        logger.error("giving up on uploading %s to %s after %d attempts", folder, target, self.max_attempts)
        return False
