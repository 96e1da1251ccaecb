"""MkDocs hook: the repository's benchmark figures as files of the site.

The figures live in ``benchmarks/`` (where the scripts write them and the README shows them), not
in ``docs/``; this adds every ``benchmarks/**/*.png`` to the site at the same relative path, so a
page links ``benchmarks/half_cheetah_100k.png`` without a copy.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]


def on_files(files: Files, config, **kwargs) -> Files:
    for png in sorted((ROOT / "benchmarks").rglob("*.png")):
        rel = png.relative_to(ROOT).as_posix()
        files.append(File(rel, src_dir=str(ROOT), dest_dir=config["site_dir"], use_directory_urls=False))
    return files
