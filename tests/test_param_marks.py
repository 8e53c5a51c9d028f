"""Weight decay and weight init read marks set where parameters are made, not parameter names."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from nsa.config import ModelConfig, NSAConfig
from nsa.model import Transformer
from train import make_optimizer

T = SimpleNamespace(lr=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.95)


def tiny(attention="nsa"):
    return Transformer(ModelConfig(dim=32, depth=3, heads=4, kv_heads=2, dim_head=8, attention=attention,
                                   nsa=NSAConfig(compress_block=8, compress_stride=4, sel_block=8, num_selected=4,
                                                 window=16, backend="torch")))


def decayed_names(model):
    decay = {id(p) for p in make_optimizer(model, T, fused=False).param_groups[0]["params"]}
    return {n for n, p in model.named_parameters() if id(p) in decay}


@pytest.mark.parametrize("attention", ["nsa", "dense"])
def test_no_decay_on_vectors_and_marked_parameters(attention):
    model = tiny(attention)
    decay = decayed_names(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}  # rotary's frozen freqs are not trained
    never = {n for n in names if n == "embed.weight" or n.endswith((".pos", ".mem_kv", ".bias")) or "norm" in n}
    assert never and not decay & never
    assert {"head.weight", "blocks.0.attn.to_q.weight", "blocks.2.ff.down.weight"} <= decay
    assert decay | never == names  # everything else is a matrix that decays


def test_a_marked_parameter_is_not_decayed_whatever_its_name():
    model = tiny()
    model.blocks[0].scale_table = nn.Parameter(torch.ones(4, 4))
    assert "blocks.0.scale_table" in decayed_names(model)
    model.blocks[0].scale_table._no_weight_decay = True
    assert "blocks.0.scale_table" not in decayed_names(model)
    assert model.to(torch.float64).blocks[0].scale_table._no_weight_decay  # the mark survives .to()


def test_init_reads_marks():
    torch.manual_seed(0)
    model = tiny()
    attn = model.blocks[0].attn
    assert torch.count_nonzero(attn.to_gates.weight) == 0  # `_own_init`: stays zero
    residual = torch.cat([b.attn.to_out.weight.flatten() for b in model.blocks] +
                         [b.ff.down.weight.flatten() for b in model.blocks])
    plain = torch.cat([model.embed.weight.flatten(), model.head.weight.flatten()])
    assert residual.std().item() == pytest.approx(0.02 / math.sqrt(2 * 3), rel=0.1)
    assert plain.std().item() == pytest.approx(0.02, rel=0.1)
    # a linear added under any name gets the default init; marked residual, the scaled one
    model.blocks[1].extra = nn.Linear(256, 256, bias=False)
    model.blocks[1].extra.weight._residual_out = True
    nn.init.zeros_(model.blocks[1].extra.weight)
    model._init_weights()
    assert model.blocks[1].extra.weight.std().item() == pytest.approx(0.02 / math.sqrt(6), rel=0.1)
