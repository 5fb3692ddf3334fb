import numpy as np
import pytest
import torch
from conftest import spec

from bne.model import DGNet
from bne.stats import instance_stats, population_stats, precise_running_stats, running_stats, stats_table


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_instance_stats_match_float64_reference(layout):
    x = (torch.randn(3, 4, 7, 5) * 4 + 10).contiguous(memory_format=layout)  # both code paths
    mean, std = instance_stats(x)
    xd = x.double()
    torch.testing.assert_close(mean.double(), xd.mean((2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std.double(), xd.std((2, 3), correction=0), rtol=1e-4, atol=1e-4)


def test_the_network_runs_channels_last_whatever_the_input_layout():
    model, seen = _tiny(), []
    h = model.norm_layers()[5].register_forward_pre_hook(lambda m, inp: seen.append(inp[0].is_contiguous(memory_format=torch.channels_last)))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a = model(x, domains=0)
        b = model(x.contiguous(memory_format=torch.channels_last), domains=0)
    h.remove()
    assert seen == [True, True]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _tiny():
    torch.manual_seed(0)
    return DGNet(spec(backbone="resnet18", weights="none", num_classes=7, domains=("a", "b"), norm="bn", bn_momentum=0.1)).eval()


def test_population_stats_are_exact_over_all_images():
    model = _tiny()
    data = [torch.rand(5, 3, 32, 32), torch.rand(7, 3, 32, 32) * 0.5]
    captured = {0: [], 1: []}
    layer = model.norm_layers()[3]
    for d, x in enumerate(data):  # reference: the layer's inputs, all at once, float64
        h = layer.register_forward_pre_hook(lambda m, inp, d=d: captured[d].append(inp[0].double()))
        with torch.no_grad():
            model(x, domains=d)
        h.remove()
    batches = [(d, x.split(2)) for d, x in enumerate(data)]  # uneven batches
    pop, inst = population_stats(model, batches)
    for d in (0, 1):
        a = captured[d][0]
        np.testing.assert_allclose(pop.mean[3][d], a.mean((0, 2, 3)).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(pop.var[3][d], a.var((0, 2, 3), correction=0).numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.sqrt(inst.var[3][d]), a.std((2, 3), correction=0).mean(0).numpy(), rtol=1e-4, atol=1e-6)
        assert pop.count[3][d] == a.shape[0] * a.shape[2] * a.shape[3]


def test_population_stats_need_every_domain():
    model = _tiny()
    with pytest.raises(ValueError, match=r"missing indices \[1\]"):
        population_stats(model, [(0, [torch.rand(2, 3, 32, 32)])])


def test_stats_table_is_long_format():
    model = _tiny()
    st = running_stats(model.norm_layers())
    t = stats_table([st], ["a", "b"], dataset="syn", held_out="c")
    n = 2 * sum(layer.num_features for layer in model.norm_layers())
    assert all(len(v) == n for v in t.values())
    assert set(t["kind"]) == {"running"} and set(t["domain"]) == {"a", "b"} and t["held_out"][0] == "c"


def test_precise_running_stats_average_the_batch_statistics():
    model = _tiny()
    layer = model.norm_layers()[0]  # the stem BN sees the images' conv output: batch statistics are direct
    batches = [torch.rand(4, 3, 32, 32) for _ in range(3)]
    ref_mean, ref_var = [], []
    for x in batches:
        h = layer.register_forward_pre_hook(lambda m, inp: ref_mean.append(inp[0].mean((0, 2, 3))) or ref_var.append(inp[0].var((0, 2, 3))))
        with torch.no_grad():
            model(x, domains=1)
        h.remove()
    other = model.norm_layers()[5].running_mean[0].clone()
    precise_running_stats(model, [(1, batches)])
    torch.testing.assert_close(layer.running_mean[1], torch.stack(ref_mean).mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.running_var[1], torch.stack(ref_var).mean(0), rtol=1e-4, atol=1e-5)
    assert torch.equal(model.norm_layers()[5].running_mean[0], other)  # domain 0 untouched
    assert not model.training and layer.momentum == 0.1


def test_stats_parquet_round_trip_and_cli(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from bne.stats import pairwise_w2, read_stats_table
    from tasks.cli import app

    model = _tiny()
    with torch.no_grad():
        model.norm_layers()[0].running_mean[1] += 2.0  # domain b differs from a
    st = running_stats(model.norm_layers())
    table = pa.table(stats_table([st], ["a", "b"], dataset="syn", held_out="c")).replace_schema_metadata({"norm": "bn"})
    pq.write_table(table, tmp_path / "stats.parquet")
    meta, kinds, domains = read_stats_table(str(tmp_path / "stats.parquet"), stage="stats")
    assert meta == {"norm": "bn"} and domains == ["a", "b"] and list(kinds) == ["running"]
    back = kinds["running"]
    for i in range(len(st.mean)):
        np.testing.assert_allclose(back.mean[i], st.mean[i])
        np.testing.assert_allclose(back.var[i], st.var[i])
    w2 = pairwise_w2(back)
    assert w2[0, 0] == 0 and w2[0, 1] == pytest.approx(w2[1, 0]) and w2[0, 1] > 0
    res = CliRunner().invoke(app, ["stats", "show", str(tmp_path / "stats.parquet")])
    assert res.exit_code == 0 and "pairwise W2" in res.output, res.output
    assert CliRunner().invoke(app, ["stats", "show", str(tmp_path / "missing.parquet")]).exit_code == 1
