"""The server optimisers and robust rules: Flower 1.41's numbers, state round trips, option and round-size errors.

The reference numbers below were printed by ``flower_reference.py`` running Flower 1.41.0's own code on the
inputs of ``flower_cases.py``; Flower is never imported here (docs/algorithms.md says how they were made).
"""

from __future__ import annotations

import io
import random
import sys
from collections.abc import Callable
from typing import Any

import flower_cases as inputs
import pytest
import torch

from fedsup import ConfigError
from fedsup.federated.optimizers import FedAdagrad, FedAdam, FedAvgM, FedYogi
from fedsup.federated.registry import BUILTIN, make_strategy
from fedsup.federated.robust import Bulyan, Krum, MultiKrum, squared_distances
from fedsup.federated.strategies import ClientUpdate, FedAvg, FedMedian, State, Strategy, streaming_weighted_mean

TOLERANCE = 1e-9
NEW_RULES = {name: cls for name, cls in BUILTIN.items()
             if name not in ('fedavg', 'fedmedian', 'trimmed_mean', 'scaffold')}

# REFERENCE-BEGIN: pasted from flower_reference.py's output, flat row-major values per key.
# fmt: off
REFERENCE: dict[str, Any] = {'flwr_version': '1.41.0',
 'fedavg_round1': {'layer.weight': [-0.18658088235294118, -0.34191176470588236, -0.2113970588235294,
                                    -0.39889705882352944, 0.8887867647058824, 0.8235294117647058],
                   'layer.bias': [0.3125, -0.16819852941176472]},
 'fedavgm_default': {'options': {},
                     'rounds': [{'layer.weight': [-0.1865808823529412, -0.34191176470588236, -0.2113970588235294,
                                                  -0.39889705882352944, 0.8887867647058822, 0.8235294117647058],
                                 'layer.bias': [0.3125, -0.1681985294117647]},
                                {'layer.weight': [0.10661764705882354, 0.40349264705882354, -0.5919117647058822,
                                                  -0.4191176470588235, 0.11672794117647059, -0.40165441176470584],
                                 'layer.bias': [0.3584558823529412, 0.22794117647058823]},
                                {'layer.weight': [0.5101102941176471, -0.33731617647058826, 0.9329044117647058,
                                                  -0.5193014705882353, -0.6507352941176471, 0.028492647058823484],
                                 'layer.bias': [-0.22886029411764705, -0.11305147058823528]}]},
 'fedavgm_lr': {'options': {'server_learning_rate': 0.7},
                'rounds': [{'layer.weight': [-0.18216911764705884, -0.4455882352941177, -0.12454044117647059,
                                             -0.016727941176470584, 0.4580882352941176, 0.299908088235294],
                            'layer.bias': [0.01718749999999991, -0.2208639705882353]},
                           {'layer.weight': [0.019981617647058803, 0.14876838235294115, -0.4517003676470588,
                                             -0.2984007352941176, 0.2191360294117647, -0.19118566176470586],
                            'layer.bias': [0.2560753676470588, 0.09329963235294117]},
                           {'layer.weight': [0.3630716911764706, -0.19149080882352942, 0.5175229779411764,
                                             -0.45303125, -0.3897738970588235, -0.03741084558823532],
                            'layer.bias': [-0.08337959558823527, -0.05114613970588233]}]},
 'fedavgm_momentum': {'options': {'server_learning_rate': 0.5, 'server_momentum': 0.9},
                      'rounds': [{'layer.weight': [-0.17922794117647062, -0.5147058823529411, -0.06663602941176472,
                                                   0.23805147058823528, 0.17095588235294112, -0.04917279411764708],
                                  'layer.bias': [-0.1796875, -0.25597426470588236]},
                                 {'layer.weight': [-0.04292279411764707, 0.09990808823529418, -0.45955882352941174,
                                                   -0.6637867647058824, 0.7898897058823529, 0.5600183823529411],
                                  'layer.bias': [0.5323529411764706, 0.06498161764705879]},
                                 {'layer.weight': [0.3562683823529412, 0.4344485294117648, -0.11695772058823528,
                                                   -1.4031985294117648, 0.6266176470588235, 0.8425275735294117],
                                  'layer.bias': [0.7925827205882353, 0.2648253676470588]}]},
 'fedadam_default': {'options': {},
                     'rounds': [{'layer.weight': [-0.216069035024016, -0.6153419974049565, 0.006357836213608567,
                                                  0.8013323072327468, -0.4731425989594745, -0.8480519777065477],
                                 'layer.bias': [-0.5983756809091476, -0.2735053895457389]},
                                {'layer.weight': [-0.15697540960121886, -0.5374172522024381, -0.07467497546089473,
                                                  0.7162696146204616, -0.39619980951996314, -0.7769050315133743],
                                 'layer.bias': [-0.5134095469519124, -0.19598823239575372]},
                                {'layer.weight': [-0.08424660653598855, -0.4640090427861581, -0.0635274279269478,
                                                  0.626025496836965, -0.3432401058541832, -0.7000128916571752],
                                 'layer.bias': [-0.43340029577326034, -0.12432074880220809]}]},
 'fedadam_custom': {'options': {'eta': 0.3, 'beta_1': 0.5, 'beta_2': 0.75, 'tau': 0.01},
                    'rounds': [{'layer.weight': [-0.2839831064010421, -0.4373988100964687, -0.16935441055509742,
                                                 0.6145144543718017, -0.2859349871266549, -0.6602972006022794],
                                'layer.bias': [-0.41256832203318416, -0.1062342543648539]},
                               {'layer.weight': [-0.04078257103539479, -0.14782208936659647, -0.4585789419436178,
                                                 0.3302041456476988, -0.06579639878297103, -0.4704524255085909],
                                'layer.bias': [-0.13097626730791723, 0.17790130535541432]},
                               {'layer.weight': [0.2539447081546137, -0.04491060871883924, -0.25987761043820223,
                                                 0.04820585552039458, -0.07084490049044756, -0.27467198261952563],
                                'layer.bias': [0.007430573710523025, 0.1309813141934134]}]},
 'fedyogi_default': {'options': {},
                     'rounds': [{'layer.weight': [-0.17782738095238096, -0.6777812241521919, 0.06845886522646373,
                                                  0.8650778878643834, -0.5369441724734245, -0.9119319669298594],
                                 'layer.bias': [-0.661975565681961, -0.33428893402021004]},
                                {'layer.weight': [-0.16862837121966637, -0.6656230512788782, 0.05586135337313389,
                                                  0.8517140014055827, -0.524687137240234, -0.9005500699428755],
                                 'layer.bias': [-0.6486241610190799, -0.32226512070265534]},
                                {'layer.weight': [-0.15625933032104358, -0.6523528898493175, 0.05628214021425217,
                                                  0.8361040186842432, -0.5144171929511121, -0.886895044570697],
                                 'layer.bias': [-0.6342792055906556, -0.3087636126866058]}]},
 'fedyogi_custom': {'options': {'eta': 0.2, 'beta_1': 0.6, 'beta_2': 0.9, 'tau': 0.05},
                    'rounds': [{'layer.weight': [-0.19340220582187204, -0.5139298018407443, -0.08549888328278044,
                                                 0.6499505346478225, -0.3189904225139144, -0.6899065069442205],
                                'layer.bias': [-0.4539040687796348, -0.2106483788297163]},
                               {'layer.weight': [-0.03272943614236626, -0.26399037294195493, -0.3175585028240442,
                                                 0.3952670596337121, -0.10396131747201631, -0.5101527601403444],
                                'layer.bias': [-0.20646358466553302, 0.007583432680110164]},
                               {'layer.weight': [0.20044299807265117, -0.12999744481897257, -0.17899115605591395,
                                                 0.1473832768852296, -0.06806069149421026, -0.32110591928251975],
                                'layer.bias': [-0.06192953596194398, 0.09222378835109321]}]},
 'fedadagrad_default': {'options': {},
                        'rounds': [{'layer.weight': [-0.26550795880149813, -0.5877885268160217,
                                                     -0.021530792057907935, 0.7750784377054664, -0.4469446058059431,
                                                     -0.8219322605058292],
                                    'layer.bias': [-0.5719764842065204, -0.24431640706342925]},
                                   {'layer.weight': [-0.16585354236616376, -0.4934522242547694,
                                                     -0.11056181470971067, 0.7067259821372259, -0.41042200178100846,
                                                     -0.7985352812828012],
                                    'layer.bias': [-0.5033357463864391, -0.15076872346832498]},
                                   {'layer.weight': [-0.07838011248712828, -0.478754889176651, -0.02537530880984605,
                                                     0.6492888646645629, -0.4258073513748601, -0.7567160257795624],
                                    'layer.bias': [-0.48348994300995973, -0.1433182646109245]}]},
 'fedadagrad_custom': {'options': {'eta': 0.05, 'tau': 0.02},
                       'rounds': [{'layer.weight': [-0.19306144067796613, -0.6402353177795655, 0.03135578750445421,
                                                    0.8257728590100585, -0.49756197277365255, -0.8724414424498635],
                                   'layer.bias': [-0.6228706440572496, -0.2988637431848092]},
                                  {'layer.weight': [-0.146242390982442, -0.5936175968985266, -0.012708187533807522,
                                                    0.7912150271768756, -0.4781416212670958, -0.8595628020237456],
                                   'layer.bias': [-0.5880709067878133, -0.25307733616569206]},
                                  {'layer.weight': [-0.10199471741745238, -0.5824637079789523, 0.027058171347019218,
                                                    0.7618488802899386, -0.4835654404530317, -0.8377339250741114],
                                   'layer.bias': [-0.575732226227752, -0.24126416302355372]}]},
 'krum_f0': {'layer.weight': [0.5625, 0.59375, 0.78125, 0.78125, -0.078125, -0.546875],
             'layer.bias': [0.078125, 0.9375]},
 'krum_f1': {'layer.weight': [0.453125, 0.578125, 0.078125, -0.734375, -0.3125, -0.953125],
             'layer.bias': [-0.09375, 0.921875]},
 'krum_f2': {'layer.weight': [-0.296875, 0.484375, 0.4375, -0.28125, 0.390625, -0.96875],
             'layer.bias': [-0.796875, 0.8125]},
 'multikrum_f0_m3': {'layer.weight': [0.2378472222222222, 0.5625, 0.5694444444444444, 0.42361111111111105,
                                      -0.5104166666666667, 0.027777777777777762],
                     'layer.bias': [-0.29861111111111105, 0.8628472222222222]},
 'multikrum_f1_m1': {'layer.weight': [0.453125, 0.578125, 0.078125, -0.734375, -0.3125, -0.953125],
                     'layer.bias': [-0.09375, 0.921875]},
 'multikrum_f1_m4': {'layer.weight': [0.18174342105263155, 0.549342105263158, 0.3125, -0.24999999999999997,
                                      -0.28289473684210525, -0.5345394736842105],
                     'layer.bias': [-0.3569078947368421, 0.8692434210526314]},
 'multikrum_f2_m5': {'layer.weight': [0.21800595238095238, 0.5535714285714286, 0.35714285714285715,
                                      -0.15178571428571425, -0.2633928571428571, -0.5357142857142857],
                     'layer.bias': [-0.31547619047619047, 0.8757440476190477]},
 'bulyan_f0': {'layer.weight': [1.6267361111111112, 1.8871527777777777, 1.34375, 1.2986111111111112,
                                1.4079861111111112, 1.09375],
               'layer.bias': [1.1041666666666667, 2.21875]},
 'bulyan_f1': {'layer.weight': [0.153125, 0.540625, 0.078125, -0.359375, 0.2, -0.478125],
               'layer.bias': [-0.378125, 0.84375]},
 'bulyan_f1_n7': {'layer.weight': [0.109375, 0.578125, 0.609375, -0.09375, -0.09375, -0.6927083333333334],
                  'layer.bias': [-0.4322916666666667, 0.828125]},
 'bulyan_differs_iterative': {'layer.weight': [-0.009375, -0.88125, -0.225, 0.1375, 0.096875, 0.6125],
                              'layer.bias': [-0.53125, -0.553125]},
 'bulyan_differs_one_shot': {'layer.weight': [-0.125, -0.9, -0.225, -0.059375, -0.00625, 0.6125],
                             'layer.bias': [-0.509375, -0.55]}}
# fmt: on
# REFERENCE-END

STATEFUL_CASES = [name for name, case in REFERENCE.items() if isinstance(case, dict) and "rounds" in case]


# --- helpers ------------------------------------------------------------------------------------------


def to_state(model: inputs.Model, dtype: torch.dtype = torch.float64) -> State:
    return {key: torch.tensor(model[key], dtype=dtype).reshape(shape) for key, shape in inputs.SHAPES.items()}


def opt_updates(round_number: int) -> list[ClientUpdate]:
    return [ClientUpdate(cid, to_state(inputs.opt_client_state(round_number, cid)), n) for cid, n in inputs.OPT_CLIENTS]


def robust_updates(seed: int = inputs.ROBUST_SEED, ids: list[int] | None = None) -> list[ClientUpdate]:
    return [
        ClientUpdate(cid, to_state(inputs.robust_state(seed, cid)), n)
        for cid, n in inputs.ROBUST_CLIENTS
        if ids is None or cid in ids
    ]


def assert_matches(result: State, expected: dict[str, list[float]]) -> None:
    assert list(result) == list(expected)
    for key, values in expected.items():
        assert result[key].dtype == torch.float64
        flat = result[key].reshape(-1)
        torch.testing.assert_close(flat, torch.tensor(values, dtype=torch.float64), rtol=0, atol=TOLERANCE)


def max_gap(result: State, expected: dict[str, list[float]]) -> float:
    return max(
        float((result[k].reshape(-1) - torch.tensor(v, dtype=torch.float64)).abs().max()) for k, v in expected.items()
    )


def assert_identical(left: State, right: State) -> None:
    assert list(left) == list(right)
    for key in left:
        assert left[key].dtype == right[key].dtype, key
        assert torch.equal(left[key], right[key]), key


def make_case(name: str) -> Strategy:
    case = REFERENCE[name]
    return NEW_RULES[name.split("_")[0]](**case["options"])  # type: ignore[return-value]


def run_rounds(strategy: Strategy, first: int, last: int, state: State) -> list[State]:
    results = []
    for round_number in range(first, last + 1):
        state = strategy.aggregate(state, opt_updates(round_number))
        results.append(state)
    return results


def save_and_load(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded: dict[str, Any] = torch.load(buffer, weights_only=True)
    return loaded


def mixed_state(seed: int) -> State:
    """A state with every kind of key fedsup meets: float64, float32, float16, int64 and bool."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(3, 2, 2, generator=generator, dtype=torch.float64),
        "fc.weight": torch.randn(4, 3, generator=generator),
        "fc.bias": torch.randn(4, generator=generator).half(),
        "bn.num_batches_tracked": torch.randint(0, 100, (), generator=generator),
        "mask": torch.rand(5, generator=generator) > 0.5,
    }


def mixed_updates(count: int) -> list[ClientUpdate]:
    updates = [ClientUpdate(cid, mixed_state(cid + 1), 3 + (7 * cid) % 11) for cid in range(count)]
    random.Random(0).shuffle(updates)
    return updates


def every_strategy() -> list[Strategy]:
    return [
        FedAvgM(),
        FedAvgM(server_learning_rate=0.5, server_momentum=0.9),
        FedAdam(),
        FedYogi(),
        FedAdagrad(),
        Krum(num_malicious_nodes=1),
        MultiKrum(num_malicious_nodes=1, num_nodes_to_select=3),
        Bulyan(num_malicious_nodes=1),
    ]


# --- Flower's numbers ---------------------------------------------------------------------------------


def test_reference_numbers_came_from_flower_1_41() -> None:
    assert REFERENCE["flwr_version"] == "1.41.0"


def test_flower_is_never_imported() -> None:
    assert not any(name == "flwr" or name.startswith("flwr.") for name in sys.modules)


def test_streaming_mean_matches_flower_fedavg() -> None:
    assert_matches(streaming_weighted_mean(to_state(inputs.opt_initial()), opt_updates(1)), REFERENCE["fedavg_round1"])


@pytest.mark.parametrize("name", STATEFUL_CASES)
def test_server_optimizer_matches_flower_over_rounds(name: str) -> None:
    results = run_rounds(make_case(name), 1, inputs.OPT_ROUNDS, to_state(inputs.opt_initial()))
    assert len(results) == len(REFERENCE[name]["rounds"]) == inputs.OPT_ROUNDS
    for result, expected in zip(results, REFERENCE[name]["rounds"], strict=True):
        assert_matches(result, expected)


@pytest.mark.parametrize("f", [0, 1, 2])
def test_krum_matches_flower(f: int) -> None:
    assert_matches(
        Krum(num_malicious_nodes=f).aggregate(to_state(inputs.opt_initial()), robust_updates()), REFERENCE[f"krum_f{f}"]
    )


@pytest.mark.parametrize(("f", "select"), [(0, 3), (1, 1), (1, 4), (2, 5)])
def test_multikrum_matches_flower(f: int, select: int) -> None:
    strategy = MultiKrum(num_malicious_nodes=f, num_nodes_to_select=select)
    assert_matches(
        strategy.aggregate(to_state(inputs.opt_initial()), robust_updates()), REFERENCE[f"multikrum_f{f}_m{select}"]
    )


@pytest.mark.parametrize("f", [0, 1])
def test_bulyan_matches_flower_aggregate_bulyan(f: int) -> None:
    assert_matches(
        Bulyan(num_malicious_nodes=f).aggregate(to_state(inputs.opt_initial()), robust_updates()),
        REFERENCE[f"bulyan_f{f}"],
    )


def test_bulyan_matches_flower_on_the_smallest_round() -> None:
    updates = robust_updates(ids=list(range(7)))
    assert len(updates) == Bulyan.min_clients({"num_malicious_nodes": 1})
    assert_matches(
        Bulyan(num_malicious_nodes=1).aggregate(to_state(inputs.opt_initial()), updates), REFERENCE["bulyan_f1_n7"]
    )


def test_bulyan_is_the_iterative_rule_not_flowers_one_shot() -> None:
    # The two Flower Bulyans really do disagree on this input ...
    assert max_gap(to_state(REFERENCE["bulyan_differs_iterative"]), REFERENCE["bulyan_differs_one_shot"]) > 0.1
    # ... and ours is the paper's iterative one (Flower's aggregate_bulyan).
    result = Bulyan(num_malicious_nodes=1).aggregate(
        to_state(inputs.opt_initial()), robust_updates(inputs.BULYAN_DIFFERS_SEED)
    )
    assert_matches(result, REFERENCE["bulyan_differs_iterative"])
    assert max_gap(result, REFERENCE["bulyan_differs_one_shot"]) > 0.1


def test_bulyan_iterative_selection_keeps_an_outlier_the_one_shot_drops() -> None:
    # Why they differ: near the end only 3 updates remain, Krum scores each by its single nearest other,
    # and the two colluding outliers are each other's nearest; the trimmed mean then removes it per coordinate.
    updates = robust_updates(inputs.BULYAN_DIFFERS_SEED)
    ordered = sorted(updates, key=lambda u: u.client_id)
    distances = squared_distances(to_state(inputs.opt_initial()), ordered)
    picked = {ordered[i].client_id for i in Bulyan(num_malicious_nodes=1).select(distances)}
    assert len(picked) == len(updates) - 2
    assert picked & set(inputs.ROBUST_OUTLIERS)


# --- FedAvg, bit for bit ------------------------------------------------------------------------------


def test_streaming_weighted_mean_is_fedavg_bit_for_bit() -> None:
    global_state = mixed_state(0)
    updates = mixed_updates(6)
    assert_identical(streaming_weighted_mean(global_state, updates), FedAvg().aggregate(global_state, updates))


def test_streaming_weighted_mean_is_fedavg_bit_for_bit_on_the_reference_inputs() -> None:
    global_state = to_state(inputs.opt_initial())
    for round_number in range(1, inputs.OPT_ROUNDS + 1):
        updates = opt_updates(round_number)
        assert_identical(streaming_weighted_mean(global_state, updates), FedAvg().aggregate(global_state, updates))


@pytest.mark.parametrize(
    "aggregate",
    [
        streaming_weighted_mean,
        FedAvgM(server_learning_rate=0.5, server_momentum=0.9).aggregate,
        FedAdam().aggregate,
        FedYogi().aggregate,
        FedAdagrad().aggregate,
    ],
)
def test_fedavg_based_rules_never_stack_the_updates(
    aggregate: Callable[..., State], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("stacked every update")

    monkeypatch.setattr(torch, "stack", refuse)
    with pytest.raises(AssertionError, match="stacked"):
        FedMedian().aggregate(mixed_state(0), mixed_updates(5))  # the patch does bite a rule that stacks
    aggregate(mixed_state(0), mixed_updates(5))


def test_fedavgm_defaults_are_fedavg_bit_for_bit() -> None:
    strategy, state = FedAvgM(), to_state(inputs.opt_initial())
    for round_number in range(1, inputs.OPT_ROUNDS + 1):
        updates = opt_updates(round_number)
        expected = FedAvg().aggregate(state, updates)
        state = strategy.aggregate(state, updates)
        assert_identical(state, expected)


# --- state_dict / load_state_dict ---------------------------------------------------------------------


@pytest.mark.parametrize("stop_after", [0, 1, 2])
@pytest.mark.parametrize("name", STATEFUL_CASES)
def test_save_load_continue_is_bit_identical(name: str, stop_after: int) -> None:
    initial = to_state(inputs.opt_initial())
    steady = make_case(name)
    unbroken = run_rounds(steady, 1, inputs.OPT_ROUNDS, initial)

    first = make_case(name)
    before = run_rounds(first, 1, stop_after, initial)
    resumed = make_case(name)
    resumed.load_state_dict(save_and_load(first.state_dict()))
    after = run_rounds(resumed, stop_after + 1, inputs.OPT_ROUNDS, before[-1] if before else initial)

    for left, right in zip(unbroken, before + after, strict=True):
        assert_identical(left, right)
    assert_identical(_flat(steady.state_dict()), _flat(resumed.state_dict()))


def _flat(state: dict[str, Any]) -> State:
    flat: State = {"step": torch.tensor(state["step"])}
    for name, buffers in state.items():
        if isinstance(buffers, dict):
            flat.update({f"{name}/{key}": tensor for key, tensor in buffers.items()})
    return flat


def test_state_dict_holds_the_buffers_and_the_step() -> None:
    strategy = FedAdam()
    run_rounds(strategy, 1, 2, to_state(inputs.opt_initial()))
    state = strategy.state_dict()
    assert state["strategy"] == "fedadam" and state["step"] == 2
    assert set(state["m_t"]) == set(state["v_t"]) == set(inputs.SHAPES)
    assert all(t.dtype == torch.float64 for t in [*state["m_t"].values(), *state["v_t"].values()])


def test_loaded_state_is_a_copy() -> None:
    source = FedYogi()
    run_rounds(source, 1, 1, to_state(inputs.opt_initial()))
    saved = source.state_dict()
    target = FedYogi()
    target.load_state_dict(saved)
    for tensor in saved["v_t"].values():
        tensor.fill_(123.0)  # the caller scribbles on its checkpoint dict
    assert all(not torch.equal(t, torch.full_like(t, 123.0)) for t in target.state_dict()["v_t"].values())


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({}, "must have keys"),
        ({"strategy": "fedyogi", "step": 1, "m_t": {}, "v_t": {}}, "saved by strategy 'fedyogi'"),
        ({"strategy": "fedadam", "step": -1, "m_t": {}, "v_t": {}}, "step must be a non-negative integer"),
        ({"strategy": "fedadam", "step": 1, "m_t": {"w": torch.zeros(2)}, "v_t": {}}, "must be a float64 tensor"),
        ({"strategy": "fedadam", "step": 1, "m_t": [], "v_t": {}}, "must be a dict of tensors"),
    ],
)
def test_load_state_dict_rejects_a_bad_state(state: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FedAdam().load_state_dict(state)


def test_a_state_for_another_model_is_rejected_at_aggregate() -> None:
    strategy = FedAvgM(server_momentum=0.5)
    strategy.load_state_dict(
        {"strategy": "fedavgm", "step": 1, "momentum": {"other": torch.zeros(3, dtype=torch.float64)}}
    )
    with pytest.raises(ValueError, match="state buffer 'momentum' has keys"):
        strategy.aggregate(to_state(inputs.opt_initial()), opt_updates(1))
    shaped = {key: torch.zeros(1, dtype=torch.float64) for key in inputs.SHAPES}
    strategy.load_state_dict({"strategy": "fedavgm", "step": 1, "momentum": shaped})
    with pytest.raises(ValueError, match="has shape"):
        strategy.aggregate(to_state(inputs.opt_initial()), opt_updates(1))


def test_a_failed_round_leaves_the_state_unchanged() -> None:
    strategy = FedAdam()
    state = run_rounds(strategy, 1, 1, to_state(inputs.opt_initial()))[-1]
    before = _flat(strategy.state_dict())
    bad = [*opt_updates(2), ClientUpdate(9, {key: torch.zeros(1) for key in inputs.SHAPES}, 1)]
    with pytest.raises(ValueError, match="has shape"):
        strategy.aggregate(state, bad)
    assert_identical(_flat(strategy.state_dict()), before)


@pytest.mark.parametrize("strategy", [Krum(), MultiKrum(), Bulyan()], ids=repr)
def test_stateless_rules_save_nothing(strategy: Strategy) -> None:
    assert strategy.state_dict() == {}
    strategy.load_state_dict({})
    with pytest.raises(ValueError, match="keeps no state"):
        strategy.load_state_dict({"step": 1})


# --- options ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "options", "option", "value"),
    [
        (FedAvgM, {"server_learning_rate": 0.0}, "server_learning_rate", "0.0"),
        (FedAvgM, {"server_learning_rate": "1"}, "server_learning_rate", "'1'"),
        (FedAvgM, {"server_momentum": 1.0}, "server_momentum", "1.0"),
        (FedAvgM, {"server_momentum": -0.1}, "server_momentum", "-0.1"),
        (FedAdam, {"eta": -1}, "eta", "-1"),
        (FedAdam, {"eta_l": float("nan")}, "eta_l", "nan"),
        (FedAdam, {"beta_1": 1.0}, "beta_1", "1.0"),
        (FedAdam, {"beta_2": True}, "beta_2", "True"),
        (FedAdam, {"tau": 0}, "tau", "0"),
        (FedYogi, {"beta_2": 1.5}, "beta_2", "1.5"),
        (FedYogi, {"tau": float("inf")}, "tau", "inf"),
        (FedAdagrad, {"eta": 0}, "eta", "0"),
        (Krum, {"num_malicious_nodes": -1}, "num_malicious_nodes", "-1"),
        (Krum, {"num_malicious_nodes": 1.0}, "num_malicious_nodes", "1.0"),
        (MultiKrum, {"num_nodes_to_select": 0}, "num_nodes_to_select", "0"),
        (MultiKrum, {"num_malicious_nodes": True}, "num_malicious_nodes", "True"),
        (Bulyan, {"num_malicious_nodes": "2"}, "num_malicious_nodes", "'2'"),
    ],
)
def test_bad_options_name_the_option_and_value(
    cls: type[Strategy], options: dict[str, Any], option: str, value: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        cls(**options)
    assert str(caught.value).startswith(f"{option}:")
    assert str(caught.value).endswith(f"got {value}")


def test_flowers_defaults() -> None:
    assert (FedAvgM().server_learning_rate, FedAvgM().server_momentum) == (1.0, 0.0)
    adam, yogi, adagrad = FedAdam(), FedYogi(), FedAdagrad()
    assert (adam.eta, adam.eta_l, adam.beta_1, adam.beta_2, adam.tau) == (0.1, 0.1, 0.9, 0.99, 1e-3)
    assert (yogi.eta, yogi.eta_l, yogi.beta_1, yogi.beta_2, yogi.tau) == (1e-2, 0.0316, 0.9, 0.99, 1e-3)
    assert (adagrad.eta, adagrad.eta_l, adagrad.beta_1, adagrad.beta_2, adagrad.tau) == (0.1, 0.1, 0.0, 0.0, 1e-3)
    assert Krum().num_malicious_nodes == MultiKrum().num_malicious_nodes == Bulyan().num_malicious_nodes == 0
    assert MultiKrum().num_nodes_to_select == 1


def test_make_strategy_builds_and_rejects() -> None:
    built = make_strategy("fedadam", {"eta": 0.5})
    assert isinstance(built, FedAdam) and built.eta == 0.5
    assert repr(make_strategy("krum", {"num_malicious_nodes": 2})) == "Krum(num_malicious_nodes=2)"
    with pytest.raises(ConfigError, match="tau: must be a number > 0"):
        make_strategy("fedyogi", {"tau": -1.0})
    with pytest.raises(ConfigError, match="do not fit FedAdagrad"):
        make_strategy("fedadagrad", {"beta_1": 0.9})  # Flower's FedAdagrad has no betas either


def test_every_name_is_registered() -> None:
    assert sorted(NEW_RULES) == [
        "bulyan",
        "fedadagrad",
        "fedadam",
        "fedavgm",
        "fedyogi",
        "krum",
        "multikrum",
    ]
    assert all(cls.name == name for name, cls in NEW_RULES.items())


# --- how many clients ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "options", "expected"),
    [
        (Krum, {}, 3),
        (Krum, {"num_malicious_nodes": 2}, 7),
        (MultiKrum, {"num_malicious_nodes": 1}, 5),
        (MultiKrum, {"num_malicious_nodes": 1, "num_nodes_to_select": 8}, 8),
        (Bulyan, None, 3),
        (Bulyan, {"num_malicious_nodes": 1}, 7),
        (Bulyan, {"num_malicious_nodes": 3}, 15),
    ],
)
def test_min_clients(cls: Any, options: dict[str, Any] | None, expected: int) -> None:
    assert cls.min_clients(options) == expected
    assert cls(**(options or {})).required_clients() == expected


def test_min_clients_checks_the_options() -> None:
    with pytest.raises(ConfigError, match="num_malicious_nodes: must be an integer >= 0, got -2"):
        Bulyan.min_clients({"num_malicious_nodes": -2})
    with pytest.raises(ConfigError, match="do not fit Krum"):
        Krum.min_clients({"num_nodes_to_select": 2})


@pytest.mark.parametrize(
    ("strategy", "count", "message"),
    [
        (
            Krum(num_malicious_nodes=1),
            4,
            r"krum: needs at least 5 client updates \(2 \* num_malicious_nodes \+ 3.*num_malicious_nodes=1, got 4",
        ),
        (
            MultiKrum(num_nodes_to_select=4),
            3,
            r"multikrum: needs at least 4 client updates .*num_malicious_nodes=0, got 3",
        ),
        (
            Bulyan(num_malicious_nodes=1),
            6,
            r"bulyan: needs at least 7 client updates \(4 \* num_malicious_nodes \+ 3\) .*=1, got 6",
        ),
        (Bulyan(), 2, r"bulyan: needs at least 3 client updates .*=0, got 2"),
    ],
    ids=repr,
)
def test_too_few_clients(strategy: Strategy, count: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        strategy.aggregate(to_state(inputs.opt_initial()), robust_updates(ids=list(range(count))))


# --- fedsup's aggregation contract --------------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(every_strategy())), ids=[repr(s) for s in every_strategy()])
def test_arrival_order_does_not_matter(index: int) -> None:
    global_state = mixed_state(0)
    updates = mixed_updates(7)
    # A fresh strategy for every call, so the stateful ones start from the same state each time.
    reference = every_strategy()[index].aggregate(global_state, updates)
    for seed in range(3):
        shuffled = list(updates)
        random.Random(seed).shuffle(shuffled)
        assert_identical(every_strategy()[index].aggregate(global_state, shuffled), reference)


@pytest.mark.parametrize("strategy", every_strategy(), ids=repr)
def test_keys_dtypes_and_inputs_kept(strategy: Strategy) -> None:
    global_state = mixed_state(0)
    updates = mixed_updates(7)
    copies = [{key: tensor.clone() for key, tensor in u.state.items()} for u in updates]
    global_copy = {key: tensor.clone() for key, tensor in global_state.items()}
    result = strategy.aggregate(global_state, updates)
    assert list(result) == list(global_state)
    for key, tensor in result.items():
        assert tensor.dtype == global_state[key].dtype and tensor.shape == global_state[key].shape
        assert tensor.is_contiguous()
    assert_identical(global_state, global_copy)
    for update, copy in zip(updates, copies, strict=True):
        assert_identical(update.state, copy)


def test_server_optimizers_take_the_max_of_integer_and_bool_keys() -> None:
    updates = mixed_updates(5)
    result = FedAdam().aggregate(mixed_state(0), updates)
    counts = torch.stack([u.state["bn.num_batches_tracked"] for u in updates])
    masks = torch.stack([u.state["mask"] for u in updates])
    assert torch.equal(result["bn.num_batches_tracked"], counts.amax(dim=0))
    assert torch.equal(result["mask"], masks.any(dim=0))


def test_krum_returns_the_chosen_update_with_its_integer_keys() -> None:
    honest = [ClientUpdate(cid, {"w": torch.tensor([0.1 * cid, 0.0]), "n": torch.tensor(cid)}, 1) for cid in range(5)]
    liar = ClientUpdate(9, {"w": torch.tensor([50.0, 50.0]), "n": torch.tensor(10_000)}, 1_000)
    result = Krum(num_malicious_nodes=1).aggregate({"w": torch.zeros(2), "n": torch.tensor(0)}, [*honest, liar])
    # The middle honest update is nearest the others; the liar's huge count is not taken.
    assert torch.equal(result["w"], torch.tensor([0.2, 0.0])) and int(result["n"]) == 2


def test_krum_breaks_ties_by_client_id() -> None:
    same = {"w": torch.ones(3, dtype=torch.float64), "n": torch.tensor(0)}
    updates = [ClientUpdate(cid, {"w": same["w"].clone(), "n": torch.tensor(cid)}, 1) for cid in (4, 2, 7)]
    assert int(Krum().aggregate(same, updates)["n"]) == 2


def test_multikrum_weights_the_selected_by_num_examples() -> None:
    weights = [(0, 1), (1, 3), (2, 1)]
    updates = [ClientUpdate(cid, {"w": torch.tensor([float(cid)], dtype=torch.float64)}, n) for cid, n in weights]
    result = MultiKrum(num_nodes_to_select=3).aggregate({"w": torch.zeros(1, dtype=torch.float64)}, updates)
    assert float(result["w"]) == pytest.approx((0 * 1 + 1 * 3 + 2 * 1) / 5, abs=1e-15)
