"""Write the arithmetic reference sets (train, dev, test) to ``references/``.

    python models/make_references.py

The three sets are drawn from disjoint seeds and never share a prompt; the
model's training data holds all of them out (see ``models/train.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.task import Problem, generate, has_slip  # noqa: E402

SPLITS = {"train": (101, 500), "dev": (202, 200), "test": (303, 500)}


def item(split: str, index: int, p: Problem) -> dict[str, object]:
    return {
        "id": f"arith-{split}-{index:04d}",
        "prompt": p.prompt,
        "answers": [str(p.answer)],
        "route": "arith",
        "difficulty": p.difficulty,
        "meta": {"operands": len(p.operands), "check": p.has_check, "slip": has_slip(p)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("references"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    for split, (seed, count) in SPLITS.items():
        problems = generate(seed, count, exclude=taken)
        taken.update(p.prompt for p in problems)
        lines = [json.dumps(item(split, i, p)) for i, p in enumerate(problems)]
        (args.out / f"arith-{split}.jsonl").write_text("\n".join(lines) + "\n")
        print(f"{split}: {count} items")


if __name__ == "__main__":
    main()
