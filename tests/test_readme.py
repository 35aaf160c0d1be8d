"""The Python snippets of the README, then of docs/scaling.md, run as written, in that order, on a
small slice of CIFAR-10 (the real one when KMJAX_DATA_DIR points at it, else a synthetic folder in
its layout). Only the lines that set the paper's sizes are shrunk, each named below: a snippet that
no longer runs, or a size line that changed, fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import kmjax
from conftest import real_data_dir
from synthetic_cifar import make_cifar

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = (README, ROOT / "docs" / "scaling.md")  # whose snippets run, in this order
SMALLER = {  # the exact size lines of those pages, and what the test runs instead
    "K, N_PATCHES = 1600, 400_000": "K, N_PATCHES = 16, 3000",
    "N_IMAGES, K = 10_000, 400": "N_IMAGES, K = 200, 8",
    "key, K, N_PATCHES = jax.random.key(0), 1600, 400_000": "key, K, N_PATCHES = jax.random.key(0), 16, 3000",
}
N_IMAGES = 300  # images per split of the slice


def _blocks() -> list[tuple[Path, str]]:
    return [(page, block) for page in PAGES
            for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)]


def test_the_readme_has_its_snippets():
    text = "".join(block for _, block in _blocks())
    for line in SMALLER:
        assert line in text, f"no snippet has the line {line!r} any more: update SMALLER"
    assert len(_blocks()) >= 4


@pytest.mark.long
def test_readme_snippets_run(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    root = real_data_dir()
    if root is None:
        root = tmp_path / "cifar"
        make_cifar(root, n=N_IMAGES)
    load = kmjax.load_cifar10

    def small_slice(data_dir=None, split="train", **kwargs):
        data = load(root, split, **kwargs)
        return data._replace(images=data.images[:N_IMAGES], labels=data.labels[:N_IMAGES])

    monkeypatch.setattr(kmjax, "load_cifar10", small_slice)
    monkeypatch.chdir(tmp_path)  # the snippets write my_model.npz
    namespace: dict = {}
    for page, block in _blocks():
        for line, smaller in SMALLER.items():
            block = block.replace(line, smaller)
        exec(compile(block, str(page), "exec"), namespace)
    assert (tmp_path / "my_model.npz").is_file()
    assert 0.0 <= namespace["accuracy"] <= 1.0 and namespace["result"].centroids.shape == (16, 108)
