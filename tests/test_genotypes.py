"""Genotypes: round trips (JSON, the DARTS string form, files), what `model.net.genotype` accepts, one
sentence for every malformed input, and derivation from architecture weights."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate

from src.nas.derive import derive_genotype, edge_softmax, num_edges
from src.nas.genotypes import (
    NAMED_GENOTYPES,
    PRIMITIVES,
    Genotype,
    GenotypeError,
    parse_genotype,
)
from src.utils.errors import AutoclsError, find_user_error

# tiny NAS nets: one intra-op thread (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


DARTS_V2_STRING = (  # as printed by the DARTS code (genotype() builds the concats with range)
    "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), "
    "('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], normal_concat=range(2, 6), "
    "reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0), "
    "('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], reduce_concat=range(2, 6))"
)


@pytest.mark.parametrize("name", sorted(NAMED_GENOTYPES))
def test_named_genotypes_round_trip_through_json_string_and_files(name, tmp_path):
    genotype = NAMED_GENOTYPES[name]
    assert Genotype.from_json(genotype.to_json()) == genotype
    assert Genotype.parse_string(genotype.to_string()) == genotype
    assert Genotype.parse_string(repr(genotype)) == genotype  # the dataclass repr (tuples) reads too
    assert parse_genotype(name) is genotype
    assert parse_genotype(genotype.to_string()) == genotype
    assert parse_genotype(genotype.to_json()) == genotype
    assert parse_genotype(genotype.to_dict()) == genotype
    json_file, string_file = tmp_path / "g.json", tmp_path / "g.txt"
    json_file.write_text(genotype.to_json(indent=1))
    string_file.write_text(genotype.to_string() + "\n")
    assert parse_genotype(str(json_file)) == genotype
    assert parse_genotype(str(string_file)) == genotype
    assert hash(genotype) == hash(Genotype.from_json(genotype.to_json()))


def test_darts_string_form_with_ranges():
    genotype = Genotype.parse_string(DARTS_V2_STRING)
    assert genotype == NAMED_GENOTYPES["DARTS_V2"]
    assert genotype.normal_concat == (2, 3, 4, 5) and genotype.steps == 4
    assert Genotype.parse_string("genotypes." + DARTS_V2_STRING) == genotype  # a module prefix is fine


def test_json_form_is_plain_data():
    data = json.loads(NAMED_GENOTYPES["DARTS_V1"].to_json())
    assert data["normal"][0] == ["sep_conv_3x3", 1]
    assert data["reduce_concat"] == [2, 3, 4, 5]


def test_canonical_ignores_the_order_of_a_nodes_edges():
    genotype = NAMED_GENOTYPES["DARTS_V1"]  # node 2 lists input 1 before input 0
    swapped = Genotype(
        [genotype.normal[1], genotype.normal[0], *genotype.normal[2:]], genotype.normal_concat, genotype.reduce, genotype.reduce_concat
    )
    assert swapped != genotype and swapped.canonical() == genotype.canonical()


BAD_INPUTS = {
    "unclosed string": ("Genotype(normal=[('sep_conv_3x3', 0)", "malformed string"),
    "code instead of literals": ("Genotype(normal=__import__('os').getcwd())", "not a literal"),
    "not a Genotype call": ("dict(normal=[])", "expected Genotype"),
    "unknown op": (DARTS_V2_STRING.replace("dil_conv_3x3", "conv_9x9"), "'conv_9x9', which is not in the DARTS search space"),
    "'none' chosen": (DARTS_V2_STRING.replace("('dil_conv_3x3', 2)", "('none', 2)"), "'none'"),
    "input from a later node": (DARTS_V2_STRING.replace("('dil_conv_3x3', 2)", "('dil_conv_3x3', 5)"), "can only read nodes 0 to 4"),
    "odd edge count": (
        (
            "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0)], normal_concat=[2], "
            "reduce=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], reduce_concat=[2])"
        ),
        "every node takes exactly two",
    ),
    "concat out of range": (DARTS_V2_STRING.replace("normal_concat=range(2, 6)", "normal_concat=[2, 9]"), "names node 9"),
    "malformed JSON": ('{"normal": [["sep_conv_3x3", 0]', "malformed JSON"),
    "missing key": (json.dumps({"normal": [["sep_conv_3x3", 0], ["sep_conv_3x3", 1]], "normal_concat": [2]}), "missing key(s) reduce"),
    "unknown name": ("DARTS_V9", "neither a named genotype"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_genotypes_give_one_sentence(case):
    text, expected = BAD_INPUTS[case]
    with pytest.raises(AutoclsError) as info:
        parse_genotype(text)
    _assert_one_sentence(str(info.value), expected)


def test_bad_genotype_file_names_the_file(tmp_path):
    path = tmp_path / "genotype.json"
    path.write_text('{"normal": [["sep_conv_3x3", 0], ["conv_9x9", 1]], "normal_concat": [2], "reduce": [], "reduce_concat": [2]}')
    with pytest.raises(GenotypeError) as info:
        parse_genotype(str(path))
    _assert_one_sentence(str(info.value), "conv_9x9")
    assert str(path) in str(info.value)
    garbage = tmp_path / "notes.txt"
    garbage.write_text("these are not the genotypes you are looking for")
    with pytest.raises(GenotypeError, match="malformed string"):
        parse_genotype(str(garbage))


def test_string_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(GenotypeError):
        parse_genotype(f"Genotype(normal=open({str(marker)!r}, 'w'))")
    assert not marker.exists()


def _assert_one_sentence(message: str, expected: str) -> None:
    assert expected in message
    assert "\n" not in message and message.endswith(".")
    assert message.startswith("Invalid genotype")


def test_darts_net_config_takes_a_genotype_file_and_reports_bad_ones(compose_train, tmp_path):
    genotype = NAMED_GENOTYPES["PC_DARTS"]
    path = tmp_path / "searched.json"
    path.write_text(genotype.to_json())
    cfg = compose_train(["model/net=darts_net", f"model.net.genotype={path}", "model.net.C=8", "model.net.layers=3", "data=cifar10"])
    net = instantiate(cfg.model.net)
    assert net.genotype == genotype and net.num_classes == 10
    cfg = compose_train(["model/net=darts_net", "model.net.genotype=DARTS_V9", "model.net.C=8", "model.net.layers=3"])
    with pytest.raises(Exception) as info:
        instantiate(cfg.model.net)
    error = find_user_error(info.value)
    assert error is not None and "model.net.genotype" in str(error)


# --- derivation --------------------------------------------------------------------------------

def _alphas(steps: int, strongest: dict[int, tuple[str, float]]) -> torch.Tensor:
    """Logits with every op at 0 except `strongest[edge] = (op, logit)`."""
    alphas = torch.zeros(num_edges(steps), len(PRIMITIVES))
    for edge, (op, logit) in strongest.items():
        alphas[edge, PRIMITIVES.index(op)] = logit
    return alphas


def test_derive_keeps_the_two_strongest_non_none_edges_per_node():
    # steps=2: node 2 has edges 0 (<-0), 1 (<-1); node 3 has edges 2 (<-0), 3 (<-1), 4 (<-2)
    normal = _alphas(2, {0: ("max_pool_3x3", 1.0), 1: ("sep_conv_3x3", 2.0), 2: ("none", 9.0), 3: ("dil_conv_5x5", 3.0), 4: ("skip_connect", 1.5)})
    # edge 2's 'none' dominates its softmax, so its best real op is weak: node 3 keeps edges 3 and 4
    reduce = _alphas(2, {0: ("avg_pool_3x3", 1.0), 1: ("sep_conv_5x5", 1.0), 2: ("dil_conv_3x3", 4.0), 3: ("max_pool_3x3", 0.5), 4: ("none", 5.0)})
    genotype = derive_genotype(normal, reduce, steps=2)
    assert genotype.normal == (("sep_conv_3x3", 1), ("max_pool_3x3", 0), ("dil_conv_5x5", 1), ("skip_connect", 2))
    # equal strengths on node 2: the earlier input comes first; on node 3 'none' on edge 4 is ignored
    # when choosing its op but weakens it, so edges 2 (dil_conv_3x3) and 3 win
    assert genotype.reduce == (("avg_pool_3x3", 0), ("sep_conv_5x5", 1), ("dil_conv_3x3", 0), ("max_pool_3x3", 1))
    assert genotype.normal_concat == genotype.reduce_concat == (2, 3)


def test_pcdarts_edge_weights_change_which_edges_are_kept():
    alphas = _alphas(2, {0: ("sep_conv_3x3", 2.0), 1: ("sep_conv_3x3", 1.0), 2: ("sep_conv_3x3", 1.0), 3: ("sep_conv_3x3", 1.0), 4: ("sep_conv_3x3", 1.0)})
    betas = torch.tensor([0.0, 3.0, 2.0, 0.0, 0.0])  # node 2 trusts edge 1 far more than edge 0
    weights = edge_softmax(betas, 2)
    torch.testing.assert_close(weights[:2].sum(), torch.tensor(1.0))
    torch.testing.assert_close(weights[2:].sum(), torch.tensor(1.0))
    plain = derive_genotype(alphas, alphas, steps=2)
    normalised = derive_genotype(alphas, alphas, steps=2, betas_normal=betas, betas_reduce=betas)
    assert plain.normal[:2] == (("sep_conv_3x3", 0), ("sep_conv_3x3", 1))
    assert normalised.normal[:2] == (("sep_conv_3x3", 1), ("sep_conv_3x3", 0))
    assert normalised.normal[2] == ("sep_conv_3x3", 0)  # node 3: edge <-0 has the largest beta


def test_derive_with_fewer_output_nodes():
    alphas = torch.zeros(num_edges(4), len(PRIMITIVES))
    assert derive_genotype(alphas, alphas, steps=4, multiplier=2).normal_concat == (4, 5)
