"""Depth steps of the viewer's slider (camscope.depth_steps): one step per depth, identical maps merged,
the main path shown, the default never a 1x1 pool; checked on hand-made layers and on a real ResNet."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torchvision

from camscope import CamEngine
from camscope.depth_steps import DepthStep, LayerAtDepth, default_position, depth_steps, step_of


def test_a_container_and_its_last_child_are_one_step_named_after_both():
    steps = depth_steps([LayerAtDepth("features.0", 1, 64, "a"), LayerAtDepth("features.1", 2, 64, "b"),
                         LayerAtDepth("features", 2, 64, "b"), LayerAtDepth("pool", 3, 1, "c")])
    assert [step.depth for step in steps] == [1, 2, 3]
    assert steps[1] == DepthStep(2, "features", ("features.1",), (), 64)
    assert steps[1].title == "features = features.1"
    assert default_position(steps) == 1  # the 1x1 pool is deeper but shows no location
    assert step_of(steps, "features.1") == step_of(steps, "features") == 1 and step_of(steps, "nope") is None


def test_different_maps_at_one_depth_show_the_main_path_and_list_the_others():
    layers = [LayerAtDepth("block.conv1", 5, 16, "m"), LayerAtDepth("block.bn1", 6, 16, "n"),
              LayerAtDepth("block.conv2", 7, 16, "o"), LayerAtDepth("block.downsample.0", 5, 16, "x"),
              LayerAtDepth("block.downsample.1", 6, 16, "y"), LayerAtDepth("block.downsample", 6, 16, "y"),
              LayerAtDepth("block", 8, 16, "z")]
    steps = depth_steps(layers)
    assert [step.depth for step in steps] == [5, 6, 7, 8]
    assert steps[0].layer == "block.conv1" and steps[0].others == ("block.downsample.0",)
    assert steps[1].layer == "block.bn1"
    assert set(steps[1].others) == {"block.downsample", "block.downsample.1"}
    assert default_position(steps) == 3


def test_without_fingerprints_the_module_tree_decides_what_is_identical():
    steps = depth_steps([LayerAtDepth("side", 3, 4), LayerAtDepth("head.1", 3, 4), LayerAtDepth("head", 3, 4)])
    assert len(steps) == 1 and steps[0].names == ("head", "head.1") and steps[0].others == ("side",)


def test_only_pools_means_the_deepest_step_is_the_default():
    steps = depth_steps([LayerAtDepth("a", 1, 1), LayerAtDepth("b", 2, 1)])
    assert default_position(steps) == 1
    assert depth_steps([]) == [] and default_position([]) == -1


def _fingerprint(maps: dict, name: str) -> str:
    digest = hashlib.sha1()
    for algorithm in sorted(maps):
        digest.update(maps[algorithm][name].numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def resnet_steps():
    torch.manual_seed(0)
    engine = CamEngine(torchvision.models.resnet18(num_classes=4).eval())
    explanation = engine.explain(torch.rand(1, 3, 64, 64), labels=[0, 1])
    layers = [LayerAtDepth(info.name, info.depth["x"], info.shape[-1] * info.shape[-2],
                           _fingerprint(explanation.maps, info.name)) for info in engine.layers]
    return engine, depth_steps(layers)


def test_resnet_steps_are_its_depths_and_the_default_is_the_engines_last_layer(resnet_steps):
    engine, steps = resnet_steps
    depths = sorted({info.depth["x"] for info in engine.layers})
    assert [step.depth for step in steps] == depths
    assert len(steps) < len(engine.layers)  # containers merged with their last block
    default = steps[default_position(steps)]
    assert engine.last_layer("x").name in default.names and default.extent > 1
    assert default.title == "layer4 = layer4.1"
    merged = steps[step_of(steps, "layer4")]
    assert "avgpool" not in merged.names


def test_resnet_downsample_branch_is_listed_beside_the_main_path(resnet_steps):
    _, steps = resnet_steps
    index = step_of(steps, "layer2.0.downsample.0")
    assert "layer2.0.downsample.0" in steps[index].others
    assert steps[index].layer.startswith("layer2.0.conv")
