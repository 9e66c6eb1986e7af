"""Recipe files are data from anyone: every bad one is a RecipeError that names the problem.

Rows of docs/bad-input.md ("Recipes"); the fuzz tests show that the parser raises nothing but the
toolkit's own errors, whatever it is given.
"""

from __future__ import annotations

import pytest
import yaml
from bad_input_kit import cli, one_paragraph
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowrank
from lowrank import LowrankError, Recipe, RecipeError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _write(tmp_path, data: bytes | str, name: str = "recipe.yaml"):
    path = tmp_path / name
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


# -- rows of the table: file-level problems ---------------------------------------------------------


def test_recipe_file_not_utf8(tmp_path):
    path = _write(tmp_path, "ratio: 0.3\nname: caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match=r"not UTF-8 text \(byte 0xe9 on line 2, offset 20\)"):
        Recipe.load(path)
    result = cli("recipe", "validate", path)
    assert result.exit_code == 2 and one_paragraph(result.stderr), result.output
    assert "not UTF-8" in result.stderr and "UnicodeDecodeError" not in result.output


def test_recipe_file_too_large(tmp_path):
    from lowrank._contract.recipe_file import MAX_RECIPE_BYTES

    path = _write(tmp_path, "# padding\n" * (MAX_RECIPE_BYTES // 10 + 1) + "ratio: 0.3\n")
    with pytest.raises(RecipeError, match="larger than 1048576 bytes"):
        Recipe.load(path)
    with pytest.raises(RecipeError, match="longer than"):
        Recipe.from_yaml(path.read_text())


def test_recipe_file_missing_or_a_directory(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.load(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="is a directory"):
        Recipe.load(tmp_path)


def test_python_tags_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    text = f"name: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(RecipeError, match="not valid YAML: could not determine a constructor"):
        Recipe.from_yaml(text)
    assert not marker.exists()


def test_not_yaml_is_one_line_with_the_position():
    with pytest.raises(RecipeError, match=r"not valid YAML: expected .* at line 3, column 1$"):
        Recipe.from_yaml("ratio: 0.3\nscalings: [whitening\n")


def test_duplicate_key(tmp_path):
    path = _write(tmp_path, "ratio: 0.3\nallocator: uniform\nratio: 0.5\n")
    with pytest.raises(RecipeError, match=r"key 'ratio' is given twice in one mapping \(line 3\)"):
        Recipe.load(path)


def test_aliases_that_expand_without_bound():
    laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdef", "bcdefg"))
    with pytest.raises(RecipeError, match="more than 100000 values"):
        Recipe.from_yaml(laughs)
    with pytest.raises(RecipeError, match="refers to itself"):
        Recipe.from_yaml("targets: &t [*t]\n")


def test_nested_too_deeply():
    with pytest.raises(RecipeError):
        Recipe.from_yaml("ratio: " + "[" * 5000 + "]" * 5000)


# -- rows of the table: settings -----------------------------------------------------------------


def test_duplicate_scaling():
    with pytest.raises(RecipeError, match="'whitening' listed more than once"):
        Recipe(scalings=["whitening", "whitening"])
    with pytest.raises(RecipeError, match="'asvd' listed more than once"):
        Recipe.from_yaml("scalings: [{asvd: {alpha: 0.5}}, whitening, {asvd: {alpha: 1.0}}]\n")


@pytest.mark.parametrize("floor", [-1, -0.5, 1.5, 10**9, 10**400])
def test_rank_floor_negative_or_huge(floor):
    with pytest.raises(RecipeError, match="zero-sum.*keep_rank_ratio"):
        Recipe(allocator={"zero-sum": {"keep_rank_ratio": floor}})


@pytest.mark.parametrize("spec", [
    {"energy": {"fraction": "half"}},
    {"energy": {"fraction": [0.5]}},
    {"zero-sum": {"stages": "many"}},
    {"zero-sum": {"gradient_windows": 1.5}},
    {"sensitivity": {"candidates": "0.5"}},
    {"energy": [0.5]},
])
def test_allocator_setting_of_the_wrong_type(spec):
    with pytest.raises(RecipeError, match="allocator"):
        Recipe(allocator=spec)


@pytest.mark.parametrize("data, match", [
    ({"seed": 2**64}, "seed"),
    ({"seed": -1}, "seed"),
    ({"ratio": 10**400}, "ratio"),
    ({"ratio": float("nan")}, "ratio"),
    ({"targets": ["re:(q_proj"]}, "not a valid regular expression"),
    ({"ignore": ["re:*"]}, "not a valid regular expression"),
    ({1: 2}, "unknown recipe key.*1"),
    ({None: "x", "ratio": 0.3}, "unknown recipe key.*None"),
    ({"lowrank_recipe": 2}, "reads format 1"),
    ({"scalings": [{"asvd": {1: 2}}]}, "asvd"),
    ({"device": "cuda:x"}, "device"),
])
def test_bad_values(data, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.from_dict(data)


def test_cli_compress_refuses_a_bad_recipe_before_loading_a_model(tmp_path, monkeypatch):
    import lowrank.data

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(lowrank.data, "load_model", never)
    path = _write(tmp_path, "scalings: [whitening, whitening]\n")
    result = cli("compress", "any-model", "--recipe", path, "--out", tmp_path / "out")
    assert result.exit_code == 2 and one_paragraph(result.stderr), result.output
    assert "listed more than once" in result.stderr
    assert not (tmp_path / "out").exists()


# -- fuzz: nothing but the toolkit's own errors -----------------------------------------------------

_KEYS = ["lowrank_recipe", "name", "targets", "ignore", "scalings", "allocator", "corrections",
         "exporter", "ratio", "device", "dtype", "seed", "inputs", "factorization", "ration"]
_NAMES = ["whitening", "asvd", "identity", "fwsvd", "sigmascale", "uniform", "energy", "zero-sum",
          "loss-aware", "sensitivity", "hf", "dense", "nope"]
_SETTINGS = ["alpha", "eps", "jitter", "fraction", "steps", "lr", "keep_rank_ratio", "stages", "candidates",
             "windows", "floor", "max_tries", "init", "train", "loss"]
_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
            | st.text(max_size=12) | st.sampled_from(_NAMES + _SETTINGS + ["re:(", "cuda", "auto", "float16"]))
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(_NAMES + _SETTINGS) | st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
_documents = st.dictionaries(st.sampled_from(_KEYS), _values, max_size=6) | _values


def _only_our_errors(call) -> None:
    try:
        call()
    except LowrankError:
        pass


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(_documents)
def test_fuzz_recipe_from_random_yaml_documents(data):
    try:
        text = yaml.safe_dump(data, allow_unicode=True)
    except (yaml.YAMLError, ValueError):  # e.g. a float YAML cannot write: not a document
        return
    _only_our_errors(lambda: Recipe.from_yaml(text))
    if isinstance(data, dict):
        _only_our_errors(lambda: Recipe.from_dict(data))


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.text(max_size=200))
def test_fuzz_recipe_from_random_text(text):
    _only_our_errors(lambda: Recipe.from_yaml(text))


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture], deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_recipe_file_from_random_bytes(tmp_path, data):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(data)
    _only_our_errors(lambda: Recipe.load(path))


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.sampled_from(["ratio: 0.3\n", "scalings: [", "whitening", "]\n", "{", "}", ": ",
                                 "&a ", "*a ", "!!python/name:os.system ", "- ", "\n  ", "'", '"',
                                 "allocator: {energy: {fraction: ", "0.5", "}}\n", "\t", "\\x00"]),
                max_size=20))
def test_fuzz_recipe_from_yaml_fragments(parts):
    _only_our_errors(lambda: Recipe.from_yaml("".join(parts)))


def test_a_good_recipe_still_round_trips(tmp_path):
    recipe = Recipe(scalings=[{"asvd": {"alpha": 0.7}}, "whitening"], allocator={"energy": {"fraction": 0.9}},
                    ratio=0.35, targets=["re:.*proj$"], seed=7)
    assert Recipe.load(recipe.save(tmp_path / "r.yaml")) == recipe
    assert lowrank.Recipe.from_yaml(recipe.to_yaml()) == recipe
