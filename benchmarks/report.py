"""Write a benchmark's results: raw JSON, a markdown table (also printed)."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(out_dir: Path, stem: str, title: str, header: list[str], rows: list[list[str]],
                 footer: str, data: dict) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=2, default=str))
    table = "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        + ["| " + " | ".join(r) + " |" for r in rows]
    )
    (out_dir / f"{stem}.md").write_text(f"# {title}\n\n{table}\n\n{footer}\n")
    print(table)
    return table
