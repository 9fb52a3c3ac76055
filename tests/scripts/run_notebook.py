"""Executes a notebook's code cells in order, in one namespace, as Jupyter would (no Jupyter
needed): ``python tests/scripts/run_notebook.py notebooks/quickstart.ipynb``. Lines starting with
``!`` or ``%`` (shell and magics) are not Python and fail the run, so notebooks keep installs in
plain Python behind a Colab check."""

import json
import sys


def main(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        nb = json.load(f)
    namespace = {"__name__": "__main__"}
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    for i, cell in enumerate(cells):
        source = "".join(cell["source"])
        print(f"--- cell {i + 1}/{len(cells)}", flush=True)
        exec(compile(source, f"{path}[code cell {i + 1}]", "exec"), namespace)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
