"""The package's layers, checked by reading every import (dev/import_graph.py): the library (picochat/*.py,
picochat/tasks/) never imports a stage (picochat/stages/), no stage imports another, the import graph has no
cycle, and imports sit at the top of each file unless a comment on the line says why not (an optional or heavy
package)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "picochat"
spec = importlib.util.spec_from_file_location("import_graph", ROOT / "dev" / "import_graph.py")
ig = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ig)


def test_the_package_has_both_layers():
    names = set(ig.modules(PACKAGE))
    assert {"picochat.stages.base_train", "picochat.stages.serve", "picochat.gpt", "picochat.engine"} <= names


def test_library_never_imports_a_stage():
    bad = {m: sorted(filter(ig.is_stage, deps)) for m, deps in ig.graph(PACKAGE).items()
           if ig.is_library(m) and any(map(ig.is_stage, deps))}
    assert not bad, f"library modules importing stages: {bad}"


def test_stages_do_not_import_each_other():
    bad = {m: sorted(filter(ig.is_stage, deps)) for m, deps in ig.graph(PACKAGE).items()
           if ig.is_stage(m) and any(map(ig.is_stage, deps))}
    assert not bad, f"stages importing other stages (move the shared code down into the library): {bad}"


def test_no_import_cycles():
    assert not ig.cycles(ig.graph(PACKAGE)), "import cycles"


def test_hf_modeling_stands_alone():
    # it is copied next to exported weights and loaded by transformers without picochat installed
    assert not ig.picochat_imports(PACKAGE / "hf_modeling.py", set(ig.modules(PACKAGE)))


def test_imports_at_the_top_or_explained():
    late = [f"{path.relative_to(ROOT)}:{line}: {text}" for path in ig.modules(PACKAGE).values()
            for line, text, commented in ig.late_imports(path) if not commented]
    assert not late, "imports inside functions without a comment saying why:\n" + "\n".join(late)


def test_the_checker_sees_violations(tmp_path):
    # the scanner must be able to fail: a stage imported inside a function, a cycle, an unexplained late import
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from picochat.stages import serve\n    return serve\n")
    assert "picochat.stages.serve" in ig.picochat_imports(f, {"picochat.stages.serve"})
    assert ig.late_imports(f) == [(2, "from picochat.stages import serve", False)]
    assert ig.cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]
