"""The README's Python example runs as written (so the README stays true)."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - our own README
    pk, model = namespace["pk"], namespace["model"]
    assert not pk.is_applied(model)  # the example ends with remove()
    assert namespace["out"].shape[1] > 0
