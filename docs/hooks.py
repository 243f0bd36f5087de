"""MkDocs hooks: a fresh scratch folder for the executed examples (markdown-exec `workdir`)."""

import shutil
from pathlib import Path

EXAMPLES = Path("build/docs-examples")


def on_pre_build(config, **kwargs):
    del config, kwargs
    shutil.rmtree(EXAMPLES, ignore_errors=True)
    EXAMPLES.mkdir(parents=True)
