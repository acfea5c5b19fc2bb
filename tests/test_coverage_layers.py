"""The attention-layer finder behind the run report's coverage (nodes/coverage.py) without
ComfyUI: it walks a model once, then re-checks only the paths to the layers it found,
walks again when any module on those paths is replaced, and keeps no model alive."""

from __future__ import annotations

import gc
import importlib.util
import os
import sys
import weakref

import pytest
import torch

from library_support import ROOT


def attention_pytorch(q, k, v, heads):  # stands for ComfyUI's function: the finder reads names
    return q


attention_pytorch.__module__ = "comfy.ldm.modules.attention"


class Attention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q = torch.nn.Linear(4, 4)

    def forward(self, x):
        return attention_pytorch(self.to_q(x), x, x, 1)


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn1, self.attn2 = Attention(), Attention()
        self.ff = torch.nn.Linear(4, 4)


class Model(torch.nn.Module):
    def __init__(self, blocks: int = 3) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block() for _ in range(blocks))
        self.out = torch.nn.Linear(4, 4)


@pytest.fixture(scope="module")
def coverage():
    spec = importlib.util.spec_from_file_location("attention_backends_coverage", os.path.join(ROOT, "nodes",
                                                                                                "coverage.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def counting_walks(model: torch.nn.Module) -> list[int]:
    """Counts the model's full walks (named_modules calls on the model itself)."""
    walks = [0]
    original = model.named_modules

    def named_modules(*args, **kwargs):
        walks[0] += 1
        return original(*args, **kwargs)

    model.named_modules = named_modules
    return walks


def names(layers) -> list[str]:
    return [name for name, _ in layers]


def test_walks_once_while_the_layers_stay(coverage):
    model = Model()
    walks = counting_walks(model)
    first = coverage.attention_layers(model)
    assert names(first) == [f"blocks.{i}.attn{j}" for i in range(3) for j in (1, 2)]
    for _ in range(3):
        assert coverage.attention_layers(model) == first
    assert walks[0] == 1
    model.blocks[0].ff = torch.nn.Linear(4, 4)  # off every layer's path: the layers are still right
    assert coverage.attention_layers(model) == first and walks[0] == 1


def test_a_replaced_layer_or_ancestor_makes_it_walk_again(coverage):
    model = Model()
    walks = counting_walks(model)
    coverage.attention_layers(model)
    replacement = Attention()
    model.blocks[1].attn2 = replacement
    layers = dict(coverage.attention_layers(model))
    assert walks[0] == 2 and layers["blocks.1.attn2"] is replacement
    model.blocks[2] = torch.nn.Sequential()  # a block and its two layers gone
    assert names(coverage.attention_layers(model)) == [f"blocks.{i}.attn{j}" for i in range(2) for j in (1, 2)]
    assert walks[0] == 3
    model.blocks = torch.nn.ModuleList([Block()])  # a module right under the model replaced
    assert names(coverage.attention_layers(model)) == ["blocks.0.attn1", "blocks.0.attn2"] and walks[0] == 4


def test_a_model_without_attention_is_walked_once(coverage):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    walks = counting_walks(model)
    assert coverage.attention_layers(model) == [] and coverage.attention_layers(model) == []
    assert walks[0] == 1


def test_keeps_no_model_alive(coverage):
    model = Model()
    coverage.attention_layers(model)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_callers_cannot_change_what_is_kept(coverage):
    model = Model()
    coverage.attention_layers(model).clear()
    assert len(coverage.attention_layers(model)) == 6
