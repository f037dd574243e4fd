"""What can be wrong with the offline cache (medtune/offline_tokenizers.py), said as user errors: a
download that failed, a damaged download, an incomplete tokenizer folder. Each message says how to
rebuild the part: python scripts/medtune/offline_tokenizers.py [family]."""
import tarfile
import zipfile
import zlib
from contextlib import contextmanager

from medtune.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja")
REBUILD = "python scripts/medtune/offline_tokenizers.py"


class OfflineSetupError(UserError):
    """A source of the offline tokenizers could not be downloaded, or the cache is damaged: a user
    error (exit 2, no traceback) whose message says how to fix it."""


@contextmanager
def damaged_download(path):
    """A truncated or foreign file in downloads/ (a killed download, a copied cache): say which, and how
    to get it again, instead of the archive module's traceback."""
    try:
        yield
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, KeyError) as e:
        raise OfflineSetupError(f"The cached download {path} is damaged ({type(e).__name__}: {e}). Delete it and "
                                f"run `{REBUILD}`, which downloads it again.") from None


def check_tokenizer_dir(target, family):
    missing = [name for name in TOKENIZER_FILES if not (target / name).is_file()]
    if missing:
        raise OfflineSetupError(f"The cached {family} tokenizer {target} is incomplete ({', '.join(missing)} "
                                f"missing). Delete that folder and run `{REBUILD} {family}`, which builds it again.")
