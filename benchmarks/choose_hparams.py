"""How SmolLM2's edited layers and lam were chosen (editing/HPARAMS.md): the tuning command on the
grid HPARAMS.md reports, its rows appended to a JSONL file.

    python benchmarks/choose_hparams.py                        # the HPARAMS.md grid
    python benchmarks/choose_hparams.py --windows 3-7,4-8 --lams 5000,1000   # any other

Every argument is editing.tune's (python -m editing.tune --help); this file only fixes the grid.
"""

import sys

from editing.tune import main

GRID = ["--model", "smollm2", "--n", "32", "--offset", "200", "--windows", "4-8,6-8,2-8",
        "--lams", "15000,5000,3000,2000,1000,500",
        "--out", "results/hparams/smollm2-preset.json",
        "--rows", "results/hparams/smollm2-tune-rows.jsonl"]

if __name__ == "__main__":
    main(GRID + sys.argv[1:])  # later arguments override the grid's
