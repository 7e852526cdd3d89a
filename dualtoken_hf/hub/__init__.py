"""Hub folders: writing them (one writer per model kind), loading them, model cards, export + remote-code check + push.

Tooling, not a Hub module: it may import the package.
"""

from .. import register_auto_classes
from .cards import CardDetails
from .writing import save_tokenizer_folder, save_unified_folder


# Folders written here need it: `save_pretrained` writes `auto_map` and copies the remote code only after it ran.
register_auto_classes()

__all__ = ["CardDetails", "save_tokenizer_folder", "save_unified_folder"]
