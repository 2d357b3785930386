"""Where the default model is found: ``$MOE_EMPATHY_CHECKPOINT``, the installed copy, the source
tree; and the error when none holds one (never untrained experts)."""

from pathlib import Path

import pytest

from moe_empathy import loading


def model_folder(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


@pytest.fixture
def places(tmp_path, monkeypatch):
    """The installed and source-tree places of the shipped checkpoint, both empty; no variable."""
    found = [tmp_path / "site-packages" / "moe_empathy" / "checkpoints" / "x", tmp_path / "src" / "checkpoints" / "x"]
    monkeypatch.setattr(loading, "shipped_checkpoint_places", lambda: found)
    monkeypatch.delenv(loading.CHECKPOINT_ENV, raising=False)
    return found


def test_the_installed_copy_comes_before_the_source_tree(places):
    model_folder(places[1])
    assert loading.default_checkpoint() == places[1]
    model_folder(places[0])
    assert loading.default_checkpoint() == places[0]


def test_the_environment_variable_comes_first(places, tmp_path, monkeypatch):
    model_folder(places[0])
    chosen = model_folder(tmp_path / "mine")
    monkeypatch.setenv(loading.CHECKPOINT_ENV, str(chosen))
    assert loading.default_checkpoint() == chosen


def test_a_variable_naming_no_model_is_an_error_not_a_fall_back(places, tmp_path, monkeypatch):
    model_folder(places[0])
    monkeypatch.setenv(loading.CHECKPOINT_ENV, str(tmp_path / "typo"))
    with pytest.raises(FileNotFoundError, match="MOE_EMPATHY_CHECKPOINT=.*typo is not a model folder.*unset it"):
        loading.default_checkpoint()


def test_nothing_found_lists_every_place_and_how_to_pass_a_model(places):
    with pytest.raises(FileNotFoundError) as error:
        loading.load_model_and_tokenizer()
    message = str(error.value)
    assert all(str(place) in message for place in places)
    assert "--model DIR" in message and "MOE_EMPATHY_CHECKPOINT" in message


def test_a_wheel_carries_the_checkpoint_where_loading_looks_first():
    """pyproject.toml installs every file of checkpoints/ as moe_empathy/checkpoints/, the first
    place :func:`loading.shipped_checkpoint_places` names."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parents[2]
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {"moe_empathy.cli", "moe_empathy.checkpoints"} <= set(setuptools["packages"])
    assert setuptools["package-dir"]["moe_empathy.checkpoints"] == "checkpoints"
    patterns = setuptools["package-data"]["moe_empathy.checkpoints"]
    shipped = [path.relative_to(root / "checkpoints") for path in (root / "checkpoints").rglob("*") if path.is_file()]
    assert shipped and all(any(path.match(pattern) for pattern in patterns) for path in shipped)
    installed = loading.shipped_checkpoint_places()[0]
    assert installed.relative_to(Path(loading.__file__).resolve().parent) == Path("checkpoints", loading.SHIPPED_CHECKPOINT)


def test_this_tree_ships_its_checkpoint():
    folder = loading.shipped_checkpoint()
    assert folder is not None and (folder / "experts.safetensors").is_file()
