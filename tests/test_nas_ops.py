"""The DARTS operation set, the search supernet and the evaluation networks, against their definitions
and against the parameter counts of the papers' code (quark0/darts, yuhuixu1993/PC-DARTS)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from src.models.darts_net import NetworkCIFAR, NetworkImageNet, drop_path
from src.nas.genotypes import NAMED_GENOTYPES, PRIMITIVES, Genotype
from src.nas.operations import OPS, FactorizedReduce
from src.nas.supernet import DartsSupernet, MixedOp, channel_shuffle
from src.utils.errors import AutoclsError

# tiny NAS nets: one intra-op thread (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("size", [8, 7])
def test_every_op_keeps_shape_at_stride_1_and_halves_it_at_stride_2(name, affine, size):
    x = torch.randn(2, 6, size, size)
    assert set(OPS) == set(PRIMITIVES)
    assert OPS[name](6, 1, affine)(x).shape == (2, 6, size, size)
    half = -(-size // 2)  # odd sizes round up, like a padded stride-2 conv
    assert OPS[name](6, 2, affine)(x).shape == (2, 6, half, half)


def test_ops_build_affine_batchnorm_only_when_asked():
    for name in ("sep_conv_3x3", "dil_conv_5x5"):
        bns = [m for m in OPS[name](4, 1, False).modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert bns and all(bn.weight is None for bn in bns)
        assert all(bn.weight is not None for bn in OPS[name](4, 1, True).modules() if isinstance(bn, torch.nn.BatchNorm2d))


def test_factorized_reduce_on_even_sizes_is_the_unpadded_darts_op():
    torch.manual_seed(0)
    op = FactorizedReduce(3, 4).eval()
    x = torch.randn(2, 3, 8, 8)
    relu = F.relu(x)
    expected = op.bn(torch.cat([op.conv_1(relu), op.conv_2(relu[:, :, 1:, 1:])], dim=1))
    torch.testing.assert_close(op(x), expected)


def test_zero_op_outputs_zeros():
    x = torch.randn(2, 4, 6, 6)
    assert torch.count_nonzero(OPS["none"](4, 1, False)(x)) == 0
    assert OPS["none"](4, 2, False)(x).shape == (2, 4, 3, 3)


def test_channel_shuffle_interleaves_groups():
    x = torch.arange(8.0).view(1, 8, 1, 1)
    # groups of 2 channels: [0 1 | 2 3 | 4 5 | 6 7] -> the first of each group, then the second
    assert channel_shuffle(x, 4).flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_partial_channel_mixed_op_searches_a_quarter_and_passes_the_rest():
    torch.manual_seed(0)
    op = MixedOp(8, 1, PRIMITIVES, partial_channels=4).eval()
    x = torch.randn(2, 8, 6, 6)
    weights = torch.zeros(len(PRIMITIVES))
    weights[PRIMITIVES.index("skip_connect")] = 1.0  # the searched quarter passes unchanged, too
    out = op(x, weights)
    assert out.shape == x.shape
    torch.testing.assert_close(out, channel_shuffle(x, 4))
    assert op.ops["sep_conv_3x3"][0][1].in_channels == 2  # ops are built for C/k channels
    reduced = MixedOp(8, 2, PRIMITIVES, partial_channels=4)(x, torch.softmax(torch.zeros(8), 0))
    assert reduced.shape == (2, 8, 3, 3)


def _count(net, skip_auxiliary: bool = False) -> int:
    return sum(p.numel() for name, p in net.named_parameters() if not (skip_auxiliary and "auxiliary" in name))


def test_supernet_matches_the_darts_and_pcdarts_search_networks():
    # weights (alphas excluded) of quark0/darts model_search.Network(16, 10, 8) and of the PC-DARTS one
    darts = DartsSupernet(C=16, num_classes=10, layers=8)
    assert _count(darts) - sum(p.numel() for p in darts.arch_parameters()) == 1_930_618
    assert [tuple(p.shape) for p in darts.arch_parameters()] == [(14, 8), (14, 8)]
    pc = DartsSupernet(C=16, num_classes=10, layers=8, partial_channels=4)
    assert sum(p.numel() for p in pc.weight_parameters()) == 299_578
    assert [tuple(p.shape) for p in pc.arch_parameters()] == [(14, 8), (14, 8), (14,), (14,)]


def test_supernet_separates_architecture_from_weights():
    net = DartsSupernet(C=4, num_classes=3, layers=3, steps=2, multiplier=2, in_chans=1, partial_channels=2)
    arch = {id(p) for p in net.arch_parameters()}
    weights = {id(p) for p in net.weight_parameters()}
    assert not arch & weights and arch | weights == {id(p) for p in net.parameters()}
    assert {id(p) for p in net.weight_modules().parameters()} == weights
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    assert net.forward_features(torch.randn(2, 1, 8, 8)).shape[1] == net.num_features


def test_supernet_rejects_partial_channels_that_do_not_divide():
    with pytest.raises(AutoclsError, match="partial_channels"):
        DartsSupernet(C=6, partial_channels=4)


def _tiny_genotype() -> Genotype:
    return Genotype(
        normal=[("sep_conv_3x3", 0), ("max_pool_3x3", 1), ("dil_conv_3x3", 2), ("skip_connect", 0)],
        normal_concat=[2, 3],
        reduce=[("avg_pool_3x3", 1), ("sep_conv_5x5", 0), ("skip_connect", 2), ("dil_conv_5x5", 1)],
        reduce_concat=[2, 3],
    )


def test_single_path_runs_only_the_genotype_ops():
    torch.manual_seed(0)
    net = DartsSupernet(C=4, num_classes=3, layers=3, steps=2, multiplier=2, in_chans=1)
    genotype = _tiny_genotype()
    F.cross_entropy(net(torch.randn(4, 1, 8, 8), genotype), torch.tensor([0, 1, 2, 0])).backward()
    checked = 0
    for cell in net.cells:
        edges, _ = genotype.cell(cell.reduction)
        chosen = {(offset + j, op) for i, offset in enumerate(cell.offsets) for op, j in edges[2 * i : 2 * i + 2]}
        for index, mixed in enumerate(cell.edges):
            for name, op in mixed.ops.items():
                params = list(op.parameters())
                if not params:
                    continue
                touched = any(p.grad is not None for p in params)
                assert touched == ((index, name) in chosen), (cell.reduction, index, name)
                checked += 1
    assert checked > 0
    assert all(p.grad is None for p in net.arch_parameters())  # the genotype replaces the mixture
    assert net.classifier.weight.grad is not None


def test_single_path_equals_the_one_hot_mixture():
    """With alphas that put all weight on the genotype's op (and on 'none' elsewhere) the mixture is the
    single path: same modules, same output."""
    torch.manual_seed(0)
    net = DartsSupernet(C=4, num_classes=3, layers=3, steps=2, multiplier=2, in_chans=1).eval()
    genotype = _tiny_genotype()
    with torch.no_grad():
        for alphas, (edges, _) in ((net.alphas_normal, genotype.cell(False)), (net.alphas_reduce, genotype.cell(True))):
            alphas.fill_(-1e4)
            alphas[:, PRIMITIVES.index("none")] = 0.0
            offsets = net.cells[0].offsets
            for i, offset in enumerate(offsets):
                for op, j in edges[2 * i : 2 * i + 2]:
                    alphas[offset + j] = -1e4
                    alphas[offset + j, PRIMITIVES.index(op)] = 0.0
        x = torch.randn(3, 1, 8, 8)
        torch.testing.assert_close(net(x), net(x, genotype))
        assert net.genotype().canonical() == genotype.canonical()


def test_single_path_rejects_a_genotype_of_another_shape():
    net = DartsSupernet(C=4, num_classes=3, layers=3, steps=2, multiplier=2, in_chans=1)
    with pytest.raises(AutoclsError, match="steps=2"):
        net(torch.randn(1, 1, 8, 8), NAMED_GENOTYPES["DARTS_V2"])


# --- evaluation networks ---------------------------------------------------------------------------

def test_darts_v2_cifar_network_has_the_papers_parameter_count():
    """Table 1 of the DARTS paper: 3.3M parameters. The DARTS code (utils.count_parameters_in_MB) counts
    all but the auxiliary head: 3,349,342; with the head 3,825,768 (both verified against
    quark0/darts model.NetworkCIFAR(36, 10, 20, True, DARTS_V2))."""
    net = NetworkCIFAR(C=36, num_classes=10, layers=20, auxiliary=True, genotype="DARTS_V2")
    assert _count(net, skip_auxiliary=True) == 3_349_342
    assert _count(net) == 3_825_768
    assert round(_count(net, skip_auxiliary=True) / 1e6, 1) == 3.3
    v1 = NetworkCIFAR(C=36, num_classes=10, layers=20, auxiliary=True, genotype="DARTS_V1")
    assert _count(v1, skip_auxiliary=True) == 3_169_414


def test_darts_v2_imagenet_network_has_the_papers_parameter_count():
    """Table 3 of the DARTS paper: 4.7M (the DARTS code: 4,718,752 without the auxiliary head)."""
    net = NetworkImageNet(C=48, num_classes=1000, layers=14, auxiliary=True, genotype="DARTS_V2")
    assert _count(net, skip_auxiliary=True) == 4_718_752


def test_network_cifar_contract_auxiliary_head_and_drop_path():
    torch.manual_seed(0)
    net = NetworkCIFAR(C=8, num_classes=5, layers=5, auxiliary=True, genotype="PC_DARTS", drop_path_prob=0.3)
    x = torch.randn(2, 3, 32, 32)
    net.train()
    logits, aux = net.forward_with_aux(x)
    assert logits.shape == aux.shape == (2, 5)
    assert net(x).shape == (2, 5)  # forward: logits only, also in training
    net.eval()
    assert net.forward_with_aux(x)[1] is not None  # the head exists, even if unused in evaluation
    features = net.forward_features(x)
    assert features.shape == (2, net.num_features, 8, 8)
    assert net.forward_head(features, pre_logits=True).shape == (2, net.num_features)
    net.reset_classifier(7)
    assert net(x).shape == (2, 7) and net.num_classes == 7
    assert NetworkCIFAR(C=8, num_classes=5, layers=5, auxiliary=False).forward_with_aux(x)[1] is None


def test_drop_path_zeroes_whole_samples_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.ones(4000, 2, 3, 3)
    out = drop_path(x, 0.25)
    per_sample = out.flatten(1)
    assert per_sample.unique().tolist() == pytest.approx([0.0, 1 / 0.75])
    assert (per_sample == 0).all(dim=1).float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert out.mean().item() == pytest.approx(1.0, abs=0.04)


def test_network_rejects_a_bad_drop_path_rate():
    with pytest.raises(AutoclsError, match="drop_path_prob"):
        NetworkCIFAR(C=8, layers=5, drop_path_prob=1.0)
