"""The project API on a tiny hand-made two-input project: lookups, batches, model checks and bad definitions."""

import pickle
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from camscope.project import Connection, DataSlice, ModelRun, Project, ProjectError, load_project

SHAPE = (1, 4, 4)
LABELS = ["cat", "dog"]


class TwoInput(nn.Module):
    """forward(a, b) -> [B, outputs]."""

    def __init__(self, outputs: int = 2) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(1, 3, 3, padding=1)
        self.conv_b = nn.Conv2d(1, 3, 3, padding=1)
        self.head = nn.Linear(6, outputs)

    def forward(self, a, b):
        features = torch.cat([self.conv_a(a), self.conv_b(b)], dim=1)
        return self.head(features.mean(dim=(2, 3)))


class OtherNames(TwoInput):
    def forward(self, a, c):  # "c" is not a connection of the project; "b" is not a parameter
        return super().forward(a, c)


def load(sample_id: str) -> dict:
    value = float(sample_id)
    return {"a": np.full(SHAPE, value, np.float32), "b": np.full(SHAPE, -value, np.float64)}


def label_of(sample_id: str) -> int:
    return int(sample_id) % 2


def metadata_of(sample_id: str) -> dict:
    return {"id": sample_id}


def black(sample: dict, metadata: dict) -> np.ndarray:
    return np.zeros((4, 4, 3), np.uint8)


def not_rgb(sample: dict, metadata: dict) -> np.ndarray:
    return np.zeros((4, 4))


def make_project(load_fn=load, build=TwoInput, ground_truth=label_of, ids=("0", "1", "2")):
    return Project(
        name="tiny",
        label_names=LABELS,
        connections=[Connection("a", SHAPE), Connection("b", SHAPE)],
        slices=[DataSlice("train", list(ids), load_fn, ground_truth, metadata_of)],
        runs=[ModelRun("net", build)],
        visualizers={"black": black, "broken": not_rgb},
    )


@pytest.fixture
def module_with(monkeypatch):
    """Register an importable module ``tiny_projects`` holding the given attributes."""
    def register(**attrs):
        module = types.ModuleType("tiny_projects")
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, "tiny_projects", module)
        return module
    return register


def assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_load_project_and_lookups(module_with):
    module_with(project=make_project())
    project = load_project("tiny_projects:project")
    assert project.label_names == LABELS
    assert list(project.connections) == ["a", "b"] and list(project.slices) == ["train"]
    assert project.ground_truth("train", 1) == 1  # ids coerced with str
    assert project.metadata("train", "2") == {"id": "2"}
    sample = project.sample("train", "2")
    assert sample["b"].dtype == np.float32 and sample["b"][0, 0, 0] == -2.0


def test_load_batch_stacks_float32_tensors():
    batch = make_project().load_batch("train", ["0", "2"])
    assert set(batch) == {"a", "b"}
    assert batch["a"].shape == (2, *SHAPE) and batch["b"].dtype == torch.float32
    assert batch["a"][1].unique().tolist() == [2.0]


def test_model_is_built_once_validated_and_in_eval_mode():
    calls = []

    def build():
        calls.append(1)
        return TwoInput().train()

    project = make_project(build=build)
    model = project.model("net")
    assert model is project.model("net") and len(calls) == 1
    assert not model.training
    assert project.model("net")(**project.load_batch("train", ["0", "1", "2"])).shape == (3, 2)


def test_visualize_and_render():
    project = make_project()
    assert project.visualize("black", "train", "0").shape == (4, 4, 3)
    with pytest.raises(ProjectError) as error:
        project.visualize("broken", "train", "0")
    assert_one_line(error, "broken", "uint8")
    image = project.render("a", {"a": np.full(SHAPE, 0.5, np.float32)})
    assert image.shape == (4, 4, 3) and image.dtype == np.uint8 and image.max() == 128


def test_project_survives_pickling_without_its_built_models():
    project = make_project()
    project.model("net")
    copy = pickle.loads(pickle.dumps(project))
    assert copy._models == {} and copy.model("net") is not project.model("net")


@pytest.mark.parametrize("call, fragments", [
    (lambda p: p.model("nope"), ["unknown run 'nope'", "net"]),
    (lambda p: p.load_batch("nope", ["0"]), ["unknown slice 'nope'", "train"]),
    (lambda p: p.connection("c"), ["unknown connection 'c'", "a, b"]),
    (lambda p: p.sample("train", "99"), ["unknown sample id '99'", "train"]),
    (lambda p: p.load_batch("train", []), ["at least one sample id"]),
    (lambda p: p.visualize("nope", "train", "0"), ["unknown visualizer 'nope'"]),
])
def test_unknown_names_raise_project_error(call, fragments):
    with pytest.raises(ProjectError) as error:
        call(make_project())
    assert_one_line(error, *fragments)


def test_project_error_is_a_value_error_with_one_line():
    assert issubclass(ProjectError, ValueError)
    assert str(ProjectError("two\n  lines")) == "two lines"


@pytest.mark.parametrize("build, fragments", [
    (lambda: TwoInput(outputs=3), ["run 'net'", "(1, 3)", "[B, 2]"]),
    (lambda: nn.Sequential(nn.Flatten()), ["run 'net'", "connections ['a', 'b']", "not parameters"]),
    (lambda: OtherNames(), ["connections ['b']", "not parameters"]),
    (lambda: "not a model", ["not a torch.nn.Module"]),
])
def test_bad_models_are_rejected(module_with, build, fragments):
    module_with(project=make_project(build=build))
    project = load_project("tiny_projects:project")  # data is fine: loads
    with pytest.raises(ProjectError) as error:
        project.model("net")
    assert_one_line(error, *fragments)
    with pytest.raises(ProjectError):
        load_project("tiny_projects:project", models=True)


def wrong_shape(sample_id):
    return {"a": np.zeros((1, 5, 4), np.float32), "b": np.zeros(SHAPE, np.float32)}


def wrong_keys(sample_id):
    return {"a": np.zeros(SHAPE, np.float32), "c": np.zeros(SHAPE, np.float32)}


def not_numbers(sample_id):
    return {"a": np.full(SHAPE, "x"), "b": np.zeros(SHAPE, np.float32)}


@pytest.mark.parametrize("project_kwargs, fragments", [
    ({"load_fn": wrong_shape}, ["slice 'train' sample '0'", "'a' has shape (1, 5, 4)", "expected (1, 4, 4)"]),
    ({"load_fn": wrong_keys}, ["keys ['a', 'c']", "expected connections ['a', 'b']"]),
    ({"load_fn": not_numbers}, ["non-numeric"]),
    ({"load_fn": lambda sid: [1, 2]}, ["must return a dict"]),
    ({"ground_truth": lambda sid: 7}, ["ground truth 7", "0..1"]),
])
def test_bad_loaders_fail_at_load_time(module_with, project_kwargs, fragments):
    module_with(project=make_project(**project_kwargs))
    with pytest.raises(ProjectError) as error:
        load_project("tiny_projects:project")
    assert_one_line(error, *fragments)


@pytest.mark.parametrize("spec, fragment", [
    ("no_colon", "module:attribute"),
    ("a:b:c", "module:attribute"),
    (":project", "module:attribute"),
    ("tiny_projects:", "module:attribute"),
    ("tiny projects:project", "module:attribute"),
    ("camscope.no_such_module_xyz:project", "cannot import project module 'camscope.no_such_module_xyz'"),
    ("tiny_projects:missing", "has no attribute 'missing'"),
    ("tiny_projects:not_a_project", "is a int, not a camscope Project"),
    (None, "module:attribute"),
])
def test_bad_project_specs(module_with, spec, fragment):
    module_with(project=make_project(), not_a_project=3)
    with pytest.raises(ProjectError) as error:
        load_project(spec)
    assert_one_line(error, fragment)


@pytest.mark.parametrize("make, fragment", [
    (lambda: Connection("a", (4,)), "shape must be (C, H, W) or (C, L)"),
    (lambda: Connection("a", (1, 0, 4)), "shape must be (C, H, W) or (C, L)"),
    (lambda: DataSlice("s", [], load, label_of), "has no samples"),
    (lambda: DataSlice("s", ["1", 1], load, label_of), "duplicate sample ids"),
    (lambda: DataSlice("s", ["1"], "load", label_of), "load must be callable"),
    (lambda: Project("p", [], [Connection("a", SHAPE)], [], []), "label_names"),
    (lambda: Project("p", LABELS, [Connection("a", SHAPE)] * 2, [], []), "duplicate connection name 'a'"),
    (lambda: Project("p", LABELS, {"x": Connection("a", SHAPE)}, [], []), "registered as 'x' is named 'a'"),
    (lambda: Project("p", LABELS, [Connection("a", SHAPE)], [], []), "at least one slice"),
])
def test_bad_definitions_fail_when_built(make, fragment):
    with pytest.raises(ProjectError) as error:
        make()
    assert_one_line(error, fragment)
