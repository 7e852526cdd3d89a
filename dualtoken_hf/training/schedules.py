"""Learning-rate schedule checks shared by the training scripts."""


def warmup_warning(warmup_steps: int, max_train_steps: int) -> str | None:
    """
    A warning when the linear warmup covers more than half of the run (the recipes' 10k warmup steps are meant for
    full-scale runs: a 300-step run with them never leaves warmup and learns next to nothing), else `None`.
    """
    if warmup_steps <= max_train_steps / 2:
        return None
    suggested = max(max_train_steps // 10, 1)
    reach = "never reaches its peak" if warmup_steps >= max_train_steps else "stays below its peak for most of it"
    return (
        f"--lr_warmup_steps {warmup_steps} covers {min(warmup_steps / max_train_steps, 1):.0%} of this "
        f"{max_train_steps}-step run: the learning rate {reach} (the recipes' warmup is "
        f"meant for full-scale runs). For a short run pass --lr_warmup_steps {suggested} (10% of the run)."
    )
