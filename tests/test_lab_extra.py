"""The lab is an optional extra: the runtime imports without the lab's dependencies and never imports
the lab, and the lab's commands, run without them, say in one line how to install them."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from merge_graphs.cli import main
from merge_graphs.lab import DEPENDENCIES, INSTALL

# Run in a fresh interpreter: this one has imported the lab and its dependencies already. A None
# in sys.modules makes `import sklearn` raise ImportError, as when it is not installed.
IMPORT_THE_RUNTIME = """
import importlib, pkgutil, sys
for name in {dependencies!r}:
    sys.modules[name] = None
import merge_graphs

def runtime_modules(package):
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        if info.name == "merge_graphs.lab":
            continue
        module = importlib.import_module(info.name)
        yield info.name
        if info.ispkg:
            yield from runtime_modules(module)

names = list(runtime_modules(merge_graphs))
lab = sorted(m for m in sys.modules if m == "merge_graphs.lab" or m.startswith("merge_graphs.lab."))
assert not lab, f"the runtime imported {{lab}}"
print("\\n".join(names))
"""


def test_every_runtime_module_imports_without_the_labs_dependencies():
    code = IMPORT_THE_RUNTIME.format(dependencies=DEPENDENCIES)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    imported = proc.stdout.split()
    assert {"merge_graphs.api", "merge_graphs.cli", "merge_graphs.evaluate", "merge_graphs.gnn.encoder",
            "merge_graphs.io.writer", "merge_graphs.symmetry.llama"} <= set(imported)
    assert not [name for name in imported if name.startswith("merge_graphs.lab")]


def test_the_lab_extra_installs_what_the_lab_checks_for_and_the_runtime_does_not():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    import_names = {"scikit-learn": "sklearn", "matplotlib": "matplotlib"}
    lab = [re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0] for d in project["optional-dependencies"]["lab"]]
    assert tuple(import_names[d] for d in lab) == DEPENDENCIES
    assert not set(lab) & {re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0] for d in project["dependencies"]}
    assert "merge-graphs[lab]" in project["optional-dependencies"]["test"]
    assert INSTALL == 'pip install "merge-graphs[lab]"'


@pytest.mark.parametrize("argv, missing", [(["bench", "mlp", "--quick"], "sklearn"),
                                           (["--quiet", "pretrain-gnn", "--steps", "1"], "matplotlib")])
def test_a_lab_command_without_the_labs_dependencies_names_the_fix(monkeypatch, capsys, argv, missing):
    monkeypatch.setitem(sys.modules, missing, None)
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and missing in err and 'pip install "merge-graphs[lab]"' in err
