"""The method-file contract (SPEC §2), checked with `ast` so it stays true: each file is at most 120 lines and
reads docstring, imports, constants (NEEDS_REFERENCE, LOSS_STATE, ...), `Args`, `loss_fn`, then the same
`__main__` call as dpo.py, so `diff dpo.py <method>.py` shows only the docstring, imports, constants, helpers the
loss needs (gammapo's solver), `Args` and `loss_fn`. Also: no method file imports another, `Args` fields each
carry a source docstring, NEEDS_REFERENCE matches whether `loss_fn` reads the reference, and `loss_fn` is pure."""

import ast
import importlib

import pytest

import common

METHODS = ["dpo", "ipo", "simpo", "apo_zero", "apo_hinge_zero", "margin_sigmoid", "gammapo", "alphapo"]
ALLOWED_IMPORTS = {"dataclasses", "math", "torch", "torch.nn.functional", "torch.distributed", "common"}


def parse(name):
    source = (common.REPO_DIR / f"{name}.py").read_text()
    return source, ast.parse(source)


@pytest.mark.parametrize("name", METHODS)
def test_method_file_layout(name):
    source, tree = parse(name)
    assert len(source.splitlines()) <= 120
    docstring = ast.get_docstring(tree)
    assert "arXiv:" in docstring and f"python {name}.py --model tiny --data tiny" in docstring
    assert f"torchrun --nproc_per_node 8 {name}.py" in docstring
    if name != "dpo":
        assert "dpo.py" in docstring  # the numbered "compared with dpo.py" list

    body = tree.body[1:]  # after the docstring
    kinds = []
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            assert set(modules) <= ALLOWED_IMPORTS, modules  # never another method file
            kinds.append("import")
        elif isinstance(node, ast.Assign):
            assert all(t.id.isupper() for t in node.targets), ast.unparse(node)  # module-level constants only
            kinds.append("constant")
        elif isinstance(node, ast.ClassDef) and node.name == "Args":
            kinds.append("Args")
        elif isinstance(node, ast.FunctionDef) and node.name == "loss_fn":
            kinds.append("loss_fn")
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            kinds.append("helper")
        else:
            assert isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'", ast.unparse(node)
            kinds.append("main")
    assert kinds[-3:] == ["Args", "loss_fn", "main"] and kinds.count("main") == 1
    assert kinds.index("constant") > max(i for i, k in enumerate(kinds) if k == "import")
    expected = ast.unparse(parse("dpo")[1].body[-1])  # one call into common, identical in all files ...
    if name == "gammapo":  # ... but for the one loss that keeps state between steps
        expected = expected.replace("NEEDS_REFERENCE)", "NEEDS_REFERENCE, loss_state=LOSS_STATE)")
    assert ast.unparse(tree.body[-1]) == expected

    constants = {t.id for node in body if isinstance(node, ast.Assign) for t in node.targets}
    assert "NEEDS_REFERENCE" in constants
    assert ("LOSS_STATE" in constants) == (name == "gammapo")  # the one loss that keeps state between steps


@pytest.mark.parametrize("name", METHODS)
def test_args_and_loss_fn(name):
    module = importlib.import_module(name)
    _, tree = parse(name)
    args_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args")
    assert [ast.unparse(d) for d in args_class.decorator_list] == ["dataclass"]
    assert [ast.unparse(b) for b in args_class.bases] == ["common.TrainArgs"]
    fields = args_class.body
    for i, node in enumerate(fields):
        if isinstance(node, ast.AnnAssign):  # every field is followed by its one-line docstring with a source
            doc = fields[i + 1]
            assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant), ast.unparse(node)
            assert "\n" not in doc.value.value and "(" in doc.value.value, doc.value.value
        else:
            assert isinstance(node, ast.Expr) or (isinstance(node, ast.FunctionDef) and node.name == "__post_init__")
    assert any(isinstance(n, ast.AnnAssign) and n.target.id == "learning_rate" for n in fields)

    loss_fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "loss_fn")
    assert [a.arg for a in loss_fn.args.args] == ["lp", "args"]
    code = ast.unparse(loss_fn)
    assert ("lp.ref_chosen" in code) == module.NEEDS_REFERENCE
    for impure in (".item(", ".cpu(", ".cuda(", ".to(", "print(", "open("):
        assert impure not in code, impure
    assert ast.unparse(loss_fn.body[-1]).startswith("return (losses, ")
    assert ("lp.chosen_len" in code) == (name in {"ipo", "simpo", "gammapo", "alphapo"})  # length-normalised, visibly


def test_readme_diff_excerpt_is_real():
    """Every line of the README's `diff dpo.py simpo.py` excerpt is where the diff says: '-' in dpo.py only,
    '+' in simpo.py only, ' ' in both, in the same order."""
    readme = (common.REPO_DIR / "README.md").read_text()
    excerpt = readme.split("```diff\n", 1)[1].split("```", 1)[0].splitlines()
    dpo_lines, simpo_lines = (parse(name)[0].splitlines() for name in ("dpo", "simpo"))
    positions = {"dpo": -1, "simpo": -1}
    for line in excerpt:
        if line.strip() == "...":
            continue
        sign, text = line[0], line[1:]
        for name, lines in (("dpo", dpo_lines), ("simpo", simpo_lines)):
            if sign == " " or (sign == "-") == (name == "dpo"):
                assert text in lines[positions[name] + 1 :], (name, line)  # present, after the previous line
                positions[name] = lines.index(text, positions[name] + 1)
            else:
                assert text not in lines, (name, line)
