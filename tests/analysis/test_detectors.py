"""Each detector finds exactly what was planted, and nothing else, at default thresholds; pure-function checks."""
from __future__ import annotations

import math

import torch

from lowbit.analysis.activations import effective_levels
from lowbit.analysis.collect import DownStats
from lowbit.analysis.config import FeatureConfig, MassiveConfig, SuperWeightConfig
from lowbit.analysis.outliers import massive_activations, outlier_features
from lowbit.analysis.superweights import find_super_weights
from lowbit.analysis.weights import linear_stats
from lowbit.analysis.config import WeightConfig
from planted import FEATURE, N_LAYERS, SW_COL, SW_ROW, planted_dir, planted_report  # noqa: F401


def test_planted_outlier_feature_only(planted_report):
    report, _ = planted_report
    features = report["outlier_features"]["features"]
    assert [f["dim"] for f in features] == [FEATURE]
    assert features[0]["layers"] == list(range(N_LAYERS))


def test_planted_massive_activation_only(planted_report):
    report, _ = planted_report
    dims = report["massive_activations"]["dims"]
    assert [d["dim"] for d in dims] == [SW_ROW]
    assert dims[0]["layers"] == list(range(N_LAYERS)) and dims[0]["positions"] == [0]
    assert dims[0]["tokens"] == [{"position": 0, "text": "<s>"}]
    assert dims[0]["max_value"] > 100 and dims[0]["max_at"]["ratio_to_median"] >= 1000


def test_planted_super_weight_only(planted_report):
    report, _ = planted_report
    sw = report["super_weights"]
    assert [(c["layer"], c["row"], c["col"]) for c in sw["found"]] == [(0, SW_ROW, SW_COL)]
    assert sw["found"][0]["weight"] == 4.0 and sw["found"][0]["share"] > 0.9
    assert all(r["found"] == [] for r in sw["rounds"][1:])         # removed: nothing creates it any more
    (check,) = sw["verification"]["checks"]
    assert check["confirmed"] and check["zeroed"]["kld"] > 100 * max(check["control"]["kld"], 1e-9)
    assert check["control"]["coords"][0][0] == 0                    # the control is in the same layer


def _walk(value, key=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v, key)
    else:
        yield key, value


def test_report_json_plain_types(planted_report):
    report, out = planted_report
    coordinate_keys = {"layer", "row", "col", "dim", "position", "sample", "channel", "absmax_channel",
                       "max_abs_layer", "first_layer", "last_layer", "max_abs_dim", "kurtosis_max_channel"}
    for key, value in _walk(report):
        assert value is None or isinstance(value, (str, int, float, bool)), (key, value)
        if isinstance(value, float):
            assert math.isfinite(value), key
        if key in coordinate_keys:
            assert isinstance(value, int) and not isinstance(value, bool), (key, value)
    for key in ("model", "text", "config", "summary", "activations", "outlier_features", "massive_activations",
                "super_weights", "weights", "sensitivity"):
        assert key in report
    assert report["text"]["tokens"] == 3 * 64 and report["config"]["features"]["magnitude"] == 6.0
    assert "definition" in report["config"]["massive"]


def test_html_self_contained(planted_report):
    _, out = planted_report
    html = (out / "report.html").read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert html.index('class="summary"') < html.index("<h2>")
    assert html.count("data:image/png;base64,") >= 8


def test_outlier_features_thresholds():
    x = torch.zeros(100, 8)
    x[:6, 2] = 7.0              # 6% of positions: counts
    x[:5, 5] = 7.0              # 5%: does not
    x[:, 6] = 5.9               # below the magnitude everywhere
    quiet = torch.zeros(100, 8)
    layers = [{"a": x, "b": quiet}] + [{"a": quiet, "b": x}] + [{"a": quiet, "b": quiet}] * 6
    result = outlier_features(layers, FeatureConfig())           # dim 2 in 2 of 8 layers = 25%
    assert [f["dim"] for f in result["features"]] == [2]
    assert outlier_features(layers, FeatureConfig(min_layers=0.3))["features"] == []


def test_massive_ratio_is_to_the_hidden_states_median():
    h = torch.ones(1, 4, 10) * 0.1
    h[0, 0, 3] = 150.0          # 1500 x median: massive
    h[0, 1, 4] = 90.0           # large ratio but under 100
    h2 = torch.ones(1, 4, 10)
    h2[0, 0, 3] = 150.0         # over 100 but only 150 x median
    result = massive_activations([h, h2], [["a", "b", "c", "d"]], MassiveConfig())
    assert [(d["dim"], d["layers"], d["positions"]) for d in result["dims"]] == [(3, [0], [0])]


def test_effective_levels_formula():
    absmax = torch.tensor([100.0, 1.0, 0.5])
    share = torch.tensor([2.0, 1.0, 0.5])                          # sums over 2 tokens
    lv = effective_levels(absmax, share, tokens=2, bits=8)
    assert torch.allclose(lv["per_tensor"], torch.tensor([256.0, 2.56, 1.28]))
    assert torch.allclose(lv["per_token"], torch.tensor([256.0, 128.0, 64.0]))


def test_super_weight_needs_one_dominant_product():
    h_before = torch.zeros(1, 2, 4)
    h = torch.zeros(1, 2, 4) + 0.01
    h[0, 0, 1] = 500.0                                              # created in layer 0 at token 0, dim 1
    W = torch.full((4, 3), 0.01)
    W[1, 2] = 5.0
    out = torch.zeros(2, 4)
    out[0, 1] = 500.0
    down = DownStats(in_val=torch.tensor([100.0, 1.0]), in_arg=torch.tensor([2, 0]), out=out)
    found, rejected = find_super_weights([down], [h], h_before, [W], [["<s>", "x"]], MassiveConfig(),
                                         SuperWeightConfig())
    assert [(c.layer, c.row, c.col) for c in found] == [(0, 1, 2)] and rejected == []
    W[1, 2] = 1.0                                                   # x_k * W explains only 20% of y_j
    found, rejected = find_super_weights([down], [h], h_before, [W], [["<s>", "x"]], MassiveConfig(),
                                         SuperWeightConfig())
    assert found == [] and len(rejected) == 1


def test_weight_stats_locate_the_outlier():
    torch.manual_seed(0)
    W = torch.randn(32, 64) * 0.02
    W[5, 17] = 1.0
    stats = linear_stats(W, WeightConfig())
    assert stats["absmax_at"] == {"row": 5, "col": 17} and stats["absmax_over_std"] > 20
    assert stats["rtn_rel_error"]["int3-g64-sym"] > stats["rtn_rel_error"]["int4-g64-sym"] > \
        stats["rtn_rel_error"]["int8-ch-sym"]
