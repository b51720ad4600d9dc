"""The worked examples of the docs pages, run by the tests from the pages themselves (so that the
documentation and the tests cannot drift apart), and registries restored after a test registers one."""

import contextlib
import re


def python_block(page) -> str:
    """The page's one python block."""
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1, f"{page} should hold exactly one python block (the worked example)"
    return blocks[0]


@contextlib.contextmanager
def run_example(page, registry: dict, name: str):
    """Execute the page's block (which registers something in ``registry``); yields its object ``name``;
    the registry is as before afterwards."""
    saved = dict(registry)
    namespace = {"__name__": f"{page.stem}_doc_example"}
    exec(compile(python_block(page), str(page), "exec"), namespace)
    try:
        yield namespace[name]
    finally:
        registry.clear()
        registry.update(saved)
