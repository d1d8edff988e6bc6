"""The README and the guides: every relative link points at a file that exists, and every #anchor at a heading."""

import re
from pathlib import Path

import pytest
from conftest import REPO_ROOT

README_LINES_MAX = 250
GUIDES = [
    "finetuning/preparation/README.md",
    "finetuning/training/README.md",
    "finetuning/evaluation/README.md",
    "finetuning/SETTINGS.md",
    "bench/README.md",
]
DOCS = ["README.md", *GUIDES, "voices/README.md", "tests/fixtures/README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def prose_keeping_code_text(text: str) -> str:
    """``text`` without fenced code blocks (a ``#`` line there is no heading); inline code keeps its text."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def anchors(markdown: str) -> set[str]:
    """The #anchors GitHub gives a file's headings: lower case, punctuation dropped, spaces to hyphens, a repeated
    heading's anchor suffixed -1, -2, ..."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *$", prose_keeping_code_text(markdown), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def broken_links(doc: Path) -> list[str]:
    """Each relative link of ``doc`` whose file does not exist or whose #anchor is no heading there."""
    broken = []
    for target in LINK.findall(prose(doc.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path = (doc.parent / path_part).resolve() if path_part else doc
        if not path.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and (path.suffix != ".md" or anchor not in anchors(path.read_text())):
            broken.append(f"{target} (no heading #{anchor})")
    return broken


@pytest.mark.parametrize("name", DOCS)
def test_every_relative_link_resolves(name):
    doc = REPO_ROOT / name
    assert doc.is_file(), f"{name} is missing"
    assert not broken_links(doc), f"{name}: broken links {broken_links(doc)}"


def test_readme_is_short_and_links_every_guide():
    readme = (REPO_ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_LINES_MAX
    for guide in GUIDES:
        assert f"]({guide})" in readme, f"the README does not link {guide}"


def test_a_broken_link_or_anchor_is_found(tmp_path):
    (tmp_path / "guide.md").write_text("# Guide\n\n## Voice-clone fine-tuning (`TRAINING_MODE=voice_clone`)\n")
    doc = tmp_path / "README.md"
    doc.write_text(
        "[ok](guide.md#voice-clone-fine-tuning-training_modevoice_clone) [self](#top) [web](https://example.org)\n"
        "# Top\n[gone](missing.md) [bad anchor](guide.md#nothing) `[in code](missing.md)`\n"
        "```\n[in a block](missing.md)\n```\n"
    )
    assert broken_links(doc) == ["missing.md (no such file)", "guide.md#nothing (no heading #nothing)"]


def test_the_quick_subset_leaves_out_the_slow_tests():
    """The README's ``-m "not slow"``: the marker is registered (``--strict-markers``) and leaves out the overfit
    runs and the demo, and nothing else of those files."""
    import subprocess
    import sys

    from conftest import subprocess_env

    files = ["tests/training/test_train.py", "tests/test_finetune_cli.py"]
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "--strict-markers", "-p", "no:cacheprovider"]
    runs = {
        which: subprocess.run(
            [*command, *marker, *files], cwd=REPO_ROOT, capture_output=True, text=True, env=subprocess_env()
        )
        for which, marker in (("all", []), ("quick", ["-m", "not slow"]))
    }
    for proc in runs.values():
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    collected = {which: {line for line in proc.stdout.splitlines() if "::" in line} for which, proc in runs.items()}
    left_out = collected["all"] - collected["quick"]
    assert left_out and all("test_train.py" in t or "test_demo" in t for t in left_out)
    assert {t for t in collected["all"] if "test_train.py" in t or "test_demo" in t} == left_out
    assert any("test_finetune_cli.py" in t for t in collected["quick"])
